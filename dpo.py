"""Direct Preference Optimization (DPO) on preference pairs, with reference log-probs computed once.

Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward Model" (2023); official
code github.com/eric-mitchell/direct-preference-optimization. In the WSPO pipeline (Zhu et al. 2025, step 2) DPO
turns the weak SFT model into the *weak aligned* model; it is also the baseline the other methods are compared with.

    logp(y)  = sum over response tokens of log pi(y_t | x, y_<t)                  (prompt and padding masked)
    margin   = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l))   (TRL: delta_score)
    sigmoid  : -logsigmoid(beta margin) (1 - eps) - logsigmoid(-beta margin) eps  (DPO eq. 7; eps = label smoothing)
    ipo      : (margin - 1 / (2 beta))^2, with length-averaged log-probs          (Azar et al. 2023, eq. 17)
    hinge    : relu(1 - beta margin)                                              (SLiC, Zhao et al. 2023)
    rewards  : beta (logp_pi - logp_ref) for y_w and y_l; accuracy = reward_w > reward_l

The reference never changes, so its log-probs are computed in one pass before training and cached on disk;
training holds only the policy. Each pair is scored in the micro-batch it is trained (epoch 0) or evaluated in, under
the same `accelerator.autocast()`, so at step 0 the policy's log-probs equal the reference's bit for bit (rewards
exactly 0, in bf16 too).
Loss normaliser: the mean over the optimizer step's pairs (every micro-batch holds the same number of pairs, as
only whole global batches are trained on, so accelerate's mean of micro-batch means is that mean).

Defaults: the WSPO repo's weak DPO, full fine-tuning. Paper scale (GPU, hub; recipes/wspo/dpo-*.yaml hold the
settings, their sources and launch commands; flags given override them):
    accelerate launch --config_file configs/zero3.yaml dpo.py --config recipes/wspo/dpo-qwen2-1.5b-full.yaml
    accelerate launch --config_file configs/ddp.yaml dpo.py --config recipes/wspo/dpo-qwen2-1.5b-lora.yaml
Offline tiny setting (CPU; --preset tiny reads recipes/tiny/dpo.yaml):
    python -m tiny --out data/tiny && python sft.py --preset tiny --output_dir runs/tiny/sft-weak
    python dpo.py --preset tiny --model_name_or_path runs/tiny/sft-weak --output_dir runs/tiny/dpo-weak
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
from contextlib import nullcontext, suppress
from dataclasses import dataclass, fields
from difflib import get_close_matches
from typing import Literal, NoReturn
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from datasets import load_dataset, load_from_disk
from datasets.fingerprint import Hasher
from huggingface_hub import constants as hub_constants
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
    output_dir: str = "runs/dpo"
    """where the final model, checkpoints and metrics.jsonl go"""
    config: str | None = None
    """YAML file of Args fields (the papers' settings are in recipes/); flags given on the command line override it"""
    preset: Literal["tiny"] | None = None
    """shorthand for --config recipes/tiny/<this script>.yaml: the offline tiny setting (data/tiny)"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # set after parsing; recorded in args.json
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
    model_name_or_path: str = "Qwen/Qwen2-1.5B-Instruct"
    """hub id or local path of the policy's initial weights (in the WSPO pipeline: the weak SFT model)"""
    ref_model_name_or_path: str | None = None
    """reference model (default: the policy's initial weights; with LoRA: the base model, adapters off)"""
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
    fp32_lm_head_grad: bool = False
    """under bf16, sum the chunked LM head's weight gradient in fp32 (off: not measured on a GPU, docs/benchmarks.md)"""
    disable_dropout: bool = True
    """set every dropout probability to 0 in the policy (LoRA dropout included), as TRL's DPOTrainer does"""

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
    """held-out split for eval metrics (None: no eval)"""
    eval_dataset_name: str | None = None
    """eval data from another hub id / folder / file (its split: --eval_split, or the whole file)"""
    eval_fraction: float | None = None
    """hold out this fraction of the training pairs for eval (seeded by --seed)"""
    prompt_column: str = "prompt"
    """prompt column: a string or a message list (unused when chosen/rejected hold whole conversations)"""
    chosen_column: str = "chosen"
    """chosen response: a message list ending in the assistant turn, or a string"""
    rejected_column: str = "rejected"
    """rejected response: a message list ending in the assistant turn, or a string"""
    max_length: int = 4096
    """prompt + response tokens; longer responses are cut (end-of-turn kept)"""
    max_prompt_length: int = 2048
    """prompt tokens; longer prompts lose whole earlier turns first, then the start of the oldest user text"""
    max_train_samples: int | None = None
    """use only the first N training pairs"""
    max_eval_samples: int | None = 1000
    """use only the first N eval pairs"""
    layout: Literal["auto", "padded", "padding_free"] = "auto"
    """micro-batch forward: padding_free (one packed row), padded (--length_groups); auto: GPU free, CPU padded"""
    length_groups: int = 4
    """padded layout: length-sorted groups, each padded to its own longest sequence; 1 = one padded forward"""

    # algorithm
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO loss: sigmoid (DPO), ipo, hinge"""
    beta: float = 0.1
    """inverse temperature of the implicit reward (paper: 0.1 full, 0.01 LoRA)"""
    label_smoothing: float = 0.0
    """sigmoid loss only: assumed probability that a label is flipped (conservative DPO)"""
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "w2s_alignment")
    """where the precomputed reference log-probs are cached"""

    # optimization
    learning_rate: float = 1e-5
    """peak learning rate (paper: 1e-5 full, 5e-6 LoRA)"""
    num_train_epochs: int = 1
    """passes over the training data (paper: 1 full, 3 LoRA)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides the epochs)"""
    per_device_train_batch_size: int = 1
    """pairs per micro-batch per process"""
    gradient_accumulation_steps: int = 8
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 8
    """pairs per eval batch per process"""
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
    """replace an earlier run in output_dir: its checkpoints/ are deleted, metrics.jsonl restarts, other files kept"""

    # filled in at runtime (not flags)
    world_size: tyro.conf.Suppress[int] = 1  # number of processes
    global_batch_size: tyro.conf.Suppress[int] = 0  # micro batch x accumulation x processes
    data_fingerprint: tyro.conf.Suppress[str] = ""  # size and mtime of the training data's files: --resume compares it


# ---- the loss --------------------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float,
             loss_type: str, label_smoothing: float = 0.0, chosen_lengths=1.0, rejected_lengths=1.0):
    """Per-pair losses and the implicit rewards beta (logp_pi - logp_ref) of the chosen and rejected responses.
    ipo takes length-averaged log-probs (the log-ratios divided by the lengths); the rewards stay on sums."""
    # ALGO LOGIC: the log-ratios log pi / pi_ref of each response, and their difference, the margin
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths  # ipo: length-averaged
    if loss_type == "sigmoid":  # DPO eq. 7
        losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2  # IPO eq. 17
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)  # SLiC-HF
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def compute_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                 chosen_lengths, rejected_lengths, args: Args) -> tuple[torch.Tensor, dict]:
    """The mean DPO loss over the pairs, and the per-pair metrics TRL logs (per pair, for exact gathering)."""
    lengths = (chosen_lengths, rejected_lengths) if args.loss_type == "ipo" else (1.0, 1.0)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, args.beta, args.loss_type,
        args.label_smoothing, *lengths)
    metrics = {"loss": losses.detach(), "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
               "rewards/margins": chosen_rewards - rejected_rewards,
               "logps/chosen": policy_chosen_logps.detach(), "logps/rejected": policy_rejected_logps.detach()}
    return losses.mean(), metrics


# ---- data ------------------------------------------------------------------------------------------------------------
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def locate_file_error(path: str) -> str:
    """The first line of a .jsonl file (1-based) that is not a JSON object, or that the file is empty; "" if neither."""
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines()
    if not any(line.strip() for line in lines):
        return f"{path} is empty: it holds no rows"
    if lines[0].lstrip().startswith("["):  # a .json array, not one object per line: datasets' message is shown
        return ""
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as e:
            return f"{path}, line {number}: not valid JSON ({e.msg}); fix or remove that line"
        if not isinstance(row, dict):
            return f"{path}, line {number}: a JSON object per line is expected, got {type(row).__name__}"
    return ""


def load_split(name: str, config: str | None, split: str):
    """Hub id, local dataset folder (README YAML / data files), save_to_disk folder, or one file (read whole)."""
    if os.path.isfile(name):
        kind = DATA_FILE_TYPES.get(os.path.splitext(name)[1])
        if kind is None:
            fail(f"cannot read dataset file {name}: use .json, .jsonl, .parquet or .csv")
        try:  # an empty file raises too (datasets: no rows, no schema)
            return load_dataset(kind, data_files={"rows": name}, split="rows")
        except Exception as e:  # datasets reports bad rows as a long traceback: find the line ourselves
            where = locate_file_error(name) if kind == "json" else ""
            fail(where or f"cannot read {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    try:
        return load_dataset(name, config, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        fail(f"could not load split {split!r} of dataset {name!r}: {e}\nWith no network, use a local copy "
             "(python -m tiny --out data/tiny writes the offline tiny setting; then --preset tiny).")


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=False)


def split_pair(ex: dict, args: Args) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) from TRL's formats: strings, a prompt message list and one
    assistant message each, or whole conversations (implicit prompt). A prompt must end with a user message."""
    chosen, rejected = ex[args.chosen_column], ex[args.rejected_column]
    if isinstance(chosen, list) and isinstance(rejected, list):
        if not chosen or not rejected or {chosen[-1].get("role"), rejected[-1].get("role")} != {"assistant"}:
            raise ValueError("chosen/rejected must end with an assistant message")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen and rejected have different prompts")
        prompt, chosen, rejected = chosen[:-1] or ex[args.prompt_column], chosen[-1]["content"], rejected[-1]["content"]
    else:
        prompt = ex[args.prompt_column]
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("the prompt does not end with a user message")
    return prompt, chosen, rejected


