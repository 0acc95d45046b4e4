"""Weak-to-Strong Preference Optimization (WSPO): align a strong model by imitating how alignment
changed a weak one.

Zhu et al., "Weak-to-Strong Preference Optimization: Stealing Reward from Weak Aligned Model"
(ICLR 2025); official code: the WSPO repo, `src/llamafactory/train/wspo/trainer.py`. Four models
share one tokenizer: the strong policy pi (trained, initialised from --strong), the strong
reference pi_sref (frozen; --strong_ref, default --strong), the weak model before alignment pi_wref
(--weak_ref) and after it pi_wal (--weak_aligned). On the chosen responses y of a preference set:

    official (default, token level):
        d_t = beta (log pi(y_t) - log pi_sref(y_t)) - gamma (log pi_wal(y_t) - log pi_wref(y_t))
        L   = mean over the batch of  sum_t d_t^2 / |y|                      beta = 0.1, gamma = 1
    paper (--loss_level sequence): the same regression on whole-response log-ratios,
        L   = mean over the batch of  (beta log pi/pi_sref(y) - gamma log pi_wal/pi_wref(y))^2

The paper writes the sequence-level form; the official code trains the token-level one, which is
the default here. The official code also forwards the rejected responses through all four models
and discards them; here they are never forwarded in training (they only serve the held-out reward
accuracy when the eval split has them).

What makes it lean: the weak log-ratio and the strong reference's log-probs never change, so they
are computed per token in a pre-pass, one frozen model in memory at a time, and cached on disk
(keyed by model, data and tokenization settings); training holds only the policy. Logits exist
only at response positions, and the fp32 log-softmax is taken a chunk at a time. Before anything,
the four tokenizers must give identical token ids on the data, or the run stops naming the first
differing example.

GPU, hub (the design card's command; defaults: weak pair Qwen2-1.5B -> Qwen2-1.5B-Instruct):
    accelerate launch wspo.py --strong Qwen/Qwen2-7B
    # the WSPO paper's setting: --strong runs/qwen2-7b-sft --weak_ref runs/qwen2-1.5b-sft \
    #   --weak_aligned runs/qwen2-1.5b-dpo   (full: lr 1e-5 x 1 epoch, ZeRO-3 offload; LoRA: lr 5e-6 x 3 epochs)
Offline tiny setting (CPU; see run_tiny.sh for the models it expects):
    python wspo.py --preset tiny --output_dir runs/tiny/wspo-strong
"""

