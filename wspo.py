"""Weak-to-Strong Preference Optimization (WSPO): align a strong model by imitating how alignment changed a weak one.

Zhu et al., "Weak-to-Strong Preference Optimization: Stealing Reward from Weak Aligned Model" (ICLR 2025); official
code: the WSPO repo, `src/llamafactory/train/wspo/trainer.py`. Four models share one tokenizer: the strong policy pi
(trained, initialised from --strong), the strong reference pi_sref (frozen; --strong_ref, default --strong), the weak
model before alignment pi_wref (--weak_ref) and after it pi_wal (--weak_aligned). On the chosen responses y:

    official (default, token level):
        d_t = beta (log pi(y_t) - log pi_sref(y_t)) - gamma (log pi_wal(y_t) - log pi_wref(y_t))
        L   = mean over the batch of  sum_t d_t^2 / |y|                      beta = 0.1, gamma = 1
    paper (--loss_level sequence): the same regression on whole-response log-ratios,
        L   = mean over the batch of  (beta log pi/pi_sref(y) - gamma log pi_wal/pi_wref(y))^2

The paper writes the sequence-level form; the official code trains the token-level one, the default here. Training
never forwards the rejected responses (the official code discards them); in eval they give the reward accuracy.

The weak log-ratio and the strong reference's log-probs never change: a pre-pass computes them per token, cached on
disk. It forwards the strong reference in the run's own batches under the same autocast and weights dtype, so the
strong log-ratio is exactly 0 at step 0, in fp32 and bf16 alike. All four models must share one tokenizer.

The paper's settings (full fine-tuning with ZeRO-3 offload, LoRA; with their sources and launch commands) are the
recipes/wspo/wspo-*.yaml files (--config), after the SFT and weak DPO recipes beside them. Loss normaliser: per
sequence (token level: sum_t d_t^2 / |y|), then the mean over the micro-batch's sequences; accumulation and processes
average those means: the mean over all sequences of the optimizer step, as every micro-batch holds as many sequences
(the rest of an epoch that does not fill a global batch is left out).

GPU (mixed precision and ZeRO-3 from configs/; the recipe's own comment adds the paper's 4 GPUs and CPU offload):
    accelerate launch --config_file configs/zero3.yaml wspo.py --config recipes/wspo/wspo-qwen2-7b-full.yaml
Offline tiny setting (CPU; run_tiny.sh trains the models it expects; --preset tiny is recipes/tiny/wspo.yaml):
    python wspo.py --preset tiny --output_dir runs/tiny/wspo-strong
"""

import argparse
import atexit
import difflib
import fcntl
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import socket
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, fields
from functools import partial
from typing import Literal, NoReturn
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device, set_seed
from datasets import load_dataset, load_from_disk
from datasets.fingerprint import Hasher
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of the experiment (data order, --eval_fraction split)"""
    output_dir: str = "runs/wspo"
    """where the final model, checkpoints, args.json and metrics.jsonl go"""
    config: str | None = None
    """YAML file of Args fields (the papers' settings are in recipes/); flags given on the command line override it"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # set after parsing; recorded in args.json
    preset: Literal["tiny"] | None = None
    """shorthand for --config recipes/tiny/wspo.yaml (the offline tiny setting); flags still override"""
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
    chat_template: str | None = None
    """Jinja chat template, or a path to a .jinja file, for a tokenizer that ships none; saved with the tokenizer"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype every model's weights are loaded in; mixed precision itself comes from the accelerate config"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, flash_attention_2"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    disable_dropout: bool = True
    """set every dropout probability to 0 in the policy, as TRL's DPOTrainer and the official WSPO trainer do"""

    # LoRA
    use_lora: bool = False
    """train LoRA adapters (peft) instead of all weights; merged into the saved model"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.05
    """LoRA dropout (0 while --disable_dropout is on)"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: "all-linear" or a comma-separated list of names"""

    # data
    dataset_name: str = "HuggingFaceH4/ultrafeedback_binarized"
    """hub id, local dataset folder, a save_to_disk folder, or a .json/.jsonl/.parquet/.csv file"""
    dataset_config: str | None = None
    """dataset config (subset) name"""
    train_split: str = "train_prefs"
    """split to train on"""
    eval_split: str | None = "test_prefs"
    """held-out split (None: no eval); with a rejected column it also gives the reward accuracy"""
    eval_dataset_name: str | None = None
    """eval data from another hub id / folder / file (its --eval_split, or the whole file)"""
    eval_fraction: float | None = None
    """hold out this fraction of the training data (seeded by --seed) as the eval split"""
    response_column: str = "chosen"
    """the responses to imitate: a message list ending in the assistant turn (`chosen`, `messages`), or a string"""
    prompt_column: str = "prompt"
    """prompt column (a string or a message list), used when each response is a string or a lone assistant message"""
    rejected_column: str = "rejected"
    """eval only: rejected responses for the held-out reward accuracy (skipped if absent)"""
    max_length: int = 4096
    """prompt + response tokens (paper cutoff 4096); longer responses are cut (end-of-turn kept)"""
    max_prompt_length: int = 2048
    """prompt tokens; longer prompts lose whole earlier turns, then the start of the oldest user text"""
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
    """sequences per forward in the weak models' pre-pass (the strong reference runs in the run's own batches)"""

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
    """micro-batches per optimizer step (paper, on 4 GPUs: 4 full, 8 LoRA)"""
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
    resume_allow_changes: tuple[str, ...] = ()
    """with --resume: argument names allowed to differ from the saved args.json"""
    overwrite_output_dir: bool = False
    """replace an earlier run in output_dir: its checkpoints/ are deleted, metrics.jsonl restarts, other files stay"""

    # filled in at runtime (not flags)
    world_size: tyro.conf.Suppress[int] = 1  # number of processes
    global_batch_size: tyro.conf.Suppress[int] = 0  # micro batch x accumulation x processes
    data_fingerprint: tyro.conf.Suppress[str] = ""  # size and mtime of the training data's files: --resume compares it


# arguments that change neither the training math nor the data order: --resume accepts changes to them
RESUME_SAFE = {"output_dir", "track", "wandb_project_name", "wandb_entity", "push_to_hub", "hub_model_id",
               "logging_steps", "eval_steps", "save_steps", "save_total_limit", "resume", "resume_allow_changes",
               "overwrite_output_dir", "cache_dir", "world_size", "per_device_eval_batch_size", "exp_name", "preset",
               "eval_split", "eval_dataset_name", "max_eval_samples", "trust_remote_code", "prepass_batch_size",
               "config", "config_sha256"}
# transformers schedules that need nothing but the warm-up and the step count (get_scheduler)
STEP_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "inverse_sqrt")


