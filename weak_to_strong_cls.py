"""Weak-to-strong generalization on binary classification, in one file.

Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision"
(arXiv:2312.09390); official code: openai/weak-to-strong (train_weak_to_strong.py, weak_to_strong/{datasets,model,
train,loss}.py). For each seed, one run does:

    1. split the train set 50/50 into half 1 and half 2
    2. weak model      <- fine-tune the weak LM on half 1 with ground truth (xent)
    3. weak labels     <- the weak model's soft predictions on half 2 (saved as a dataset)
    4. strong ceiling  <- fine-tune the strong LM on half 2 with ground truth
    5. weak-to-strong  <- fine-tune the strong LM on half 2 with the weak labels, once per loss (xent, logconf, product)
    report: test accuracy of each, PGR = (w2s - weak) / (strong ceiling - weak) (undefined, null, when the ceiling
    is not above the weak model), and the test-set agreement of each strong student with its weak teacher.

Every model is a causal LM whose hidden state at the last real token feeds a zero-initialised 2-class linear head
without bias; stages are cached in --output_dir, keyed by their settings. The size sweep (figure 3) is w2s_sweep.py.

Losses (loss.py), with soft labels y and predictions p: xent = CE(p, y); product = CE(p, norm(p^beta y^alpha));
logconf = CE(p, (1 - c) y + c h), h = p hardened at the quantile of p(0) that gives h the weak labels' class
balance, c ramping to 0.5 over the first 10% of training. Every loss is a mean over the examples of the whole
optimizer step (micro batches hold equal numbers of examples), and logconf's quantile is taken over that whole
batch too (all micro batches, all processes), so any split of a batch gives the same step. Adam without weight
decay, cosine to 0, no warm-up, dropout off (the official train_with_dropout=False).

Settings: the YAML files in recipes/ (published: weak_to_strong/; offline: tiny/, --preset tiny), e.g.
    accelerate launch weak_to_strong_cls.py --config recipes/weak_to_strong/weak_to_strong_cls-sciq.yaml
"""

import argparse
import contextlib
import hashlib
import inspect
import json
import os
import random
import sys
import time
from dataclasses import dataclass, fields
from difflib import get_close_matches
from functools import partial
from pathlib import Path
from typing import Literal, NoReturn

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import Dataset, load_dataset, load_dataset_builder, load_from_disk
from huggingface_hub import constants
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
    """paper: the defaults; tiny: short for --config recipes/tiny/weak_to_strong_cls.yaml (the offline setting)"""
    config: str | None = None
    """YAML file of Args fields (the papers' settings are in recipes/); flags given on the command line override it"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # set after parsing; recorded in results.json
    output_dir: str = "output/weak_to_strong_cls"
    """stages (models, weak labels, predictions), results.json and results.png go here"""
    force_retrain: bool = False
    """retrain every stage even when its results are cached in output_dir"""
    overwrite_output_dir: bool = False
    """write into an output_dir that holds other files than this script's stages and results"""
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
    """sciq, amazon_polarity, boolq, anthropic_hh, cosmos_qa, or a local folder / file with `text`, 0/1 `label`"""
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
    """weak model lr; default: by model name (5e-5 for gpt2 and gpt2-medium, 1e-5 larger, DEFAULT_LR)"""
    strong_lr: float | None = None
    """strong ceiling lr; default: by model name, as --weak_lr"""
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


# fine-tuning lr per model name, at batch 32: train_weak_to_strong.py MODEL_CONFIGS (larger: 1e-5), tiny/cls.py
DEFAULT_LR = {"gpt2": 5e-5, "gpt2-medium": 5e-5, "tiny-s": 3e-3, "tiny-m": 3e-4, "tiny-l": 1e-4}


# --------------------------------------------------------------------------------------------
# data: OpenAI's formatting (weak_to_strong/datasets.py); every formatter returns text and a 0/1 label
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


