"""Supervised fine-tuning (SFT) of a causal LM on chat conversations, loss on assistant tokens only.

Step 1 of the WSPO pipeline (Zhu et al., "Weak-to-Strong Preference Optimization", 2025; official code: the WSPO
repo, LLaMA-Factory `stage: sft`): the weak and strong base models are fine-tuned on UltraChat before alignment.
The loss is next-token cross-entropy on the tokens of every assistant turn, its end-of-turn token included; system
and user turns (and the template's glue) are masked:

    L = - (1 / N) * sum_{t in A} log p(y_t | y_<t)

A = the assistant tokens of one optimizer step (every micro-batch, every process), N = |A|: the normaliser is the
token count of the whole global batch, as in transformers >= 4.46 and TRL (`num_items_in_batch`), so the gradient
does not depend on how the batch is split. Each micro-batch contributes sum_{t in A_mb} / N.

Defaults = the WSPO repo's full fine-tuning of Qwen2 base models; the published settings are recipes/ files (--config).
bf16 comes from the accelerate config (every forward runs under its autocast); dropout is kept, as in TRL's SFTTrainer.

    accelerate launch --config_file configs/zero3.yaml sft.py --config recipes/wspo/sft-qwen2-7b-full.yaml
    python -m tiny --out data/tiny && python sft.py --preset tiny   # offline tiny setting (CPU), recipes/tiny/
"""

import argparse
import atexit
import fcntl
import hashlib
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, fields
from difflib import get_close_matches
from itertools import islice
from typing import Literal, NoReturn
from urllib.parse import urlparse

import datasets
import torch
import torch.nn.functional as F
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, set_seed
from datasets import load_dataset, load_from_disk
from huggingface_hub import constants
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of the experiment (LoRA init, dropout, data order, --eval_fraction split)"""
    output_dir: str = "runs/sft"
    """where the final model, checkpoints and metrics.jsonl go"""
    config: str | None = None
    """YAML file of Args fields (the papers' settings are in recipes/); flags given on the command line override it"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # of the --config file, set after parsing (in args.json)
    preset: Literal["tiny"] | None = None
    """`tiny` = --config recipes/tiny/sft.yaml, the offline tiny setting (data/tiny and its model folders)"""
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

    # model
    model_name_or_path: str = "Qwen/Qwen2-7B"
    """hub id or local path of the model to fine-tune"""
    tokenizer_name: str | None = None
    """tokenizer hub id or path (default: --model_name_or_path)"""
    chat_template: str | None = None
    """Jinja chat template, or a path to a .jinja file, for a tokenizer that ships none; saved with the tokenizer"""
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
    dataset_name: str = "HuggingFaceH4/ultrachat_200k"
    """hub id, local dataset folder, a save_to_disk folder, or a .json/.jsonl/.parquet/.csv file"""
    dataset_config: str | None = None
    """dataset config (subset) name"""
    train_split: str = "train_sft"
    """split to train on"""
    eval_split: str | None = "test_sft"
    """split for the eval loss (None: no eval)"""
    eval_dataset_name: str | None = None
    """eval data from another hub id / folder / file (its --eval_split, or the whole file)"""
    eval_fraction: float | None = None
    """hold out this fraction of the training data (seeded by --seed) as the eval split"""
    messages_column: str = "messages"
    """column with a list of {role, content} messages (without it: TRL's prompt / completion columns)"""
    max_length: int = 4096
    """tokens per conversation; longer ones are cut (counted in the log)"""
    max_train_samples: int | None = None
    """use only the first N training conversations"""
    max_eval_samples: int | None = 1000
    """use only the first N eval conversations"""
    packing: bool = False
    """padding-free batches: a micro-batch is one row of concatenated conversations that cannot attend to each other"""

    # optimization
    learning_rate: float = 2e-6
    """peak learning rate (paper: 2e-6 full, 2e-5 LoRA)"""
    num_train_epochs: int = 2
    """passes over the training data (paper: 2 full, 3 LoRA)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides the epochs)"""
    per_device_train_batch_size: int = 1
    """conversations per micro-batch per process"""
    gradient_accumulation_steps: int = 8
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 8
    """conversations per eval batch per process"""
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
    resume_allow_changes: tuple[str, ...] = ()
    """with --resume: argument names allowed to differ from the saved args.json"""
    overwrite_output_dir: bool = False
    """replace an earlier run in output_dir: its checkpoints/ are deleted, metrics.jsonl restarts, other files stay"""

    # filled in at runtime (not flags)
    world_size: tyro.conf.Suppress[int] = 1
    """number of processes"""
    global_batch_size: tyro.conf.Suppress[int] = 0
    """micro batch x accumulation x processes"""
    data_fingerprint: tyro.conf.Suppress[str] = ""
    """size and modification time of the training data's files: --resume refuses changed data"""


# arguments that change neither the training math nor the data order: --resume accepts new values for these
RESUME_SAFE = {"exp_name", "output_dir", "preset", "config", "config_sha256", "track", "wandb_project_name",
               "wandb_entity", "push_to_hub", "hub_model_id", "trust_remote_code", "gradient_checkpointing",
               "eval_split", "eval_dataset_name", "max_eval_samples", "per_device_eval_batch_size", "logging_steps",
               "eval_steps", "save_steps", "save_total_limit", "resume", "resume_allow_changes", "overwrite_output_dir"}

# transformers schedules that need nothing but the warm-up and the step count (get_scheduler)
STEP_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "inverse_sqrt")