def fit_prompt(tokenizer, prompt: list[dict], max_tokens: int) -> tuple[list[int], bool] | None:
    """The prompt's ids (generation prompt included) within max_tokens, and whether it was cut: whole earlier turns go
    first (a system message stays), then the oldest user text's start, never its role header. None if nothing fits."""
    ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    if len(ids) <= max_tokens:
        return ids, False
    system, turns = (prompt[:1], prompt[1:]) if prompt[0].get("role") == "system" else ([], prompt)
    too_long = lambda msgs: len(chat_ids(tokenizer, msgs, add_generation_prompt=True)) > max_tokens
    while len(turns) > 1 and (turns[0]["role"] != "user" or too_long(system + turns)):
        turns = turns[1:]
    ids = chat_ids(tokenizer, system + turns, add_generation_prompt=True)
    if len(ids) <= max_tokens:
        return ids, True
    text = tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"]
    shortened = lambda keep: [{**turns[0], "content": tokenizer.decode(text[len(text) - keep :])}]
    fits = lambda keep: chat_ids(tokenizer, system + shortened(keep) + turns[1:], add_generation_prompt=True)
    low, high = 0, len(text)  # the most user-text tokens (from the end) that fit: binary search
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(fits(mid)) <= max_tokens else (low, mid - 1)
    ids = fits(low)
    return (ids, True) if len(ids) <= max_tokens else None