HUB_DATASETS = {  # name: (hub id, split used as test, formatter)
    "amazon_polarity": ("fancyzhx/amazon_polarity", "test",
                        lambda ex, rng: {"text": f"{ex['title']} {ex['content']}", "label": ex["label"]}),
    "sciq": ("allenai/sciq", "test", format_sciq),
    "anthropic_hh": ("Anthropic/hh-rlhf", "test", format_anthropic_hh),
    "cosmos_qa": ("allenai/cosmos_qa", "validation", format_cosmos_qa),
    "boolq": ("google/boolq", "validation", lambda ex, rng: {
        "text": f"Passage: {ex['passage']}\nQuestion: {ex['question']}", "label": int(ex["answer"])}),
}
HUB_DATASETS["Anthropic/hh-rlhf"] = HUB_DATASETS["anthropic_hh"]


class DataError(ValueError):
    """Bad data, or an argument found wrong only once data or models are known: one message, exit code 2."""


def read_rows(file: str) -> list[tuple[dict, int]]:
    """The rows of one .jsonl/.json/.csv/.parquet file with their line number (a csv's header is line 1; the rows of
    a JSON array or a parquet file count from 1), in file order; a bad JSON line is named by file and line."""
    ext = file.rsplit(".", 1)[-1].lower()
    if ext not in ("jsonl", "json", "csv", "parquet"):
        raise DataError(f"{file}: unknown file type; use .jsonl, .json, .csv or .parquet files")
    rows = []
    if ext in ("jsonl", "json"):
        text = Path(file).read_text()
        array = ext == "json" and text.lstrip().startswith("[")  # a JSON array: one object per element
        for n, line in [(1, text)] if array else enumerate(text.splitlines(), 1):
            try:
                rows += [(json.loads(line), n)] if line.strip() else []
            except json.JSONDecodeError as e:
                shown = f"line {e.lineno}: not valid JSON ({e.msg})" if array else \
                    f"line {n}: not valid JSON ({e.msg}): {line[:80]!r}"
                raise DataError(f"{file} {shown}; fix or remove that line") from None
        rows = list(zip(rows[0][0], range(1, len(rows[0][0]) + 1))) if array else rows
    else:  # datasets reads a csv or parquet file with the column types it holds (csv.DictReader's are all strings)
        try:
            table = load_dataset(ext, data_files=file, split="train")
        except Exception as e:  # a csv with a header only, a broken file
            raise DataError(f"{file}: no rows could be read ({type(e).__name__}: {e})") from None
        rows = list(zip(table, range(2 if ext == "csv" else 1, len(table) + 2)))
    if not rows:
        raise DataError(f"{file} is empty: it holds no rows; write the examples one JSON object per line")
    for row, n in rows:
        if not isinstance(row, dict):
            raise DataError(f"{file} line {n}: a {type(row).__name__}, not an object with `text` and `label` fields")
    return rows


def read_local(path: str) -> dict[str, list[dict]]:
    """Rows of a local dataset per split, each with text, label and `where` ("FILE line N"), in file order. A single
    file is the `train` split; a folder resolves like `load_dataset(folder)` (its README's configs, or file names)."""
    try:
        split_files = {"train": [path]} if os.path.isfile(path) else {
            str(split): [str(f) for f in fs] for split, fs in load_dataset_builder(path).config.data_files.items()}
    except Exception as e:  # an empty folder, unknown file types
        raise DataError(f"{path}: no data files found ({type(e).__name__}: {e}); put train/test .jsonl in it") from e
    out = {split: [] for split in split_files}
    for split, files in split_files.items():
        for file in files:
            for row, n in read_rows(file):
                missing = [c for c in ("text", "label") if c not in row]
                if missing:
                    raise DataError(f"{file} line {n}: no {' / '.join(f'`{c}`' for c in missing)} field (it has "
                                    f"{sorted(row)}); --ds_name needs `text` and 0/1 `label` columns: rename them")
                out[split].append({"text": row["text"], "label": row["label"], "where": f"{file} line {n}"})
    return out