def fail(message: str) -> NoReturn:
    """A user error: one message saying what is wrong and how to fix it, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_config(path: str) -> list[str]:
    """A --config file as the flags it stands for: tyro checks them as on the command line, and later flags win."""
    try:
        config = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError) as e:
        config = e
    if not isinstance(config, dict):
        fail(f"--config {path} is not a YAML file of `key: value` lines: {str(config).splitlines()[0]}")
    names = [f.name for f in fields(Args) if "Suppress" not in str(f.type) and f.name not in ("config", "preset")]
    flags = ["--config", path]
    for key, value in config.items():
        if key not in names:
            fail(f"--config {path}: unknown key {key!r} (did you mean {get_close_matches(key, names, 1, 0)[0]!r}?)")
        flags += ([f"--{key}" if value else f"--no_{key}"] if isinstance(value, bool)
                  else [f"--{key}", *map(str, value if isinstance(value, list) else [value])])
    return flags


def parse_args() -> Args:
    """`--config FILE` (or `--preset tiny`, its shorthand) gives the values; every flag given overrides them."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--preset", choices=["tiny"])
    given = pre.parse_known_args()[0]
    if given.config and given.preset:
        fail("--preset tiny stands for --config recipes/tiny/sft.yaml: pass one of them")
    path = given.config or given.preset and f"{os.path.dirname(os.path.abspath(__file__))}/recipes/tiny/sft.yaml"
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = path and hashlib.sha256(open(path, "rb").read()).hexdigest()
    validate(args)
    return args