def fail(message: str) -> NoReturn:
    """A user error: one message saying what is wrong and how to fix it, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_config(path: str) -> list[str]:
    """A --config YAML file as the flags it stands for: tyro checks the values as typed on the command line."""
    try:
        config = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError) as e:
        fail(f"--config {path}: cannot read it as YAML ({str(e).splitlines()[0]}); pass a YAML file of Args fields")
    if not isinstance(config, dict):
        fail(f"--config {path} is not a mapping of Args fields (`key: value` lines)")
    names = [f.name for f in fields(Args) if f.name not in ("config", "preset") and "Suppress" not in str(f.type)]
    flags = ["--config", path]
    for key, value in config.items():  # the fields filled in at runtime (Suppress) are no keys either
        if key not in names:
            fail(f"--config {path}: unknown key {key!r} (did you mean "
                 f"{difflib.get_close_matches(str(key), names, n=1, cutoff=0)[0]!r}?)")
        values = [] if isinstance(value, bool) else value if isinstance(value, list) else [value]  # None: "None"
        flags += [f"--{'no_' if value is False else ''}{key}", *map(str, values)]  # bool: --key / --no_key
    return flags


def parse_args() -> Args:
    """`--config FILE.yaml` (`--preset tiny`: recipes/tiny/wspo.yaml) sets the defaults; flags given override them."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # which file, if any: tyro then parses once
    pre.add_argument("--config")
    pre.add_argument("--preset", choices=["tiny"])
    given = pre.parse_known_args()[0]
    if given.config and given.preset:
        fail("--preset tiny is --config recipes/tiny/wspo.yaml: pass one of them")
    path = given.config or given.preset and os.path.join(os.path.dirname(__file__), "recipes", "tiny", "wspo.yaml")
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = path and hashlib.sha256(open(path, "rb").read()).hexdigest()
    return args


def is_file_dataset(name: str | None) -> bool:
    return name is not None and name.endswith((".json", ".jsonl", ".parquet", ".csv"))


def validate(args: Args):
    """Every check that needs no model or data, before anything is loaded or written (--resume's; the hub's in 3 s)."""
    value = lambda name: getattr(args, name)
    positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                "num_train_epochs", "max_length", "max_prompt_length", "prepass_batch_size", "lora_r", "lora_alpha",
                "logging_steps", "save_total_limit", "max_steps", "eval_steps", "save_steps", "max_train_samples",
                "max_eval_samples", "beta", "max_grad_norm"]
    unknown = sorted(set(args.resume_allow_changes) - set(vars(args)))
    no_held_out = args.eval_fraction is None and args.eval_dataset_name is None and args.eval_split is not None
    out, floats = args.output_dir, [f.name for f in fields(Args) if isinstance(value(f.name), float)]
    inputs = (args.strong, args.strong_ref, args.weak_ref, args.weak_aligned, args.dataset_name, args.eval_dataset_name)
    checks = [(not math.isfinite(value(n)), f"--{n} must be a finite number (got {value(n)})") for n in floats]
    checks += [(value(n) is not None and value(n) <= 0, f"--{n} must be positive (got {value(n)})") for n in positive]
    checks += [(value(n) < 0, f"--{n} must be non-negative (got {value(n)})")
               for n in ("learning_rate", "weight_decay", "weak_coef")]
    checks += [
        (not 0 <= args.warmup_ratio <= 1, f"--warmup_ratio must be in [0, 1] (got {args.warmup_ratio})"),
        (not 0 <= args.lora_dropout < 1, f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})"),
        (args.eval_fraction is not None and not 0 < args.eval_fraction < 1,
         f"--eval_fraction must be in (0, 1) (got {args.eval_fraction})"),
        (args.max_prompt_length >= args.max_length, f"--max_prompt_length ({args.max_prompt_length}) must be below "
         f"--max_length ({args.max_length}): the response needs room"),
        (args.resume and args.overwrite_output_dir,
         "--resume continues the run in output_dir, --overwrite_output_dir replaces it: pass one of them"),
        (args.resume_allow_changes and not args.resume, "--resume_allow_changes only applies with --resume"),
        (unknown, f"--resume_allow_changes names unknown arguments {unknown}"),
        (args.eval_fraction is not None and args.eval_dataset_name is not None,
         "--eval_fraction holds out training data, --eval_dataset_name names other data: pass one of them"),
        (no_held_out and is_file_dataset(args.dataset_name), f"--dataset_name {args.dataset_name} is a single "
         f"file, which has no held-out split: evaluating on {args.eval_split!r} would evaluate on the training data. "
         "Pass --eval_dataset_name FILE, --eval_fraction 0.05, or --eval_split None"),
        (no_held_out and args.eval_split == args.train_split, f"--eval_split {args.eval_split!r} is the training "
         "split: pick a held-out split, --eval_fraction 0.05, or --eval_split None"),
        (args.eval_dataset_name is not None and (is_file_dataset(args.eval_dataset_name) or args.eval_split ==
         args.train_split) and os.path.abspath(args.eval_dataset_name) == os.path.abspath(args.dataset_name),
         f"--eval_dataset_name {args.eval_dataset_name} is the training data: name held-out data"),
        (os.path.realpath(args.weak_aligned) == os.path.realpath(args.weak_ref), f"--weak_aligned and --weak_ref are "
         f"the same model ({args.weak_ref}): the weak log-ratio is 0 and nothing is learned; pass the weak model after "
         "and before alignment"),
        (args.lr_scheduler_type not in STEP_SCHEDULES, f"--lr_scheduler_type {args.lr_scheduler_type!r} is not a "
         f"schedule of warm-up and steps alone: use one of {', '.join(STEP_SCHEDULES)}"),
        (args.dtype == "float16", "--dtype float16 trains float16 weights without a loss scaler (the loss turns nan): "
         "use --dtype bfloat16, or float32 weights with mixed_precision fp16 in the accelerate config"),
        (any(n and os.path.realpath(n) == os.path.realpath(out) for n in inputs),
         f"--output_dir {out} is an input of this run (a model or the data): pass another --output_dir"),
        (os.path.exists(out) and not os.path.isdir(out), f"--output_dir {out} is a file: pass a folder"),
        (str(args.chat_template).endswith(".jinja") and not os.path.isfile(args.chat_template),
         f"--chat_template {args.chat_template} does not exist: pass a .jinja file or the template itself"),
        (os.path.isdir(out) and set(os.listdir(out)) - {".lock"} and not args.resume
         and not args.overwrite_output_dir, f"output_dir {args.output_dir} already holds files (a model, "
         "metrics.jsonl, ...); pass --overwrite_output_dir to replace them, --resume to continue that run, or another "
         "--output_dir")]
    for bad, message in checks:
        if bad:
            fail(message)
    args.strong_ref = args.strong_ref or args.strong
    args.world_size = int(os.environ.get("WORLD_SIZE", 1))
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size

    args.data_fingerprint = data_fingerprint(args.dataset_name)
    saved_path = os.path.join(args.output_dir, "args.json")
    if args.resume and os.path.exists(saved_path):
        saved, new = json.load(open(saved_path)), json.loads(json.dumps(vars(args)))
        changed = [k for k in new if k not in RESUME_SAFE and k in saved and saved[k] != new[k]]
        refused = [k for k in changed if k not in args.resume_allow_changes]
        if refused:
            changes = "; ".join(f"{k}: {saved[k]!r} -> {new[k]!r}" for k in refused)
            fail(f"--resume with arguments that differ from {saved_path}: {changes}. Resume with the saved values, or "
                 f"allow the change with --resume_allow_changes {' '.join(refused)}")
        if "completed_steps" in saved and not changed:  # as dpo.py: allowed but unchanged arguments change nothing
            print(f"run in {args.output_dir} already finished (step {saved['completed_steps']}); nothing to do")
            sys.exit(0)
        if "completed_steps" in saved and not checkpoint_steps(os.path.join(args.output_dir, "checkpoints")):
            fail(f"the run in {args.output_dir} finished and saved no checkpoint (--save_steps), so it cannot be "
                 f"continued (it would retrain from scratch over its model): train further with --strong "
                 f"{args.output_dir} into another --output_dir")

    remote, url = [n for n in inputs if n is not None and not os.path.exists(n)], urlparse(constants.ENDPOINT)
    try:
        if remote and not constants.HF_HUB_OFFLINE:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
    except OSError:
        fail(f"no network: cannot reach the Hugging Face Hub for {remote[0]!r}. Set HF_HUB_OFFLINE=1 to use the "
             "local cache, or pass a local path.")