def load_cls_dataset(ds_name: str, n_docs: int, n_test_docs: int, seed: int) -> dict[str, Dataset]:
    """Train and test splits with columns text, label (0/1), idx: the first n docs of each split,
    formatted with a seeded rng, then shuffled (the official order). Bad local rows are named by file and line."""
    if ds_name in HUB_DATASETS:
        hub_id, test_split, fmt = HUB_DATASETS[ds_name]
        try:
            raw = {"train": load_dataset(hub_id, split="train"), "test": load_dataset(hub_id, split=test_split)}
        except Exception as e:  # offline, gated, renamed...: say which dataset and what to do instead
            raise DataError(f"could not load {hub_id} from the hub ({type(e).__name__}: {e}); offline, pass a local "
                            "dataset with --ds_name, or write the tiny setting (python -m tiny --out data/tiny "
                            "--no_images --models cls) and use --preset tiny") from None
        raw = {split: [{**fmt(ex, rng), "where": f"{hub_id} {split} row {i}"}
                       for i, ex in enumerate(raw[split].select(range(min(n, len(raw[split])))))]
               for split, n, rng in (("train", n_docs, random.Random(seed)),
                                     ("test", n_test_docs, random.Random(seed)))}
    elif os.path.exists(ds_name):
        raw = read_local(ds_name)
        if "train" not in raw:
            raise DataError(f"--ds_name {ds_name} has splits {sorted(raw)}, no `train`; name a file train.jsonl")
        if "test" not in raw:  # a single file: the same n_test_docs rows are the test set for every seed
            if len(raw["train"]) < 2 * n_test_docs:
                raise DataError(f"--ds_name {ds_name} has {len(raw['train'])} rows, no test split: too few to hold "
                                f"out --n_test_docs {n_test_docs} and train on as many; lower --n_test_docs")
            held_out = set(random.Random(0).sample(range(len(raw["train"])), n_test_docs))
            raw = {"train": [r for i, r in enumerate(raw["train"]) if i not in held_out],
                   "test": [r for i, r in enumerate(raw["train"]) if i in held_out]}
        raw = {"train": raw["train"][:n_docs], "test": raw["test"][:n_test_docs]}
    else:
        raise DataError(f"--ds_name {ds_name} is neither one of {sorted(HUB_DATASETS)} nor a local path (for the "
                        "offline setting run `python -m tiny --out data/tiny --no_images --models cls` first)")
    out = {}
    for split, rows in raw.items():
        for row in rows:  # checked in file order, before any shuffling; a label may be an int, a bool or 0.0 / 1.0
            if isinstance(row["label"], str) or row["label"] not in (0, 1):
                raise DataError(f"{row['where']}: label {row['label']!r} is not 0 or 1; this is binary "
                                "classification, map your classes to the integers 0 and 1 first")
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise DataError(f"{row['where']}: empty text; drop or fill the empty rows first")
        columns = {"text": [r["text"] for r in rows], "label": [int(r["label"]) for r in rows]}
        out[split] = Dataset.from_dict({**columns, "idx": list(range(len(rows)))}).shuffle(seed=seed)
    return out


