"""Weak-to-strong generalization on binary classification, in one file.

Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision"
(arXiv:2312.09390); official code: openai/weak-to-strong (train_weak_to_strong.py and
weak_to_strong/{datasets,model,train,loss}.py). For each seed, one run does:

    1. split the train set 50/50 into half 1 and half 2
    2. weak model      <- fine-tune the weak LM on half 1 with ground truth (xent)
    3. weak labels     <- the weak model's soft predictions on half 2 (saved as a dataset)
    4. strong ceiling  <- fine-tune the strong LM on half 2 with ground truth
    5. weak-to-strong  <- fine-tune the strong LM on half 2 with the weak labels, once per loss
                          (xent, logconf, product)
    report: test accuracy of each, PGR = (w2s - weak) / (strong ceiling - weak), and the test-set
    agreement of each strong student with its weak teacher.

Every model is a causal LM whose hidden state at the last real token feeds a zero-initialised
2-class linear head without bias. Stages are cached under --output_dir (keyed by their settings)
and skipped on rerun unless --force_retrain.

Offline (tiny setting, CPU, about 1 min a seed): sentiment with negations (tiny/cls.py); the weak model is
a 1-layer Qwen2 (hidden 8: a bag of words, blind to negation), the strong one a 2-layer Qwen2 (hidden 32),
both built from configs. Measured over 3 seeds: weak 0.78 +- 0.01, strong ceiling 0.98 +- 0.02, weak-to-
strong 0.78-0.79 for every loss (PGR -0.03 to 0.02): students trained from scratch hold no latent
knowledge to elicit, so they copy their teacher (agreement 0.90-0.94).
    python -m tiny --out data/tiny --no_images
    OMP_NUM_THREADS=1 python weak_to_strong_cls.py --preset tiny   # one thread: tiny matrices on a busy CPU
    python weak_to_strong_cls.py --preset tiny --n_seeds 3         # seed 0 comes from the cache

Published setting (e.g. gpt2 -> gpt2-xl on sciq, 3 seeds; any GPU count):
    accelerate launch weak_to_strong_cls.py --ds_name sciq --weak_model_name_or_path gpt2 \\
        --strong_model_name_or_path gpt2-xl --losses xent logconf --n_seeds 3
"""

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, load_dataset, load_from_disk
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 0
    """seed of the first run (data formatting, 50/50 split, data order, model init)"""
    n_seeds: int = 1
    """runs with seeds seed, seed+1, ...; the report gives mean +- std over them"""
    preset: Literal["paper", "tiny"] = "paper"
    """`tiny`: the offline setting (data/tiny, tiny Qwen2 models from configs); explicit flags still win"""
    output_dir: str = "output/weak_to_strong_cls"
    """stages (models, weak labels, predictions), results.json and results.png go here"""
    force_retrain: bool = False
    """retrain every stage even when its results are cached in output_dir"""
    save_models: bool = True
    """save each trained model (safetensors) in its stage folder"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project_name: str = "weak_to_strong"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""

    # data
    ds_name: str = "sciq"
    """sciq, amazon_polarity, boolq, anthropic_hh, cosmos_qa, or a local folder/file with `text` and 0/1 `label` columns"""
    n_docs: int = 10000
    """training documents taken (before the 50/50 split)"""
    n_test_docs: int = 200
    """test documents taken"""
    max_ctx: int = 1024
    """examples of max_ctx tokens or more are dropped (and counted)"""

    # models: a hub id or local path (pretrained), or a model type + config overrides (from scratch, as run_clm.py)
    weak_model_name_or_path: str | None = "gpt2"
    """weak model: hub id or local path of a causal LM (None to build it from --weak_model_type)"""
    weak_model_type: str | None = None
    """weak model built from scratch: a transformers model type, e.g. qwen2, gpt2, llama"""
    weak_config_overrides: str | None = None
    """weak model from scratch: config overrides, e.g. "hidden_size=32,num_hidden_layers=1" """
    strong_model_name_or_path: str | None = "gpt2-xl"
    """strong model: hub id or local path of a causal LM (None to build it from --strong_model_type)"""
    strong_model_type: str | None = None
    """strong model built from scratch: a transformers model type"""
    strong_config_overrides: str | None = None
    """strong model from scratch: config overrides"""
    tokenizer_name: str | None = None
    """tokenizer of both models (hub id or path); default: each model's own"""
    trust_remote_code: bool = False
    """allow models and tokenizers that ship their own code (e.g. Qwen/Qwen-7B)"""
    linear_probe: bool = False
    """freeze the LM body and train only the linear head"""

    # optimization (openai/weak-to-strong defaults)
    batch_size: int = 32
    """global batch size per optimizer step (the published learning rates were tuned at 32)"""
    gradient_accumulation_steps: int = 1
    """micro batches accumulated per optimizer step"""
    eval_batch_size: int = 32
    """batch size per device for predictions"""
    weak_lr: float | None = None
    """weak model lr; default: published per-model lr (5e-5 for gpt2 and gpt2-medium, 1e-5 for larger)"""
    strong_lr: float | None = None
    """strong ceiling lr; default: published per-model lr"""
    transfer_lr: float | None = None
    """weak-to-strong lr; default: strong_lr"""
    gt_epochs: int = 2
    """epochs on ground truth (weak model and strong ceiling)"""
    transfer_epochs: int | None = None
    """epochs on weak labels; default: gt_epochs"""

    # algorithm
    losses: tuple[Literal["xent", "logconf", "product"], ...] = ("xent", "logconf")
    """weak-to-strong losses; one strong student is trained per loss"""
    logconf_aux_coef: float = 0.5
    """logconf: weight of the hardened strong prediction in the target"""
    logconf_warmup_frac: float = 0.1
    """logconf: fraction of training during which the weight ramps up"""
    product_alpha: float = 1.0
    """product: exponent of the weak label"""
    product_beta: float = 1.0
    """product: exponent of the strong prediction"""

    # filled in at runtime
    micro_batch_size: tyro.conf.Suppress[int] = 0
    """batch_size / (gradient_accumulation_steps x num_processes)"""
    run_name: tyro.conf.Suppress[str] = ""
    """name of the wandb run"""