import gc
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from datasets import load_dataset, load_from_disk
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of the experiment (data order)"""
    output_dir: str = "runs/wspo"
    """where the final model, checkpoints and metrics.jsonl go"""
    preset: Literal["tiny"] | None = None
    """named defaults: `tiny` = the offline tiny setting (data/tiny, runs/tiny models); flags still override"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "w2s-alignment"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    push_to_hub: bool = False
    """upload the final model to the Hugging Face Hub (needs a login)"""
    hub_model_id: str | None = None
    """repo id for --push_to_hub (default: the output_dir's name)"""

    # the four models
    strong: str = "Qwen/Qwen2-7B"
    """the strong model (hub id or path): initialises the policy, and is its reference unless --strong_ref"""
    strong_ref: str | None = None
    """the strong reference pi_sref (default: --strong; with LoRA: --strong itself, the adapters' base)"""
    weak_ref: str = "Qwen/Qwen2-1.5B"
    """the weak model before alignment, pi_wref (paper: the weak SFT model)"""
    weak_aligned: str = "Qwen/Qwen2-1.5B-Instruct"
    """the weak model after alignment, pi_wal (paper: the weak DPO model)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in; mixed precision itself comes from the accelerate config"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, flash_attention_2"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""

    # LoRA
    use_lora: bool = False
    """train LoRA adapters (peft) instead of all weights; merged into the saved model"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.05
    """LoRA dropout"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: "all-linear" or a comma-separated list of names"""

    # data
    dataset_name: str = "HuggingFaceH4/ultrafeedback_binarized"
    """hub id, local dataset folder, a save_to_disk folder, or a .json/.jsonl/.parquet file"""
    dataset_config: str | None = None
    """dataset config (subset) name"""
    train_split: str = "train_prefs"
    """split to train on"""
    eval_split: str | None = "test_prefs"
    """held-out split (None: no eval); with a rejected column it also gives the reward accuracy"""
    response_column: str = "chosen"
    """the responses to imitate: a message list ending in the assistant turn (e.g. `chosen`, or `messages` of an SFT set), or a string"""
    prompt_column: str = "prompt"
    """prompt column, used when the responses are plain strings"""
    rejected_column: str = "rejected"
    """eval only: rejected responses for the held-out reward accuracy (skipped if absent)"""
    max_length: int = 4096
    """prompt + response tokens (paper cutoff 4096); longer responses are cut (end-of-turn kept)"""
    max_prompt_length: int = 2048
    """prompt tokens; longer prompts keep their last tokens"""
    max_train_samples: int | None = None
    """use only the first N training examples"""
    max_eval_samples: int | None = 1000
    """use only the first N eval examples"""
    padding_free: bool = False
    """pack each micro-batch into one row without padding (sequences cannot attend to each other)"""

    # algorithm
    beta: float = 0.1
    """scale of the strong log-ratio (official: 0.1)"""
    weak_coef: float = 1.0
    """gamma: scale of the weak log-ratio target (official: 1)"""
    loss_level: Literal["token", "sequence"] = "token"
    """token: the official code's per-token regression; sequence: the paper's whole-response form"""
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "w2s_alignment")
    """where the pre-pass's per-token log-probs are cached"""
    prepass_batch_size: int = 16
    """sequences per forward in the pre-pass"""

    # optimization
    learning_rate: float = 1e-5
    """peak learning rate (paper: 1e-5 full, 5e-6 LoRA)"""
    num_train_epochs: int = 1
    """passes over the training data (paper: 1 full, 3 LoRA)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides the epochs)"""
    per_device_train_batch_size: int = 1
    """examples per micro-batch per process (paper: 1)"""
    gradient_accumulation_steps: int = 8
    """micro-batches per optimizer step (paper: 8)"""
    per_device_eval_batch_size: int = 8
    """examples per eval batch per process"""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # logging and checkpoints
    logging_steps: int = 10
    """log train metrics every N optimizer steps"""
    eval_steps: int | None = None
    """evaluate every N optimizer steps (default: only at the start and end)"""
    save_steps: int | None = None
    """write a resumable checkpoint every N optimizer steps"""
    save_total_limit: int = 2
    """keep only the newest N checkpoints"""
    resume: bool = False
    """resume from the newest checkpoint in output_dir/checkpoints"""

    # filled in at runtime
    world_size: int = 1
    """(runtime) number of processes"""
    global_batch_size: int = 0
    """(runtime) micro batch x accumulation x processes"""


PRESETS = {
    "tiny": Args(
        preset="tiny", output_dir="runs/tiny/wspo", strong="runs/tiny/sft-strong", weak_ref="runs/tiny/sft-weak",
        weak_aligned="runs/tiny/dpo-weak", dataset_name="data/tiny/ultrafeedback", max_length=128, max_prompt_length=64,
        learning_rate=5e-4, num_train_epochs=1, per_device_train_batch_size=32, gradient_accumulation_steps=1,
        per_device_eval_batch_size=64, max_eval_samples=400, logging_steps=20, prepass_batch_size=64,
        cache_dir="runs/tiny/cache", beta=0.5,
    ),
}
# beta 0.5 offline: the strong log-ratio goes to (weak log-ratio) / beta, amplifying the weak DPO's likelihood
# displacement too; on the tiny setting beta 0.1 cut answer correctness 0.97 -> 0.33 (docs/results.md).