def data_fingerprint(name: str) -> str:
    """Size and modification time of every file of a local dataset or model (a file or a folder); a hub id: its name.
    The cache-*/tmp* files that map/filter write next to a save_to_disk dataset are left out (a resume must match)."""
    files = [name] if os.path.isfile(name) else sorted(os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs
                                                       if not f.startswith(("cache-", "tmp")))
    stats = [(os.path.relpath(f, name), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16] if os.path.exists(name) else name


def lock_output_dir(path: str) -> None:
    """One run at a time per output folder: a kernel lock (flock) on path/.lock, released however the process ends. At
    exit the file goes, and the folder if this run created it and left it empty."""
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


def checkpoint_steps(root: str) -> list[int]:
    """The steps of the checkpoints in root, sorted (`step-12`; a half-written `tmp-step-15` is not renamed yet)."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit())


# ---- data ------------------------------------------------------------------------------------------------------------
def first_bad_line(path: str) -> str | None:
    """Where a .json/.jsonl file breaks: the 1-based line of invalid JSON, a non-object, or a field whose type
    differs from its first occurrence (a .json file's records count as lines); None if nothing is found."""
    lines, seen = enumerate(open(path), 1), {}
    if path.endswith(".json"):  # one JSON document
        try:
            document = json.load(open(path))
        except json.JSONDecodeError as e:
            return f"line {e.lineno} is not valid JSON ({e.msg})"
        lines = enumerate(map(json.dumps, document if isinstance(document, list) else []), 1)
    for number, line in lines:
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            return f"line {number} is not valid JSON ({e.msg})"
        if not isinstance(record, dict):
            return f"line {number} is not a JSON object"
        for key, value in record.items():
            first = seen.setdefault(key, (type(value).__name__, number))
            if value is not None and first[0] not in ("NoneType", type(value).__name__):
                return f"line {number}: {key!r} is a {type(value).__name__}, but a {first[0]} on line {first[1]}"
    return None


def load_split(name: str, config: str | None, split: str | None):
    """Hub id, local dataset folder (README YAML / data files), save_to_disk folder, or one file (all of it)."""
    if is_file_dataset(name):
        if not os.path.isfile(name):
            fail(f"dataset file {name} does not exist")
        if not open(name, "rb").read(4096).strip():
            fail(f"dataset file {name} is empty: it holds no examples")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}[os.path.splitext(name)[1]]
        try:
            return load_dataset(kind, data_files=name, split="train")
        except Exception as e:
            where = first_bad_line(name) if kind == "json" else None
            fail(f"cannot read dataset file {name}: {where or str(e).splitlines()[0]}; fix or remove that line")
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        splits = load_from_disk(name)
        if split not in splits:
            fail(f"dataset {name} has no split {split!r} (splits: {list(splits)})")
        return splits[split]
    try:
        return load_dataset(name, config, split=split)
    except Exception as e:
        fail(f"could not load split {split!r} of dataset {name!r}: {str(e).splitlines()[0]}\nWith no network, use a "
             "local copy (python -m tiny --out data/tiny writes the offline tiny setting; then --preset tiny).")


def load_raw_splits(args: Args, log):
    """The raw training and eval splits; the eval source is logged, and never the training data."""
    raw_train = load_split(args.dataset_name, args.dataset_config, args.train_split)
    if args.eval_fraction is not None:
        parts = raw_train.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        log(f"eval: {len(parts['test'])} examples held out of {args.dataset_name} (--eval_fraction "
            f"{args.eval_fraction})")
        return parts["train"], parts["test"]
    if args.eval_dataset_name is None and args.eval_split is None:
        return raw_train, None
    eval_name = args.eval_dataset_name or args.dataset_name
    raw_eval = load_split(eval_name, args.dataset_config, args.eval_split)
    log(f"eval: {eval_name}" + ("" if is_file_dataset(args.eval_dataset_name) else f", split {args.eval_split}"))
    return raw_train, raw_eval


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)