def tokenize_pair(tokenizer, ex: dict, args: Args) -> dict:
    """Prompt ids (chat template + generation prompt), the two response ids, whether the prompt / each response was
    cut, and a skip reason ("" = keep). The response tokens are what the template appends to the prompt's tokens."""
    empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt_cut": False, "responses_cut": 0}
    try:
        prompt, chosen, rejected = split_pair(ex, args)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        return {**empty, "skip": f"malformed pair ({e})"}
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        return {**empty, "skip": "empty chosen or rejected"}
    if chosen == rejected:
        return {**empty, "skip": "chosen identical to rejected"}
    full_prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    responses = []
    for text in (chosen, rejected):
        full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": text}])
        if full[: len(full_prompt_ids)] != full_prompt_ids:
            fail(f"the chat template's prompt tokens are not a prefix of prompt+response tokens for {prompt!r}; the "
                 "response cannot be located. Use a template whose generation prompt ends the prompt exactly.")
        response = full[len(full_prompt_ids):]
        eot = tokenizer.eos_token_id
        responses.append(response[: len(response) - response[::-1].index(eot)] if eot in response else response + [eot])
    fitted = fit_prompt(tokenizer, prompt, args.max_prompt_length)
    if fitted is None:
        return {**empty, "skip": "prompt too long to cut (system message)"}
    prompt_ids, prompt_cut = fitted
    room = args.max_length - len(prompt_ids)
    if room < 2:
        return {**empty, "skip": "prompt leaves no room for a response"}
    cut = [len(r) > room for r in responses]
    responses = [r[: room - 1] + [tokenizer.eos_token_id] if c else r for r, c in zip(responses, cut)]
    return {"prompt_ids": prompt_ids, "chosen_ids": responses[0], "rejected_ids": responses[1],
            "prompt_cut": prompt_cut, "responses_cut": sum(cut), "skip": ""}


def prepare_dataset(ds, tokenizer, args: Args, what: str, source: str, log) -> tuple[object, dict]:
    """Tokenize and drop the pairs that cannot be trained on; every drop and cut is counted in the log and metrics."""
    missing = [c for c in (args.chosen_column, args.rejected_column) if c not in ds.column_names]
    if missing:
        fail(f"the {what} data ({source}) have no column {missing} (columns: {ds.column_names}); pass "
             "--chosen_column / --rejected_column / --prompt_column naming your columns")
    read = {k: getattr(args, k) for k in ("prompt_column", "chosen_column", "rejected_column", "max_length",
                                          "max_prompt_length")}  # what tokenize_pair reads
    key = Hasher.hash((ds._fingerprint, tokenizer, read, open(__file__, "rb").read()))  # code edited: tokenized anew
    ds = ds.map(lambda ex: tokenize_pair(tokenizer, ex, args), remove_columns=ds.column_names,
                desc=f"tokenizing {what}", new_fingerprint=key)
    reasons = {str(r): int(n) for r, n in zip(*np.unique(list(ds["skip"]), return_counts=True)) if r}  # no np reprs
    seen = set()  # hashes: an exact duplicate (same prompt, chosen and rejected tokens) would count twice in the loss

    def first_time(ex) -> bool:
        key = hash((tuple(ex["prompt_ids"]), tuple(ex["chosen_ids"]), tuple(ex["rejected_ids"])))
        return key not in seen and not seen.add(key)  # set.add returns None

    usable = ds.filter(lambda ex: ex["skip"] == "")
    kept = usable.filter(first_time, load_from_cache_file=False)
    reasons.update({"duplicate pair": len(usable) - len(kept)} if len(usable) > len(kept) else {})
    stats = {f"data/{what}_pairs": len(kept), f"data/{what}_dropped": len(ds) - len(kept),
             f"data/{what}_prompts_cut": int(sum(kept["prompt_cut"])),
             f"data/{what}_responses_cut": int(sum(kept["responses_cut"]))}
    log(f"{what}: {len(kept)} of {len(ds)} pairs kept; {stats[f'data/{what}_prompts_cut']} prompts cut (earlier turns "
        f"dropped or oldest user text shortened), {stats[f'data/{what}_responses_cut']} responses cut; "
        + (", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none skipped"))
    if len(kept) == 0:
        fail(f"no usable pair in the {what} data ({source}: {reasons}); check the column flags and the data")
    kept = kept.remove_columns(["skip", "prompt_cut", "responses_cut"])
    return kept.add_column("row", list(range(len(kept)))), stats


def load_data(args: Args, tokenizer, log) -> tuple[object, object, dict]:
    """Training and eval pairs, tokenized; the log says where the eval pairs come from."""
    train, evals = load_split(args.dataset_name, args.dataset_config, args.train_split), None
    if args.eval_fraction is not None:
        parts = train.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train, evals = parts["train"], parts["test"]
        source = f"{args.eval_fraction:g} of {args.dataset_name} held out with seed {args.seed}"
    elif args.eval_dataset_name is not None:
        config = args.dataset_config if args.eval_dataset_name == args.dataset_name else None
        evals = load_split(args.eval_dataset_name, config, args.eval_split or "rows")
        source = args.eval_dataset_name + ("" if os.path.isfile(args.eval_dataset_name) else f"[{args.eval_split}]")
    elif args.eval_split:
        evals = load_split(args.dataset_name, args.dataset_config, args.eval_split)
        source = f"{args.dataset_name}[{args.eval_split}]"
    log(f"eval data: {source}" if evals is not None else "eval data: none (--eval_split None)")
    head = lambda ds, limit: ds.select(range(min(limit or len(ds), len(ds))))
    train, stats = prepare_dataset(head(train, args.max_train_samples), tokenizer, args, "train", args.dataset_name,
                                   log)
    if evals is not None:
        evals, eval_stats = prepare_dataset(head(evals, args.max_eval_samples), tokenizer, args, "eval", source, log)
        stats.update(eval_stats)
    return train, evals, stats


