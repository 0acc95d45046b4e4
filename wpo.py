"""Weighted Preference Optimization (WPO): DPO with each pair weighted by its probability under the
current policy.

Zhou et al., "WPO: Enhancing RLHF with Weighted Preference Optimization" (2024); official code
github.com/wzhouad/WPO (`scripts/run_wpo.py`, class WPOTrainer). Off-policy pairs are reweighted to
look on-policy: a pair the policy would likely have sampled counts fully, an unlikely one less.
On-policy (hybrid, WPO-HB) pairs are built by hybrid_pairs.py; wpo.py trains on the dataset it writes.

    logp(y)  = sum over response tokens of log pi(y_t | x, y_<t)          (prompt and padding masked)
    h        = (logp_pi(y_w) - logp_ref(y_w)) - (logp_pi(y_l) - logp_ref(y_l))
    sigmoid  : -logsigmoid(beta h) (1 - eps) - logsigmoid(-beta h) eps     (eps = label smoothing)
    ipo      : (h - 1 / (2 beta))^2, with length-averaged log-probs        (Azar et al. 2023)
    hinge    : relu(1 - beta h)                                            (SLiC, Zhao et al. 2023)
    rewards  : beta (logp_pi - logp_ref) for y_w and y_l; accuracy = reward_w > reward_l
    a(y)     = mean over response tokens of [logp(y_t) - log sum_v p_v(t)^2]   (official "sampled alignment")
    w        = min(1, exp(a(y_w) + a(y_l))), detached, from the policy's own forward pass
    loss     = w * (the DPO loss above); logged: the weight's mean, min and max
    --no_clamp_weight: TRL's `use_weighting` form (no min with 1); --no_weight_sum_sq: a(y) = the plain
    length-normalised log-prob (no sum of squares term)

What makes it lean: the reference model's log-probs never change, so by default they are computed
in one pass before training and cached on disk (keyed by a hash of the model, data and tokenization
settings; a rerun reuses them), and training holds only the policy. Chosen and rejected go through
one loss; sorted by length, they go through the model in `--length_groups` forwards, each padded
only to its own longest sequence (8 pairs with prompts of 16..128 and responses of 32..384 tokens,
uniform: 38% of the positions are padding in one forward, 11% in four; benchmarks/padding.py).
Logits exist only at response positions (no batch x length x vocab tensor), and the fp32
log-softmax is taken chunk by chunk; its gradient, onehot - softmax, is written chunk by chunk into
one buffer (TokenLogps). `--padding_free` packs each batch into one row. With LoRA the reference
is the base model (adapters disabled). The weight needs log sum_v p_v^2 = log sum_v e_v^2 -
2 log sum_v e_v with e = exp(z - max z) for logits z, from the exponentials the log-normaliser takes
anyway, in fp32: no probability tensor either. Everything else is dpo.py: `diff dpo.py wpo.py` shows WPO.

Loss normaliser: the mean over the optimizer step's pairs. Each micro-batch's loss is its per-pair mean, and
accelerate averages micro-batches and processes; this equals the mean over all pairs because every micro-batch
holds the same number of pairs (only whole global batches are trained on). Dropout is off in the policy
(`--disable_dropout`, LoRA dropout included), as in TRL's DPOTrainer: at step 0 the policy is the reference.

Paper-scale (GPU, hub; the official Llama-3-8B-Instruct setting: beta 0.01, lr 1e-6, 2 epochs, max
length 2048 / prompt 1800, 8 GPUs x batch 2 x accumulation 8, gradient checkpointing, UltraFeedback binarized):
    accelerate launch --config_file configs/zero3.yaml wpo.py --output_dir runs/llama3-8b-instruct-wpo
    # WPO-HB: on-policy pairs from hybrid_pairs.py (the policy's samples scored by ArmoRM), then WPO on them:
    accelerate launch --config_file configs/zero3.yaml wpo.py --dataset_name data/llama3-hybrid \
        --output_dir runs/llama3-8b-instruct-wpo-hb
Offline tiny setting (CPU):
    python -m tiny --out data/tiny && python sft.py --preset tiny --output_dir runs/tiny/sft-weak
    python wpo.py --preset tiny --model_name_or_path runs/tiny/sft-weak --output_dir runs/tiny/wpo-weak
"""