def parse_args() -> Args:
    """`--preset NAME` picks the defaults; every other flag overrides them."""
    argv = sys.argv[1:]
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv[:-1] else None
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    return tyro.cli(Args, default=PRESETS.get(preset, Args()), use_underscores=True)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_split(name: str, config: str | None, split: str):
    """Hub id, local dataset folder (README YAML / data files), save_to_disk folder, or one file."""
    if os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(name)[1])
        if kind is None:
            raise SystemExit(f"cannot read dataset file {name!r}: use .json, .jsonl, .parquet or .csv")
        return load_dataset(kind, data_files={split: name}, split=split)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    try:
        return load_dataset(name, config, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise SystemExit(
            f"could not load split {split!r} of dataset {name!r}: {e}\nWith no network, use a local copy "
            "(python -m tiny --out data/tiny writes the offline tiny setting; then --preset tiny)."
        ) from e


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def response_ids(tokenizer, prompt: list[dict], text: str) -> list[int]:
    """The tokens the chat template appends to the prompt for an assistant turn, through end-of-turn."""
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": text}])
    if full[: len(prompt_ids)] != prompt_ids:
        raise SystemExit(f"the chat template's prompt tokens are not a prefix of prompt+response tokens for {prompt!r}; "
                         "the response cannot be located. Use a template whose generation prompt ends the prompt exactly.")
    resp, eot = full[len(prompt_ids):], tokenizer.eos_token_id
    return resp[: len(resp) - resp[::-1].index(eot)] if eot in resp else resp + [eot]


def tokenize_example(tokenizer, ex: dict, args: Args, with_rejected: bool) -> dict:
    """prompt_ids, chosen_ids (the response to imitate) and, for eval, rejected_ids; or a skip reason."""
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "skip": ""}
    conv = ex[args.response_column]
    if isinstance(conv, list):
        if not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
            return {**out, "skip": "response is not a conversation ending in an assistant turn"}
        prompt, text = conv[:-1] or [{"role": "user", "content": ex[args.prompt_column]}], conv[-1].get("content")
    else:
        p = ex.get(args.prompt_column)
        prompt, text = (p if isinstance(p, list) else [{"role": "user", "content": p}]), conv
    if not isinstance(text, str) or not text.strip():
        return {**out, "skip": "empty response"}
    texts = [text]
    if with_rejected:
        r = ex[args.rejected_column]
        texts.append(r[-1]["content"] if isinstance(r, list) else r)
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)[-args.max_prompt_length:]
    room = args.max_length - len(prompt_ids)
    if room < 2:
        return {**out, "skip": "prompt leaves no room for a response"}
    resps = [response_ids(tokenizer, prompt, t) for t in texts]
    skip = "truncated" if max(map(len, resps)) > room else ""
    resps = [r if len(r) <= room else r[: room - 1] + [tokenizer.eos_token_id] for r in resps]
    return {"prompt_ids": prompt_ids, "chosen_ids": resps[0], "rejected_ids": resps[1] if with_rejected else [], "skip": skip}


def prepare_dataset(ds, tokenizer, args: Args, what: str, log):
    if args.response_column not in ds.column_names:
        raise SystemExit(f"the {what} split has no column {args.response_column!r} (columns: {ds.column_names}); pass "
                         "--response_column naming the responses to imitate (e.g. chosen, or messages)")
    with_rejected = what == "eval" and args.rejected_column in ds.column_names
    ds = ds.map(lambda ex: tokenize_example(tokenizer, ex, args, with_rejected), remove_columns=ds.column_names,
                desc=f"tokenizing {what}")
    reasons = {r: n for r, n in zip(*np.unique(list(ds["skip"]), return_counts=True)) if r}
    kept = ds.filter(lambda ex: ex["skip"] in ("", "truncated")).remove_columns("skip")
    log(f"{what}: {len(kept)} of {len(ds)} examples kept; " + (", ".join(f"{n} {r}" for r, n in reasons.items()) or "none skipped or cut"))
    if len(kept) == 0:
        raise SystemExit(f"no usable example in the {what} split ({reasons}); check --response_column and the data")
    return kept.add_column("row", list(range(len(kept)))), with_rejected