def collate(rows: list[dict], pad_id: int, padding_free: bool, length_groups: int = 1) -> dict:
    """Chosen sequences first, then rejected ones: sequence i and i + len(rows) are one pair. Each of `parts` is one
    forward. `targets[t]` is the next token; `loss_mask[t]` marks the positions that predict a response token;
    `seq_id[t]` says which sequence position t belongs to. padded: the sequences, sorted by length, are cut into
    `length_groups` parts, each right-padded to its own longest sequence, with an attention mask. padding-free: one
    part, one row, position_ids restart per sequence, no attention mask (transformers then builds a block-diagonal
    causal mask; this needs use_cache=False)."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            seqs.append(torch.tensor(r["prompt_ids"] + r[key]))
            masks.append(torch.tensor([False] * (len(r["prompt_ids"]) - 1) + [True] * len(r[key]) + [False]))
    targets = [torch.cat([s[1:], s.new_zeros(1)]) for s in seqs]
    seq_id = [torch.full_like(s, i) for i, s in enumerate(seqs)]
    out = {"row": torch.tensor([r["row"] for r in rows]), "n_seqs": len(seqs), "n_tokens": sum(map(len, seqs))}
    if padding_free:
        part = {"input_ids": seqs, "position_ids": [torch.arange(len(s)) for s in seqs], "targets": targets,
                "loss_mask": masks, "seq_id": seq_id}
        return {**out, "parts": [{k: torch.cat(v)[None] for k, v in part.items()}]}
    n_groups = min(length_groups, len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if n_groups > 1 else range(len(seqs))
    parts = []
    for group in (order[j * len(order) // n_groups : (j + 1) * len(order) // n_groups] for j in range(n_groups)):
        width = max(len(seqs[i]) for i in group)
        pad = lambda xs, v: torch.stack([F.pad(xs[i], (0, width - len(xs[i])), value=v) for i in group])
        parts.append({"input_ids": pad(seqs, pad_id), "attention_mask": pad([torch.ones_like(s) for s in seqs], 0),
                      "targets": pad(targets, 0), "loss_mask": pad(masks, False), "seq_id": pad(seq_id, 0)})
    return {**out, "parts": parts}


# ---- log-probs and loss ----------------------------------------------------------------------------------------------
class TokenLogps(torch.autograd.Function):
    """log softmax(z)[target] for rows of logits z, in fp32, from the logits shifted by their row maximum as
    torch.softmax takes them (exp(z - log Z), |log Z| ~ 70, put ~4e-6 of rounding into every probability). Backward
    builds d logp / dz = (onehot(target) - softmax(z)) * grad in fp32 from the saved logits and casts it once to the
    logits' dtype (bf16 logits keep the gradient's precision)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        z = logits.float()
        m = z.max(-1, keepdim=True).values
        e = (z - m).exp_()
        log_s = e.sum(-1).log()
        ctx.save_for_backward(logits, targets, m, log_s)
        return z.gather(-1, targets[:, None])[:, 0] - m[:, 0] - log_s

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        logits, targets, m, log_s = ctx.saved_tensors
        d_logits = (logits.float() - m).sub_(log_s[:, None]).exp_().mul_(-grad[:, None])  # -softmax * grad
        return d_logits.scatter_add_(-1, targets[:, None], grad[:, None]).to(logits.dtype), None  # + onehot * grad


class ChunkedTokenLogps(torch.autograd.Function):
    """TokenLogps of a linear LM head's logits, F.linear(hidden, weight), chunk by chunk of rows, each chunk's logits
    recomputed in backward; the weight gradient is summed over the chunks in fp32 and rounded once, as one unchunked
    bf16 matmul rounds it (autograd rounds each chunk's bf16 gradient, an error that grows with the chunks)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int):
        logps = []
        for i in range(0, len(hidden), rows):
            logits = F.linear(hidden[i : i + rows], weight)  # in autocast's dtype, if on
            logps.append(TokenLogps.apply(logits, targets[i : i + rows]))
        ctx.save_for_backward(hidden, weight, targets)
        ctx.rows, ctx.dtype = rows, logits.dtype
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        hidden, weight, targets = ctx.saved_tensors
        w, acc = weight.to(ctx.dtype), torch.promote_types(ctx.dtype, torch.float32)
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None  # None: a frozen head
        for i in range(0, len(hidden), ctx.rows):
            h = hidden[i : i + ctx.rows].to(ctx.dtype)
            logits = F.linear(h, w).requires_grad_()
            with torch.enable_grad():
                logps = TokenLogps.apply(logits, targets[i : i + ctx.rows])
            (d_logits,) = torch.autograd.grad(logps, logits, grad[i : i + ctx.rows])
            d_hidden[i : i + ctx.rows] = d_logits @ w
            if d_weight is not None:
                d_weight.addmm_(d_logits.T.to(acc), h.to(acc))  # exact products of the bf16 values, fp32 sum
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None


def token_logps(lm_head, hidden: torch.Tensor, targets: torch.Tensor, chunk_elements: int = 2**27,
                fp32_weight_grad: bool = False) -> torch.Tensor:
    """log pi(target) at each response position from the final hidden states: the LM head and the log-softmax run on
    chunks of rows (about chunk_elements logits each), recomputed in backward (activation checkpointing), so the
    logits of one chunk exist at a time. fp32_weight_grad: a linear head goes through ChunkedTokenLogps."""
    chunk = max(1, chunk_elements // lm_head.weight.shape[0])
    if fp32_weight_grad and type(lm_head) is torch.nn.Linear and lm_head.bias is None:
        return ChunkedTokenLogps.apply(hidden, lm_head.weight, targets, chunk)
    head = lambda h, t: TokenLogps.apply(lm_head(h), t)
    run = (lambda h, t: checkpoint(head, h, t, use_reentrant=False)) if torch.is_grad_enabled() else head
    return torch.cat([run(hidden[i : i + chunk], targets[i : i + chunk]) for i in range(0, len(hidden), chunk)])


def per_sequence_sum(values: torch.Tensor, seq_id: torch.Tensor, n_seqs: int) -> torch.Tensor:
    return torch.zeros(n_seqs, device=values.device, dtype=values.dtype).index_add(0, seq_id, values)


def sequence_logps(model, batch: dict, fp32_lm_head_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every sequence in the batch, and the response lengths; one forward per part.
    The model returns its final hidden states (no logits: logits_to_keep selects no position); the LM head module
    (DDP / FSDP2 / peft wrapping aside, the model's own) is applied to the response positions only."""
    lm_head = getattr(model, "module", model).get_output_embeddings()
    logps, seq_id = [], []
    for part in batch["parts"]:
        mask = part["loss_mask"]
        out = model(input_ids=part["input_ids"], attention_mask=part.get("attention_mask"),
                    position_ids=part.get("position_ids"), logits_to_keep=torch.zeros_like(mask),
                    output_hidden_states=True, use_cache=False)
        hidden, targets = out.hidden_states[-1][mask], part["targets"][mask]  # the response positions
        logps.append(token_logps(lm_head, hidden, targets, fp32_weight_grad=fp32_lm_head_grad))
        seq_id.append(part["seq_id"][mask])
    logps, seq_id = torch.cat(logps), torch.cat(seq_id)
    n = batch["n_seqs"]
    return per_sequence_sum(logps, seq_id, n), per_sequence_sum(torch.ones_like(logps), seq_id, n)