TINY_PRESET = dict(  # the offline setting written by `python -m tiny --out data/tiny --no_images`
    ds_name="data/tiny/cls",
    n_docs=8000,
    n_test_docs=400,
    max_ctx=64,
    tokenizer_name="data/tiny/tokenizer",
    weak_model_name_or_path=None,
    weak_model_type="qwen2",
    weak_config_overrides="hidden_size=8,intermediate_size=16,num_hidden_layers=1,num_attention_heads=1,"
    "num_key_value_heads=1,max_position_embeddings=64",
    strong_model_name_or_path=None,
    strong_model_type="qwen2",
    strong_config_overrides="hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=4,"
    "num_key_value_heads=4,max_position_embeddings=64",
    weak_lr=3e-3,
    strong_lr=1e-3,
    gt_epochs=8,  # the 2-layer student needs ~1000 steps to learn negation from scratch
    eval_batch_size=128,
    losses=("xent", "logconf", "product"),
    output_dir="output/weak_to_strong_cls_tiny",
)


# --------------------------------------------------------------------------------------------
# data: OpenAI's formatting (weak_to_strong/datasets.py); every formatter returns text and a 0/1 label
def format_amazon_polarity(ex, rng):
    return {"text": f"{ex['title']} {ex['content']}", "label": ex["label"]}


def format_sciq(ex, rng):
    label = int(rng.random() < 0.5)  # the correct answer or a random distractor, by coin flip
    answer = ex["correct_answer"] if label else rng.choice([ex["distractor1"], ex["distractor2"], ex["distractor3"]])
    return {"text": f"Q: {ex['question']} A: {answer}", "label": label}


def format_anthropic_hh(ex, rng):
    label = int(rng.random() < 0.5)  # the chosen or the rejected conversation, by coin flip
    return {"text": ex["chosen"] if label else ex["rejected"], "label": label}


def format_cosmos_qa(ex, rng):
    true_answer = ex[f"answer{ex['label']}"]
    # a true answer "None of the above choices ." is never shown as correct (official formatter)
    label = 0 if "None of the above choices ." in true_answer else int(rng.random() < 0.5)
    wrong = [ex[f"answer{i}"] for i in range(4) if ex[f"answer{i}"] != true_answer]
    answer = true_answer if label else rng.choice(wrong)
    return {"text": f"Context: {ex['context']}\nQuestion: {ex['question']}\nAnswer: {answer}", "label": label}