def fit_prompt(tokenizer, prompt: list[dict], max_prompt_length: int):
    """The prompt's ids within max_prompt_length, no role header cut: earlier turns are dropped (a system message is
    kept), then the oldest user text is cut from its start. Returns (ids, messages kept, cut?), or None."""
    ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    cut = len(ids) > max_prompt_length
    system = prompt[:1] if prompt[0].get("role") == "system" else []
    turns = prompt[len(system):]
    for start in [i for i in range(1, len(turns)) if turns[i].get("role") == "user"]:  # oldest turns first
        if len(ids) <= max_prompt_length:
            break
        prompt = system + turns[start:]
        ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    excess = len(ids) - max_prompt_length
    if excess > 0:
        oldest = next(i for i, m in enumerate(prompt) if m.get("role") == "user")  # the prompt ends with one
        blank = chat_ids(tokenizer, [{**m, "content": ""} if i == oldest else m for i, m in enumerate(prompt)], True)
        head = next((i for i, (a, b) in enumerate(zip(ids, blank)) if a != b), min(len(ids), len(blank)))
        limit = min(len(ids), len(blank)) - head  # the common suffix cannot overlap the common prefix
        tail = next((i for i in range(limit) if ids[-1 - i] != blank[-1 - i]), limit)
        if len(ids) - head - tail <= excess:  # the user text is shorter than the excess: headers alone too long
            return None
        ids = ids[:head] + ids[head + excess:]
    return ids, prompt, cut


def response_ids(tokenizer, prompt: list[dict], text: str) -> list[int]:
    """The tokens the chat template appends to the prompt for an assistant turn, through end-of-turn."""
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": text}])
    if full[: len(prompt_ids)] != prompt_ids:
        fail(f"the chat template's prompt tokens are not a prefix of prompt+response tokens for {prompt!r}; the "
             "response cannot be located. Use a template whose generation prompt ends the prompt exactly.")
    resp, eot = full[len(prompt_ids):], tokenizer.eos_token_id
    return resp[: len(resp) - resp[::-1].index(eot)] if eot in resp else resp + [eot]


def tokenize_example(tokenizer, ex: dict, args: Args, with_rejected: bool) -> dict:
    """prompt_ids, chosen_ids (the response to imitate) and, for eval, rejected_ids; or a skip reason."""
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "skip": "", "prompt_cut": False,
           "response_cut": False}
    conv = ex[args.response_column]
    if isinstance(conv, list):
        if not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
            return {**out, "skip": "response is not a conversation ending in an assistant turn"}
        prompt, text = conv[:-1] or ex.get(args.prompt_column), conv[-1].get("content")
    else:
        prompt, text = ex.get(args.prompt_column), conv
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not prompt or not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
        return {**out, "skip": "the prompt does not end with a user message"}
    if not isinstance(text, str) or not text.strip():
        return {**out, "skip": "empty response"}
    rejected = ex[args.rejected_column] if with_rejected else None
    texts = [text] + ([rejected[-1]["content"] if isinstance(rejected, list) else rejected] if with_rejected else [])
    fitted = fit_prompt(tokenizer, prompt, args.max_prompt_length)
    if fitted is None or args.max_length - len(fitted[0]) < 2:
        return {**out, "skip": "prompt leaves no room for a response"}
    prompt_ids, prompt, prompt_cut = fitted
    room = args.max_length - len(prompt_ids)
    resps = [response_ids(tokenizer, prompt, t) for t in texts]
    kept = [r if len(r) <= room else r[: room - 1] + [tokenizer.eos_token_id] for r in resps]  # end-of-turn kept
    return {**out, "prompt_ids": prompt_ids, "chosen_ids": kept[0], "rejected_ids": kept[1] if with_rejected else [],
            "prompt_cut": prompt_cut, "response_cut": kept != resps}


def prepare_split(raw, max_samples: int | None, tokenizer, args: Args, what: str, source: str, log):
    """The first max_samples, columns checked, tokenized, unusable rows dropped: (split + `row`, rejected?, counts)."""
    raw = raw if max_samples is None else raw.select(range(min(max_samples, len(raw))))
    if args.response_column not in raw.column_names:
        fail(f"the {what} data ({source}) has no column {args.response_column!r} (columns: {raw.column_names}); pass "
             "--response_column naming the responses to imitate (e.g. chosen, or messages)")
    first = raw[0][args.response_column] if len(raw) else ""
    if not isinstance(first, (str, list)):
        fail(f"column {args.response_column!r} of the {what} data ({source}) holds {type(first).__name__} values "
             "(row 1); expected a message list ending in the assistant turn, or a string")
    if isinstance(first, str) and args.prompt_column not in raw.column_names:
        fail(f"the {what} responses are strings, but the data ({source}) has no prompt column {args.prompt_column!r}; "
             "pass --prompt_column")
    with_rejected = what == "eval" and args.rejected_column in raw.column_names
    # the datasets cache key: the input rows, the tokenizer, the fields tokenize_example reads and this file's code
    read = ("response_column", "prompt_column", "rejected_column", "max_length", "max_prompt_length")
    key = Hasher.hash([raw._fingerprint, tokenizer, with_rejected, *(getattr(args, n) for n in read),
                       open(__file__, "rb").read()])
    ds = raw.map(lambda ex: tokenize_example(tokenizer, ex, args, with_rejected), remove_columns=raw.column_names,
                 desc=f"tokenizing {what}", new_fingerprint=key)
    skips = {str(r): int(n) for r, n in zip(*np.unique(list(ds["skip"]), return_counts=True)) if r}  # no np reprs
    kept = ds.filter(lambda ex: ex["skip"] == "")
    prompts_cut, responses_cut = sum(kept["prompt_cut"]), sum(kept["response_cut"])
    log(f"{what}: {len(kept)} of {len(ds)} examples kept; {prompts_cut} prompts cut, {responses_cut} responses cut"
        + "".join(f", {n} {r}" for r, n in skips.items()))
    if len(kept) == 0:
        fail(f"no usable example in the {what} data ({source}; {skips}); check --response_column and the data")
    counts = {f"data/{what}_examples": len(kept), f"data/{what}_dropped": len(ds) - len(kept),
              f"data/{what}_prompts_cut": prompts_cut, f"data/{what}_responses_cut": responses_cut}
    kept = kept.remove_columns(["skip", "prompt_cut", "response_cut"])
    return kept.add_column("row", list(range(len(kept)))), with_rejected, counts