# ---- reference log-probs: a pre-pass cached on disk ------------------------------------------------------------------
LOGPS_VERSION = "token_logps 2: max-shifted"  # changed with the log-prob code, so an older cache is not reused


def cache_key(args: Args, ref_name: str, ds, split: str, accelerator) -> str:
    """The reference model (its name; a local folder: data_fingerprint), the token ids, the precision and the
    pre-pass's micro-batches (a sequence's log-prob depends, in its last bits, on those padded or packed with it)."""
    ids = hashlib.sha256()
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for row in ds[column]:
            ids.update(np.asarray(row, dtype=np.int64).tobytes() + b"|")
    layout = ((args.seed, args.per_device_train_batch_size, args.global_batch_size) if split == "train"
              else (args.per_device_eval_batch_size,))
    parts = [LOGPS_VERSION, ref_name, data_fingerprint(ref_name), ids.hexdigest(), str(args.use_lora), args.dtype,
             str(accelerator.mixed_precision), args.attn_implementation,
             str((split, *layout, args.layout, args.length_groups))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


@torch.no_grad()
def reference_logps(ref_model, loaders, n_rows: int, accelerator, path: str, log) -> dict:
    """Summed reference log-probs of every pair's chosen and rejected response, indexed by row, from the batches of
    `loaders()` (each process scores its own); the main process writes the cache (safetensors, renamed into place)."""
    if os.path.exists(path):
        log(f"reference log-probs: reusing the cache {path}")
        return load_file(path)
    ref_model.eval()
    results = []
    for loader in loaders():
        for batch in tqdm(loader, desc="reference pre-pass", disable=not accelerator.is_local_main_process):
            with accelerator.autocast():
                logps, _ = sequence_logps(ref_model, batch)
            n = len(batch["row"])
            results += list(zip(batch["row"].tolist(), logps[:n].tolist(), logps[n:].tolist()))
    # accelerate repeats rows to even out the last batches: a row's first result is kept (reversed: written last)
    first = {row: (chosen, rejected) for row, chosen, rejected in reversed(gather_object(results))}
    assert sorted(first) == list(range(n_rows))
    out = {"chosen": torch.tensor([first[i][0] for i in range(n_rows)], dtype=torch.float64),
           "rejected": torch.tensor([first[i][1] for i in range(n_rows)], dtype=torch.float64)}
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save_file(out, path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f"reference log-probs: computed {n_rows} pairs, cached in {path}")
    accelerator.wait_for_everyone()
    return out


# ---- start-up: arguments, output folder, network, models, checkpoints ------------------------------------------------
# arguments that change neither the training math nor the data order: --resume accepts new values for these
RESUME_SAFE = {"exp_name", "output_dir", "config", "preset", "config_sha256", "track", "wandb_project_name",
               "wandb_entity", "push_to_hub", "hub_model_id", "trust_remote_code", "gradient_checkpointing",
               "attn_implementation", "layout", "length_groups", "eval_split", "eval_dataset_name", "max_eval_samples",
               "per_device_eval_batch_size", "cache_dir", "logging_steps", "eval_steps", "save_steps",
               "save_total_limit", "resume", "resume_allow_changes", "overwrite_output_dir", "world_size"}
# transformers schedules that need nothing but the warm-up and the step count (get_scheduler)
STEP_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                  "inverse_sqrt")


def fail(message: str) -> NoReturn:
    """A user error: one message saying what is wrong and how to fix it, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_config(path: str) -> list[str]:
    """A YAML file of Args fields as the flags it stands for: tyro parses them as typed, and flags given after win."""
    try:
        config = yaml.safe_load(open(path, "rb"))
    except (OSError, yaml.YAMLError) as e:
        fail(f"--config {path}: {' '.join(str(e).split())}; pass a YAML file of Args fields (see recipes/)")
    if not isinstance(config, dict):
        fail(f"--config {path} must hold `key: value` lines of Args fields, not a {type(config).__name__}")
    keys = [f.name for f in fields(Args) if f.name not in ("config", "preset") and "Suppress" not in str(f.type)]
    flags = ["--config", path]
    for key, value in config.items():  # the fields filled in at runtime (Suppress) are no keys either
        if key not in keys:
            fail(f"--config {path}: unknown key {key!r} (did you mean {get_close_matches(str(key), keys, 1, 0)[0]!r}?)")
        values = [] if isinstance(value, bool) else value if isinstance(value, list) else [value]  # None: "None"
        flags += [f"--{'no_' if value is False else ''}{key}", *map(str, values)]  # bool: --key / --no_key
    return flags


def parse_args() -> Args:
    """`--config FILE.yaml` (`--preset tiny`: recipes/tiny/<this script>.yaml) sets Args fields; flags given win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # which file, if any: tyro then parses once
    pre.add_argument("--config")
    pre.add_argument("--preset", choices=["tiny"])
    given = pre.parse_known_args()[0]
    if given.config and given.preset:
        fail(f"--config {given.config} and --preset tiny (recipes/tiny) both name a recipe file: pass one of them")
    path = given.config or given.preset and os.path.abspath(f"{__file__}/../recipes/tiny/{Args.exp_name}.yaml")
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = path and hashlib.sha256(open(path, "rb").read()).hexdigest()
    validate(args)
    return args