def format_boolq(ex, rng):
    return {"text": f"Passage: {ex['passage']}\nQuestion: {ex['question']}", "label": int(ex["answer"])}


def format_local(ex, rng):
    return {"text": ex["text"], "label": ex["label"]}


HUB_DATASETS = {  # name: (hub id, split used as test, formatter)
    "amazon_polarity": ("fancyzhx/amazon_polarity", "test", format_amazon_polarity),
    "sciq": ("allenai/sciq", "test", format_sciq),
    "anthropic_hh": ("Anthropic/hh-rlhf", "test", format_anthropic_hh),
    "cosmos_qa": ("allenai/cosmos_qa", "validation", format_cosmos_qa),
    "boolq": ("google/boolq", "validation", format_boolq),
}
HUB_DATASETS["Anthropic/hh-rlhf"] = HUB_DATASETS["anthropic_hh"]


def load_cls_dataset(ds_name: str, n_docs: int, n_test_docs: int, seed: int) -> dict[str, Dataset]:
    """Train and test splits with columns text, label (0/1), idx: the first n docs of each split,
    formatted with a seeded rng, then shuffled (the official order)."""
    if ds_name in HUB_DATASETS:
        hub_id, test_split, fmt = HUB_DATASETS[ds_name]
        try:
            raw = {"train": load_dataset(hub_id, split="train"), "test": load_dataset(hub_id, split=test_split)}
        except Exception as e:  # offline, gated, renamed...: say which dataset and what to do instead
            raise ValueError(f"could not load {hub_id} from the hub ({type(e).__name__}: {e}); offline, pass a local "
                             "dataset with --ds_name, or write the tiny setting (python -m tiny --out data/tiny "
                             "--no_images) and use --preset tiny") from e
    elif os.path.exists(ds_name):
        fmt = format_local
        if os.path.isdir(ds_name):
            raw = load_dataset(ds_name)
        else:
            ext = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}.get(ds_name.rsplit(".", 1)[-1])
            if ext is None:
                raise ValueError(f"--ds_name {ds_name}: unknown file type; use a .jsonl, .json, .csv or .parquet file")
            raw = load_dataset(ext, data_files=ds_name)
        columns = raw["train"].column_names if "train" in raw else []
        if "text" not in columns or "label" not in columns:
            raise ValueError(f"--ds_name {ds_name} needs a `train` split with `text` and 0/1 `label` columns; "
                             f"it has splits {list(raw)} and columns {columns}. Rename them first.")
        if "test" not in raw:  # a single file: the same n_test_docs rows are the test set for every seed
            if len(raw["train"]) < 2 * n_test_docs:
                raise ValueError(f"--ds_name {ds_name} has {len(raw['train'])} rows and no test split: too few to "
                                 f"hold out --n_test_docs {n_test_docs} and train on at least as many; lower --n_test_docs")
            raw = raw["train"].train_test_split(test_size=n_test_docs, seed=0)
    else:
        raise ValueError(f"--ds_name {ds_name} is neither one of {sorted(HUB_DATASETS)} nor a local path (for the "
                         "offline setting run `python -m tiny --out data/tiny --no_images` first)")
    out = {}
    for split, n in (("train", n_docs), ("test", n_test_docs)):
        rng = random.Random(seed)
        rows = [fmt(ex, rng) for ex in raw[split].select(range(min(n, len(raw[split]))))]
        for i, row in enumerate(rows):
            if row["label"] not in (0, 1):  # 0/1 as int, bool or float
                raise ValueError(f"{ds_name} {split} row {i}: label {row['label']!r} is not 0 or 1; "
                                 "this is binary classification, map your classes to the integers 0 and 1 first")
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise ValueError(f"{ds_name} {split} row {i}: empty text; drop or fill the empty rows first")
        columns = {"text": [r["text"] for r in rows], "label": [int(r["label"]) for r in rows]}
        out[split] = Dataset.from_dict({**columns, "idx": list(range(len(rows)))}).shuffle(seed=seed)
    return out