def check_tokenizers(args: Args, raws: list, names: list[str], log):
    """# ALGO LOGIC: d_t pairs strong and weak log-probs token by token, so every model's tokenizer must
    give the strong tokenizer's ids on every example; stop at the first that does not. A tokenizer
    whose definition (vocabulary, merges, normalisation, chat template, special tokens) is identical
    to the strong one's gives identical ids by construction and is not re-run over the data."""
    base = load_tokenizer(args.strong, args)
    definition = lambda t: (t.backend_tokenizer.to_str(), t.chat_template, t.eos_token, t.pad_token)
    base_ids = {}
    for name in dict.fromkeys(names):
        if name == args.strong:
            continue
        tok = load_tokenizer(name, args)
        if definition(tok) == definition(base):
            log(f"tokenizer check: {name} has the strong model's tokenizer (identical definition)")
            continue
        for split, raw in raws:
            for i, ex in enumerate(raw):
                mine = tokenize_example(tok, ex, args, False)
                if (split, i) not in base_ids:
                    theirs = tokenize_example(base, ex, args, False)
                    base_ids[split, i] = theirs["prompt_ids"] + theirs["chosen_ids"]
                if mine["prompt_ids"] + mine["chosen_ids"] != base_ids[split, i]:
                    raise SystemExit(
                        f"tokenizer mismatch: {name!r} and the strong model {args.strong!r} tokenize {split} example {i} "
                        f"differently ({ex.get(args.prompt_column)!r}):\n  {name}: {mine['prompt_ids'] + mine['chosen_ids']}\n"
                        f"  {args.strong}: {base_ids[split, i]}\nWSPO pairs the weak and strong log-probs token by "
                        "token; all four models must share one tokenizer and chat template.")
        log(f"tokenizer check: {name} gives the strong tokenizer's ids on every example")


def collate(rows: list[dict], pad_id: int, padding_free: bool, keys=("chosen_ids",)) -> dict:
    """One sequence per (row, key), keys outer: with keys=(chosen, rejected), sequence i and i+len(rows) pair up.
    `targets[t]` is the next token, `loss_mask[t]` marks positions that predict a response token,
    `seq_id[t]` the sequence of position t. padding-free: one row, position_ids restart per sequence."""
    seqs, masks = [], []
    for key in keys:
        for r in rows:
            seqs.append(torch.tensor(r["prompt_ids"] + r[key]))
            masks.append(torch.tensor([False] * (len(r["prompt_ids"]) - 1) + [True] * len(r[key]) + [False]))
    targets = [torch.cat([s[1:], s.new_zeros(1)]) for s in seqs]
    seq_id = [torch.full_like(s, i) for i, s in enumerate(seqs)]
    out = {"row": torch.tensor([r["row"] for r in rows]), "n_seqs": len(seqs)}
    if padding_free:
        return {**out, "input_ids": torch.cat(seqs)[None], "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
                "targets": torch.cat(targets)[None], "loss_mask": torch.cat(masks)[None], "seq_id": torch.cat(seq_id)[None]}
    n = max(len(s) for s in seqs)
    pad = lambda xs, v: torch.stack([F.pad(x, (0, n - len(x)), value=v) for x in xs])
    return {**out, "input_ids": pad(seqs, pad_id), "attention_mask": pad([torch.ones_like(s) for s in seqs], 0),
            "targets": pad(targets, 0), "loss_mask": pad(masks, False), "seq_id": pad(seq_id, 0)}


# ---------------------------------------------------------------------------------------------
# per-token log-probs and the loss
# ---------------------------------------------------------------------------------------------
def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(-1, targets[:, None])[:, 0] - logits.logsumexp(-1)