def validate(args: Args) -> None:
    """Every argument checked before anything is loaded or written; the first problem found is reported."""
    value, is_file = lambda name: getattr(args, name), os.path.isfile(args.dataset_name)
    same_data = args.eval_dataset_name is not None and (
        os.path.realpath(args.eval_dataset_name) == os.path.realpath(args.dataset_name)
        and (is_file or args.eval_split in (None, args.train_split)))
    unknown = sorted(set(args.resume_allow_changes) - {f.name for f in fields(Args)})
    out, floats = args.output_dir, [f.name for f in fields(Args) if isinstance(value(f.name), float)]
    inputs = (args.model_name_or_path, args.ref_model_name_or_path, args.tokenizer_name, args.dataset_name,
              args.eval_dataset_name)
    problems = [(not math.isfinite(value(n)), f"--{n} must be a finite number (got {value(n)})") for n in floats]
    problems += [(value(n) is not None and value(n) < 1, f"--{n} must be at least 1 (got {value(n)})") for n in (
        "per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size", "num_train_epochs",
        "max_steps", "max_length", "max_prompt_length", "max_train_samples", "max_eval_samples", "length_groups",
        "logging_steps", "eval_steps", "save_steps", "save_total_limit", "lora_r", "lora_alpha")]
    problems += [(value(n) < 0, f"--{n} must be non-negative (got {value(n)})") for n in ("learning_rate",
                                                                                          "weight_decay")]
    problems += [(value(n) <= 0, f"--{n} must be positive (got {value(n)})") for n in ("beta", "max_grad_norm")]
    problems += [(not ok, f"--{n} must be in {interval} (got {value(n)})") for n, ok, interval in (
        ("warmup_ratio", 0 <= args.warmup_ratio <= 1, "[0, 1]"), ("lora_dropout", 0 <= args.lora_dropout < 1, "[0, 1)"),
        ("label_smoothing", 0 <= args.label_smoothing < 0.5, "[0, 0.5)"),
        ("eval_fraction", args.eval_fraction is None or 0 < args.eval_fraction < 1, "(0, 1)"))]
    problems += [
        (args.label_smoothing > 0 and args.loss_type != "sigmoid",
         f"--label_smoothing applies to --loss_type sigmoid only (got --loss_type {args.loss_type})"),
        (args.max_prompt_length >= args.max_length, f"--max_prompt_length ({args.max_prompt_length}) must be below "
         f"--max_length ({args.max_length}), or no response token fits"),
        (args.resume and args.overwrite_output_dir,
         "--resume continues the run in output_dir, --overwrite_output_dir replaces it: pass one of them"),
        (args.resume_allow_changes and not args.resume, "--resume_allow_changes only applies with --resume"),
        (unknown, f"--resume_allow_changes: no such argument {unknown}; name Args fields, e.g. learning_rate"),
        (args.eval_fraction is not None and args.eval_dataset_name is not None,
         "--eval_fraction holds out training data, --eval_dataset_name names other data: pass one of them"),
        (args.eval_split and args.eval_fraction is None and args.eval_dataset_name is None and is_file,
         f"--dataset_name {args.dataset_name} is a single file, so it has no eval split {args.eval_split!r}: pass "
         "--eval_dataset_name FILE (held-out data), --eval_fraction 0.05 or --eval_split None (no eval)"),
        (same_data, f"the eval data are the training data ({args.eval_dataset_name}, split "
         f"{args.eval_split or args.train_split}): pass held-out data or --eval_fraction"),
        (args.eval_split == args.train_split and args.eval_dataset_name is None and args.eval_fraction is None,
         f"--eval_split {args.eval_split!r} is the training split: pass a held-out split, --eval_fraction 0.05 or "
         "--eval_split None"),
        (args.lr_scheduler_type not in STEP_SCHEDULES, f"--lr_scheduler_type {args.lr_scheduler_type!r} is not a "
         f"schedule of warm-up and steps alone: use one of {', '.join(STEP_SCHEDULES)}"),
        (str(args.chat_template).endswith(".jinja") and not os.path.isfile(args.chat_template),
         f"--chat_template {args.chat_template}: no such file; pass a .jinja file or the template text itself"),
        (args.dtype == "float16", "--dtype float16 trains float16 weights without a loss scaler (the loss turns nan): "
         "use --dtype bfloat16, or float32 weights with mixed_precision fp16 in the accelerate config"),
        (any(n and os.path.realpath(n) == os.path.realpath(out) for n in inputs),
         f"--output_dir {out} is an input of this run (model, tokenizer or data): pass another --output_dir"),
        (os.path.exists(out) and not os.path.isdir(out), f"--output_dir {out} is a file: pass a folder"),
        (os.path.isdir(out) and set(os.listdir(out)) - {".lock"} and not (args.resume or args.overwrite_output_dir),
         f"output_dir {out} already holds files (a model, metrics.jsonl, ...); pass --overwrite_output_dir to "
         "replace them, --resume to continue that run, or another --output_dir"),
    ]
    for bad, message in problems:
        if bad:
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
    """Size and modification time of every file of a local dataset or model (a file or a folder); a hub id: its name.
    The cache-*/tmp* files that map/filter write next to a save_to_disk dataset are left out (a resume must match)."""
    files = [name] if os.path.isfile(name) else sorted(os.path.join(d, f) for d, _, fs in os.walk(name) for f in fs
                                                       if not f.startswith(("cache-", "tmp")))
    stats = [(os.path.relpath(f, name), os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files]
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16] if os.path.exists(name) else name


def lock_output_dir(path: str) -> None:
    """One run at a time per output folder: a kernel flock on path/.lock, released however the process ends (a killed
    run leaves the file, not the lock). At exit the file goes, and the folder if this run made it and it is empty."""
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


def check_network(args: Args) -> None:
    """A name not a local path, HF_HUB_OFFLINE unset: one 3-second connection, so no network is reported at once."""
    remote = [n for n in (args.model_name_or_path, args.ref_model_name_or_path, args.tokenizer_name,
                          args.dataset_name, args.eval_dataset_name) if n and not os.path.exists(n)]
    url = urlparse(hub_constants.ENDPOINT)
    try:
        if remote and not hub_constants.HF_HUB_OFFLINE:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), 3).close()
    except OSError:
        fail(f"no network: cannot reach the Hugging Face Hub for {remote[0]!r}. Set HF_HUB_OFFLINE=1 to use the "
             "local cache, or pass a local path.")