import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object, send_to_device, set_seed
from datasets import load_dataset, load_from_disk
from safetensors.torch import load_file, save_file
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
    output_dir: str = "runs/wpo"
    """where the final model, checkpoints and metrics.jsonl go"""
    preset: Literal["tiny"] | None = None
    """named defaults: `tiny` = the offline tiny setting (data/tiny); flags still override"""
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
    model_name_or_path: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """hub id or local path of the policy's initial weights (paper: Llama-3-8B-Instruct, Mistral-7B-SFT)"""
    ref_model_name_or_path: str | None = None
    """reference model (default: the policy's initial weights; with LoRA: the base model, adapters off)"""
    tokenizer_name: str | None = None
    """tokenizer hub id or path (default: --model_name_or_path)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in; mixed precision itself comes from the accelerate config"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, flash_attention_2"""
    gradient_checkpointing: bool = True
    """recompute activations in backward to save memory (on in the official config)"""

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
    """held-out split for eval metrics (None: no eval)"""
    prompt_column: str = "prompt"
    """prompt column: a string (used when chosen/rejected are strings) or a message list"""
    chosen_column: str = "chosen"
    """chosen response: a message list ending in the assistant turn, or a string"""
    rejected_column: str = "rejected"
    """rejected response: a message list ending in the assistant turn, or a string"""
    max_length: int = 2048
    """prompt + response tokens; longer responses are cut (end-of-turn kept) (paper: 2048 Llama-3, 1024 Mistral)"""
    max_prompt_length: int = 1800
    """prompt tokens; longer prompts keep their last tokens (paper: 1800 Llama-3, 512 Mistral)"""
    max_train_samples: int | None = None
    """use only the first N training pairs"""
    max_eval_samples: int | None = 1000
    """use only the first N eval pairs"""
    padding_free: bool = False
    """pack each micro-batch into one row without padding (sequences cannot attend to each other)"""
    length_groups: int = 4
    """padded batches: forward the sequences sorted by length in this many groups, each padded only to its own
    longest sequence (less padding, same loss); 1 = one padded forward"""

    # algorithm
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """DPO loss: sigmoid (DPO), ipo, hinge"""
    beta: float = 0.01
    """inverse temperature of the implicit reward (paper: 0.01)"""
    label_smoothing: float = 0.0
    """sigmoid loss only: assumed probability that a label is flipped (conservative DPO)"""
    clamp_weight: bool = True
    """clamp the pair weight at 1 (official code); --no_clamp_weight: TRL's `use_weighting` form"""
    weight_sum_sq: bool = True
    """subtract log sum_v p_v^2 per token (official "sampled alignment"); off: plain length-normalised log-probs"""
    disable_dropout: bool = True
    """set every dropout probability to 0 in the policy (LoRA dropout included), as TRL's DPOTrainer does"""
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "w2s_alignment")
    """where the precomputed reference log-probs are cached"""
    prepass_batch_size: int = 16
    """pairs per forward in the reference pre-pass"""

    # optimization
    learning_rate: float = 1e-6
    """peak learning rate (paper: 1e-6 Llama-3-8B-Instruct, 5e-7 Mistral-7B-SFT)"""
    num_train_epochs: int = 2
    """passes over the training data (paper: 2 Llama-3-8B-Instruct, 1 Mistral-7B-SFT)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides the epochs)"""
    per_device_train_batch_size: int = 2
    """pairs per micro-batch per process (paper: 2 x 8 accumulation x 8 GPUs = 128)"""
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

    # filled in at runtime
    world_size: int = 1
    """(runtime) number of processes"""
    global_batch_size: int = 0
    """(runtime) micro batch x accumulation x processes"""


PRESETS = {
    "tiny": Args(
        preset="tiny", output_dir="runs/tiny/wpo", model_name_or_path="runs/tiny/sft-weak",
        dataset_name="data/tiny/ultrafeedback", max_length=128, max_prompt_length=64, learning_rate=1e-4,
        num_train_epochs=1, per_device_train_batch_size=32, gradient_accumulation_steps=1, per_device_eval_batch_size=64,
        max_eval_samples=400, logging_steps=20, prepass_batch_size=64, cache_dir="runs/tiny/cache",
        beta=0.1, gradient_checkpointing=False,  # as dpo.py: wpo.py's paper defaults differ
    ),
}