def split_halves(train: Dataset, seed: int, batch_size: int) -> tuple[Dataset, Dataset]:
    """The 50/50 split: half 1 trains the weak model, half 2 is labelled by it (official train_weak_to_strong.py)."""
    if len(train) < 2 * batch_size:
        raise DataError(f"the train split has {len(train)} examples: too few to split 50/50 into halves of at least "
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
    batch = tokenizer.pad([{"input_ids": r["input_ids"]} for r in rows], return_tensors="pt")
    return {**batch, "soft_label": torch.tensor([r["soft_label"] for r in rows], dtype=torch.float32)}


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
        hidden = self.body(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        last = hidden[torch.arange(len(hidden), device=hidden.device), last_token_index(attention_mask)]
        return self.score(last.to(self.score.weight.dtype))


def build_model(spec: dict, args: Args, check: bool = False) -> tuple:
    """Tokenizer and CausalLMWithHead (the LM's body with a fresh head), from a hub id / local path, or from scratch
    (run_clm.py's --model_type + --config_overrides). check=True: the tokenizer and the config only, so that a model
    that cannot load is reported before any stage runs."""
    what, name = ("tokenizer", spec["tokenizer"]) if spec["tokenizer"] else ("model", spec["name_or_path"])
    try:  # what failed to load and why, with a hint that fits what was passed
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        if tokenizer.pad_token is None:  # GPT-2 has none; which id pads does not matter, the mask marks padding
            tokenizer.pad_token = tokenizer.eos_token
        what, name = "model", spec["name_or_path"]  # float32 weights: mixed precision comes from accelerate's config
        load = AutoConfig.from_pretrained if check else partial(AutoModelForCausalLM.from_pretrained,
                                                                dtype=torch.float32)
        lm = None if name is None else load(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        if os.path.isdir(name):  # an empty folder, or a checkpoint instead of a saved model, is named as one
            why = ("it is empty; pass a folder holding a saved model, or a hub id" if not os.listdir(name) else
                   "it holds a training checkpoint (optimizer state), not a saved model; pass a run's output folder "
                   "(its final model)" if "optimizer.bin" in os.listdir(name) else str(e).splitlines()[0])
            raise DataError(f"could not load {what} {name!r} from that folder: {why}") from None
        cache = " in the local cache (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        tiny = " (python -m tiny --out data/tiny --models cls writes it)" if "/models/cls/" in name else ""
        raise DataError(f"could not load {what} {name!r}: no such local folder and not a hub id{cache}; pass a hub id "
                        f"(e.g. gpt2) or a folder holding a model{tiny}") from None
    if lm is None:
        overrides = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        if spec["config_overrides"]:  # parsed and type-checked as in run_clm.py, then passed to the constructor
            parsed = AutoConfig.for_model(spec["model_type"])  # so that derived fields (layer_types) follow
            parsed.update_from_string(spec["config_overrides"])
            keys = [kv.split("=")[0] for kv in spec["config_overrides"].split(",")]
            overrides |= {k: getattr(parsed, k) for k in keys}
        config = AutoConfig.for_model(spec["model_type"], **overrides)
        lm = config if check else AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code)
    return tokenizer, lm if check else CausalLMWithHead(lm.base_model, args.linear_probe)


# --------------------------------------------------------------------------------------------
# the losses of openai/weak-to-strong weak_to_strong/loss.py. `labels` are soft labels
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


def harden(probs0: torch.Tensor, labels1: torch.Tensor) -> torch.Tensor:
    """Hardened strong predictions [n, 2]: class 0 where p(0) reaches the batch quantile at the weak labels' mean
    of class 1, so that they take the weak labels' class balance (loss.py: logconf_loss_fn)."""
    threshold = torch.quantile(probs0.float(), labels1.float().mean())
    return torch.stack([probs0 >= threshold, probs0 < threshold], dim=1).float()


def logconf_loss(logits, labels, step_frac, aux_coef: float = 0.5, warmup_frac: float = 0.1,
                 hardened: torch.Tensor | None = None) -> torch.Tensor:
    """Auxiliary confidence loss (loss.py: logconf_loss_fn): target = (1 - c) * weak + c * hardened strong
    prediction. `hardened`: this micro batch's rows of the whole optimizer-step batch's (default: this batch's)."""
    logits, labels = logits.float(), labels.float()
    # c = aux_coef * step_frac during warm-up, aux_coef after (the official ramp, not step_frac / warmup_frac)
    coef = aux_coef * (1.0 if step_frac > warmup_frac else step_frac)
    if hardened is None:
        hardened = harden(torch.softmax(logits, dim=-1)[:, 0], labels[:, 1])
    target = labels * (1 - coef) + hardened.detach() * coef
    return F.cross_entropy(logits, target)


# --------------------------------------------------------------------------------------------
# training and evaluation (official weak_to_strong/train.py, with accelerate)
def train(model, rows, tokenizer, loss_fn, lr, epochs, seed, args, accelerator, log_prefix, tracker):
    """Adam without weight decay, cosine to 0, no warm-up, dropout off; losses and logconf's threshold are over the
    whole optimizer-step batch (header): the threshold by a no-grad pass over its micro batches, all processes."""
    n_steps = len(rows) * epochs // args.batch_size  # official: a stream of epochs x rows cut into full batches
    if n_steps == 0:
        raise DataError(f"{log_prefix}: {len(rows)} training examples x {epochs} epochs make no full batch of "
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
    # logconf (a loss taking hardened predictions) gets the whole batch's when a step has several micro batches
    whole_batch_hardening = ("hardened" in inspect.signature(loss_fn).parameters
                             and args.micro_batch_size < args.batch_size)
    step, loss_sum, acc_sum, micro_batches = 0, 0.0, 0.0, []
    bar = tqdm(total=n_steps, desc=log_prefix, disable=not accelerator.is_main_process)
    for micro_batch in loader:
        micro_batches.append(micro_batch)
        if len(micro_batches) < args.gradient_accumulation_steps:
            continue
        loss_kwargs = [{}] * len(micro_batches)
        if whole_batch_hardening:  # ALGO LOGIC: logconf's quantile over the whole optimizer-step batch
            with torch.no_grad():
                probs0 = torch.cat([torch.softmax(model(b["input_ids"], b["attention_mask"]).float(), -1)[:, 0]
                                    for b in micro_batches])
            labels1 = torch.cat([b["soft_label"][:, 1] for b in micro_batches])
            mine = harden(accelerator.gather(probs0), accelerator.gather(labels1)).chunk(accelerator.num_processes)
            loss_kwargs = [{"hardened": h} for h in mine[accelerator.process_index].chunk(len(micro_batches))]
        # TRY NOT TO MODIFY: accumulation by hand (accelerate's accumulate() would sync at every micro batch of the
        # last step, as the step's micro batches are read ahead); gradients all-reduced on the last micro batch only
        for k, (batch, kwargs) in enumerate(zip(micro_batches, loss_kwargs)):
            with accelerator.no_sync(model) if k < len(micro_batches) - 1 else contextlib.nullcontext():
                logits = model(batch["input_ids"], batch["attention_mask"])
                # ALGO LOGIC: the weak-to-strong loss (xent / logconf / product) on this micro batch
                loss = loss_fn(logits, batch["soft_label"], step_frac=step / n_steps, **kwargs)
                accelerator.backward(loss)  # divided by gradient_accumulation_steps inside
            loss_sum += loss.detach() / args.gradient_accumulation_steps
            acc = (logits.argmax(-1) == batch["soft_label"].argmax(-1)).float().mean()
            acc_sum += acc / args.gradient_accumulation_steps
        optimizer.step()
        optimizer.zero_grad()
        micro_batches = []
        # TRY NOT TO MODIFY: one optimizer step done: log, schedule
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
def predict(model, rows, tokenizer, args, accelerator) -> tuple[torch.Tensor, float]:
    """Class probabilities of `rows`, in order, gathered from every process, and their accuracy."""
    loader = DataLoader(rows, args.eval_batch_size, collate_fn=partial(collate, tokenizer))
    model.eval()
    probs = []
    for batch in accelerator.prepare_data_loader(loader):
        logits = model(batch["input_ids"], batch["attention_mask"])
        probs.append(accelerator.gather_for_metrics(torch.softmax(logits.float(), dim=-1)))  # drops the padding rows
    probs = torch.cat(probs).cpu()
    return probs, (probs.argmax(-1) == torch.tensor([r["label"] for r in rows])).float().mean().item()


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
    test_probs, test_acc = predict(model, test_rows, tokenizer, args, accelerator)
    results = {"stage": name, "dir": str(out), "test_acc": test_acc, "train_time_s": time.time() - start,
               "n_train": len(train_rows), "n_test": len(test_rows),
               "n_dropped_long": {"train": dropped_train, "test": dropped_test}}
    if label_ds is not None:  # weak labels: the weak model's soft predictions on half 2
        label_rows, results["n_dropped_long"]["labelled"] = tokenize(label_ds, tokenizer, args.max_ctx)
        label_probs, results["weak_label_acc"] = predict(model, label_rows, tokenizer, args, accelerator)
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
    pred_a, pred_b = (dict(zip(p["idx"].tolist(), p["probs"].argmax(-1).tolist())) for p in
                      (load_file(Path(d) / "test_predictions.safetensors") for d in (dir_a, dir_b)))
    return float(np.mean([pred_a[i] == pred_b[i] for i in pred_a.keys() & pred_b.keys()]))


def plot(summary: dict, losses: tuple, path: Path, title: str) -> None:
    keys = ["weak_acc", "strong_acc"] + [f"transfer_acc_{loss}" for loss in losses]
    names = ["weak", "strong ceiling"] + [f"w2s {loss}" for loss in losses]
    means, stds = [summary["mean"][k] for k in keys], [summary["std"][k] for k in keys]
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(keys), 4))
    bars = ax.bar(names, means, yerr=stds, capsize=4, color=["tab:gray", "tab:blue"] + ["tab:orange"] * len(losses))
    for bar, key, std in zip(bars, keys, stds):
        pgr = summary["mean"].get(key.replace("transfer_acc", "pgr"))
        text = f"{summary['mean'][key]:.3f}"
        if key.startswith("transfer"):
            text += f"\nPGR {pgr:.2f}" if pgr is not None else "\nPGR undefined\n(strong <= weak)"
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + std + 0.005, text, ha="center", va="bottom")
    ax.set_ylim(max(0.0, min(means) - 0.1), max(m + s for m, s in zip(means, stds)) + 0.08)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# arguments: --config or --preset, then the checks that need no data or model (one message, exit 2, nothing written)