def token_logps(model, batch: dict) -> torch.Tensor:
    """log p(y_t) at every response position of the batch, in sequence order (fp32, chunked and
    recomputed in backward; logits only at response positions via logits_to_keep)."""
    mask = batch["loss_mask"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), logits_to_keep=mask, use_cache=False).logits
    targets = batch["targets"][mask]
    fn = partial(checkpoint, _chunk_logps, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logps
    return torch.cat([fn(logits[i : i + 2048], targets[i : i + 2048]) for i in range(0, len(targets), 2048)])


def wspo_loss(policy_lp, sref_lp, weak_ratio, seq_id, n_seqs: int, beta: float, gamma: float, level: str):
    """Per-sequence WSPO loss from per-token log-probs (all aligned, response tokens only).

    # ALGO LOGIC: official trainer: d_t = beta (log pi - log pi_sref) - gamma (log pi_wal - log pi_wref);
    # loss = sum_t d_t^2 / |y| per sequence (token level); the paper's form squares the summed ratios.
    """
    strong_ratio = policy_lp - sref_lp
    zeros = torch.zeros(n_seqs, device=policy_lp.device, dtype=policy_lp.dtype)
    lengths = zeros.index_add(0, seq_id, torch.ones_like(policy_lp))
    if level == "token":
        d = beta * strong_ratio - gamma * weak_ratio
        return zeros.index_add(0, seq_id, d**2) / lengths, d
    d_seq = beta * zeros.index_add(0, seq_id, strong_ratio) - gamma * zeros.index_add(0, seq_id, weak_ratio)
    return d_seq**2, d_seq


def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x - x.mean(), y - y.mean(), dim=0)


# ---------------------------------------------------------------------------------------------
# the pre-pass: per-token log-probs of each frozen model, one model in memory at a time, cached
# ---------------------------------------------------------------------------------------------
def model_fingerprint(name: str) -> str:
    """A hub id names fixed weights (up to its revision); a local folder is fingerprinted by its files."""
    if not os.path.isdir(name):
        return name
    files = sorted(f for f in os.listdir(name) if f.endswith((".safetensors", ".json")))
    return name + "|" + "|".join(f"{f}:{os.path.getsize(os.path.join(name, f))}:{os.path.getmtime(os.path.join(name, f))}" for f in files)


def data_fingerprint(ds, columns) -> str:
    """A hash of the token ids themselves: the cache follows the data and tokenization, nothing else."""
    h = hashlib.sha256()
    for col in columns:
        for ids in ds[col]:
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


@torch.no_grad()
def prepass(name: str, ds, keys, args: Args, accelerator, collate_fn, log) -> dict:
    """Per-token log-probs of model `name` on every (row, key) response of `ds`, as one flat tensor
    with offsets: the tokens of sequence k (= key index * len(ds) + row) are values[offsets[k]:offsets[k+1]]."""
    key = hashlib.sha256("\n".join([model_fingerprint(name), data_fingerprint(ds, ("prompt_ids", *keys)), args.dtype]).encode())
    path = os.path.join(args.cache_dir, f"token-logps-{key.hexdigest()[:20]}.safetensors")
    if os.path.exists(path):
        log(f"pre-pass {name}: reusing the cache {path}")
        return load_file(path)
    model = load_model(name, args).to(accelerator.device).eval()
    results = []
    with accelerator.split_between_processes(list(range(len(ds)))) as mine:
        loader = DataLoader(ds.select(mine), batch_size=args.prepass_batch_size, collate_fn=partial(collate_fn, keys=keys))
        for batch in tqdm(loader, desc=f"pre-pass {os.path.basename(name.rstrip('/'))}", disable=not accelerator.is_local_main_process):
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            lp = token_logps(model, batch).cpu()
            lengths = torch.bincount(batch["seq_id"][batch["loss_mask"]].cpu(), minlength=batch["n_seqs"]).tolist()
            per_seq = lp.split(lengths)
            n = len(batch["row"])
            for j, row in enumerate(batch["row"].tolist()):
                results.append((row, [per_seq[k * n + j] for k in range(len(keys))]))
    del model
    gc.collect()
    results = sorted(gather_object(results), key=lambda t: t[0])
    assert [r for r, _ in results] == list(range(len(ds)))
    seqs = [lps[k] for k in range(len(keys)) for _, lps in results]
    out = {"values": torch.cat(seqs), "offsets": torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)}
    if accelerator.is_main_process:
        os.makedirs(args.cache_dir, exist_ok=True)
        save_file(out, path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f"pre-pass {name}: {len(seqs)} responses, {len(out['values'])} tokens, cached in {path}")
    accelerator.wait_for_everyone()
    return out