def validate(args: Args) -> None:
    """Every argument checked before anything is loaded or written: (failed, message) pairs, the first failure wins."""
    positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size", "lora_r",
                "num_train_epochs", "max_steps", "max_length", "max_train_samples", "max_eval_samples", "lora_alpha",
                "max_grad_norm", "logging_steps", "eval_steps", "save_steps", "save_total_limit")
    value = lambda name: getattr(args, name)
    unknown = sorted(set(args.resume_allow_changes) - {f.name for f in fields(Args)})
    train_file, eval_name = os.path.isfile(args.dataset_name), args.eval_dataset_name
    eval_is_train = (eval_name is not None and os.path.realpath(eval_name) == os.path.realpath(args.dataset_name)
                     and (train_file or args.eval_split in (None, args.train_split)))
    out, floats = args.output_dir, [f.name for f in fields(Args) if isinstance(value(f.name), float)]
    inputs = (args.model_name_or_path, args.tokenizer_name, args.dataset_name, eval_name)
    checks = [
        *((not math.isfinite(value(n)), f"--{n} must be a finite number (got {value(n)})") for n in floats),
        *((value(n) is not None and value(n) <= 0, f"--{n} must be positive (got {value(n)})") for n in positive),
        *((value(n) < 0, f"--{n} must be non-negative (got {value(n)})") for n in ("learning_rate", "weight_decay")),
        (not 0 <= args.warmup_ratio <= 1, f"--warmup_ratio must be in [0, 1] (got {args.warmup_ratio})"),
        (not 0 <= args.lora_dropout < 1, f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})"),
        (args.eval_fraction is not None and not 0 < args.eval_fraction < 1,
         f"--eval_fraction must be in (0, 1) (got {args.eval_fraction})"),
        (args.resume and args.overwrite_output_dir, "--resume and --overwrite_output_dir conflict: pass one of them"),
        (args.resume_allow_changes and not args.resume, "--resume_allow_changes only applies with --resume"),
        (unknown, f"--resume_allow_changes: no such argument {unknown}; name Args fields, e.g. learning_rate"),
        (args.eval_fraction is not None and eval_name is not None,
         "--eval_fraction holds out training data, --eval_dataset_name names other data: pass one of them"),
        (args.eval_split and args.eval_fraction is None and eval_name is None and train_file,
         f"--dataset_name {args.dataset_name} is a single file, so it has no eval split {args.eval_split!r}: pass "
         "--eval_dataset_name FILE, --eval_fraction 0.05 (hold out 5% of the rows) or --eval_split None (no eval)"),
        (eval_name is not None and not (args.eval_split or os.path.isfile(eval_name)),
         f"--eval_dataset_name {eval_name} is not a file: name its split with --eval_split"),
        (eval_is_train, f"the eval data are the training data ({eval_name}, split "
                        f"{args.eval_split or args.train_split}): pass held-out data or --eval_fraction"),
        (args.eval_split == args.train_split and eval_name is None and args.eval_fraction is None,
         f"--eval_split {args.eval_split!r} is the training split: pass a held-out split, --eval_fraction 0.05 or "
         "--eval_split None"),
        ((args.chat_template or "").endswith(".jinja") and not os.path.isfile(args.chat_template),
         f"--chat_template {args.chat_template}: no such file; pass a .jinja file or the template itself"),
        (args.lr_scheduler_type not in STEP_SCHEDULES, f"--lr_scheduler_type {args.lr_scheduler_type!r} is not a "
         f"schedule of warm-up and steps alone: use one of {', '.join(STEP_SCHEDULES)}"),
        (args.dtype == "float16", "--dtype float16 trains float16 weights without a loss scaler (the loss turns nan): "
         "use --dtype bfloat16, or float32 weights with mixed_precision fp16 in the accelerate config"),
        (any(n and os.path.realpath(n) == os.path.realpath(out) for n in inputs),
         f"--output_dir {out} is an input of this run (model, tokenizer or data): pass another --output_dir"),
        (os.path.exists(out) and not os.path.isdir(out), f"--output_dir {out} is a file: pass a folder"),
        (os.path.isdir(out) and set(os.listdir(out)) - {".lock"} and not (args.resume or args.overwrite_output_dir),
         f"output_dir {out} already holds files (a model, metrics.jsonl, ...); pass --overwrite_output_dir to "
         "replace them, --resume to continue that run, or another --output_dir"),
    ]
    for failed, message in checks:
        if failed:
            fail(message)


def compare_with_saved_run(args: Args) -> int | None:
    """--resume: refuse changes to the math or data order; return the saved run's completed steps if it finished."""
    path = os.path.join(args.output_dir, "args.json")
    if not os.path.exists(path):
        return None
    saved = json.load(open(path))
    changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in vars(args).items()
               if k in saved and k not in RESUME_SAFE and saved[k] != (list(v) if isinstance(v, tuple) else v)]
    refused = [c for c in changed if c.split(":")[0] not in args.resume_allow_changes]
    if refused:
        fail(f"--resume with arguments that differ from the run in {args.output_dir}: {'; '.join(refused)}. Pass the "
             f"saved values, name them in --resume_allow_changes, or use another --output_dir")
    if changed and "completed_steps" in saved and newest_checkpoint(args.output_dir) is None:
        fail(f"the run in {args.output_dir} finished and saved no checkpoint (--save_steps), so it cannot be "
             f"continued: train further with --model_name_or_path {args.output_dir} into another --output_dir")
    return None if changed else saved.get("completed_steps")