def check_tokenizers(args: Args, tokenizer, raws: list, log):
    """d_t pairs strong and weak log-probs token by token: every tokenizer must give the strong one's ids on every
    example (stop at the first that does not), as one with the strong one's definition does by construction."""
    definition = lambda t: (t.backend_tokenizer.to_str(), t.chat_template, t.eos_token, t.pad_token)
    ids_of = lambda tok, ex: sum(map(tokenize_example(tok, ex, args, False).get, ("prompt_ids", "chosen_ids")), [])
    for name in dict.fromkeys(n for n in (args.strong_ref, args.weak_ref, args.weak_aligned) if n != args.strong):
        tok = load_pretrained(AutoTokenizer, name, args)
        same = definition(tok) == definition(tokenizer)
        for split, raw in [] if same else raws:
            for i, ex in enumerate(raw):
                if ids_of(tok, ex) != ids_of(tokenizer, ex):
                    fail(f"tokenizer mismatch: {name!r} and the strong model {args.strong!r} tokenize {split} example "
                         f"{i} differently ({ex.get(args.prompt_column)!r}):\n  {name}: {ids_of(tok, ex)}\n  "
                         f"{args.strong}: {ids_of(tokenizer, ex)}\nThe 4 models need one tokenizer and chat template.")
        log(f"tokenizer check: {name} " + ("has the strong model's tokenizer (identical definition)" if same else
                                           "gives the strong tokenizer's ids on every example"))


def cached_tokens(cache: dict, rows: list[int], key_index: int = 0) -> torch.Tensor:
    """The cached per-token values of the rows' responses (key 0: chosen, 1: rejected), in collate's token order."""
    sequences = [key_index * cache["n_rows"] + r for r in rows]
    return torch.cat([cache["values"][cache["offsets"][k]: cache["offsets"][k + 1]] for k in sequences])