def split_halves(train: Dataset, seed: int, batch_size: int) -> tuple[Dataset, Dataset]:
    """The 50/50 split: half 1 trains the weak model, half 2 is labelled by it (official train_weak_to_strong.py)."""
    if len(train) < 2 * batch_size:
        raise ValueError(f"the train split has {len(train)} examples: too few to split 50/50 into halves of at least "
                         f"one batch ({batch_size}); raise --n_docs, use a bigger dataset or lower --batch_size")
    halves = train.train_test_split(test_size=0.5, seed=seed)
    return halves["train"], halves["test"]


def tokenize(ds: Dataset, tokenizer, max_ctx: int) -> tuple[list[dict], int]:
    """Token ids and soft labels [p(0), p(1)]; drops examples of max_ctx tokens or more (returns how many)."""
    cols = ds.to_dict()
    ids = tokenizer(cols["text"])["input_ids"]
    soft = cols["soft_label"] if "soft_label" in cols else [[1.0 - y, float(y)] for y in cols["label"]]
    rows = [dict(input_ids=x, soft_label=s, label=y, idx=i, text=t)
            for x, s, y, i, t in zip(ids, soft, cols["label"], cols["idx"], cols["text"]) if 0 < len(x) < max_ctx]
    return rows, len(ds) - len(rows)


def collate(tokenizer, rows: list[dict]) -> dict:
    """Pad on the tokenizer's side; the attention mask, not the pad id, marks the real tokens."""
    length = max(len(r["input_ids"]) for r in rows)
    left = tokenizer.padding_side == "left"
    ids, mask = [], []
    for r in rows:
        n, pad = len(r["input_ids"]), [tokenizer.pad_token_id] * (length - len(r["input_ids"]))
        ids.append(pad + r["input_ids"] if left else r["input_ids"] + pad)
        mask.append([0] * len(pad) + [1] * n if left else [1] * n + [0] * len(pad))
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "soft_label": torch.tensor([r["soft_label"] for r in rows], dtype=torch.float32)}


# --------------------------------------------------------------------------------------------
# model: causal LM body + linear head on the last real token (official weak_to_strong/model.py)
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token of each row, from the mask alone: right or left padding alike
    (the official code counts `input_ids != 0`, which breaks when the pad id is a real token)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


class CausalLMWithHead(torch.nn.Module):
    def __init__(self, body: torch.nn.Module, linear_probe: bool):
        super().__init__()
        self.body = body
        # ALGO LOGIC: 2-class head, no bias, zero init (model.py: TransformerWithHead)
        self.score = torch.nn.Linear(body.config.hidden_size, 2, bias=False)
        torch.nn.init.zeros_(self.score.weight)
        if linear_probe:  # a frozen body: only the head learns (model.py detaches the hidden states)
            self.body.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # positions count real tokens only, so left and right padding give the same logits
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        hidden = out.last_hidden_state
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(attention_mask)]
        return self.score(last.to(self.score.weight.dtype))


def build_model(spec: dict, args: Args) -> tuple:
    """Tokenizer and CausalLMWithHead from a hub id / local path, or from scratch (run_clm.py's
    --model_type + --config_overrides)."""
    remote = args.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"] or spec["name_or_path"], trust_remote_code=remote)
    if tokenizer.pad_token is None:  # GPT-2 has none; which id pads does not matter, the mask marks padding
        tokenizer.pad_token = tokenizer.eos_token
    if spec["name_or_path"] is not None:  # float32 weights: mixed precision comes from the accelerate config
        lm = AutoModelForCausalLM.from_pretrained(spec["name_or_path"], dtype=torch.float32, trust_remote_code=remote)
    else:
        overrides = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        if spec["config_overrides"]:  # parsed and type-checked as in run_clm.py, then passed to the constructor
            parsed = AutoConfig.for_model(spec["model_type"])  # so that derived fields (layer_types) follow
            parsed.update_from_string(spec["config_overrides"])
            keys = [kv.split("=")[0] for kv in spec["config_overrides"].split(",")]
            overrides |= {k: getattr(parsed, k) for k in keys}
        config = AutoConfig.for_model(spec["model_type"], **overrides)
        lm = AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    return tokenizer, CausalLMWithHead(lm.base_model, args.linear_probe)  # the LM head is dropped


PUBLISHED_LR = {"gpt2": 5e-5, "gpt2-medium": 5e-5}  # train_weak_to_strong.py MODEL_CONFIGS; larger models: 1e-5