def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_config(path: str) -> list[str]:
    """The flags a YAML file of Args fields stands for: tyro checks them as typed; flags given after them win."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"--config {path}: cannot be read as YAML ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(config, dict):
        fail(f"--config {path} is not a mapping of Args fields: write one `field: value` per line")
    keys = [f.name for f in fields(Args) if f.name not in ("preset", "config") and "Suppress" not in str(f.type)]
    flags = ["--config", path]
    for key, value in config.items():
        if key not in keys:
            fail(f"--config {path}: unknown key {key!r} (did you mean {get_close_matches(str(key), keys, 1, 0)[0]!r}?)")
        flags += ([f"--{key}" if value else f"--no_{key}"] if isinstance(value, bool) else
                  [f"--{key}", *map(str, value if isinstance(value, list) else [value])])
    return flags


def parse_args() -> Args:
    """`--config FILE` (or --preset tiny: recipes/tiny/weak_to_strong_cls.yaml), then the flags given, which win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--preset", "--weak_model_name_or_path", "--strong_model_name_or_path"):
        pre.add_argument(flag)
    given = pre.parse_known_args()[0]
    if given.config and given.preset == "tiny":
        fail("pass one of --config and --preset (--preset tiny is recipes/tiny/weak_to_strong_cls.yaml)")
    path = given.config or (given.preset == "tiny" and f"{Path(__file__).parent}/recipes/tiny/weak_to_strong_cls.yaml")
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    for side in ("weak", "strong"):  # a model type replaces a pretrained model the command line does not name
        if getattr(args, f"{side}_model_type") is not None and getattr(given, f"{side}_model_name_or_path") is None:
            setattr(args, f"{side}_model_name_or_path", None)
    validate(args)
    return args


