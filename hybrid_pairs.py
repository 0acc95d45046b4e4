"""Hybrid (on-policy) preference pairs for WPO: sample responses from the policy, score them with a reward model,
and keep one (chosen, rejected) pair per prompt, for wpo.py (WPO-HB) or dpo.py `--dataset_name OUTPUT_DIR`.

Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization" (2024); official code
github.com/wzhouad/WPO (README: the "hybrid" HB / HB-v2 data). For each prompt x of a preference dataset:

    candidates(x) = the existing chosen and rejected responses (--include_existing, the "hybrid" part)
                    + --num_samples responses sampled from the policy (--temperature, --top_p, --max_new_tokens)
    score(y)      = reward model r(x, y): a sequence-classification head on the chat-formatted conversation
    v2 (default, the README's HB-v2 models):
        chosen    = the highest score; ties -> the shortest response (policy tokens)
        rejected  = the lowest score;  ties -> the smallest length difference to the chosen response
    v1 (the paper): chosen = the highest score; rejected = a random response with a lower score,
        drawn from a generator seeded by (seed, split, row), so the pick does not depend on sharding
    ties these rules leave go to the earliest candidate (existing responses first, then samples in order);
    a prompt whose candidates all score the same gives no pair (dropped, counted); empty samples are dropped.

Output (save_to_disk, HuggingFaceH4/ultrafeedback_binarized schema, one split per input split): `prompt`,
`prompt_id`, `chosen` / `rejected` (message lists ending in the assistant turn), `messages` (= chosen),
`score_chosen` / `score_rejected`, `candidates` / `candidate_scores` (every scored response), and `args.json`.
A prompt longer than --max_prompt_length tokens is cut as dpo.py and wpo.py cut it, so the policy samples from the
context it is then trained on; one that does not end with a user message is dropped and counted. The reward model
reads the last --max_length tokens per conversation, left-padded with positions counted from each sequence's first
token (a batched score equals the score alone); a model without a trained score head is refused. Each process
samples with its own seed (set_seed(seed, device_specific=True)): the samples depend on the number of processes.

Paper scale (GPU, hub): recipes/wpo/hybrid_pairs-*.yaml, the WPO README's Llama-3-8B-Instruct (HB-v2 rules; the
defaults) and gemma-2-9b-it settings, scored by ArmoRM; recipes/wpo/wpo-llama3-8b-instruct-hybrid.yaml trains on them.
    accelerate launch hybrid_pairs.py --config recipes/wpo/hybrid_pairs-llama3-8b-instruct-v2.yaml
Offline tiny setting (CPU; RM_FOLDER = any AutoModelForSequenceClassification folder with a chat template):
    python -m tiny --out data/tiny && python sft.py --preset tiny --output_dir runs/tiny/sft-weak
    python hybrid_pairs.py --preset tiny --reward_model_name_or_path RM_FOLDER --output_dir data/tiny/hybrid
    python wpo.py --preset tiny --model_name_or_path runs/tiny/sft-weak --dataset_name data/tiny/hybrid
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import sys
from collections import Counter
from dataclasses import dataclass, fields
from difflib import get_close_matches
from typing import Literal, NoReturn
from urllib.parse import urlparse

import torch
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this program (log prefix)"""
    seed: int = 1
    """seed of the sampling and of v1's random rejected response"""
    output_dir: str = "data/hybrid"
    """the folder the dataset is written to (save_to_disk; train on it with --dataset_name OUTPUT_DIR)"""
    overwrite_output_dir: bool = False
    """replace a dataset an earlier run wrote in output_dir (the folder is deleted once the new one is complete)"""
    config: str | None = None
    """YAML file of Args fields (the papers' settings are in recipes/); flags given on the command line override it"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # of the --config file, set after parsing (in args.json)
    preset: Literal["tiny"] | None = None
    """`tiny` = --config recipes/tiny/hybrid_pairs.yaml, the offline tiny setting (data/tiny, runs/tiny/sft-weak)"""
    push_to_hub: bool = False
    """also upload the dataset to the Hugging Face Hub (needs a login)"""
    hub_dataset_id: str | None = None
    """repo id for --push_to_hub (default: the output_dir's name)"""

    # policy and reward model
    model_name_or_path: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """the policy that samples responses: hub id or local folder (WPO README: the model WPO then trains)"""
    tokenizer_name: str | None = None
    """the policy's tokenizer, hub id or path (default: --model_name_or_path)"""
    chat_template: str | None = None
    """Jinja chat template, or a path to a .jinja file, for the policy's tokenizer (for one that ships none)"""
    reward_model_name_or_path: str = "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    """reward model: a trained AutoModelForSequenceClassification with a chat template (ArmoRM: --trust_remote_code)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of both models' weights; auto = bfloat16 on a GPU, float32 on the CPU"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, flash_attention_2"""

    # data
    dataset_name: str = "HuggingFaceH4/ultrafeedback_binarized"
    """prompts (and existing pairs): hub id, local dataset folder, save_to_disk folder or .json/.jsonl/.parquet file"""
    dataset_config: str | None = None
    """dataset config (subset) name"""
    train_split: str = "train_prefs"
    """split whose prompts become the training pairs (the output split keeps this name)"""
    eval_split: str | None = "test_prefs"
    """split whose prompts become held-out pairs (None: build the train split only)"""
    prompt_column: str = "prompt"
    """prompt column: a string or a message list (used when there is no chosen/rejected pair)"""
    chosen_column: str = "chosen"
    """existing chosen response: a message list ending in the assistant turn, or a string"""
    rejected_column: str = "rejected"
    """existing rejected response: a message list ending in the assistant turn, or a string"""
    max_train_samples: int | None = None
    """use only the first N prompts of the train split"""
    max_eval_samples: int | None = 1000
    """use only the first N prompts of the eval split"""
    max_length: int = 2048
    """the reward model reads at most this many tokens per conversation (the last ones)"""
    max_prompt_length: int = 1800
    """prompt tokens the policy samples from; longer prompts are cut as dpo.py / wpo.py cut them (whole turns first)"""

    # sampling and pairs
    num_samples: int = 5
    """responses sampled from the policy per prompt"""
    temperature: float = 0.8
    """sampling temperature (> 0)"""
    top_p: float = 0.95
    """nucleus sampling: keep the smallest token set with this much probability"""
    max_new_tokens: int = 1024
    """longest sampled response, in tokens"""
    include_existing: bool = True
    """also score the dataset's own chosen and rejected responses as candidates (the "hybrid" in WPO-HB)"""
    pair_rule: Literal["v2", "v1"] = "v2"
    """v2: rejected = lowest score (WPO README); v1: rejected = a random lower-scored response (paper)"""
    batch_size: int = 8
    """prompts per generate call and per reward-model forward (which scores all their candidates at once)"""


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
        fail("--preset tiny stands for --config recipes/tiny/hybrid_pairs.yaml: pass one of them")
    tiny = f"{os.path.dirname(os.path.abspath(__file__))}/recipes/tiny/hybrid_pairs.yaml"
    path = given.config or given.preset and tiny
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = path and hashlib.sha256(open(path, "rb").read()).hexdigest()
    validate(args)
    return args


def validate(args: Args) -> None:
    """Every argument error, before anything is loaded or written."""
    for name in ("num_samples", "max_new_tokens", "batch_size", "max_length", "max_prompt_length", "max_train_samples",
                 "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if not args.temperature > 0:
        fail(f"--temperature must be above 0 (got {args.temperature}): greedy decoding makes every sample the same")
    if not 0 < args.top_p <= 1:
        fail(f"--top_p must be in (0, 1] (got {args.top_p})")
    if (args.chat_template or "").endswith(".jinja") and not os.path.isfile(args.chat_template):
        fail(f"--chat_template {args.chat_template}: no such file; pass a .jinja file or the template itself")
    if args.max_prompt_length >= args.max_length:
        fail(f"--max_prompt_length ({args.max_prompt_length}) must be below --max_length ({args.max_length})")
    if args.num_samples < 2 and not args.include_existing:
        fail("a pair needs at least two candidates: pass --num_samples 2 or more, or keep --include_existing")
    if args.eval_split is not None and args.eval_split == args.train_split:
        fail(f"--train_split and --eval_split are both {args.train_split!r}; pass another --eval_split, or None")
    if os.path.isfile(args.dataset_name) and args.eval_split is not None:
        fail(f"--dataset_name {args.dataset_name} is a single file: it holds one split, read as --train_split; "
             "pass --eval_split None (or give a dataset folder with both splits)")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        fail(f"output_dir {args.output_dir} is a file; pass another --output_dir")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        fail(f"output_dir {args.output_dir} already holds files (a dataset, args.json, ...); pass "
             "--overwrite_output_dir to replace them, or another --output_dir")
    if os.path.abspath(args.output_dir) == os.path.abspath(args.dataset_name):
        fail(f"--output_dir {args.output_dir} is the input --dataset_name; pass another --output_dir")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def check_hub(names: list[str]) -> None:
    """With the hub online and some name not a local path: fail fast (3 s) when the hub cannot be reached."""
    from huggingface_hub import constants

    remote = [n for n in names if n is not None and not os.path.exists(n)]
    if not remote or constants.HF_HUB_OFFLINE:
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        fail(f"no network: cannot reach the Hugging Face Hub for '{remote[0]}'. Set HF_HUB_OFFLINE=1 to use the "
             "local cache, or pass a local path.")


# data
def read_jsonl(path: str) -> list[dict]:
    """A .jsonl file row by row, so a bad line is reported by its 1-based number."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    fail(f"{path}, line {n}: not valid JSON ({e.msg}); fix or remove that line")
                if not isinstance(rows[-1], dict):
                    fail(f"{path}, line {n}: expected a JSON object with the prompt and pair columns")
    return rows


def load_split(args: Args, split: str):
    """Hub id, local dataset folder (README YAML / data files), save_to_disk folder, or one file."""
    name = args.dataset_name
    try:
        if os.path.isfile(name):
            ext = os.path.splitext(name)[1]
            if ext == ".jsonl":
                rows = read_jsonl(name)
                if not rows:
                    fail(f"{name} is empty; it needs one JSON object per line")
                return Dataset.from_list(rows)
            kind = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
            if kind is None:
                fail(f"cannot read dataset file {name}: use .json, .jsonl, .parquet or .csv")
            return load_dataset(kind, data_files={split: name}, split=split)
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
            saved = load_from_disk(name)
            if split not in saved:
                fail(f"dataset {name} has no split {split!r} (splits: {sorted(saved)}); pass --train_split / "
                     "--eval_split")
            return saved[split]
        return load_dataset(name, args.dataset_config, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        where = "no such local folder or file, and not a hub dataset" + (" in the local cache" if hub_offline() else "")
        fail(f"could not load split {split!r} of dataset '{name}': {where} ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:200]})")


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def fit_prompt(tokenizer, prompt: list[dict], max_tokens: int) -> tuple[list[int], bool] | None:
    """The prompt's ids (generation prompt included) within max_tokens, and whether it was cut: whole earlier turns
    go first (a system message stays), then the start of the oldest user text. None if that cannot fit."""
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


def as_messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_and_existing(ex: dict, args: Args) -> tuple[list[dict], list[str]]:
    """A row's prompt messages (of a message-list pair: the turns before its last) and existing responses (or none)."""
    if args.chosen_column not in ex or args.rejected_column not in ex:
        return as_messages(ex[args.prompt_column]), []
    chosen, rejected = ex[args.chosen_column], ex[args.rejected_column]
    if isinstance(chosen, list) and isinstance(rejected, list):
        prompt = chosen[:-1] or as_messages(ex[args.prompt_column])
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    else:
        prompt = as_messages(ex[args.prompt_column])
    return prompt, [chosen, rejected] if args.include_existing else []


def check_columns(ds, args: Args, split: str) -> None:
    """A split needs a prompt column, or a chosen/rejected pair to take the prompt from."""
    cols = ds.column_names
    has_pair = args.chosen_column in cols and args.rejected_column in cols
    if args.prompt_column not in cols and not has_pair:
        fail(f"the {split} split of {args.dataset_name} has neither a {args.prompt_column!r} column nor "
             f"{args.chosen_column!r}/{args.rejected_column!r} (columns: {cols}); pass --prompt_column (and "
             "--chosen_column / --rejected_column) naming your columns")
    for k, ex in enumerate(ds.select(range(min(len(ds), 1000)))):
        try:
            prompt, existing = prompt_and_existing(ex, args)
            ok = all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt)
            ok = ok and all(isinstance(t, str) for t in existing)
        except (KeyError, TypeError, IndexError, AttributeError):
            ok = False
        if not ok:
            fail(f"row {k} of the {split} split of {args.dataset_name}: the prompt must be a string or a list of "
                 "{role, content} messages, and chosen/rejected strings or message lists ending in the assistant turn")


# the pair rules
def pick_pair(scores: list[float], lengths: list[int], rule: str = "v2", rng: random.Random | None = None):
    """(chosen, rejected) indices among one prompt's candidate responses, or None when every score ties."""
    top, low = max(scores), min(scores)
    if top == low:
        return None
    best = [i for i, s in enumerate(scores) if s == top]
    if rule == "v1":  # ALGO LOGIC: the paper: chosen = the best, rejected = a random lower-scored response
        return best[0], rng.choice([i for i, s in enumerate(scores) if s < top])
    # ALGO LOGIC: v2 (WPO README): chosen = highest score, ties -> the shortest;
    # rejected = lowest score, ties -> the smallest length difference to the chosen
    chosen = min(best, key=lambda i: lengths[i])
    rejected = min((i for i, s in enumerate(scores) if s == low), key=lambda i: abs(lengths[i] - lengths[chosen]))
    return chosen, rejected


# sampling and scoring
def left_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left to the longest, and their attention mask."""
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask


@torch.no_grad()
def sample_responses(model, tokenizer, prompt_ids: list[list[int]], args: Args) -> list[list[str]]:
    """`num_samples` responses per prompt (its ids, as fit_prompt cut them) in one batched `generate`, left-padded."""
    input_ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, model.device)
    eos = model.generation_config.eos_token_id
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                         top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,  # top-k off (transformers: 50)
                         num_return_sequences=args.num_samples, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id if eos is None else eos)
    texts = [t.strip() for t in tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
    return [texts[i : i + args.num_samples] for i in range(0, len(texts), args.num_samples)]


@torch.no_grad()
def reward_scores(rm, rm_tokenizer, convs: list[list[dict]], max_length: int) -> list[float]:
    """One scalar per conversation (prompt + response) from a sequence-classification reward model (header)."""
    input_ids, mask = left_pad([chat_ids(rm_tokenizer, c)[-max_length:] for c in convs], rm_tokenizer.pad_token_id,
                               rm.device)
    out = rm(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    score = out.score if getattr(out, "score", None) is not None else out.logits[:, 0]  # ArmoRM's head returns `score`
    return score.float().flatten().tolist()


def hybrid_pairs(exs: list[dict], keys: list[str], model, tokenizer, rm, rm_tokenizer, args: Args) -> tuple[list, int]:
    """One preference row per example (or why there is none), the number of empty samples dropped; `keys` seed v1."""
    prompts, existing = zip(*(prompt_and_existing(ex, args) for ex in exs))
    ends_with_user = [bool(p) and p[-1].get("role") == "user" for p in prompts]
    # the policy samples from the prompt as dpo.py / wpo.py train on it (None: it cannot be)
    fitted = [fit_prompt(tokenizer, p, args.max_prompt_length) if ok else None
              for p, ok in zip(prompts, ends_with_user)]
    todo = [i for i, f in enumerate(fitted) if f is not None]
    sampled = iter(sample_responses(model, tokenizer, [fitted[i][0] for i in todo], args) if todo else [])
    samples = [next(sampled) if f is not None else [] for f in fitted]
    # ALGO LOGIC: candidates = the existing responses + the policy's samples, all scored by one reward model;
    # an empty sample cannot be trained on and is dropped
    candidates = [[t for t in list(old) + new if t.strip()] if f is not None else []
                  for old, new, f in zip(existing, samples, fitted)]
    convs = [p + [{"role": "assistant", "content": t}] for p, cands in zip(prompts, candidates) for t in cands]
    flat_scores = reward_scores(rm, rm_tokenizer, convs, args.max_length) if convs else []
    rows = []
    for ex, key, prompt, cands, ok, f in zip(exs, keys, prompts, candidates, ends_with_user, fitted):
        scores, flat_scores = flat_scores[: len(cands)], flat_scores[len(cands) :]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in cands]  # length = policy tokens
        pair = pick_pair(scores, lengths, args.pair_rule, random.Random(key)) if cands else None
        if pair is None:
            rows.append("the prompt does not end with a user message" if not ok
                        else "prompt too long to cut (system message)" if f is None
                        else "fewer than two non-empty candidates" if len(cands) < 2 else "every score ties")
            continue
        chosen, rejected = (prompt + [{"role": "assistant", "content": cands[i]}] for i in pair)
        text = ex.get(args.prompt_column)
        rows.append({"prompt": text if isinstance(text, str) else prompt[-1]["content"],
                     "prompt_id": str(ex.get("prompt_id", key)), "chosen": chosen, "rejected": rejected,
                     "messages": chosen, "score_chosen": scores[pair[0]], "score_rejected": scores[pair[1]],
                     "candidates": cands, "candidate_scores": scores})
    return rows, sum(len(old) + len(new) - len(c) for old, new, c, f in zip(existing, samples, candidates, fitted)
                     if f is not None)


# models
def load_pretrained(cls, name: str, what: str, args: Args, **kwargs):
    """A tokenizer or model by hub id or local folder; a bad name is a user error naming it."""
    try:
        return cls.from_pretrained(name, trust_remote_code=args.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        held = os.listdir(name) if os.path.isdir(name) else None  # a folder: empty, a checkpoint, or what failed
        where = ("no such local folder" + (", and not a hub id in the local cache (HF_HUB_OFFLINE is set)"
                                           if hub_offline() else " and not a hub id") if held is None else
                 "an empty folder; pass one holding a saved model" if not held else "a training checkpoint "
                 "(optimizer state), not a saved model; pass the run's output folder" if "optimizer.bin" in held
                 else "a folder that transformers cannot load")
        fail(f"could not load {what} '{name}': {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def load_tokenizer(name: str, what: str, args: Args, template: str | None = None):
    tok = load_pretrained(AutoTokenizer, name, what, args)
    if template:  # --chat_template, for a base tokenizer
        tok.chat_template = open(template).read() if template.endswith(".jinja") else template
    if tok.chat_template is None:
        fail(f"{what} '{name}' has no chat template; use an instruct / chat tokenizer or one with a template set"
             + ("" if what == "the reward model" else ", or pass --chat_template (a Jinja string or a .jinja file)"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


if __name__ == "__main__":
    args = parse_args()
    check_hub([args.model_name_or_path, args.tokenizer_name, args.reward_model_name_or_path, args.dataset_name])
    # TRY NOT TO MODIFY: accelerator, seeding, logging
    accelerator = Accelerator()
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    set_seed(args.seed, device_specific=True)
    auto = "bfloat16" if torch.cuda.is_available() else "float32"
    dtype = getattr(torch, auto if args.dtype == "auto" else args.dtype)

    splits = {}
    for split, limit in ((args.train_split, args.max_train_samples), (args.eval_split, args.max_eval_samples)):
        if split is not None:
            ds = load_split(args, split)
            splits[split] = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
            if len(splits[split]) == 0:
                fail(f"the {split} split of {args.dataset_name} is empty")
            check_columns(splits[split], args, split)
    tokenizer = load_tokenizer(args.tokenizer_name or args.model_name_or_path, "the policy's tokenizer"
                               if args.tokenizer_name else "the policy", args, args.chat_template)
    rm_tokenizer = load_tokenizer(args.reward_model_name_or_path, "the reward model", args)
    model = load_pretrained(AutoModelForCausalLM, args.model_name_or_path, "the policy", args, dtype=dtype,
                            attn_implementation=args.attn_implementation)
    rm, loading = load_pretrained(AutoModelForSequenceClassification, args.reward_model_name_or_path,
                                  "the reward model", args, dtype=dtype, output_loading_info=True,
                                  ignore_mismatched_sizes=True)  # a head of another shape: reported just below
    if loading["missing_keys"] or loading["mismatched_keys"]:  # e.g. a causal LM: its score head would be random
        fail(f"the reward model '{args.reward_model_name_or_path}' has no trained weights for "
             f"{sorted(loading['missing_keys'] or [k[0] for k in loading['mismatched_keys']])[:3]}: it is not a "
             "reward model (a causal LM gets a random score head); pass a sequence-classification reward model")
    rm.config.pad_token_id = rm_tokenizer.pad_token_id  # the classifier reads the last non-pad token
    model, rm = model.to(accelerator.device).eval(), rm.to(accelerator.device).eval()
    log(f"policy {args.model_name_or_path}, reward model {args.reward_model_name_or_path}, {dtype}, "
        f"{accelerator.num_processes} process(es)")

    built = {}
    for split, ds in splits.items():
        rows, empty = [], 0
        # ALGO LOGIC: every prompt gets candidates, scores and a pair; processes take contiguous shards of prompts
        with accelerator.split_between_processes(list(range(len(ds)))) as mine:
            for start in tqdm(range(0, len(mine), args.batch_size), desc=f"hybrid pairs ({split})",
                              disable=not accelerator.is_local_main_process):
                idx = mine[start : start + args.batch_size]
                keys = [f"{args.seed}-{split}-{i}" for i in idx]
                got, n_empty = hybrid_pairs([ds[i] for i in idx], keys, model, tokenizer, rm, rm_tokenizer, args)
                rows, empty = rows + list(zip(idx, got)), empty + n_empty
        rows, empty = sorted(gather_object(rows), key=lambda r: r[0]), sum(gather_object([empty]))
        kept = [r for _, r in rows if isinstance(r, dict)]
        dropped = Counter(r for _, r in rows if isinstance(r, str))
        log(f"{split}: {len(kept)} pairs from {len(ds)} prompts ({args.num_samples} samples each"
            f"{' + the existing responses' if args.include_existing else ''}); {len(rows) - len(kept)} prompts dropped"
            f" ({', '.join(f'{n} {r}' for r, n in sorted(dropped.items())) or 'none'}), {empty} empty samples dropped")
        if not kept and set(dropped) == {"every score ties"}:
            fail(f"no pair could be built for the {split} split: every prompt's candidates score the same; check the "
                 "reward model, or sample more (--num_samples, --temperature)")
        if not kept:
            fail(f"no pair could be built for the {split} split ({dict(dropped)}); check the prompts, the existing "
                 "responses and --max_prompt_length, or sample more (--num_samples)")
        built[split] = Dataset.from_list(kept)

    # TRY NOT TO MODIFY: write to a temporary folder, then rename: a run that stops early leaves nothing behind
    if accelerator.is_main_process:
        tmp = args.output_dir.rstrip("/") + f".tmp-{os.getpid()}"
        DatasetDict(built).save_to_disk(tmp)
        with open(os.path.join(tmp, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        if os.path.isdir(args.output_dir):  # non-empty only with --overwrite_output_dir (validated)
            shutil.rmtree(args.output_dir)
        os.replace(tmp, args.output_dir)
        log(f"wrote the hybrid pairs to {args.output_dir}; train on them with --dataset_name {args.output_dir}")
        if args.push_to_hub:
            DatasetDict(built).push_to_hub(args.hub_dataset_id or os.path.basename(args.output_dir.rstrip("/")))
    accelerator.wait_for_everyone()
    accelerator.end_training()