def data_fingerprint(name: str) -> str:
    """Size and mtime of each local dataset file (not the cache-*/tmp* files map/filter add); a hub id: its name."""
    files = [name] if os.path.isfile(name) else sorted(os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs
                                                       if not f.startswith(("cache-", "tmp")))
    stats = [(os.path.relpath(f, name), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16] if os.path.exists(name) else name


def lock_output_dir(path: str) -> None:
    """One run per output folder: flock on path/.lock; at exit the file goes (and the folder, if created and empty)."""
    lock, created = os.path.join(path, ".lock"), not os.path.isdir(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(lock, os.O_CREAT | os.O_RDWR)  # kept open while the process lives: that is the lock
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
    except BlockingIOError:
        fail(f"--output_dir {path} is in use by another run (host and pid {open(lock).read()!r} in {lock}): wait for "
             "it or pass another --output_dir")
    except OSError as e:
        fail(f"cannot write to --output_dir {path}: {e.strerror}; pass a folder you can write to")

    def release():
        with suppress(OSError):
            os.remove(lock)
            created and not os.listdir(path) and os.rmdir(path)

    atexit.register(release)


# ---- data: read, check, tokenize with the assistant-only mask, collate -----------------------------------------------
def locate_file_error(path: str) -> str:
    """The first bad line of a .jsonl file (1-based), or that it is empty; "" if none is found."""
    lines = [(n, line) for n, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1) if line.strip()]
    if not lines:
        return f"{path} is empty: it holds no rows"
    seen = {}  # column: (type name, line) where a value of it was first seen
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}, line {number}: not valid JSON ({e.msg}); fix or remove that line"
        if not isinstance(row, dict):
            return f"{path}, line {number}: a JSON object per line is expected, got {type(row).__name__}"
        for key, kind in ((k, type(v).__name__) for k, v in row.items() if v is not None):
            first_kind, first_line = seen.setdefault(key, (kind, number))
            if kind != first_kind:
                return (f"{path}, line {number}: column {key!r} holds type {kind} here but type {first_kind} on "
                        f"line {first_line}; every row needs the same value types")
    return ""


def load_split(name: str, config: str | None, split: str, column: str):
    """Hub id, dataset folder, save_to_disk folder or file; the column is checked unshuffled, so errors name a line."""
    if os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(name)[1])
        if kind is None:
            fail(f"cannot read dataset file {name}: use .json, .jsonl, .parquet or .csv")
        try:
            ds = load_dataset(kind, data_files={"rows": name}, split="rows")
        except Exception as e:  # datasets reports a bad row as a long traceback: find its line ourselves
            fail((name.endswith(".jsonl") and locate_file_error(name))
                 or f"cannot read {name}: {(str(e).splitlines() or [e])[0]}")
        if len(ds) == 0:
            fail(f"{name} is empty: it holds no rows")
    elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        ds = load_from_disk(name)[split]
    else:
        try:
            ds = load_dataset(name, config, split=split)
        except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
            fail(f"could not load split {split!r} of dataset {name!r}: {e}\nWith no network, use a local copy "
                 "(python -m tiny --out data/tiny writes the offline tiny setting; then --preset tiny).")
    if column not in ds.column_names and {"prompt", "completion"} <= set(ds.column_names):
        return ds  # TRL's prompt-completion format: see conversation()
    if column not in ds.column_names:
        fail((name.endswith(".jsonl") and locate_file_error(name)) or f"{name} has no column {column!r} (columns: "
             f"{ds.column_names}); pass --messages_column naming the column of {{role, content}} message lists")
    if not isinstance(ds.features[column], (datasets.List, datasets.LargeList)):  # mixed or other types: find the row
        row = next((i for i, v in enumerate(ds[column]) if v is not None and not isinstance(v, list)), None)
        if row is not None:  # in a .jsonl file: the (row + 1)-th non-blank line
            where = (f"line {[i for i, line in enumerate(open(name), 1) if line.strip()][row]}"
                     if name.endswith(".jsonl") else f"row {row + 1}")
            fail(f"{name}, {where}: column {column!r} holds type {type(ds[row][column]).__name__}, not a list of "
                 "{role, content} messages; fix the data or pass --messages_column")
    return ds


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]


def conversation(ex: dict, column: str) -> tuple[list, int]:
    """A row's messages and the first index trained on (TRL's prompt-completion rows: the completion only)."""
    if column in ex:
        return ex[column], 0
    as_list = lambda x, role: x if isinstance(x, list) else [{"role": role, "content": x}]
    prompt = as_list(ex["prompt"], "user")
    return prompt + as_list(ex["completion"], "assistant"), len(prompt)


def tokenize_conversation(tokenizer, messages, max_length: int, first: int = 0) -> dict:
    """input_ids + labels (-100 outside assistant turns and before message `first`), or a skip reason."""
    malformed = lambda m: not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str)
    skip = ("empty conversation" if not isinstance(messages, list) or not messages
            else "malformed message (needs role and string content)" if any(map(malformed, messages))
            else "" if any(m["role"] == "assistant" for m in messages[first:]) else "no assistant turn")
    if skip:
        return {"input_ids": [], "labels": [], "skip": skip}
    ids, eot = chat_ids(tokenizer, messages), tokenizer.eos_token_id
    labels = [-100] * len(ids)
    for i in (i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first):
        # ALGO LOGIC: an assistant turn = [ids(messages[:i] + generation prompt), ids(messages[:i+1])), from its
        # first content token through its end-of-turn token (the template's trailing newline is not trained)
        start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = chat_ids(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto:
            fail(f"the chat template does not render conversations incrementally (turn {i} of {messages!r}), so the "
                 "assistant-only loss mask cannot be placed; use a template that renders earlier turns unchanged")
        end = len(upto) - upto[start:][::-1].index(eot) if eot in upto[start:] else len(upto)
        labels[start:end] = ids[start:end]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels):
        return {"input_ids": [], "labels": [], "skip": "no assistant token within max_length"}
    return {"input_ids": ids, "labels": labels, "skip": "truncated" if truncated else ""}