def parse_args() -> Args:
    """`--preset NAME` picks the defaults; every other flag overrides them."""
    argv = sys.argv[1:]
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv[:-1] else None
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    args = tyro.cli(Args, default=PRESETS.get(preset, Args()), use_underscores=True)
    if args.length_groups < 1:
        raise SystemExit(f"--length_groups must be at least 1 (got {args.length_groups}); 1 means one padded forward per micro-batch")
    return args


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


def split_pair(ex: dict, args: Args) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen text, rejected text) from message lists or plain strings."""
    c, r = ex[args.chosen_column], ex[args.rejected_column]
    if isinstance(c, list) and isinstance(r, list):
        if not c or not r or c[-1].get("role") != "assistant" or r[-1].get("role") != "assistant":
            raise ValueError("chosen/rejected must end with an assistant message")
        if c[:-1] != r[:-1]:
            raise ValueError("chosen and rejected have different prompts")
        prompt = c[:-1] or [{"role": "user", "content": ex[args.prompt_column]}]
        return prompt, c[-1]["content"], r[-1]["content"]
    p = ex[args.prompt_column]
    prompt = p if isinstance(p, list) else [{"role": "user", "content": p}]
    return prompt, c, r


def tokenize_pair(tokenizer, ex: dict, args: Args) -> dict:
    """Prompt ids (chat template + generation prompt) and the two response ids, or a skip reason.

    # ALGO LOGIC: the response tokens are what the template appends to the prompt's tokens, through
    # the end-of-turn token; the prompt's tokens must be a prefix of prompt+response's tokens.
    """
    empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    try:
        prompt, chosen, rejected = split_pair(ex, args)
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        return {**empty, "skip": f"malformed pair ({e})"}
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        return {**empty, "skip": "empty chosen or rejected"}
    if chosen == rejected:
        return {**empty, "skip": "chosen identical to rejected"}
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    responses = []
    for text in (chosen, rejected):
        full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": text}])
        if full[: len(prompt_ids)] != prompt_ids:
            raise SystemExit(
                f"the chat template's prompt tokens are not a prefix of prompt+response tokens for {prompt!r}; "
                "the response cannot be located. Use a template whose generation prompt ends the prompt exactly."
            )
        resp = full[len(prompt_ids):]
        eot = tokenizer.eos_token_id
        resp = resp[: len(resp) - resp[::-1].index(eot)] if eot in resp else resp + [eot]
        responses.append(resp)
    prompt_ids = prompt_ids[-args.max_prompt_length:]  # ALGO LOGIC: the prompt is cut from the left
    room = args.max_length - len(prompt_ids)
    if room < 2:
        return {**empty, "skip": "prompt leaves no room for a response"}
    skip = "truncated" if max(map(len, responses)) > room else ""
    responses = [r if len(r) <= room else r[: room - 1] + [tokenizer.eos_token_id] for r in responses]
    return {"prompt_ids": prompt_ids, "chosen_ids": responses[0], "rejected_ids": responses[1], "skip": skip}


def prepare_dataset(ds, tokenizer, args: Args, what: str, log):
    """Tokenize and drop the pairs that cannot be trained on; every drop is counted in the log."""
    missing = [c for c in (args.chosen_column, args.rejected_column) if c not in ds.column_names]
    if missing:
        raise SystemExit(f"the {what} split has no column {missing} (columns: {ds.column_names}); pass "
                         "--chosen_column / --rejected_column / --prompt_column naming your columns")
    ds = ds.map(lambda ex: tokenize_pair(tokenizer, ex, args), remove_columns=ds.column_names, desc=f"tokenizing {what}")
    reasons = {r: n for r, n in zip(*np.unique(list(ds["skip"]), return_counts=True)) if r}
    kept = ds.filter(lambda ex: ex["skip"] in ("", "truncated")).remove_columns("skip")
    seen = set()  # an exact duplicate (same prompt, chosen and rejected tokens) would count twice in the loss

    def first_time(ex) -> bool:
        key = hash((tuple(ex["prompt_ids"]), tuple(ex["chosen_ids"]), tuple(ex["rejected_ids"])))
        new = key not in seen
        seen.add(key)
        return new

    n_usable = len(kept)
    kept = kept.filter(first_time, load_from_cache_file=False)
    if n_usable > len(kept):
        reasons["duplicate pair"] = n_usable - len(kept)
    log(f"{what}: {len(kept)} of {len(ds)} pairs kept; " + (", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none skipped or cut"))
    if len(kept) == 0:
        raise SystemExit(f"no usable pair in the {what} split ({reasons}); check the column flags and the data")
    return kept.add_column("row", list(range(len(kept))))


def prepare_split(args: Args, tokenizer, what: str, log):
    """The train or eval pairs: loaded, cut to --max_{what}_samples, tokenized, filtered."""
    split = args.train_split if what == "train" else args.eval_split
    ds = load_split(args.dataset_name, args.dataset_config, split)
    limit = args.max_train_samples if what == "train" else args.max_eval_samples
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return prepare_dataset(ds, tokenizer, args, what, log)


def collate(rows: list[dict], pad_id: int, padding_free: bool, length_groups: int = 1) -> dict:
    """Chosen sequences first, then rejected ones: sequence i and i + len(rows) are one pair.

    Each of `parts` is one forward. `targets[t]` is the next token; `loss_mask[t]` marks the positions that
    predict a response token; `seq_id[t]` says which sequence position t belongs to. padded: the sequences,
    sorted by length, are cut into `length_groups` parts, each right-padded to its own longest sequence, with
    an attention mask. padding-free: one part, one row, position_ids restart per sequence, no attention mask
    (transformers then builds a block-diagonal causal mask; this needs use_cache=False)."""
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for r in rows:
            ids = r["prompt_ids"] + r[key]
            seqs.append(torch.tensor(ids))
            masks.append(torch.tensor([False] * (len(r["prompt_ids"]) - 1) + [True] * len(r[key]) + [False]))
    targets = [torch.cat([s[1:], s.new_zeros(1)]) for s in seqs]
    seq_id = [torch.full_like(s, i) for i, s in enumerate(seqs)]
    out = {"row": torch.tensor([r["row"] for r in rows]), "n_seqs": len(seqs)}
    if padding_free:
        return {**out, "parts": [{"input_ids": torch.cat(seqs)[None], "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
                                  "targets": torch.cat(targets)[None], "loss_mask": torch.cat(masks)[None], "seq_id": torch.cat(seq_id)[None]}]}
    g = min(length_groups, len(seqs))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if g > 1 else range(len(seqs))
    parts = []
    for group in (order[j * len(order) // g : (j + 1) * len(order) // g] for j in range(g)):
        n = max(len(seqs[i]) for i in group)
        pad = lambda xs, v: torch.stack([F.pad(xs[i], (0, n - len(xs[i])), value=v) for i in group])
        parts.append({"input_ids": pad(seqs, pad_id), "attention_mask": pad([torch.ones_like(s) for s in seqs], 0),
                      "targets": pad(targets, 0), "loss_mask": pad(masks, False), "seq_id": pad(seq_id, 0)})
    return {**out, "parts": parts}


# ---------------------------------------------------------------------------------------------
# log-probs and loss
# ---------------------------------------------------------------------------------------------
class TokenLogps(torch.autograd.Function):
    """log softmax(z)[target] and log sum_v softmax(z)_v^2 (no gradient) for rows of logits z, in fp32,
    `chunk` rows at a time.

    Autograd through log_softmax would keep an fp32 copy and a softmax of every row, and allocate several
    logits-sized temporaries in backward. Here forward saves only the logits it was given and one
    log-normaliser per row, and backward writes d logp / dz = onehot(target) - softmax(z), times the
    incoming gradient, chunk by chunk into one logits-sized buffer."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        log_z, log_sum_sq = [], []
        for i in range(0, len(logits), chunk):
            z = logits[i : i + chunk].float()
            m = z.max(-1, keepdim=True).values
            e = (z - m).exp_()
            s = e.sum(-1)
            log_z.append(m[:, 0] + s.log())
            # ALGO LOGIC: log sum_v p_v^2 = log sum_v e_v^2 - 2 log sum_v e_v, e = exp(z - max z): WPO's per-token
            # normaliser from the same fp32 exponentials, no probabilities materialised (TRL chunked_logprob.py:
            # log(sq_sum_exp) - 2 log(sum_exp)); it only feeds the weight, so it carries no gradient
            log_sum_sq.append(e.square_().sum(-1).log() - 2 * s.log())
        log_z, log_sum_sq = torch.cat(log_z), torch.cat(log_sum_sq)
        ctx.save_for_backward(logits, targets, log_z)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(log_sum_sq)
        return logits.gather(-1, targets[:, None])[:, 0].float() - log_z, log_sum_sq

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        logits, targets, log_z = ctx.saved_tensors
        out = torch.empty_like(logits)
        for i in range(0, len(logits), ctx.chunk):
            rows = slice(i, i + ctx.chunk)
            # (onehot - softmax) * grad built in fp32, cast once: bf16 logits keep the gradient's precision
            d = (logits[rows].float() - log_z[rows, None]).exp_().mul_(-grad[rows, None])
            out[rows] = d.scatter_add_(-1, targets[rows, None], grad[rows, None])
        return out, None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    return TokenLogps.apply(logits, targets, chunk)


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs of every sequence in the batch, response lengths, and summed
    log sum_v p_v^2 over the response positions (no gradient); one forward per part.

    # ALGO LOGIC: logits_to_keep = loss_mask, so the lm_head runs only where a response token is predicted.
    """
    lp, sq, seq = [], [], []
    for part in batch["parts"]:
        mask = part["loss_mask"]
        logits = model(input_ids=part["input_ids"], attention_mask=part.get("attention_mask"),
                       position_ids=part.get("position_ids"), logits_to_keep=mask, use_cache=False).logits
        lp_part, sq_part = token_logps(logits, part["targets"][mask])
        lp.append(lp_part)
        sq.append(sq_part)
        seq.append(part["seq_id"][mask])
    lp, sq, seq = torch.cat(lp), torch.cat(sq), torch.cat(seq)
    sums = torch.zeros(batch["n_seqs"], device=lp.device, dtype=lp.dtype).index_add(0, seq, lp)
    lengths = torch.zeros(batch["n_seqs"], device=lp.device, dtype=lp.dtype).index_add(0, seq, torch.ones_like(lp))
    sq_sums = torch.zeros(batch["n_seqs"], device=lp.device, dtype=lp.dtype).index_add(0, seq, sq)
    return sums, lengths, sq_sums


def wpo_weight(logps: torch.Tensor, lengths: torch.Tensor, sq_sums: torch.Tensor, clamp: bool = True,
               sum_sq: bool = True) -> torch.Tensor:
    """Pair weights from the policy's summed response log-probs (chosen rows first, then rejected)."""
    # ALGO LOGIC: official WPOTrainer.get_batch_logps (scripts/run_wpo.py): per response, the mean over its
    # tokens of logp(y_t) - log sum_v p_v(t)^2; weight = clamp(exp(mean_w + mean_l), max=1), detached.
    # TRL DPOTrainer (use_weighting): the same product of exp(mean) factors, without the clamp.
    n = len(logps) // 2
    mean = ((logps - sq_sums) if sum_sq else logps).detach() / lengths
    w = torch.exp(mean[:n] + mean[n:])
    return w.clamp(max=1) if clamp else w