def lookup(cache: dict, rows: torch.Tensor, n_rows: int, key_index: int = 0) -> torch.Tensor:
    """The cached per-token values of the given rows, concatenated in batch order (= loss_mask order)."""
    off = cache["offsets"]
    seqs = [key_index * n_rows + r for r in rows.tolist()]
    return torch.cat([cache["values"][off[k] : off[k + 1]] for k in seqs])


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def load_tokenizer(name: str, args: Args):
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load the tokenizer of {name!r} from the hub or a local path: {e}\nWith no network, "
                         "train the tiny models first (bash run_tiny.sh) and pass --preset tiny.") from e
    if tok.chat_template is None:
        raise SystemExit(f"tokenizer {name!r} has no chat template; use an instruct tokenizer or set one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, args: Args):
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code,
                                                    attn_implementation=args.attn_implementation)
    except OSError as e:
        raise SystemExit(f"could not load the model {name!r} from the hub or a local path: {e}\nWith no network, train "
                         "the tiny models first (bash run_tiny.sh) and pass --preset tiny.") from e


def newest_checkpoint(output_dir: str) -> str | None:
    """Only fully written checkpoints count: they are renamed into place after saving."""
    root = os.path.join(output_dir, "checkpoints")
    steps = [int(d.split("-")[1]) for d in os.listdir(root) if d.startswith("step-")] if os.path.isdir(root) else []
    return os.path.join(root, f"step-{max(steps)}") if steps else None