def validate(args: Args) -> None:
    checks = [(name, lambda v: v <= 0, "must be a positive integer") for name in (
        "n_seeds", "n_docs", "n_test_docs", "max_ctx", "batch_size", "gradient_accumulation_steps", "eval_batch_size",
        "gt_epochs", "transfer_epochs")]
    checks += [(name, lambda v: v < 0, "must not be negative") for name in (
        "weak_lr", "strong_lr", "transfer_lr", "logconf_warmup_frac", "product_alpha", "product_beta")]
    checks += [("logconf_aux_coef", lambda v: not 0 <= v <= 1, "a mixing weight, must lie in [0, 1]")]
    for name, bad, message in checks:
        if getattr(args, name) is not None and bad(getattr(args, name)):
            fail(f"--{name} {getattr(args, name)}: {message}")
    if args.batch_size % args.gradient_accumulation_steps:
        fail(f"--batch_size {args.batch_size} must be a multiple of --gradient_accumulation_steps "
             f"{args.gradient_accumulation_steps}")
    if not args.losses:
        fail("--losses is empty: name at least one of xent, logconf, product")
    for side in ("weak", "strong"):
        path, model_type = getattr(args, f"{side}_model_name_or_path"), getattr(args, f"{side}_model_type")
        if (path is None) == (model_type is None):
            fail(f"give exactly one of --{side}_model_name_or_path (pretrained) and --{side}_model_type "
                 f"(from scratch); to build from scratch pass --{side}_model_name_or_path None")
        if model_type is not None and args.tokenizer_name is None:
            fail(f"--{side}_model_type builds a model from scratch: give a tokenizer with --tokenizer_name")
        if path is not None and getattr(args, f"{side}_config_overrides"):
            fail(f"--{side}_config_overrides only applies to a model built from scratch (--{side}_model_type)")
        if getattr(args, f"{side}_lr") is None and (path is None or args.batch_size != 32):
            fail(f"set --{side}_lr: the published learning rates are for pretrained models at --batch_size 32")
    out = Path(args.output_dir)
    if out.is_file():
        fail(f"--output_dir {out} is a file; pass a folder")
    ours = {"results.json", "results.png", "sweep.json", "sweep.png"}  # sweep.*: w2s_sweep.py's
    foreign = sorted(p.name for p in out.glob("*") if p.name not in ours and not p.name.startswith("seed_"))
    if foreign and not args.overwrite_output_dir:
        fail(f"output_dir {out} already holds files this script did not write ({', '.join(foreign[:5])}); pass "
             "--overwrite_output_dir to write into it anyway, or another --output_dir (a folder it wrote is a cache)")
    # one 3-second request to the hub if a name is not a local path: no network fails at once, not after retries
    names = (HUB_DATASETS.get(args.ds_name, [args.ds_name])[0], args.tokenizer_name, args.weak_model_name_or_path,
             args.strong_model_name_or_path)
    remote = [n for n in names if n and not os.path.exists(n)]
    if remote and not constants.HF_HUB_OFFLINE:
        try:
            httpx.head(constants.ENDPOINT, timeout=3)
        except httpx.HTTPError:
            fail(f"no network: cannot reach the Hugging Face Hub for {remote[0]!r}. Set HF_HUB_OFFLINE=1 to use the "
                 "local cache, or pass a local path.")