def load_data(args: Args, tokenizer, log) -> tuple[object, object, dict]:
    """Training and eval conversations, tokenized and masked; every drop or cut, and the eval source, are logged."""
    column, evals, source = args.messages_column, None, "none (--eval_split None)"
    train = load_split(args.dataset_name, args.dataset_config, args.train_split, column)
    if args.eval_fraction is not None:
        parts = train.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train, evals = parts["train"], parts["test"]
        source = f"{args.eval_fraction:g} of {args.dataset_name} held out with seed {args.seed}"
    elif args.eval_dataset_name or args.eval_split:
        name = args.eval_dataset_name or args.dataset_name
        evals = load_split(name, args.dataset_config if name == args.dataset_name else None, args.eval_split, column)
        source = name if os.path.isfile(name) else f"{name}[{args.eval_split}]"
    log(f"eval data: {source}")
    stats, out = {}, []
    for ds, limit, what in ((train, args.max_train_samples, "train"), (evals, args.max_eval_samples, "eval")):
        if ds is not None:
            ds = ds.select(range(min(limit or len(ds), len(ds))))
            max_length = args.max_length  # not args itself in the function: datasets hashes it for its cache key
            tokenize = lambda messages, first: tokenize_conversation(tokenizer, messages, max_length, first)
            ds = ds.map(lambda ex: tokenize(*conversation(ex, column)),
                        remove_columns=ds.column_names, desc=f"tokenizing {what}")
            reasons = dict(sorted(Counter(reason for reason in ds["skip"] if reason).items()))
            kept = ds.filter(lambda ex: ex["skip"] in ("", "truncated")).remove_columns("skip")
            log(f"{what}: {len(kept)} of {len(ds)} conversations kept; "
                + (", ".join(f"{n} {r}" for r, n in reasons.items()) or "none skipped or cut"))
            if len(kept) == 0:
                fail(f"no usable conversation in the {what} data ({reasons}); check --messages_column and the data")
            stats.update({f"data/{what}_conversations": len(kept), f"data/{what}_conversations_cut": reasons.get(
                "truncated", 0), f"data/{what}_conversations_skipped": len(ds) - len(kept)})
            ds = kept
        out.append(ds)
    return out[0], out[1], stats


def collate(rows: list[dict], pad_id: int, packing: bool) -> dict:
    """Padded: right padding + attention mask. Packed: one row, position_ids restart at 0 per conversation, no mask
    (transformers: a block-diagonal causal mask; use_cache=False). Labels are shifted here, so no sequence predicts the
    next one's first token. `loss_positions` / `loss_labels`: per row, the trained positions and their tokens."""
    pad = lambda tensors, value: pad_sequence(tensors, batch_first=True, padding_value=value)  # right, to the longest
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    shifted = [torch.tensor(r["labels"][1:] + [-100]) for r in rows]
    if packing:
        batch = {"position_ids": torch.cat([torch.arange(len(x)) for x in ids])[None]}
        ids, shifted = [torch.cat(ids)], [torch.cat(shifted)]
    else:
        batch = {"attention_mask": pad([torch.ones_like(x) for x in ids], 0)}
    positions = [(s != -100).nonzero()[:, 0] for s in shifted]
    return {"input_ids": pad(ids, pad_id), **batch, "loss_positions": pad(positions, 0),
            "loss_labels": pad([s[p] for s, p in zip(shifted, positions)], -100)}