if __name__ == "__main__":
    args = parse_args()
    # TRY NOT TO MODIFY: accelerator, batch-size chain, seeding, logging
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    args.world_size = accelerator.num_processes
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    args.strong_ref = args.strong_ref or args.strong
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.track and accelerator.is_main_process:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args), dir=args.output_dir,
                   name=f"{args.exp_name}__{args.seed}__{int(time.time())}")
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if accelerator.is_main_process else None

    def log_metrics(metrics: dict, step: int):
        if accelerator.is_main_process:
            metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            metrics_file.flush()
            if args.track:
                wandb.log(metrics, step=step)

    set_seed(args.seed, device_specific=True)
    tokenizer = load_tokenizer(args.strong, args)
    log(f"global batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
        f"{args.world_size} processes = {args.global_batch_size} responses")

    with accelerator.main_process_first():
        raw_train = load_split(args.dataset_name, args.dataset_config, args.train_split)
        if args.max_train_samples is not None:
            raw_train = raw_train.select(range(min(args.max_train_samples, len(raw_train))))
        train_ds, _ = prepare_dataset(raw_train, tokenizer, args, "train", log)
        eval_ds, raw_eval, eval_pairs = None, None, False
        if args.eval_split:
            raw_eval = load_split(args.dataset_name, args.dataset_config, args.eval_split)
            if args.max_eval_samples is not None:
                raw_eval = raw_eval.select(range(min(args.max_eval_samples, len(raw_eval))))
            eval_ds, eval_pairs = prepare_dataset(raw_eval, tokenizer, args, "eval", log)
    check_tokenizers(args, [("train", raw_train)] + ([("eval", raw_eval)] if raw_eval is not None else []),
                     [args.strong_ref, args.weak_ref, args.weak_aligned], log)
    collate_fn = partial(collate, pad_id=tokenizer.pad_token_id, padding_free=args.padding_free)

    # ALGO LOGIC: the pre-pass. Weak log-ratio log pi_wal - log pi_wref and the strong reference's
    # log-probs, per token, once; one frozen model in memory at a time. Rejected only for eval accuracy.
    cache = {}
    for split, ds, keys in (("train", train_ds, ("chosen_ids",)),
                            ("eval", eval_ds, ("chosen_ids", "rejected_ids") if eval_pairs else ("chosen_ids",))):
        if ds is None:
            continue
        wal, wref = (prepass(n, ds, keys, args, accelerator, collate_fn, log) for n in (args.weak_aligned, args.weak_ref))
        cache[split] = {"weak_ratio": {"values": wal["values"] - wref["values"], "offsets": wal["offsets"]},
                        "sref": prepass(args.strong_ref, ds, keys, args, accelerator, collate_fn, log)}
        assert torch.equal(wal["offsets"], wref["offsets"])

    model = load_model(args.strong, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.use_lora:
        from peft import LoraConfig, get_peft_model
        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    log(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    rows_per_epoch = len(train_ds) // args.global_batch_size * args.global_batch_size
    steps_per_epoch = rows_per_epoch // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_ds)} training examples are fewer than one global batch ({args.global_batch_size})")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    def epoch_loader(epoch: int):
        # the data order depends on (seed, epoch) only, so a resumed run sees the same batches
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed + epoch))
        subset = train_ds.select(order[:rows_per_epoch].tolist())
        return accelerator.prepare(DataLoader(subset, batch_size=args.per_device_train_batch_size, collate_fn=collate_fn))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors (TRL's default)
    # stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None
    if eval_ds is not None:
        eval_collate = partial(collate_fn, keys=("chosen_ids", "rejected_ids") if eval_pairs else ("chosen_ids",))
        eval_loader = accelerator.prepare(DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size, collate_fn=eval_collate))

    def step_metrics(batch, split: str, n_rows: int):
        """The loss over the batch's chosen responses, per-example metrics (for exact gathering), and
        the batch's correlation between strong and weak per-token log-ratios."""
        c = cache[split]
        n = len(batch["row"])
        lp = token_logps(model, batch)
        chosen = batch["seq_id"][batch["loss_mask"]] < n  # chosen responses come first in the batch
        seq = batch["seq_id"][batch["loss_mask"]][chosen]
        sref = lookup(c["sref"], batch["row"], n_rows).to(lp)
        weak = lookup(c["weak_ratio"], batch["row"], n_rows).to(lp)
        losses, d = wspo_loss(lp[chosen], sref, weak, seq, n, args.beta, args.weak_coef, args.loss_level)
        strong_ratio = (lp[chosen] - sref).detach()
        zeros = torch.zeros(n, device=lp.device)
        reward = args.beta * zeros.index_add(0, seq, strong_ratio)
        abs_d = (zeros.index_add(0, seq, d.detach().abs()) / zeros.index_add(0, seq, torch.ones_like(strong_ratio))
                 if args.loss_level == "token" else d.detach().abs())
        m = {"loss": losses.detach(), "abs_d": abs_d, "rewards/chosen": reward}
        if split == "eval" and eval_pairs:  # held-out reward accuracy of the strong implicit reward
            seq_r = batch["seq_id"][batch["loss_mask"]][~chosen] - n
            sref_r = lookup(c["sref"], batch["row"], n_rows, key_index=1).to(lp)
            reward_r = args.beta * zeros.index_add(0, seq_r, (lp[~chosen] - sref_r).detach())
            m.update({"rewards/rejected": reward_r, "rewards/accuracies": (reward > reward_r).float(),
                      "rewards/margins": reward - reward_r})
        return losses.mean(), m, pearson(strong_ratio, weak)

    @torch.no_grad()
    def evaluate() -> dict:
        """Means over every held-out example: per-example metrics go through gather_for_metrics, which
        drops the duplicates accelerate adds to even out the last batch across processes."""
        model.eval()
        parts = [accelerator.gather_for_metrics(step_metrics(batch, "eval", len(eval_ds))[1]) for batch in eval_loader]
        model.train()
        return {f"eval/{k}": torch.cat([p[k] for p in parts]).double().mean().item() for k in parts[0]}

    global_step = 0
    if args.resume:
        ckpt = newest_checkpoint(args.output_dir)
        if ckpt is None:
            log("--resume: no checkpoint found, starting from scratch")
        else:
            accelerator.load_state(ckpt)
            global_step = int(ckpt.rsplit("-", 1)[1])
            for _ in range(global_step):  # the schedule is a function of the step: replayed, never unpickled
                scheduler.step()
            log(f"resumed from {ckpt} (step {global_step})")

    def save_checkpoint(step: int):
        # written to a temporary folder, then renamed: a crash mid-save never leaves a checkpoint resume would pick
        root = os.path.join(args.output_dir, "checkpoints")
        tmp, final = os.path.join(root, f"tmp-step-{step}"), os.path.join(root, f"step-{step}")
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, final)
            for old in sorted((d for d in os.listdir(root) if d.startswith("step-")), key=lambda d: int(d[5:]))[: -args.save_total_limit]:
                shutil.rmtree(os.path.join(root, old))
        accelerator.wait_for_everyone()

    if eval_loader is not None and global_step == 0:
        m = evaluate()
        log("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        log_metrics(m, 0)

    # TRY NOT TO MODIFY: the training loop
    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="wspo")
    running, n_tokens, t0 = {}, 0, time.time()
    for epoch in range(global_step // steps_per_epoch, num_epochs):
        loader = epoch_loader(epoch)
        skip = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if skip > 0:
            loader = accelerator.skip_first_batches(loader, skip)
        for batch in loader:
            with accelerator.accumulate(model):
                loss, m, corr = step_metrics(batch, "train", len(train_ds))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)):  # checked before the update
                        raise SystemExit(f"non-finite loss or gradient at step {global_step + 1} (epoch {epoch}, rows {batch['row'].tolist()}); no update "
                                         f"was applied; the last good checkpoint is in {args.output_dir}/checkpoints")
                optimizer.step()
                optimizer.zero_grad()
            m = {**m, "logratio_corr": corr.detach() * torch.ones_like(m["loss"]), "examples": torch.ones_like(m["loss"])}
            running = {k: running.get(k, 0) + v.double().sum() for k, v in m.items()}
            n_tokens += batch["input_ids"].numel()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            bar.update(1)
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                r = {k: accelerator.reduce(v, reduction="sum") for k, v in running.items()}
                tokens = accelerator.reduce(torch.tensor(float(n_tokens), device=accelerator.device), reduction="sum")
                out = {f"train/{k}": (v / r["examples"]).item() for k, v in r.items() if k != "examples"}
                out.update({"train/lr": scheduler.get_last_lr()[0], "train/epoch": global_step / steps_per_epoch,
                            "perf/tokens_per_s": tokens.item() / (time.time() - t0)})
                bar.set_postfix(loss=f"{out['train/loss']:.4f}")
                log_metrics(out, global_step)
                running, n_tokens, t0 = {}, 0, time.time()
            if eval_loader is not None and args.eval_steps and global_step % args.eval_steps == 0 and global_step != total_steps:
                log_metrics(evaluate(), global_step)
            if args.save_steps and global_step % args.save_steps == 0:
                save_checkpoint(global_step)
            if global_step >= total_steps:
                break
        if global_step >= total_steps:
            break
    bar.close()

    if eval_loader is not None:
        m = evaluate()
        log(f"step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()))
        log_metrics(m, global_step)

    # TRY NOT TO MODIFY: save a plain transformers model (LoRA merged) + tokenizer, safetensors
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if args.use_lora:
            unwrapped, state_dict = unwrapped.merge_and_unload(), None
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        log(f"saved the model to {args.output_dir}")
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
            tokenizer.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
    accelerator.wait_for_everyone()
    if args.track and accelerator.is_main_process:
        wandb.finish()
    accelerator.end_training()