def collate(examples: list[dict], pad_id: int, padding_free: bool, keys=("chosen_ids",), cache: dict | None = None):
    """One sequence per (key, row), keys outer: with keys=(chosen, rejected), sequence i and i+len(examples) pair up.
    `loss_mask[t]` marks the positions that predict a response token (`response_targets`, in order); their sequence
    ids and cached values are built on the host. padding-free: one row, position_ids restart per sequence."""
    seqs = [torch.tensor(ex["prompt_ids"] + ex[key]) for key in keys for ex in examples]
    masks = [torch.tensor([False] * (len(ex["prompt_ids"]) - 1) + [True] * len(ex[key]) + [False])
             for key in keys for ex in examples]
    response_lengths = [len(ex[key]) for key in keys for ex in examples]
    row_ids = [ex["row"] for ex in examples]
    out = {"row": row_ids, "n_seqs": len(seqs), "n_tokens": sum(map(len, seqs)), "response_lengths": response_lengths,
           "response_seq": torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor(response_lengths)),
           "response_targets": torch.tensor([t for key in keys for ex in examples for t in ex[key]])}
    if cache is not None:  # the pre-pass's strong-reference log-probs (every response) and weak log-ratio (chosen)
        out["ref_logps"] = torch.cat([cached_tokens(cache["ref"], row_ids, k) for k in range(len(keys))])
        out["weak_logratio"] = cached_tokens(cache["weak_aligned"], row_ids) - cached_tokens(cache["weak_ref"], row_ids)
    if padding_free:
        return {**out, "input_ids": torch.cat(seqs)[None], "loss_mask": torch.cat(masks)[None],
                "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None]}
    width = max(len(s) for s in seqs)
    pad = lambda xs, v: torch.stack([F.pad(x, (0, width - len(x)), value=v) for x in xs])
    return {**out, "input_ids": pad(seqs, pad_id), "attention_mask": pad([torch.ones_like(s) for s in seqs], 0),
            "loss_mask": pad(masks, False)}


# ---- per-token log-probs and the loss --------------------------------------------------------------------------------
def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 before the log-softmax (its gradient is cast to the logits' dtype once), shifted by the row maximum as
    # torch.softmax does (logsumexp's backward, exp(z - log Z), was ~|log Z| ulps off)
    z = logits.float()
    m = z.detach().max(-1, keepdim=True).values
    return z.gather(-1, targets[:, None])[:, 0] - m[:, 0] - (z - m).exp().sum(-1).log()


def token_logps(model, batch: dict) -> torch.Tensor:
    """log p(y_t) at every response position of the batch, in sequence order (fp32, chunked and recomputed in
    backward; logits only at response positions via logits_to_keep)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), logits_to_keep=batch["loss_mask"], use_cache=False).logits
    targets = batch["response_targets"]
    fn = partial(checkpoint, _chunk_logps, use_reentrant=False) if torch.is_grad_enabled() else _chunk_logps
    return torch.cat([fn(logits[i: i + 2048], targets[i: i + 2048]) for i in range(0, len(targets), 2048)])


def per_sequence_sum(values: torch.Tensor, seq_id: torch.Tensor, n_seqs: int) -> torch.Tensor:
    return torch.zeros(n_seqs, device=values.device, dtype=values.dtype).index_add(0, seq_id, values)


def wspo_loss(d_t: torch.Tensor, batch: dict, level: str) -> torch.Tensor:
    """The WSPO loss of each chosen response y from its per-token differences d_t: the official trainer's sum_t d_t^2 /
    |y| (token level), or the paper's (sum_t d_t)^2 = (beta log pi/pi_sref(y) - gamma log pi_wal/pi_wref(y))^2."""
    n, seq_id = len(batch["row"]), batch["response_seq"][: len(d_t)]
    if level == "token":  # |y| as a sum of ones: counted without a host sync
        return per_sequence_sum(d_t**2, seq_id, n) / per_sequence_sum(torch.ones_like(d_t), seq_id, n)
    return per_sequence_sum(d_t, seq_id, n) ** 2


def response_metrics(losses, d_t, strong_logratio, batch: dict, args: Args) -> dict:
    """Per example: loss, |d| (token level: mean |d_t|), reward beta log pi/pi_sref(y); eval pairs: margin, accuracy."""
    n, d_t, chosen_seq = len(batch["row"]), d_t.detach(), batch["response_seq"][: len(d_t)]
    if args.loss_level == "token":
        abs_d = per_sequence_sum(d_t.abs(), chosen_seq, n) / per_sequence_sum(torch.ones_like(d_t), chosen_seq, n)
    else:
        abs_d = per_sequence_sum(d_t, chosen_seq, n).abs()
    rewards = args.beta * per_sequence_sum(strong_logratio.detach(), batch["response_seq"], batch["n_seqs"])
    metrics = {"loss": losses.detach(), "abs_d": abs_d, "rewards/chosen": rewards[:n]}
    if batch["n_seqs"] > n:
        metrics.update({"rewards/rejected": rewards[n:], "rewards/margins": rewards[:n] - rewards[n:],
                        "rewards/accuracies": (rewards[:n] > rewards[n:]).float()})
    return metrics


# ---- the pre-pass: per-token log-probs of each frozen model, one model in memory at a time, cached -------------------
def chunks(rows: list[int], size: int) -> list[list[int]]:
    return [rows[i: i + size] for i in range(0, len(rows), size)]


LOGPS_VERSION = "token_logps 2: max-shifted"  # changed with the log-prob code, so an older cache is not reused


@torch.no_grad()
def prepass(name: str, ds, batches: list[list[int]], keys, args: Args, accelerator, pad_id: int, log) -> dict:
    """Per-token log-probs of model `name` on every (key, row) response of `ds`, forwarded in `batches` (lists of
    rows; batch i on process i % processes) under the training forward's autocast and weights dtype, as one flat
    tensor: sequence k = key index * len(ds) + row is values[offsets[k]:offsets[k+1]]. Cached under the model (a
    folder by its files' sizes and times), the token ids, precision and layout."""
    token_hash = hashlib.sha256()
    for column in ("prompt_ids", *keys):
        for ids in ds[column]:
            token_hash.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    cache_key = "\n".join([LOGPS_VERSION, name, data_fingerprint(name), token_hash.hexdigest(), args.dtype,
                           accelerator.mixed_precision, str(args.padding_free), json.dumps(batches)])
    digest = hashlib.sha256(cache_key.encode()).hexdigest()[:20]
    path = os.path.join(args.cache_dir, f"token-logps-{digest}.safetensors")
    if os.path.exists(path):
        log(f"pre-pass {name}: reusing the cache {path}")
        return {**load_file(path), "n_rows": len(ds)}
    model = load_pretrained(AutoModelForCausalLM, name, args).to(accelerator.device).eval()
    results = []
    for rows in tqdm(batches[accelerator.process_index:: accelerator.num_processes], disable=not
                     accelerator.is_local_main_process, desc=f"pre-pass {os.path.basename(name.rstrip('/'))}"):
        batch = send_to_device(collate([ds[r] for r in rows], pad_id, args.padding_free, keys), accelerator.device)
        with accelerator.autocast():
            per_seq = token_logps(model, batch).cpu().split(batch["response_lengths"])
        results += [(k * len(ds) + row, per_seq[k * len(rows) + j]) for k in range(len(keys))
                    for j, row in enumerate(rows)]
    del model
    gc.collect()
    results = sorted(gather_object(results), key=lambda t: t[0])
    assert [k for k, _ in results] == list(range(len(keys) * len(ds)))
    seqs = [values for _, values in results]
    out = {"values": torch.cat(seqs), "offsets": torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)}
    if accelerator.is_main_process:
        os.makedirs(args.cache_dir, exist_ok=True)
        save_file(out, path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f"pre-pass {name}: {len(seqs)} responses, {len(out['values'])} tokens, cached in {path}")
    accelerator.wait_for_everyone()
    return {**out, "n_rows": len(ds)}


# ---- models ----------------------------------------------------------------------------------------------------------
def load_pretrained(auto_class, name: str, args: Args):
    """A model or tokenizer (its chat template, else --chat_template; pad = eos if unset); loading errors are clear."""
    kwargs = {} if auto_class is AutoTokenizer else {"dtype": getattr(torch, args.dtype),
                                                       "attn_implementation": args.attn_implementation}
    try:
        loaded = auto_class.from_pretrained(name, trust_remote_code=args.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        held = os.listdir(name) if os.path.isdir(name) else None  # a folder: empty, a checkpoint, or what failed
        why = ("no such local folder, and not a hub id in the local cache (HF_HUB_OFFLINE=1)"
               if not os.path.exists(name) and constants.HF_HUB_OFFLINE else "the folder is empty" if held == [] else
               "that folder holds a training checkpoint (optimizer state), not a saved model; pass the run's output "
               "folder" if "optimizer.bin" in (held or []) else str(e).splitlines()[0])
        fail(f"could not load model {name!r}: {why}. Pass a local model folder or a hub id (the offline tiny models "
             "come from `bash run_tiny.sh`)")
    if auto_class is not AutoTokenizer:
        return loaded
    if loaded.chat_template is None and (template := args.chat_template):
        loaded.chat_template = open(template).read() if template.endswith(".jinja") else template
    if loaded.chat_template is None:
        fail(f"tokenizer of {name!r} has no chat template: pass --chat_template (a Jinja string or a .jinja file)")
    loaded.pad_token = loaded.pad_token or loaded.eos_token
    return loaded


def add_lora(model, args: Args):
    from peft import LoraConfig, get_peft_model

    targets = args.lora_target_modules.split(",") if args.lora_target_modules != "all-linear" else "all-linear"
    try:
        return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets,
                                                lora_dropout=args.lora_dropout, task_type="CAUSAL_LM"))
    except ValueError as e:  # peft: no module of the model matches
        fail(f"--lora_target_modules {args.lora_target_modules!r}: {str(e).splitlines()[0].rstrip('.')}; name the "
             "model's modules (e.g. q_proj,v_proj) or all-linear")