def load_pretrained(cls, name: str, args: Args, what: str = "model"):
    """`cls.from_pretrained`, or an error naming what failed to load, with a hint that fits what was passed."""
    kwargs = {} if cls is AutoTokenizer else {"dtype": getattr(torch, args.dtype),
                                              "attn_implementation": args.attn_implementation}
    try:
        return cls.from_pretrained(name, trust_remote_code=args.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        held = os.listdir(name) if os.path.isdir(name) else None  # a folder: empty, or a checkpoint (accelerate state)
        why = ("it is empty; pass a folder holding a saved model (a run's output folder) or a hub id" if held == []
               else "it holds a training checkpoint (optimizer state), not a saved model; pass the run's output "
               "folder, which holds its final model" if held and "optimizer.bin" in held else str(e).splitlines()[0])
        if held is not None:
            fail(f"could not load {what} {name!r} from that folder: {why}")
        fail(f"could not load {what} {name!r}: no such local folder and not a hub id"
             + (" in the local cache (HF_HUB_OFFLINE is set)" if hub_constants.HF_HUB_OFFLINE else "")
             + ". Pass a folder written by sft.py (python -m tiny --out data/tiny, then python sft.py --preset tiny).")


def saved_steps(output_dir: str) -> list[int]:
    """The steps of the fully written checkpoints (`step-12`; not a half-written `tmp-step-15`), oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted(int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit())


def newest_checkpoint(output_dir: str) -> str | None:
    steps = saved_steps(output_dir)
    return os.path.join(output_dir, "checkpoints", f"step-{steps[-1]}") if steps else None


def main(args: Args):
    # TRY NOT TO MODIFY: accelerator, batch-size chain, seeding, logging
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    args.world_size = accelerator.num_processes
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.layout == "auto":
        args.layout = "padding_free" if accelerator.device.type == "cuda" else "padded"
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    args.data_fingerprint = data_fingerprint(args.dataset_name)
    if args.resume and (done := compare_with_saved_run(args)) is not None:
        log(f"run in {args.output_dir} already finished (step {done}); nothing to do")
        return
    if accelerator.is_main_process:
        lock_output_dir(args.output_dir)
    run_id = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    check_network(args)
    set_seed(args.seed, device_specific=True)
    tokenizer = load_pretrained(AutoTokenizer, args.tokenizer_name or args.model_name_or_path, args,
                                "tokenizer" if args.tokenizer_name else "model")
    if template := args.chat_template:  # for a base tokenizer; saved with the tokenizer: the output folder has it
        tokenizer.chat_template = open(template).read() if template.endswith(".jinja") else template
    if tokenizer.chat_template is None:
        fail(f"tokenizer {tokenizer.name_or_path!r} has no chat template: pass --chat_template (a Jinja string or a "
             ".jinja file)")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
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
    if args.disable_dropout:  # dropout would make the policy's log-probs differ from the reference's at step 0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
    log(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; global batch "
        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x {args.world_size} "
        f"processes = {args.global_batch_size} pairs; layout {args.layout}")

    with accelerator.main_process_first():  # tokenized once: the other processes reuse the datasets cache
        train_ds, eval_ds, data_stats = load_data(args, tokenizer, log)
    collate_fn = lambda rows: collate(rows, tokenizer.pad_token_id, args.layout == "padding_free", args.length_groups)
    rows_per_epoch = len(train_ds) // args.global_batch_size * args.global_batch_size  # whole global batches only
    steps_per_epoch = rows_per_epoch // args.global_batch_size
    if steps_per_epoch == 0:
        fail(f"{len(train_ds)} training pairs are fewer than one global batch ({args.global_batch_size}): lower "
             "--per_device_train_batch_size or --gradient_accumulation_steps")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs

    def epoch_order(epoch: int) -> list[int]:  # depends on (seed, epoch) only: a resumed run sees the same batches
        return torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()

    def loader_of(ds, rows: list[int], batch_size: int):
        return accelerator.prepare(DataLoader(ds.select(rows), batch_size=batch_size, collate_fn=collate_fn))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors (as TRL)
    # stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=math.ceil(args.warmup_ratio * total_steps))
    if not any(scheduler.lr_lambdas[0](step) for step in range(total_steps)):  # warm-up starts at a rate of 0
        log(f"warning: the learning rate is 0 at each of the {total_steps} steps (warm-up --warmup_ratio "
            f"{args.warmup_ratio}): no update is applied; train more steps or lower --warmup_ratio")
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None if eval_ds is None else loader_of(eval_ds, list(range(len(eval_ds))),
                                                         args.per_device_eval_batch_size)

    # ALGO LOGIC: the reference log-probs logp_ref(y_w), logp_ref(y_l) of every pair, once, before training
    ref_name = args.ref_model_name_or_path or args.model_name_or_path
    scorer = model if args.ref_model_name_or_path is None else \
        load_pretrained(AutoModelForCausalLM, ref_name, args).to(accelerator.device)
    order = epoch_order(0)
    train_batches = lambda: [loader_of(train_ds, rows, args.per_device_train_batch_size)  # epoch 0, then the rest
                             for rows in (order[:rows_per_epoch], order[rows_per_epoch:]) if rows]
    ref_cache = {}
    with accelerator.unwrap_model(model).disable_adapter() if args.use_lora and scorer is model else nullcontext():
        for split, ds, loaders in (("train", train_ds, train_batches), ("eval", eval_ds, lambda: [eval_loader])):
            if ds is not None:
                path = os.path.join(args.cache_dir, f"ref-logps-{cache_key(args, ref_name, ds, split, accelerator)}"
                                    ".safetensors")
                cache = reference_logps(scorer, loaders, len(ds), accelerator, path, log)
                ref_cache[split] = {k: v.to(accelerator.device, torch.float32) for k, v in cache.items()}
    del scorer  # training holds only the policy

    global_step, root = 0, os.path.join(args.output_dir, "checkpoints")
    saved = saved_steps(args.output_dir) if args.resume else []
    errors = []
    for step in reversed(saved):  # the newest that loads
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
    if saved and not global_step:
        fail(f"no checkpoint in {root} can be loaded (newest: {(errors or ['another process failed'])[0]}); "
             "restore them, or start afresh with --overwrite_output_dir (discards them)")
    if args.resume and not saved:
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
            metrics_file.write(json.dumps({"step": step, "run_id": run_id, **metrics}) + "\n")
            metrics_file.flush()
            if args.track:
                wandb.log(metrics, step=step)

    def policy_pass(batch: dict, split: str) -> tuple[torch.Tensor, dict]:
        # ALGO LOGIC: logp_pi of both responses in one pass, the cached logp_ref, the DPO loss (eq. 7)
        with accelerator.autocast():
            policy_logps, lengths = sequence_logps(model, batch, args.fp32_lm_head_grad)
        n = len(batch["row"])
        return compute_loss(policy_logps[:n], policy_logps[n:], ref_cache[split]["chosen"][batch["row"]],
                            ref_cache[split]["rejected"][batch["row"]], lengths[:n], lengths[n:], args)

    @torch.no_grad()
    def evaluate_and_log(step: int):  # gather_for_metrics drops the pairs accelerate repeats to even out batches
        model.eval()
        parts = [accelerator.gather_for_metrics(policy_pass(batch, "eval")[1]) for batch in eval_loader]
        model.train()
        metrics = {f"eval/{k}": torch.cat([p[k] for p in parts]).double().mean().item() for k in parts[0]}
        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        log_metrics(metrics, step)
        if not math.isfinite(metrics["eval/loss"]):
            raise SystemExit(f"eval/loss is {metrics['eval/loss']} at step {step}: the model is not saved (newest "
                             f"checkpoint: {newest_checkpoint(args.output_dir) or 'none'})")

    def save_checkpoint(step: int):
        # written to a temporary folder, then renamed: a crash mid-save never leaves a checkpoint resume would pick
        tmp, final = os.path.join(root, f"tmp-step-{step}"), os.path.join(root, f"step-{step}")
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # a step saved before (resumed from an earlier checkpoint) is replaced
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in saved_steps(args.output_dir)[: -args.save_total_limit]:
                shutil.rmtree(os.path.join(root, f"step-{old}"))
        accelerator.wait_for_everyone()

    if global_step == 0:
        log_metrics(data_stats, 0)
        if eval_loader is not None:
            evaluate_and_log(0)

    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="dpo")
    window, window_pairs, window_tokens, window_start = {}, 0, 0, time.time()
    while global_step < total_steps:
        epoch, steps_done = divmod(global_step, steps_per_epoch)
        loader = loader_of(train_ds, epoch_order(epoch)[:rows_per_epoch], args.per_device_train_batch_size)
        if steps_done:
            loader = accelerator.skip_first_batches(loader, steps_done * args.gradient_accumulation_steps)
        for batch in loader:
            with accelerator.accumulate(model):
                # ALGO LOGIC: L = mean over pairs of -logsigmoid(beta margin) (DPO eq. 7; ipo / hinge: dpo_loss)
                loss, metrics = policy_pass(batch, "train")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    # TRY NOT TO MODIFY: clip; stop before a non-finite update (one host sync a step, as nanoGPT)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
                    if not torch.isfinite(accelerator.reduce(loss.detach(), reduction="sum") + grad_norm):
                        raise SystemExit(f"non-finite loss or gradient at step {global_step + 1}: no update was "
                                         f"applied from that step on; newest checkpoint: "
                                         f"{newest_checkpoint(args.output_dir) or 'none'}")
                optimizer.step()
                optimizer.zero_grad()
            # TRY NOT TO MODIFY: schedule, logging, eval, checkpoints, throughput per logging window
            window = {k: window.get(k, 0) + v.double().sum() for k, v in metrics.items()}
            window_pairs, window_tokens = window_pairs + len(batch["row"]), window_tokens + batch["n_tokens"]
            if not accelerator.sync_gradients:
                continue
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used (logged)
            scheduler.step()
            global_step += 1
            bar.update(1)
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                sums = accelerator.reduce(torch.stack(list(window.values())), reduction="sum").tolist()
                counts = accelerator.reduce(torch.tensor([window_pairs, window_tokens], dtype=torch.float64,
                                                         device=accelerator.device), reduction="sum").tolist()
                seconds = time.time() - window_start
                out = {f"train/{k}": v / counts[0] for k, v in zip(window, sums)}
                out.update({"train/lr": step_lr, "train/epoch": global_step / steps_per_epoch,
                            "perf/tokens_per_s": counts[1] / seconds, "perf/pairs_per_s": counts[0] / seconds})
                bar.set_postfix(loss=f"{out['train/loss']:.4f}", acc=f"{out['train/rewards/accuracies']:.2f}")
                log_metrics(out, global_step)
                window, window_pairs, window_tokens, window_start = {}, 0, 0, time.time()
            if eval_loader is not None and args.eval_steps and global_step % args.eval_steps == 0 \
                    and global_step != total_steps:
                evaluate_and_log(global_step)
            if args.save_steps and global_step % args.save_steps == 0:
                save_checkpoint(global_step)
            if global_step >= total_steps:
                break
    bar.close()
    peak_bytes = (torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    log_metrics({"perf/peak_memory_gb": peak_bytes / 1e9}, global_step)
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
        for obj in (unwrapped, tokenizer) if args.push_to_hub else ():
            obj.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
    accelerator.wait_for_everyone()
    if args.track and accelerator.is_main_process:
        wandb.finish()
    # the model goes before the process group: a DDP model freed after it can deadlock Gloo's exit (pytorch#56297)
    accelerator.free_memory()
    del model, optimizer
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