def published_lr(flag: str, name_or_path: str | None, batch_size: int) -> float:
    if name_or_path is None:
        raise ValueError(f"a model built from scratch has no published learning rate: set --{flag}")
    if batch_size != 32:
        raise ValueError(f"the published learning rates were tuned at --batch_size 32, not {batch_size}: set --{flag}")
    return PUBLISHED_LR.get(name_or_path.rstrip("/").split("/")[-1], 1e-5)


# --------------------------------------------------------------------------------------------
# ALGO LOGIC: the losses of openai/weak-to-strong weak_to_strong/loss.py. `labels` are soft labels
# [p(0), p(1)] (one-hot for ground truth); `step_frac` = optimizer steps done / total steps.
def xent_loss(logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
    """Cross-entropy against the (soft) labels (loss.py: xent_loss)."""
    return F.cross_entropy(logits.float(), labels.float())


def product_loss(logits, labels, step_frac, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Cross-entropy against target ~ pred^beta * label^alpha, renormalised, detached (loss.py: product_loss_fn)."""
    logits, labels = logits.float(), labels.float()
    target = torch.softmax(logits, dim=-1).pow(beta) * labels.pow(alpha)
    target = (target / target.sum(dim=-1, keepdim=True)).detach()
    return F.cross_entropy(logits, target)


def logconf_loss(logits, labels, step_frac, aux_coef: float = 0.5, warmup_frac: float = 0.1) -> torch.Tensor:
    """Auxiliary confidence loss (loss.py: logconf_loss_fn): target = (1 - c) * weak + c * hardened
    strong prediction."""
    logits, labels = logits.float(), labels.float()
    # c = aux_coef * step_frac during warm-up, aux_coef after (the official ramp, not step_frac / warmup_frac)
    coef = aux_coef * (1.0 if step_frac > warmup_frac else step_frac)
    preds = torch.softmax(logits, dim=-1)
    # harden at the batch quantile of p(0) that gives the strong predictions the weak labels' class balance
    threshold = torch.quantile(preds[:, 0], labels.mean(dim=0)[1])
    strong_preds = torch.stack([preds[:, 0] >= threshold, preds[:, 0] < threshold], dim=1).float()
    target = labels * (1 - coef) + strong_preds.detach() * coef
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------------
# training and evaluation (official weak_to_strong/train.py, with accelerate)
def train(model, rows, tokenizer, loss_fn, lr, epochs, seed, args, accelerator, log_prefix, tracker):
    """Adam without weight decay, cosine to 0 without warm-up, dropout off; the losses see one
    micro batch (logconf's quantile too: it is the official full-batch quantile when the micro batch
    is the whole batch, as by default on one device)."""
    n_steps = len(rows) * epochs // args.batch_size  # official: a stream of epochs x rows cut into full batches
    if n_steps == 0:
        raise ValueError(f"{log_prefix}: {len(rows)} training examples x {epochs} epochs make no full batch of "
                         f"{args.batch_size}; raise --n_docs or lower --batch_size")
    g = torch.Generator().manual_seed(seed)  # the same order on every process
    order = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(epochs)])[: n_steps * args.batch_size]
    # TRY NOT TO MODIFY: batch_size = micro_batch_size x gradient_accumulation_steps x num_processes; every
    # optimizer step consumes batch_size consecutive rows of `order`
    loader = DataLoader([rows[i] for i in order], args.micro_batch_size, collate_fn=partial(collate, tokenizer))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.eval()  # dropout off during training, as the official default (train_with_dropout=False)
    step, loss_sum, acc_sum = 0, 0.0, 0.0
    bar = tqdm(total=n_steps, desc=log_prefix, disable=not accelerator.is_main_process)
    for batch in loader:
        with accelerator.accumulate(model):
            logits = model(batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(logits, batch["soft_label"], step_frac=step / n_steps)
            accelerator.backward(loss)  # divided by gradient_accumulation_steps inside
            optimizer.step()  # only acts on the last micro batch of a step
            optimizer.zero_grad()
        loss_sum += loss.detach() / args.gradient_accumulation_steps
        acc = (logits.argmax(-1) == batch["soft_label"].argmax(-1)).float().mean()
        acc_sum += acc / args.gradient_accumulation_steps
        if accelerator.sync_gradients:  # one optimizer step done
            loss_step, acc_step = accelerator.gather(loss_sum).mean().item(), accelerator.gather(acc_sum).mean().item()
            if tracker is not None:
                tracker.log({f"{log_prefix}/train/loss": loss_step, f"{log_prefix}/train/acc": acc_step,
                             f"{log_prefix}/train/lr": scheduler.get_last_lr()[0]})
            scheduler.step()
            step, loss_sum, acc_sum = step + 1, 0.0, 0.0
            bar.update()
            bar.set_postfix(loss=f"{loss_step:.3f}", acc=f"{acc_step:.2f}")
    bar.close()
    return model


@torch.no_grad()
def predict(model, rows, tokenizer, args, accelerator) -> torch.Tensor:
    """Class probabilities of `rows`, in order, gathered from every process."""
    loader = DataLoader(rows, args.eval_batch_size, collate_fn=partial(collate, tokenizer))
    model.eval()
    probs = []
    for batch in accelerator.prepare_data_loader(loader):
        logits = model(batch["input_ids"], batch["attention_mask"])
        probs.append(accelerator.gather_for_metrics(torch.softmax(logits.float(), dim=-1)))  # drops the padding rows
    return torch.cat(probs).cpu()


def accuracy(probs: torch.Tensor, rows: list[dict]) -> float:
    return (probs.argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean().item()


def run_stage(name, spec, train_ds, loss_name, loss_fn, lr, epochs, *, test_ds, seed, args, accelerator, tracker,
              cache_key: dict, label_ds: Dataset | None = None) -> dict:
    """Train one model on train_ds and predict the test set (and weak labels on label_ds), or reuse
    the stage's cached results. Writes results.json last: its presence marks a finished stage."""
    key = json.dumps({**cache_key, "model": spec, "loss": loss_name, "lr": lr, "epochs": epochs}, sort_keys=True)
    out = Path(args.output_dir) / f"seed_{seed}" / f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (out / "results.json").exists() and not args.force_retrain:
        accelerator.print(f"[seed {seed}] {name}: cached in {out}, skipped (--force_retrain to retrain)")
        return json.loads((out / "results.json").read_text())
    set_seed(seed, device_specific=True)  # per-rank seed; DDP broadcasts rank 0's initial weights
    tokenizer, model = build_model(spec, args)
    train_rows, dropped_train = tokenize(train_ds, tokenizer, args.max_ctx)
    test_rows, dropped_test = tokenize(test_ds, tokenizer, args.max_ctx)
    start = time.time()
    model = train(model, train_rows, tokenizer, loss_fn, lr, epochs, seed, args, accelerator, f"seed{seed}/{name}",
                  tracker)
    test_probs = predict(model, test_rows, tokenizer, args, accelerator)
    results = {"stage": name, "dir": str(out), "test_acc": accuracy(test_probs, test_rows),
               "train_time_s": time.time() - start, "n_train": len(train_rows), "n_test": len(test_rows),
               "n_dropped_long": {"train": dropped_train, "test": dropped_test}}
    if label_ds is not None:  # weak labels: the weak model's soft predictions on half 2
        label_rows, results["n_dropped_long"]["labelled"] = tokenize(label_ds, tokenizer, args.max_ctx)
        label_probs = predict(model, label_rows, tokenizer, args, accelerator)
        results["weak_label_acc"] = accuracy(label_probs, label_rows)
    state_dict = accelerator.get_state_dict(model) if args.save_models else None  # every rank: ZeRO-3 gathers
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        test_idx = torch.tensor([r["idx"] for r in test_rows])
        save_file({"idx": test_idx, "probs": test_probs}, out / "test_predictions.safetensors")
        if label_ds is not None:
            columns = {k: [r[k] for r in label_rows] for k in ("text", "label", "idx")}
            Dataset.from_dict({**columns, "soft_label": label_probs.tolist()}).save_to_disk(out / "weak_labels")
        if args.save_models:
            body = {k.removeprefix("body."): v for k, v in state_dict.items() if k.startswith("body.")}
            accelerator.unwrap_model(model).body.save_pretrained(out / "model", state_dict=body)
            save_file({"weight": state_dict["score.weight"].contiguous()}, out / "model" / "score.safetensors")
            tokenizer.save_pretrained(out / "model")
        (out / "settings.json").write_text(key)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.print(f"[seed {seed}] {name}: test acc {results['test_acc']:.4f} ({results['train_time_s']:.0f}s)")
    return results


def agreement(dir_a: str, dir_b: str) -> float:
    """Share of the test examples (kept by both models) where two stages predict the same class."""
    a, b = (load_file(Path(d) / "test_predictions.safetensors") for d in (dir_a, dir_b))
    pred_a = dict(zip(a["idx"].tolist(), a["probs"].argmax(-1).tolist()))
    pred_b = dict(zip(b["idx"].tolist(), b["probs"].argmax(-1).tolist()))
    common = pred_a.keys() & pred_b.keys()
    return float(np.mean([pred_a[i] == pred_b[i] for i in common]))


def plot(summary: dict, losses: tuple, path: Path, title: str) -> None:
    keys = ["weak_acc", "strong_acc"] + [f"transfer_acc_{loss}" for loss in losses]
    names = ["weak", "strong ceiling"] + [f"w2s {loss}" for loss in losses]
    means, stds = [summary["mean"][k] for k in keys], [summary["std"][k] for k in keys]
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(keys), 4))
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=["tab:gray", "tab:blue"] + ["tab:orange"] * len(losses))
    for bar, key, std in zip(bars, keys, stds):
        pgr = summary["mean"].get(key.replace("transfer_acc", "pgr"))
        text = f"{summary['mean'][key]:.3f}"
        if key.startswith("transfer") and pgr is not None:
            text += f"\nPGR {pgr:.2f}"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + std + 0.005, text, ha="center", va="bottom")
    ax.set_ylim(max(0.0, min(means) - 0.1), max(m + s for m, s in zip(means, stds)) + 0.08)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args, use_underscores=True)
    if args.preset == "tiny":  # parse again on top of the tiny defaults: flags given on the command line win
        args = tyro.cli(Args, use_underscores=True, default=dataclasses.replace(Args(), **TINY_PRESET))
    for side in ("weak", "strong"):
        path, model_type = getattr(args, f"{side}_model_name_or_path"), getattr(args, f"{side}_model_type")
        if (path is None) == (model_type is None):
            raise ValueError(f"give exactly one of --{side}_model_name_or_path (pretrained) and --{side}_model_type "
                             f"(from scratch); to build from scratch pass --{side}_model_name_or_path None")
        if model_type is not None and args.tokenizer_name is None:
            raise ValueError(f"--{side}_model_type builds a model from scratch: give a tokenizer with --tokenizer_name")
        if path is not None and getattr(args, f"{side}_config_overrides"):
            raise ValueError(f"--{side}_config_overrides only applies to a model built from scratch "
                             f"(--{side}_model_type)")

    # filled in at runtime
    if args.weak_lr is None:
        args.weak_lr = published_lr("weak_lr", args.weak_model_name_or_path, args.batch_size)
    if args.strong_lr is None:
        args.strong_lr = published_lr("strong_lr", args.strong_model_name_or_path, args.batch_size)
    args.transfer_lr = args.strong_lr if args.transfer_lr is None else args.transfer_lr
    args.transfer_epochs = args.gt_epochs if args.transfer_epochs is None else args.transfer_epochs
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    args.micro_batch_size, rest = divmod(args.batch_size, args.gradient_accumulation_steps * accelerator.num_processes)
    if rest or args.micro_batch_size == 0:
        raise ValueError(f"--batch_size {args.batch_size} must be a multiple of --gradient_accumulation_steps "
                         f"{args.gradient_accumulation_steps} x {accelerator.num_processes} processes")
    args.run_name = f"{args.exp_name}__{Path(args.ds_name).name}__{args.seed}__{int(time.time())}"
    weak_spec, strong_spec = ({"name_or_path": getattr(args, f"{side}_model_name_or_path"),
                               "model_type": getattr(args, f"{side}_model_type"),
                               "config_overrides": getattr(args, f"{side}_config_overrides"),
                               "tokenizer": args.tokenizer_name} for side in ("weak", "strong"))
    loss_fns = {
        "xent": xent_loss,
        "logconf": partial(logconf_loss, aux_coef=args.logconf_aux_coef, warmup_frac=args.logconf_warmup_frac),
        "product": partial(product_loss, alpha=args.product_alpha, beta=args.product_beta),
    }
    loss_settings = {"xent": {},  # part of each student's cache key
                     "logconf": {"aux_coef": args.logconf_aux_coef, "warmup_frac": args.logconf_warmup_frac},
                     "product": {"alpha": args.product_alpha, "beta": args.product_beta}}
    tracker = None
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, config=vars(args),
                   save_code=True)
        tracker = wandb

    per_seed = {}
    for seed in range(args.seed, args.seed + args.n_seeds):
        ds = load_cls_dataset(args.ds_name, args.n_docs, args.n_test_docs, seed)
        half1, half2 = split_halves(ds["train"], seed, args.batch_size)
        accelerator.print(f"[seed {seed}] train halves {len(half1)} / {len(half2)}, test {len(ds['test'])}; "
                          f"batch {args.batch_size} = {args.micro_batch_size} x {args.gradient_accumulation_steps} "
                          f"accumulated x {accelerator.num_processes} processes")
        data_keys = ("ds_name", "n_docs", "n_test_docs", "max_ctx", "batch_size", "linear_probe")
        cache_key = {**{k: getattr(args, k) for k in data_keys}, "seed": seed}
        stage = partial(run_stage, test_ds=ds["test"], seed=seed, args=args, accelerator=accelerator, tracker=tracker,
                        cache_key=cache_key)
        # ALGO LOGIC: 1-2. weak model trained on half 1 with ground truth; its soft labels on half 2
        weak = stage("weak", weak_spec, half1, "xent", xent_loss, args.weak_lr, args.gt_epochs, label_ds=half2)
        weak_labels = load_from_disk(str(Path(weak["dir"]) / "weak_labels"))
        # ALGO LOGIC: 3. strong ceiling trained on half 2 with ground truth
        strong = stage("strong_ceiling", strong_spec, half2, "xent", xent_loss, args.strong_lr, args.gt_epochs)
        res = {"weak_acc": weak["test_acc"], "strong_acc": strong["test_acc"], "weak_label_acc": weak["weak_label_acc"]}
        # ALGO LOGIC: 4. strong student trained on half 2 with the weak soft labels, once per loss
        for loss in args.losses:
            w2s = stage(f"w2s_{loss}", {**strong_spec, "teacher": weak["dir"], **loss_settings[loss]}, weak_labels, loss,
                        loss_fns[loss], args.transfer_lr, args.transfer_epochs)
            res[f"transfer_acc_{loss}"] = w2s["test_acc"]
            # ALGO LOGIC: performance gap recovered (Burns et al. 2023, section 3)
            gap = strong["test_acc"] - weak["test_acc"]
            res[f"pgr_{loss}"] = (w2s["test_acc"] - weak["test_acc"]) / gap if gap != 0 else None
            res[f"agreement_{loss}"] = agreement(w2s["dir"], weak["dir"])  # student vs teacher, test set
        per_seed[seed] = res

    keys = list(next(iter(per_seed.values())))
    values = {k: [r[k] for r in per_seed.values() if r[k] is not None] for k in keys}
    summary = {"mean": {k: float(np.mean(v)) if v else None for k, v in values.items()},
               "std": {k: float(np.std(v)) if v else None for k, v in values.items()},
               "n_seeds": args.n_seeds, "per_seed": per_seed, "args": vars(args)}
    if accelerator.is_main_process:
        out = Path(args.output_dir)
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        weak_name = args.weak_model_name_or_path or f"{args.weak_model_type} (scratch)"
        strong_name = args.strong_model_name_or_path or f"{args.strong_model_type} (scratch)"
        title = f"{Path(args.ds_name).name}: {weak_name} -> {strong_name}, {args.n_seeds} seed(s)"
        plot(summary, args.losses, out / "results.png", title)
        print(f"\n{'metric':<24}{'mean':>8}{'std':>8}")
        for k in keys:
            if summary["mean"][k] is not None:
                print(f"{k:<24}{summary['mean'][k]:>8.4f}{summary['std'][k]:>8.4f}")
        print(f"wrote {out / 'results.json'} and {out / 'results.png'}")
        if tracker is not None:
            tracker.summary.update({f"eval/{k}": v for k, v in summary["mean"].items() if v is not None})
            tracker.log({"eval/results": tracker.Image(str(out / "results.png"))})
            tracker.finish()