def disable_dropout(model: torch.nn.Module):
    """Every dropout probability to 0: nn.Dropout modules (LoRA's included) and attention-dropout attributes."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


if __name__ == "__main__":
    args = parse_args()
    validate(args)
    # TRY NOT TO MODIFY: accelerator, batch-size chain, seeding, logging
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    args.world_size = accelerator.num_processes  # validate read WORLD_SIZE; the launcher's count decides
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    run_id = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    if accelerator.is_main_process:
        lock_output_dir(args.output_dir)
    set_seed(args.seed, device_specific=True)
    tokenizer = load_pretrained(AutoTokenizer, args.strong, args)
    log(f"global batch {args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
        f"{args.world_size} processes = {args.global_batch_size} responses")

    with accelerator.main_process_first():
        raw_train, raw_eval = load_raw_splits(args, log)
        train_ds, _, data_counts = prepare_split(raw_train, args.max_train_samples, tokenizer, args, "train",
                                                 args.dataset_name, log)
        eval_ds, eval_pairs = None, False
        if raw_eval is not None:
            eval_ds, eval_pairs, eval_counts = prepare_split(raw_eval, args.max_eval_samples, tokenizer, args, "eval",
                                                             args.eval_dataset_name or args.dataset_name, log)
            data_counts.update(eval_counts)
    check_tokenizers(args, tokenizer, [("train", raw_train)] + ([("eval", raw_eval)] if raw_eval else []), log)
    if args.use_lora:  # the adapters' target modules, checked on an empty model before the pre-pass
        with torch.device("meta"):
            config = AutoConfig.from_pretrained(args.strong, trust_remote_code=args.trust_remote_code)
            add_lora(AutoModelForCausalLM.from_config(config, trust_remote_code=args.trust_remote_code), args)

    rows_per_epoch = len(train_ds) // args.global_batch_size * args.global_batch_size
    steps_per_epoch = rows_per_epoch // args.global_batch_size
    if steps_per_epoch == 0:
        fail(f"{len(train_ds)} training examples are fewer than one global batch ({args.global_batch_size}); lower "
             "--per_device_train_batch_size or --gradient_accumulation_steps, or add data")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs
    # the data order depends on (seed, epoch) only, so a resumed run sees the same batches
    seeded = lambda epoch: torch.Generator().manual_seed(args.seed + epoch)
    epoch_order = lambda epoch: torch.randperm(len(train_ds), generator=seeded(epoch))

    # ALGO LOGIC: the pre-pass; the strong reference in epoch 0's micro-batches (bit-equal to the policy's step-0
    # forward) and the eval batches, then the rows epoch 0 leaves out
    order, batch_size = epoch_order(0).tolist(), args.per_device_train_batch_size
    layouts = {"train": (train_ds, ("chosen_ids",), chunks(order[:rows_per_epoch], batch_size)
                         + chunks(order[rows_per_epoch:], batch_size))}
    if eval_ds is not None:
        layouts["eval"] = (eval_ds, ("chosen_ids", "rejected_ids") if eval_pairs else ("chosen_ids",),
                           chunks(list(range(len(eval_ds))), args.per_device_eval_batch_size))
    cache = {}
    for split, (ds, keys, batches) in layouts.items():
        run = partial(prepass, ds=ds, args=args, accelerator=accelerator, pad_id=tokenizer.pad_token_id, log=log)
        cache[split] = {"ref": run(args.strong_ref, batches=batches, keys=keys)}
        for role in ("weak_ref", "weak_aligned"):  # a weak model that is the strong reference is forwarded once
            cache[split][role] = cache[split]["ref"] if getattr(args, role) == args.strong_ref else run(
                getattr(args, role), batches=chunks(list(range(len(ds))), args.prepass_batch_size), keys=keys[:1])

    model = load_pretrained(AutoModelForCausalLM, args.strong, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.use_lora:
        model = add_lora(model, args)
    if args.disable_dropout:
        disable_dropout(model)
    log(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    def make_loader(split: str, rows: list[int], batch_size: int):
        ds, keys, _ = layouts[split]
        collate_fn = partial(collate, pad_id=tokenizer.pad_token_id, padding_free=args.padding_free, keys=keys,
                             cache=cache[split])
        return accelerator.prepare(DataLoader(ds.select(rows), batch_size=batch_size, collate_fn=collate_fn))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors
    # stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))
    if not any(scheduler.lr_lambdas[0](step) for step in range(total_steps)):  # warm-up starts at a rate of 0
        log(f"warning: the learning rate is 0 at each of the {total_steps} steps (warm-up --warmup_ratio "
            f"{args.warmup_ratio}): no update is applied; train more steps or lower --warmup_ratio")
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None if eval_ds is None else make_loader("eval", range(len(eval_ds)), args.per_device_eval_batch_size)

    ckpt_root, global_step = os.path.join(args.output_dir, "checkpoints"), 0
    errors = []
    for step in reversed(checkpoint_steps(ckpt_root) if args.resume else []):  # the newest that loads
        try:
            accelerator.load_state(os.path.join(ckpt_root, f"step-{step}"))
            global_step = step
            break
        except Exception as e:  # a truncated or corrupt file: the previous checkpoint is loaded over it
            errors.append((str(e).splitlines() or [repr(e)])[0])
            log(f"--resume: checkpoint step-{step} cannot be loaded ({errors[-1]}); trying the previous one")
    # one step on every process: the newest that all loaded (a process that loaded a newer one reloads that step)
    agreed = -int(accelerator.reduce(torch.tensor(-global_step, device=accelerator.device), reduction="max"))
    if agreed and agreed != global_step:
        accelerator.load_state(os.path.join(ckpt_root, f"step-{agreed}"))
    global_step = agreed
    for _ in range(global_step):  # the schedule is a function of the step: replayed, never unpickled
        scheduler.step()
    if global_step:
        log(f"resumed from {ckpt_root}/step-{global_step} (step {global_step})")
    if args.resume and not global_step:
        if checkpoint_steps(ckpt_root):
            fail(f"no checkpoint in {ckpt_root} can be loaded (newest: {(errors or ['another process failed'])[0]}); "
                 "restore them, or start afresh with --overwrite_output_dir (discards them)")
        log("--resume: no checkpoint found, starting from scratch")

    # TRY NOT TO MODIFY: the run's files are written from here on (before: only the lock, gone again if the start fails)
    save_args = lambda **extra: json.dump({**vars(args), "run_id": run_id, **extra},
                                          open(os.path.join(args.output_dir, "args.json"), "w"), indent=2)
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        os.makedirs(args.output_dir, exist_ok=True)
        metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a" if args.resume else "w")
        save_args()
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=vars(args),
                       dir=args.output_dir, name=run_id, save_code=True)

    def log_metrics(metrics: dict, step: int):
        if accelerator.is_main_process:
            metrics_file.write(json.dumps({"step": step, "run_id": run_id, **metrics}) + "\n")
            metrics_file.flush()
            if args.track:
                wandb.log(metrics, step=step)

    newest = lambda: next((f"{ckpt_root}/step-{s}" for s in checkpoint_steps(ckpt_root)[-1:]), "none")  # for messages

    @torch.no_grad()
    def evaluate_and_log(step: int, extra: dict | None = None):
        """Logs `extra` and the means over every held-out example; a non-finite eval loss stops the run unsaved."""
        if eval_loader is None:
            return extra and log_metrics(extra, step)
        parts = []
        model.eval()
        for batch in eval_loader:
            with accelerator.autocast():
                policy_logps = token_logps(model, batch)
            # the training loss on the chosen responses; the strong log-ratio of the rejected ones too, if any
            strong_logratio = policy_logps - batch["ref_logps"]
            d_t = args.beta * strong_logratio[: len(batch["weak_logratio"])] - args.weak_coef * batch["weak_logratio"]
            losses = wspo_loss(d_t, batch, args.loss_level)
            parts.append(accelerator.gather_for_metrics(response_metrics(losses, d_t, strong_logratio, batch, args)))
        model.train()
        means = {f"eval/{k}": torch.cat([p[k] for p in parts]).double().mean().item() for k in parts[0]}
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        log_metrics({**means, **(extra or {})}, step)
        if not math.isfinite(means["eval/loss"]):
            raise SystemExit(f"eval/loss is {means['eval/loss']} at step {step}: the model is not saved (newest "
                             f"checkpoint: {newest()})")

    def save_checkpoint(step: int):
        # written to a temporary folder, then renamed: a crash mid-save never leaves a checkpoint resume would pick
        tmp = os.path.join(ckpt_root, f"tmp-step-{step}")
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # a step saved before (resumed from an earlier checkpoint) is replaced
            shutil.rmtree(os.path.join(ckpt_root, f"step-{step}"), ignore_errors=True)
            os.replace(tmp, os.path.join(ckpt_root, f"step-{step}"))
            for old in checkpoint_steps(ckpt_root)[: -args.save_total_limit]:
                shutil.rmtree(os.path.join(ckpt_root, f"step-{old}"))
        accelerator.wait_for_everyone()

    if global_step == 0:
        evaluate_and_log(0, data_counts)

    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="wspo")
    running, window_tokens, window_start = {}, 0, time.time()
    epoch = global_step // steps_per_epoch
    while global_step < total_steps:
        loader = make_loader("train", epoch_order(epoch)[:rows_per_epoch].tolist(), args.per_device_train_batch_size)
        batches_done = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps  # when resumed
        loader = accelerator.skip_first_batches(loader, batches_done) if batches_done > 0 else loader
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    policy_logps = token_logps(model, batch)  # log pi(y_t) at every chosen response token
                # ALGO LOGIC: the WSPO loss on the chosen responses y (training batches hold no rejected ones)
                strong_logratio = policy_logps - batch["ref_logps"]  # log pi(y_t) - log pi_sref(y_t)
                weak_logratio = batch["weak_logratio"]  # log pi_wal(y_t) - log pi_wref(y_t), from the pre-pass
                d_t = args.beta * strong_logratio - args.weak_coef * weak_logratio
                losses = wspo_loss(d_t, batch, args.loss_level)  # token: sum_t d_t^2 / |y|; sequence: (sum_t d_t)^2
                loss = losses.mean()
                # TRY NOT TO MODIFY: backward, clipping, a non-finite gradient stops the run before its update
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if not torch.isfinite(grad_norm):  # one host sync per step; a non-finite loss gives one too
                        raise SystemExit(f"non-finite loss or gradient at step {global_step + 1}: no update was "
                                         f"applied from that step on; newest checkpoint: {newest()}")
                optimizer.step()
                optimizer.zero_grad()
            metrics = response_metrics(losses, d_t, strong_logratio, batch, args)
            corr = F.cosine_similarity(strong_logratio.detach() - strong_logratio.detach().mean(),
                                       weak_logratio - weak_logratio.mean(), dim=0)
            ones = torch.ones_like(losses.detach())
            metrics.update(logratio_corr=corr * ones, examples=ones)
            running = {k: running.get(k, 0) + v.double().sum() for k, v in metrics.items()}
            window_tokens += batch["n_tokens"]
            if not accelerator.sync_gradients:
                continue
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used (logged)
            scheduler.step()
            global_step += 1
            bar.update(1)
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                sums = {k: accelerator.reduce(v, reduction="sum") for k, v in running.items()}
                tokens = accelerator.reduce(torch.tensor(float(window_tokens), device=accelerator.device), "sum")
                window_s = time.time() - window_start  # eval and checkpoint time inside the window included
                out = {f"train/{k}": (v / sums["examples"]).item() for k, v in sums.items() if k != "examples"}
                out.update({"train/lr": step_lr, "train/epoch": global_step / steps_per_epoch,
                            "perf/tokens_per_s": tokens.item() / window_s,
                            "perf/examples_per_s": sums["examples"].item() / window_s})
                bar.set_postfix(loss=f"{out['train/loss']:.4f}")
                log_metrics(out, global_step)
                running, window_tokens, window_start = {}, 0, time.time()
            if args.eval_steps and global_step % args.eval_steps == 0 and global_step != total_steps:
                evaluate_and_log(global_step)
            if args.save_steps and global_step % args.save_steps == 0:
                save_checkpoint(global_step)
            if global_step >= total_steps:
                break
        epoch += 1
    bar.close()
    peak_memory = (torch.cuda.max_memory_allocated(accelerator.device) if accelerator.device.type == "cuda" else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    evaluate_and_log(global_step, {"perf/peak_memory_gb": peak_memory})

    # TRY NOT TO MODIFY: save a plain transformers model (LoRA merged) + tokenizer, safetensors
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if args.use_lora:
            unwrapped, state_dict = unwrapped.merge_and_unload(), None
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(args.output_dir)
        save_args(completed_steps=global_step)
        log(f"saved the model to {args.output_dir}")
        for artefact in (unwrapped, tokenizer) if args.push_to_hub else ():
            artefact.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
    accelerator.wait_for_everyone()
    if args.track and accelerator.is_main_process:
        wandb.finish()
    # the model goes before the process group: a DDP model freed after it can deadlock Gloo's exit (pytorch#56297)
    accelerator.free_memory()
    del model, optimizer
    accelerator.end_training()