def weight_extremes(w: torch.Tensor, accelerator, prefix: str) -> dict:
    """The min and max of the pair weights w over all processes."""
    lo = accelerator.gather(w.min().double()[None]).min()
    hi = accelerator.gather(w.max().double()[None]).max()
    return {f"{prefix}/weight_min": lo.item(), f"{prefix}/weight_max": hi.item()}


def dpo_loss(pc, pr, rc, rr, beta: float, loss_type: str, label_smoothing: float = 0.0):
    """Per-pair loss and implicit rewards from policy (p) and reference (r) log-probs of chosen (c)
    and rejected (r) responses (already length-averaged for ipo)."""
    # ALGO LOGIC: h = (logp_pi(yw) - logp_ref(yw)) - (logp_pi(yl) - logp_ref(yl))   (DPO eq. 7)
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2  # IPO eq. 17
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)  # SLiC-HF
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def pair_metrics(model, batch, ref_c, ref_r, args: Args) -> tuple[torch.Tensor, dict]:
    """Mean weighted loss over the batch's pairs, and the TRL-named metrics per pair (for exact gathering)."""
    logps, lengths, sq_sums = sequence_logps(model, batch)
    n = len(batch["row"])
    # ALGO LOGIC: the weight comes from this same forward of the policy, detached
    w = wpo_weight(logps, lengths, sq_sums, args.clamp_weight, args.weight_sum_sq)
    pc, pr = logps[:n], logps[n:]
    # IPO's loss takes length-averaged log-probs; the implicit rewards stay on summed log-probs (as TRL logs them)
    nc, nr = (lengths[:n], lengths[n:]) if args.loss_type == "ipo" else (1.0, 1.0)
    losses, _, _ = dpo_loss(pc / nc, pr / nr, ref_c / nc, ref_r / nr, args.beta, args.loss_type, args.label_smoothing)
    # ALGO LOGIC: L = -E[w * logsigmoid(beta h)]; the official dpo_loss scales both label-smoothing terms by w
    losses = w * losses
    rw_c, rw_r = args.beta * (pc - ref_c).detach(), args.beta * (pr - ref_r).detach()
    m = {"loss": losses.detach(), "rewards/chosen": rw_c, "rewards/rejected": rw_r,
         "rewards/accuracies": (rw_c > rw_r).float(), "rewards/margins": rw_c - rw_r,
         "logps/chosen": logps[:n].detach(), "logps/rejected": logps[n:].detach(), "weight": w}
    return losses.mean(), m