# ---- loss ------------------------------------------------------------------------------------------------------------
def assistant_nll_sum(model, batch: dict, per_sequence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the assistant tokens' next-token NLL, and their count (per row if asked); logits only at those tokens."""
    labels = batch["loss_labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                   position_ids=batch.get("position_ids"), logits_to_keep=batch["loss_positions"]).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)
    if per_sequence:
        return nll.sum(1), (labels != -100).sum(1)
    return nll.sum(), (labels != -100).sum()


# ---- model and checkpoints -------------------------------------------------------------------------------------------
def check_network(args: Args) -> None:
    """One 3-second connection to the hub if a name is not a local path: no network fails at once, not after retries."""
    remote = [n for n in (args.model_name_or_path, args.tokenizer_name, args.dataset_name, args.eval_dataset_name)
              if n and not os.path.exists(n)]
    if remote and not constants.HF_HUB_OFFLINE:
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
        except OSError:
            fail(f"no network: cannot reach the Hugging Face Hub for {remote[0]!r}. Set HF_HUB_OFFLINE=1 to use the "
                 "local cache, or pass a local path.")


def from_pretrained(auto_class, what: str, name: str, args: Args, **kwargs):
    """auto_class.from_pretrained, or one error naming what failed to load and why, with a hint that fits the input."""
    try:
        return auto_class.from_pretrained(name, trust_remote_code=args.trust_remote_code, **kwargs)
    except (OSError, ValueError) as error:
        if os.path.isdir(name):  # an empty folder, or a checkpoint (accelerate state) instead of a saved model
            held = os.listdir(name)
            why = ("it is empty; pass a folder holding a saved model (a run's output folder) or a hub id" if not held
                   else "it holds a training checkpoint (optimizer state), not a saved model; pass the run's output "
                   "folder, which holds its final model" if "optimizer.bin" in held
                   else str(error).splitlines()[0])
            fail(f"could not load {what} {name!r} from that folder: {why}")
    cache = " in the local cache (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    hint = (" Write the tiny setting's models with python -m tiny, or pass a sft.py run's folder." if args.preset else
            " With no network, build the offline tiny setting (python -m tiny --out data/tiny) and pass --preset tiny.")
    fail(f"could not load {what} {name!r}: no such local folder and not a hub id{cache}.{hint}")


def load_tokenizer(args: Args):
    name = args.tokenizer_name or args.model_name_or_path  # without --tokenizer_name: the model's own tokenizer
    tok = from_pretrained(AutoTokenizer, "tokenizer" if args.tokenizer_name else "model", name, args)
    if template := args.chat_template:  # for a base tokenizer: saved with it, so the output folder carries it
        tok.chat_template = open(template).read() if template.endswith(".jinja") else template
    if tok.chat_template is None:
        fail(f"tokenizer {name!r} has no chat template; pass --chat_template (a Jinja string or a .jinja file)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(args: Args, tokenizer):
    model = from_pretrained(AutoModelForCausalLM, "model", args.model_name_or_path, args,
                            dtype=getattr(torch, args.dtype), attn_implementation=args.attn_implementation)
    model.generation_config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()  # every forward passes use_cache=False
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_target_modules
        try:
            model = get_peft_model(model, LoraConfig(
                r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, task_type="CAUSAL_LM",
                target_modules=targets if targets == "all-linear" else targets.split(",")))
        except ValueError as e:  # peft: no module of the model matches
            fail(f"--lora_target_modules {targets!r}: {str(e).splitlines()[0].rstrip('.')}; name the model's "
                 "modules (e.g. q_proj,v_proj) or all-linear")
    return model


def checkpoint_steps(root: str) -> list[int]:
    """The steps of the fully written checkpoints in root, sorted (`step-12`, not a half-written `tmp-step-15`)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit())


def newest_checkpoint(output_dir: str) -> str | None:
    steps = checkpoint_steps(os.path.join(output_dir, "checkpoints"))
    return os.path.join(output_dir, "checkpoints", f"step-{steps[-1]}") if steps else None


if __name__ == "__main__":
    args = parse_args()
    # TRY NOT TO MODIFY: accelerator, batch-size chain, seeding, logging
    accumulation = GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps, sync_with_dataloader=False)
    # the loop fetches a step's micro-batches first; batches are copied to the device from pinned memory, without a wait
    accelerator = Accelerator(gradient_accumulation_plugin=accumulation,
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))
    args.world_size = accelerator.num_processes
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    args.data_fingerprint = data_fingerprint(args.dataset_name)
    if args.resume and (done := compare_with_saved_run(args)) is not None:
        log(f"run in {args.output_dir} already finished (step {done}); nothing to do")
        sys.exit(0)
    if accelerator.is_main_process:
        lock_output_dir(args.output_dir)
    run_id = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    check_network(args)
    set_seed(args.seed)  # the same LoRA init on every process
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer)
    set_seed(args.seed, device_specific=True)  # per-rank streams from here on
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; global batch "
        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x {args.world_size} "
        f"processes = {args.global_batch_size}")

    with accelerator.main_process_first():  # tokenized once: the other processes reuse the datasets cache
        train_ds, eval_ds, data_stats = load_data(args, tokenizer, log)
    collate_fn = lambda rows: collate(rows, tokenizer.pad_token_id, args.packing)
    # whole optimizer steps only: every step sees exactly global_batch_size conversations
    steps_per_epoch = len(train_ds) // args.global_batch_size
    if steps_per_epoch == 0:
        fail(f"{len(train_ds)} training conversations are fewer than one global batch ({args.global_batch_size}): "
             "lower --per_device_train_batch_size or --gradient_accumulation_steps")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs
    accum = args.gradient_accumulation_steps

    def epoch_loader(epoch: int, steps_done: int):
        # the data order depends on (seed, epoch) only, so a resumed run sees the same batches (and skips those done)
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed + epoch))
        subset = train_ds.select(order[: steps_per_epoch * args.global_batch_size].tolist())
        loader = accelerator.prepare(DataLoader(subset, args.per_device_train_batch_size, collate_fn=collate_fn,
                                                pin_memory=accelerator.device.type == "cuda"))
        return accelerator.skip_first_batches(loader, steps_done * accum) if steps_done else loader

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors (as TRL)
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))
    if not any(scheduler.lr_lambdas[0](step) for step in range(total_steps)):  # warm-up starts at a rate of 0
        log(f"warning: the learning rate is 0 at each of the {total_steps} steps (warm-up --warmup_ratio "
            f"{args.warmup_ratio}): no update is applied; train more steps or lower --warmup_ratio")
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None if eval_ds is None else accelerator.prepare(DataLoader(  # padded: one row per conversation
        eval_ds, args.per_device_eval_batch_size, collate_fn=lambda rows: collate(rows, tokenizer.pad_token_id, False)))

    global_step, root, errors = 0, os.path.join(args.output_dir, "checkpoints"), []
    for step in reversed(checkpoint_steps(root) if args.resume else []):  # the newest that loads
        try:
            accelerator.load_state(os.path.join(root, f"step-{step}"))
            global_step = step
            break
        except Exception as e:  # a truncated or corrupt file: the previous checkpoint is loaded over it
            errors.append((str(e).splitlines() or [repr(e)])[0])
            log(f"--resume: checkpoint step-{step} cannot be loaded ({errors[-1]}); trying the previous one")
    # one step on every process: the newest that all loaded (a process that loaded a newer one reloads that step)
    agreed = -int(accelerator.reduce(torch.tensor(-global_step, device=accelerator.device), reduction="max"))
    if agreed and agreed != global_step:
        accelerator.load_state(os.path.join(root, f"step-{agreed}"))
    global_step = agreed
    for _ in range(global_step):  # the schedule is a function of the step: replayed, never unpickled
        scheduler.step()
    if global_step:
        log(f"resumed from {root}/step-{global_step} (step {global_step})")
    if args.resume and not global_step:
        if checkpoint_steps(root):
            fail(f"no checkpoint in {root} can be loaded (newest: {(errors or ['another process failed'])[0]}); "
                 "restore them, or start afresh with --overwrite_output_dir (discards them)")
        log("--resume: no checkpoint found, starting from scratch")

    # TRY NOT TO MODIFY: the run's files are written from here on (before: only the lock, gone again if the start fails)
    metrics_file = None
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            shutil.rmtree(os.path.join(args.output_dir, "checkpoints"), ignore_errors=True)
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump({**vars(args), "run_id": run_id}, f, indent=2)
        metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w")
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_id, config=vars(args),
                       dir=args.output_dir, save_code=True)

    def log_metrics(metrics: dict, step: int):
        if accelerator.is_main_process:
            print(json.dumps({"step": step, "run_id": run_id, **metrics}), file=metrics_file, flush=True)
            if args.track:
                wandb.log(metrics, step=step)

    @torch.no_grad()
    def evaluate_and_log(step: int):
        # token-weighted mean over the split; gather_for_metrics drops the duplicates that even out the last batch
        model.eval()
        nll_sums, counts = zip(*(accelerator.gather_for_metrics(assistant_nll_sum(model, batch, per_sequence=True))
                                 for batch in eval_loader))
        model.train()
        eval_loss = (torch.cat(nll_sums).sum() / torch.cat(counts).sum()).item()
        log(f"step {step}: eval/loss {eval_loss:.4f}")
        log_metrics({"eval/loss": eval_loss}, step)
        if not math.isfinite(eval_loss):
            raise SystemExit(f"eval/loss is {eval_loss} at step {step}: the model is not saved (newest "
                             f"checkpoint: {newest_checkpoint(args.output_dir) or 'none'})")

    def save_checkpoint(step: int):
        # written to a temporary folder, then renamed: a crash mid-save never leaves a checkpoint resume would pick
        accelerator.save_state(os.path.join(root, f"tmp-step-{step}"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # a step saved before (resumed from an earlier checkpoint) is replaced
            shutil.rmtree(os.path.join(root, f"step-{step}"), ignore_errors=True)
            os.replace(os.path.join(root, f"tmp-step-{step}"), os.path.join(root, f"step-{step}"))
            for old in checkpoint_steps(root)[: -args.save_total_limit]:
                shutil.rmtree(os.path.join(root, f"step-{old}"))
        accelerator.wait_for_everyone()

    if global_step == 0:
        log_metrics(data_stats, 0)
        if eval_loader is not None:
            evaluate_and_log(0)

    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="sft")
    window = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # sum of step losses, input tokens
    window_steps, window_start = 0, time.time()
    while global_step < total_steps:
        loader = epoch_loader(*divmod(global_step, steps_per_epoch))
        for micro_batches in islice(zip(*[iter(loader)] * accum), total_steps - global_step):  # one optimizer step
            # ALGO LOGIC: N = the assistant tokens of the whole step (all micro-batches, all processes), counted first
            n_loss_tokens = accelerator.reduce(sum((b["loss_labels"] != -100).sum() for b in micro_batches), "sum")
            # input tokens (not padding), a device scalar: counted without a host sync
            step_tokens = sum(b["attention_mask"].sum() if "attention_mask" in b
                              else b["input_ids"].new_tensor(b["input_ids"].numel()) for b in micro_batches)
            for batch in micro_batches:
                with accelerator.accumulate(model):
                    # ALGO LOGIC: this micro-batch's share of L = -(1/N) sum_{t in A} log p(y_t | y_<t) (header)
                    nll_sum, _ = assistant_nll_sum(model, batch)
                    loss = nll_sum / n_loss_tokens
                    # accelerate divides by the accumulation steps and DDP / FSDP average over processes: undone here
                    accelerator.backward(loss * accum * accelerator.num_processes)
                    if accelerator.sync_gradients:
                        # TRY NOT TO MODIFY: clip; a non-finite loss or gradient stops the run before its update
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        if not torch.isfinite(grad_norm):
                            raise SystemExit(f"non-finite loss or gradient at step {global_step + 1}: no update was "
                                             f"applied from that step on; newest checkpoint: "
                                             f"{newest_checkpoint(args.output_dir) or 'none'}")
                    optimizer.step()
                    optimizer.zero_grad()
                window[0] += loss.detach()
            window[1] += step_tokens
            # TRY NOT TO MODIFY: schedule, logging, eval, checkpoints, throughput
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used (logged)
            scheduler.step()
            global_step += 1
            window_steps += 1
            bar.update(1)
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                loss_sum, tokens = accelerator.reduce(window, reduction="sum").tolist()
                seconds = time.time() - window_start  # eval and checkpoint time included: benchmarks/ skips them
                metrics = {"train/loss": loss_sum / window_steps, "train/lr": step_lr,
                           "train/epoch": global_step / steps_per_epoch, "perf/tokens_per_s": tokens / seconds,
                           "perf/examples_per_s": window_steps * args.global_batch_size / seconds}
                bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
                log_metrics(metrics, global_step)
                window.zero_()
                window_steps, window_start = 0, time.time()
            if eval_loader is not None and args.eval_steps and global_step % args.eval_steps == 0 \
                    and global_step != total_steps:
                evaluate_and_log(global_step)
            if args.save_steps and global_step % args.save_steps == 0:
                save_checkpoint(global_step)
    bar.close()
    log_metrics({"perf/peak_memory_gb": (torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda"
                                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9},
                global_step)
    if eval_loader is not None:
        evaluate_and_log(global_step)

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
            json.dump({**vars(args), "run_id": run_id, "completed_steps": global_step}, f, indent=2)
        log(f"saved the model to {args.output_dir}")
        for part in (unwrapped, tokenizer) if args.push_to_hub else ():
            part.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
    accelerator.wait_for_everyone()
    if args.track and accelerator.is_main_process:
        wandb.finish()
    # the model goes before the process group: a DDP model freed after it can deadlock Gloo's exit (pytorch#56297)
    accelerator.free_memory()
    del model, optimizer
    accelerator.end_training()