if __name__ == "__main__":
    args = parse_args()
    try:  # data errors: one clear message, exit code 2 (nothing of a failed stage is written)
        # filled in at runtime
        for side in ("weak", "strong"):  # validate(): an lr left unset is a pretrained model's at batch 32
            if getattr(args, f"{side}_lr") is None:
                name = getattr(args, f"{side}_model_name_or_path").rstrip("/").split("/")[-1]
                setattr(args, f"{side}_lr", DEFAULT_LR.get(name, 1e-5))
        args.transfer_lr = args.strong_lr if args.transfer_lr is None else args.transfer_lr
        args.transfer_epochs = args.gt_epochs if args.transfer_epochs is None else args.transfer_epochs
        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
        n_micro = args.gradient_accumulation_steps * accelerator.num_processes
        args.micro_batch_size, rest = divmod(args.batch_size, n_micro)
        if rest:  # validate() checked the accumulation steps; the processes are known now
            fail(f"--batch_size {args.batch_size} must be a multiple of --gradient_accumulation_steps "
                 f"{args.gradient_accumulation_steps} x {accelerator.num_processes} processes")
        args.run_name = f"{args.exp_name}__{Path(args.ds_name).name}__{args.seed}__{int(time.time())}"
        loss_settings = {"xent": {},  # part of each student's cache key
                         "logconf": {"aux_coef": args.logconf_aux_coef, "warmup_frac": args.logconf_warmup_frac},
                         "product": {"alpha": args.product_alpha, "beta": args.product_beta}}
        loss_fns = {"xent": xent_loss, "logconf": partial(logconf_loss, **loss_settings["logconf"]),
                    "product": partial(product_loss, **loss_settings["product"])}
        # every input is checked before any stage runs: each seed's data and halves, each model's tokenizer and config
        data = {}
        for seed in range(args.seed, args.seed + args.n_seeds):
            ds = load_cls_dataset(args.ds_name, args.n_docs, args.n_test_docs, seed)
            data[seed] = (ds["test"], *split_halves(ds["train"], seed, args.batch_size))
        specs = {side: {"name_or_path": getattr(args, f"{side}_model_name_or_path"),
                        "model_type": getattr(args, f"{side}_model_type"),
                        "config_overrides": getattr(args, f"{side}_config_overrides"), "tokenizer": args.tokenizer_name}
                 for side in ("weak", "strong")}
        for spec in specs.values():
            build_model(spec, args, check=True)
        tracker = None
        if args.track and accelerator.is_main_process:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name,
                       config=vars(args), save_code=True)
            tracker = wandb

        per_seed = {}
        for seed, (test_ds, half1, half2) in data.items():
            accelerator.print(f"[seed {seed}] train halves {len(half1)} / {len(half2)}, test {len(test_ds)}; "
                              f"batch {args.batch_size} = {args.micro_batch_size} x {args.gradient_accumulation_steps} "
                              f"accumulated x {accelerator.num_processes} processes")
            data_keys = ("ds_name", "n_docs", "n_test_docs", "max_ctx", "batch_size", "linear_probe")
            stage = partial(run_stage, test_ds=test_ds, seed=seed, args=args, accelerator=accelerator,
                            tracker=tracker, cache_key={**{k: getattr(args, k) for k in data_keys}, "seed": seed})
            # ALGO LOGIC: 1-2. weak model on half 1 with ground truth; its soft labels on half 2
            weak = stage("weak", specs["weak"], half1, "xent", xent_loss, args.weak_lr, args.gt_epochs, label_ds=half2)
            # ALGO LOGIC: 3. strong ceiling on half 2 with ground truth
            strong = stage("strong_ceiling", specs["strong"], half2, "xent", xent_loss, args.strong_lr, args.gt_epochs)
            weak_labels = load_from_disk(str(Path(weak["dir"]) / "weak_labels"))
            res = {"weak_acc": weak["test_acc"], "strong_acc": strong["test_acc"],
                   "weak_label_acc": weak["weak_label_acc"]}
            for loss in args.losses:  # ALGO LOGIC: 4. strong student on half 2 with the weak soft labels, per loss
                w2s = stage(f"w2s_{loss}", {**specs["strong"], "teacher": weak["dir"], **loss_settings[loss]},
                            weak_labels, loss, loss_fns[loss], args.transfer_lr, args.transfer_epochs)
                res[f"transfer_acc_{loss}"] = w2s["test_acc"]
                # ALGO LOGIC: performance gap recovered (Burns et al. 2023, section 3); null when strong <= weak
                gap = strong["test_acc"] - weak["test_acc"]
                res[f"pgr_{loss}"] = (w2s["test_acc"] - weak["test_acc"]) / gap if gap > 0 else None
                res[f"agreement_{loss}"] = agreement(w2s["dir"], weak["dir"])  # student vs teacher, test set
            per_seed[seed] = res
    except DataError as e:
        fail(str(e))

    # report: mean and std over the seeds; PGR only when every seed has one
    values = {k: [r[k] for r in per_seed.values()] for k in per_seed[args.seed]}
    no_gap = [seed for seed, r in per_seed.items() if r["strong_acc"] <= r["weak_acc"]]
    summary = {"mean": {k: None if None in v else float(np.mean(v)) for k, v in values.items()},
               "std": {k: None if None in v else float(np.std(v)) for k, v in values.items()},
               "pgr_undefined": no_gap,  # the seeds without a gap to recover (w2s_sweep.py: the pairs)
               "n_seeds": args.n_seeds, "per_seed": per_seed, "args": vars(args)}
    files = (Path(args.output_dir) / "results.json", Path(args.output_dir) / "results.png")
    if accelerator.is_main_process:
        files[0].write_text(json.dumps(summary, indent=2))
        names = [spec["name_or_path"] or f"{spec['model_type']} (scratch)" for spec in specs.values()]
        plot(summary, args.losses, files[1], f"{Path(args.ds_name).name}: {names[0]} -> {names[1]}, "
             f"{args.n_seeds} seed(s)")
        print(f"\n{'metric':<24}{'mean':>8}{'std':>8}")
        for k, v in summary["mean"].items():
            print(f"{k:<24}" + (f"{'undefined':>16}" if v is None else f"{v:>8.4f}{summary['std'][k]:>8.4f}"))
        if no_gap:
            print(f"PGR undefined: the strong ceiling is not above the weak model in seed(s) {no_gap}, so there is no "
                  "gap to recover")
        print(f"wrote {files[0]} and {files[1]}")
        if tracker is not None:
            tracker.summary.update({f"eval/{k}": v for k, v in summary["mean"].items() if v is not None})
            tracker.log({"eval/results": tracker.Image(str(files[1]))})
            tracker.finish()