# ---------------------------------------------------------------------------------------------
# reference log-probs: a pre-pass cached on disk
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


def cache_key(args: Args, ref_name: str, ds, split: str, accelerator) -> str:
    """The reference model, the token ids, the precision and the micro-batches the pre-pass forms (a sequence's
    log-prob depends, in its last bits, on the sequences padded or packed with it)."""
    layout = ((args.seed, args.per_device_train_batch_size, args.global_batch_size) if split == "train"
              else (args.per_device_eval_batch_size,))
    parts = [model_fingerprint(ref_name), data_fingerprint(ds, ("prompt_ids", "chosen_ids", "rejected_ids")),
             str(args.use_lora), args.dtype, str(accelerator.mixed_precision), args.attn_implementation,
             str((split, *layout, args.length_groups, args.padding_free))]
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
                logps, _, _ = sequence_logps(ref_model, batch)
            n = len(batch["row"])
            results += list(zip(batch["row"].tolist(), logps[:n].tolist(), logps[n:].tolist()))
    first = {}
    for row, chosen, rejected in gather_object(results):  # accelerate repeats rows to even out the last batches
        first.setdefault(row, (chosen, rejected))
    assert sorted(first) == list(range(n_rows))
    out = {"chosen": torch.tensor([first[i][0] for i in range(n_rows)], dtype=torch.float64),
           "rejected": torch.tensor([first[i][1] for i in range(n_rows)], dtype=torch.float64)}
    if accelerator.is_main_process:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(out, path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f"reference log-probs: computed {n_rows} pairs, cached in {path}")
    accelerator.wait_for_everyone()
    return out


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def load_tokenizer(args: Args):
    name = args.tokenizer_name or args.model_name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"could not load the tokenizer {name!r} from the hub or a local path: {e}\nWith no network, "
                         "build the offline tiny setting (python -m tiny --out data/tiny) and pass --preset tiny.") from e
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
                         "one offline first (python -m tiny --out data/tiny; python sft.py --preset tiny) and pass its folder.") from e


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
    tokenizer = load_tokenizer(args)
    model = load_model(args.model_name_or_path, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.use_lora:
        from peft import LoraConfig, get_peft_model
        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    if args.disable_dropout:  # dropout would make the policy's log-probs differ from the reference's at step 0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
    log(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; global batch "
        f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} accumulation x {args.world_size} processes "
        f"= {args.global_batch_size} pairs")

    with accelerator.main_process_first():
        train_ds = prepare_split(args, tokenizer, "train", log)
        eval_ds = prepare_split(args, tokenizer, "eval", log) if args.eval_split else None
    collate_fn = lambda rows: collate(rows, tokenizer.pad_token_id, args.padding_free, args.length_groups)

    rows_per_epoch = len(train_ds) // args.global_batch_size * args.global_batch_size
    steps_per_epoch = rows_per_epoch // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_ds)} training pairs are fewer than one global batch ({args.global_batch_size})")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    def epoch_loader(epoch: int, rows=None):
        # the data order depends on (seed, epoch) only, so a resumed run sees the same batches
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed + epoch))
        subset = train_ds.select(order[:rows_per_epoch].tolist() if rows is None else rows)
        return accelerator.prepare(DataLoader(subset, batch_size=args.per_device_train_batch_size, collate_fn=collate_fn))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors (TRL's default)
    # stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None
    if eval_ds is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size, collate_fn=collate_fn))

    # ALGO LOGIC: the reference log-probs of every pair, once, before training, cached on disk. The reference
    # defaults to the policy's initial weights, so the pre-pass runs the policy itself (LoRA: adapters off).
    # Each pair is scored in the micro-batch it is trained (epoch 0) or evaluated in, under the same autocast:
    # at step 0 the policy's log-probs equal the reference's bit for bit, so every reward is exactly 0.
    ref_name = args.ref_model_name_or_path or args.model_name_or_path
    scorer = model
    if args.ref_model_name_or_path is not None:
        scorer = load_model(ref_name, args).to(accelerator.device)
        scorer.requires_grad_(False)
    order0 = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed)).tolist()
    ref_cache = {}
    with accelerator.unwrap_model(model).disable_adapter() if args.use_lora and scorer is model else nullcontext():
        for split, ds, loaders in (("train", train_ds, lambda: [epoch_loader(0), epoch_loader(0, order0[rows_per_epoch:])]),
                                   ("eval", eval_ds, lambda: [eval_loader])):
            if ds is not None:
                path = os.path.join(args.cache_dir, f"ref-logps-{cache_key(args, ref_name, ds, split, accelerator)}.safetensors")
                ref_cache[split] = reference_logps(scorer, loaders, len(ds), accelerator, path, log)
    del scorer  # training holds only the policy

    def reference(batch, split):
        c = ref_cache[split]
        return (c["chosen"][batch["row"].cpu()].to(accelerator.device, torch.float32),
                c["rejected"][batch["row"].cpu()].to(accelerator.device, torch.float32))

    @torch.no_grad()
    def evaluate() -> dict:
        """Means over every held-out pair: per-pair metrics go through gather_for_metrics, which drops
        the duplicates accelerate adds to even out the last batch across processes."""
        model.eval()
        parts = []
        for batch in eval_loader:
            ref_c, ref_r = reference(batch, "eval")
            with accelerator.autocast():
                parts.append(accelerator.gather_for_metrics(pair_metrics(model, batch, ref_c, ref_r, args)[1]))
        model.train()
        out = {f"eval/{k}": torch.cat([p[k] for p in parts]).double().mean().item() for k in parts[0]}
        return {**out, **weight_extremes(torch.cat([p["weight"] for p in parts]), accelerator, "eval")}

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
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="wpo")
    running, n_tokens, t0, weights = {}, 0, time.time(), []
    for epoch in range(global_step // steps_per_epoch, num_epochs):
        loader = epoch_loader(epoch)
        skip = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if skip > 0:
            loader = accelerator.skip_first_batches(loader, skip)
        for batch in loader:
            with accelerator.accumulate(model):
                ref_c, ref_r = reference(batch, "train")
                with accelerator.autocast():
                    loss, m = pair_metrics(model, batch, ref_c, ref_r, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)):  # checked before the update
                        raise SystemExit(f"non-finite loss or gradient at step {global_step + 1} (epoch {epoch}, rows {batch['row'].tolist()}); no update "
                                         f"was applied; the last good checkpoint is in {args.output_dir}/checkpoints")
                optimizer.step()
                optimizer.zero_grad()
            running = {k: running.get(k, 0) + v.double().sum() for k, v in {**m, "pairs": torch.ones_like(m["loss"])}.items()}
            weights.append(m["weight"])  # for the weight's min and max over the logging window
            n_tokens += sum(p["input_ids"].numel() for p in batch["parts"])
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            bar.update(1)
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                r = {k: accelerator.reduce(v, reduction="sum") for k, v in running.items()}
                tokens = accelerator.reduce(torch.tensor(float(n_tokens), device=accelerator.device), reduction="sum")
                out = {f"train/{k}": (v / r["pairs"]).item() for k, v in r.items() if k != "pairs"}
                out.update(weight_extremes(torch.cat(weights), accelerator, "train"))
                out.update({"train/lr": scheduler.get_last_lr()[0], "train/epoch": global_step / steps_per_epoch,
                            "perf/tokens_per_s": tokens.item() / (time.time() - t0),
                            "perf/pairs_per_s": r["pairs"].item() / (time.time() - t0)})
                bar.set_postfix(loss=f"{out['train/loss']:.4f}", acc=f"{out['train/rewards/accuracies']:.2f}")
                log_metrics(out, global_step)
                running, n_tokens, t0, weights = {}, 0, time.time(), []
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
