"""Speed and memory of the single-file scripts against TRL and the official WSPO formulation (issue 9).

One run on one machine. Every measured configuration runs in its own process (forked from this one, so
each has its own peak memory), and ours and theirs get the same model weights, the same token ids in
the same batches, the same batch size, max length, precision (fp32) and number of steps:

    dpo   dpo.py, reference log-probs from a pre-pass        vs  TRL DPOTrainer, loss sigmoid (live reference)
    wpo   wpo.py                                             vs  TRL DPOTrainer, use_weighting=True; and vs dpo.py
    wspo  wspo.py, three frozen models in a pre-pass         vs  the official WSPO step (LLaMA-Factory
          CustomWSPOTrainer) re-created here: all four models live, chosen and rejected through all four,
          full logits, the same token-level loss (the two must give the same loss on the first batch)
    sft   sft.py                                             vs  TRL SFTTrainer, padded, and packed (bfd)

"Ours" calls the scripts' own functions (collate, pair_metrics, token_logps, wspo_loss, prepass,
reference_logps, sft_loss_sum, load_model) in a loop that mirrors each script's training step. "Theirs"
runs TRL's trainers with their defaults (gradient checkpointing on, AdamW fused), except: fp32 instead
of bf16 autocast, a sequential sampler (same batches as ours), per-step logging (to read the loss), and,
for DPOTrainer, a pass-through `_prepare_dataset`: it tokenizes text only and the data here are token ids.
The main comparisons run both sides with gradient checkpointing on (TRL's and LLaMA-Factory's default,
wpo.py's default); the rows marked "no GC" are our scripts' other default (dpo.py, wspo.py, sft.py).

Data are synthetic token ids (vocab 32000, chat-like prompt / response split, response lengths spread
over 32..384 tokens so that padding matters), fed identically to both sides. A step's time runs from the
end of the previous step to the end of this one (data collation, forward, backward, clipping, optimizer
and scheduler steps, logging); the first `warmup` steps are dropped; throughput is taken per step and
reported as the median with its min..max over the measured steps. The pre-pass is timed in its own
process and amortised over one epoch of `--epoch_pairs` pairs. Where a target is missed, our step is
profiled with torch.profiler and the top operators go into the report (with --profile_theirs, the TRL /
official step too). Besides wall-clock time, each step's process CPU time (all threads) is recorded: the
machine may be shared, and CPU-time ratios are the cross-check when other jobs stretch wall time. The
report keeps whatever follows its notes marker, so a hand-written analysis survives a rerun.

    OMP_NUM_THREADS=2 python benchmarks/bench.py --profile_theirs  # full CPU run (~17 min), writes docs/benchmarks.md
    OMP_NUM_THREADS=2 python benchmarks/bench.py --quick         # smoke run (small model), < 2 minutes
    OMP_NUM_THREADS=2 python benchmarks/bench.py --sections dpo wpo
"""

import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
import tyro  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import send_to_device  # noqa: E402
from datasets import Dataset  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, TrainerCallback, get_scheduler  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402
from trl.data_utils import pack_dataset  # noqa: E402

import dpo  # noqa: E402
import sft  # noqa: E402
import wpo  # noqa: E402
import wspo  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, one per model load
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5.x renames (gradient -> activation checkpointing)
warnings.filterwarnings("ignore", message=".*pin_memory.*")
PAD, IM_START, EOS, FIRST_WORD = 0, 1, 2, 4  # <|endoftext|>, <|im_start|>, <|im_end|> (end of turn), first content id
SECTIONS = ("dpo", "wpo", "wspo", "sft")
NOTES = "<!-- notes: everything below this line is written by hand and kept when the benchmark rewrites the file -->"


@dataclass
class Args:
    quick: bool = False
    """smoke run: a small model, short sequences, 1 warm-up + 2 measured steps, no extra rows (< 2 minutes)"""
    sections: tuple[str, ...] = SECTIONS
    """which comparisons to run: dpo, wpo, wspo, sft (wpo reuses dpo's pre-pass; it runs it if dpo is not selected)"""
    out: str | None = None
    """markdown report (default: docs/benchmarks.md; with --quick: WORKDIR/benchmarks-quick.md)"""
    workdir: str = "/tmp/w2s-benchmarks"
    """models, caches and per-configuration results (wiped at the start)"""
    epoch_pairs: int = 61135
    """pairs in the epoch the pre-pass is amortised over (UltraFeedback binarized train_prefs)"""
    no_gc_rows: bool = True
    """also measure dpo.py, wspo.py and sft.py (padded) with gradient checkpointing off, their default; off in --quick"""
    profile_missed: bool = True
    """profile our step (torch.profiler) for every missed target and put the top operators in the report"""
    profile_theirs: bool = False
    """with --profile_missed, also profile the TRL / official step of each missed comparison"""
    seed: int = 0
    """seed of the synthetic data and of the model weights"""


@dataclass
class Size:
    """Model and data shapes of a run (Qwen2 architecture; the weak pair for WSPO is a smaller Qwen2)."""
    vocab: int = 32000
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1536
    weak_hidden: int = 256
    weak_layers: int = 2
    weak_intermediate: int = 768
    prompt_len: tuple[int, int] = (16, 128)
    response_len: tuple[int, int] = (32, 384)
    max_length: int = 512
    batch_size: int = 8
    warmup: int = 2
    steps: int = 3
    prepass_pairs: int = 64
    prepass_batch_size: int = 16
    learning_rate: float = 1e-6


FULL = Size()
QUICK = Size(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, weak_hidden=32, weak_layers=1, weak_intermediate=96,
             prompt_len=(12, 32), response_len=(8, 96), max_length=128, batch_size=4, warmup=1, steps=2, prepass_pairs=16,
             prepass_batch_size=8)

# targets of issue 9, as (ratio key, comparison, bound, direction)
TARGETS = [
    ("dpo/throughput", "dpo.py / TRL DPOTrainer, throughput", 3.0, ">="),
    ("dpo/memory", "dpo.py / TRL DPOTrainer, peak memory", 0.5, "<="),
    ("wpo/throughput", "wpo.py / TRL DPOTrainer use_weighting, throughput", 3.0, ">="),
    ("wpo/step_vs_dpo", "wpo.py / dpo.py, step time", 1.10, "<="),
    ("wspo/throughput", "wspo.py / official WSPO, throughput", 4.0, ">="),
    ("wspo/memory", "wspo.py / official WSPO, peak memory", 0.4, "<="),
    ("sft-padded/throughput", "sft.py / TRL SFTTrainer padded, throughput", 1.2, ">="),
    ("sft-packed/throughput", "sft.py / TRL SFTTrainer packed, throughput", 1.0, ">="),
]


# ---------------------------------------------------------------------------------------------
# synthetic data and models (built once, in the parent / a setup process)
# ---------------------------------------------------------------------------------------------
def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with one id per vocabulary entry: TRL wants a tokenizer (pad / eos ids), and the
    tiny setting's ~490-word tokenizer is too small for a 32000-row embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"] + [f"w{i}" for i in range(FIRST_WORD, vocab)]
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])


def make_pairs(n: int, size: Size, rng: random.Random) -> Dataset:
    """Preference pairs of token ids: a ChatML-shaped prompt (system + user turns, assistant header) and two
    responses of independent lengths, each ending in the end-of-turn token."""
    words = lambda k: [rng.randrange(FIRST_WORD, size.vocab) for _ in range(k)]
    rows = {"row": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for i in range(n):
        p = rng.randint(*size.prompt_len) - 9  # 9 template tokens around the user's words
        rows["row"].append(i)
        rows["prompt_ids"].append([IM_START] + words(3) + [EOS, IM_START] + words(p) + [EOS, IM_START] + words(1))
        rows["chosen_ids"].append(words(rng.randint(*size.response_len) - 1) + [EOS])
        rows["rejected_ids"].append(words(rng.randint(*size.response_len) - 1) + [EOS])
        # nothing to truncate: TRL would cut at max_length and ours would not see the same tokens
        assert len(rows["prompt_ids"][-1]) + max(len(rows["chosen_ids"][-1]), len(rows["rejected_ids"][-1])) <= size.max_length
    return Dataset.from_dict(rows)


def sft_rows(pairs: Dataset) -> Dataset:
    """SFT conversations from the pairs' prompts and chosen responses; loss on the response tokens only."""
    p, c = pairs["prompt_ids"], pairs["chosen_ids"]
    return Dataset.from_dict({"input_ids": [a + b for a, b in zip(p, c)], "labels": [[-100] * len(a) + b for a, b in zip(p, c)]})


def qwen2(size: Size, weak: bool) -> Qwen2Config:
    h, n, i = (size.weak_hidden, size.weak_layers, size.weak_intermediate) if weak else (size.hidden, size.layers, size.intermediate)
    return Qwen2Config(vocab_size=size.vocab, hidden_size=h, num_hidden_layers=n, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, intermediate_size=i, max_position_embeddings=4 * size.max_length,
                       pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


def build_models(ctx) -> dict:
    """strong (policy init = strong reference), weak_ref and weak_aligned (differently initialised weak
    models: the weak log-ratio is not zero), saved as safetensors folders that every process loads."""
    out = {}
    for seed, (name, weak) in enumerate((("strong", False), ("weak_ref", True), ("weak_aligned", True))):
        torch.manual_seed(ctx.args.seed + seed)
        model = AutoModelForCausalLM.from_config(qwen2(ctx.size, weak), dtype=torch.float32)
        model.save_pretrained(ctx.paths[name])
        ctx.tokenizer.save_pretrained(ctx.paths[name])
        out[name] = sum(p.numel() for p in model.parameters())
    return out


# ---------------------------------------------------------------------------------------------
# one measured configuration = one process
# ---------------------------------------------------------------------------------------------
def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:  # VmHWM: peak RSS since the reset at the start of this process
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def _child(fn, spec, path):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS (what a fresh process importing the same would hold)
        load = os.getloadavg()
        out = fn(spec)
        out.update(peak_gb=peak_memory_gb(), load=[load[0], os.getloadavg()[0]])
        with open(path, "w") as f:
            json.dump(out, f)
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def isolated(fn, spec: dict) -> dict:
    """Run fn(spec) in a forked process (this one has imported everything but never ran a torch op, so the
    child starts a fresh thread pool) and return its result with its peak memory."""
    path = os.path.join(CTX.args.workdir, "results", spec["name"].replace("/", "--") + ".json")
    t0 = time.time()
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(fn, spec, path))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"configuration {spec['name']} failed (exit code {proc.exitcode}); see the traceback above")
    with open(path) as f:
        out = json.load(f)
    print(f"  {spec['name']:<28} {time.time() - t0:6.1f} s   " + (
        f"step {statistics.median(out['step_s']):.2f} s, " if "step_s" in out else "") + f"peak {out['peak_gb']:.2f} GB", flush=True)
    return out


def run_probe(spec) -> dict:
    """How fast the (shared) machine is right now, for CPU runs: a compute-bound matmul, and a multiply into a fresh
    [4096 x 32000] fp32 tensor per call, bound by memory bandwidth and page faults like TRL's full-vocabulary
    logits ops. Measured at the start and the end of the run."""
    a, b, x = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.randn(4096, 32000)
    a @ b, x * 2.0  # warm-up
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    mm = 10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for _ in range(5):
        x * 2.0
    return {"matmul_gflops": mm, "fresh_elementwise_gbs": 5 * 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9}


def profiler():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_flops=True)


class StepTimer(TrainerCallback):
    """End-of-step wall and CPU times and the logged per-step losses of a transformers Trainer; with
    profile=True, the first step after warm-up runs under torch.profiler."""

    def __init__(self, profile: bool = False):
        self.times, self.cpu, self.losses, self.t, self.table = [], [], [], None, None
        self.prof = profiler() if profile else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t = (time.perf_counter(), time.process_time())

    def on_step_begin(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == CTX.size.warmup:
            self.prof.start()

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), time.process_time())
        self.times.append(now[0] - self.t[0])
        self.cpu.append(now[1] - self.t[1])
        self.t = now
        if self.prof is not None and state.global_step == CTX.size.warmup + 1:
            self.prof.stop()
            self.table = profile_tables(self.prof, self.times[-1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def timed_steps(step, batches, spec) -> dict:
    """Our loop: step(batch) -> loss, timed from the end of one step to the end of the next (collation
    included). With spec["profile"], the first step after warm-up runs under torch.profiler instead."""
    size = CTX.size
    times, cpu, losses, table = [], [], [], None
    it = iter(batches)
    t, c = time.perf_counter(), time.process_time()
    for i in range(size.warmup + (1 if spec.get("profile") else size.steps)):
        profiling = spec.get("profile") and i == size.warmup
        with profiler() if profiling else contextlib.nullcontext() as prof:
            losses.append(step(next(it)))
        now, now_c = time.perf_counter(), time.process_time()
        times.append(now - t)
        cpu.append(now_c - c)
        t, c = now, now_c
        if profiling:
            table = profile_tables(prof, times[-1])
    return {"step_s": times, "cpu_s": cpu, "losses": losses, "profile": table}


def profile_tables(prof, step_s: float) -> str:
    """Top operators by self CPU time, the same split by input shape, and how much of the step is matmul."""
    ops = prof.key_averages()
    mm = [e for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")]
    mm_s, flops = sum(e.self_cpu_time_total for e in mm) / 1e6, sum(e.flops for e in ops) / 1e9
    total = sum(e.self_cpu_time_total for e in ops) / 1e6
    head = (f"profiled step {step_s:.2f} s wall (with profiler overhead); operators' self CPU time {total:.2f} s, of which matrix "
            f"multiplies {mm_s:.2f} s for {flops:.0f} GFLOP ({flops / max(mm_s, 1e-9):.0f} GFLOP/s); everything else {total - mm_s:.2f} s")
    by_op = ops.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=44)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12,
                                                                  max_name_column_width=30, max_shapes_column_width=64)
    return "\n".join([head, "", "by operator:", by_op.rstrip(), "", "by operator and input shapes:", by_shape.rstrip()])


def trl_run(trainer, timer: StepTimer) -> dict:
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return {"step_s": timer.times, "cpu_s": timer.cpu, "losses": timer.losses, "profile": timer.table}


def trl_common(spec) -> dict:
    size = CTX.size
    return dict(output_dir=os.path.join(CTX.args.workdir, "trl", spec["name"].replace("/", "--")),
                per_device_train_batch_size=size.batch_size, gradient_accumulation_steps=1,
                max_steps=size.warmup + (1 if spec.get("profile") else size.steps), learning_rate=size.learning_rate, max_length=size.max_length,
                bf16=False, fp16=False, gradient_checkpointing=spec["gc"], train_sampling_strategy="sequential",
                logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=CTX.args.seed,
                model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"})


def ours_training(model, args, loss_fn, batches, spec) -> dict:
    """The scripts' optimizer / scheduler / accelerate setup and training step (identical in dpo.py, wpo.py,
    wspo.py and sft.py): accumulate, backward, clip, AdamW step, zero_grad, scheduler step, running metrics,
    loss.item() for the finiteness check."""
    accelerator = Accelerator(gradient_accumulation_steps=1)
    total = CTX.size.warmup + CTX.size.steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors (TRL's default)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total),
                              num_training_steps=total)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    running = {}

    def step(batch):
        nonlocal running
        batch = send_to_device(batch, accelerator.device)  # nested: the parts' tensors too
        with accelerator.accumulate(model):
            loss, m = loss_fn(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        running = {k: running.get(k, 0) + v for k, v in m.items()}
        scheduler.step()
        return loss.item()

    return timed_steps(step, batches, spec)


def loader(rows_per_step: list[list[dict]], collate_fn):
    """Batches in the given order (each item is one step's list of rows), collated as the script does."""
    return DataLoader(rows_per_step, batch_size=None, collate_fn=collate_fn)


def pair_batches(ds: Dataset) -> list[list[dict]]:
    b, n = CTX.size.batch_size, CTX.size.warmup + CTX.size.steps
    rows = ds.select(range(b * n)).to_list()
    return [rows[i * b : (i + 1) * b] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# dpo / wpo
# ---------------------------------------------------------------------------------------------
def pair_args(mod, gc: bool, padding_free: bool = False):
    size = CTX.size
    return mod.Args(model_name_or_path=CTX.paths["strong"], beta=0.1, padding_free=padding_free, learning_rate=size.learning_rate,
                    per_device_train_batch_size=size.batch_size, gradient_accumulation_steps=1, max_length=size.max_length,
                    gradient_checkpointing=gc, cache_dir=os.path.join(CTX.args.workdir, "cache"),
                    prepass_batch_size=size.prepass_batch_size, max_steps=size.warmup + size.steps)


def ref_cache_path(mod, args) -> str:
    return os.path.join(args.cache_dir, f"ref-logps-{mod.cache_key(args, CTX.paths['strong'], CTX.pairs)}.safetensors")


def run_prepass_dpo(spec) -> dict:
    """dpo.py's reference pre-pass (the policy's initial weights score every pair once, no grad)."""
    args = pair_args(dpo, gc=False)
    accelerator = Accelerator()
    model = dpo.load_model(CTX.paths["strong"], args).to(accelerator.device).eval()
    collate_fn = lambda rows: dpo.collate(rows, PAD, args.padding_free, args.length_groups)
    t0 = time.perf_counter()
    dpo.reference_logps(model, CTX.pairs, args, accelerator, collate_fn, ref_cache_path(dpo, args), lambda _: None)
    return {"prepass_s": time.perf_counter() - t0, "items": len(CTX.pairs)}


def run_ours_pairs(spec) -> dict:
    """dpo.py / wpo.py: policy only, reference log-probs read from the pre-pass cache, pair_metrics."""
    mod = {"dpo": dpo, "wpo": wpo}[spec["script"]]
    args = pair_args(mod, spec["gc"], spec.get("padding_free", False))
    path = ref_cache_path(mod, args)
    assert os.path.exists(path), "the pre-pass must run first"
    model = mod.load_model(CTX.paths["strong"], args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    collate_fn = lambda rows: mod.collate(rows, PAD, args.padding_free, args.length_groups)
    ref = mod.reference_logps(model, CTX.pairs, args, Accelerator(), collate_fn, path, lambda _: None)  # cache hit

    def loss_fn(model, batch):
        rows = batch["row"].cpu()
        ref_c, ref_r = ref["chosen"][rows].to(torch.float32), ref["rejected"][rows].to(torch.float32)
        return mod.pair_metrics(model, batch, ref_c, ref_r, args)

    return ours_training(model, args, loss_fn, loader(pair_batches(CTX.pairs), collate_fn), spec)


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer as shipped, except that the dataset is already token ids (its preparation tokenizes text)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def run_trl_dpo(spec) -> dict:
    timer = StepTimer(spec.get("profile", False))
    n = CTX.size.batch_size * (CTX.size.warmup + CTX.size.steps)
    cfg = DPOConfig(**trl_common(spec), loss_type=["sigmoid"], beta=0.1, use_weighting=spec["weighting"])
    trainer = PretokenizedDPOTrainer(model=CTX.paths["strong"], args=cfg, processing_class=CTX.tokenizer, callbacks=[timer],
                                     train_dataset=CTX.pairs.select(range(n)).select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]))
    return trl_run(trainer, timer)


# ---------------------------------------------------------------------------------------------
# wspo
# ---------------------------------------------------------------------------------------------
def wspo_args(gc: bool):
    size = CTX.size
    return wspo.Args(strong=CTX.paths["strong"], strong_ref=CTX.paths["strong"], weak_ref=CTX.paths["weak_ref"],
                     weak_aligned=CTX.paths["weak_aligned"], beta=0.1, learning_rate=size.learning_rate,
                     per_device_train_batch_size=size.batch_size, gradient_accumulation_steps=1, max_length=size.max_length,
                     gradient_checkpointing=gc, cache_dir=os.path.join(CTX.args.workdir, "cache"),
                     prepass_batch_size=size.prepass_batch_size)


def wspo_cache(args, collate_fn, timings: dict | None = None) -> dict:
    """wspo.py's pre-pass: per-token log-probs of each frozen model on the chosen responses, one model in
    memory at a time; the cache holds the weak log-ratio and the strong reference's log-probs."""
    out = {}
    for name in ("weak_aligned", "weak_ref", "strong_ref"):
        t0 = time.perf_counter()
        out[name] = wspo.prepass(getattr(args, name), CTX.pairs, ("chosen_ids",), args, Accelerator(), collate_fn, lambda _: None)
        if timings is not None:
            timings[name] = time.perf_counter() - t0
    return {"weak_ratio": {"values": out["weak_aligned"]["values"] - out["weak_ref"]["values"], "offsets": out["weak_ref"]["offsets"]},
            "sref": out["strong_ref"]}


def run_prepass_wspo(spec) -> dict:
    args = wspo_args(gc=False)
    timings = {}
    wspo_cache(args, partial(wspo.collate, pad_id=PAD, padding_free=False), timings)
    return {"prepass_s": sum(timings.values()), "prepass_parts": timings, "items": len(CTX.pairs)}


def run_ours_wspo(spec) -> dict:
    """wspo.py's training step (its step_metrics, train split): only the policy, only the chosen responses."""
    args = wspo_args(spec["gc"])
    collate_fn = partial(wspo.collate, pad_id=PAD, padding_free=args.padding_free)
    cache = wspo_cache(args, collate_fn)  # cache hit: the pre-pass process wrote it
    model = wspo.load_model(args.strong, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_rows = len(CTX.pairs)

    def loss_fn(model, batch):
        n = len(batch["row"])
        lp = wspo.token_logps(model, batch)
        seq_all = batch["seq_id"][batch["loss_mask"]]
        chosen = seq_all < n
        seq = seq_all[chosen]
        sref = wspo.lookup(cache["sref"], batch["row"], n_rows).to(lp)
        weak = wspo.lookup(cache["weak_ratio"], batch["row"], n_rows).to(lp)
        losses, d = wspo.wspo_loss(lp[chosen], sref, weak, seq, n, args.beta, args.weak_coef, args.loss_level)
        strong_ratio = (lp[chosen] - sref).detach()
        reward = args.beta * torch.zeros(n, device=lp.device).index_add(0, seq, strong_ratio)
        m = {"loss": losses.detach().sum(), "abs_d": d.detach().abs().mean() * n, "rewards/chosen": reward.sum(),
             "logratio_corr": wspo.pearson(strong_ratio, weak) * n, "examples": torch.tensor(float(n), device=lp.device)}
        return losses.mean(), m

    return ours_training(model, args, loss_fn, loader(pair_batches(CTX.pairs), collate_fn), spec)


def get_wspo_batch_logps(logits, labels, label_pad_token_id=-100):
    """Official (WSPO repo, src/llamafactory/train/trainer_utils.py), verbatim but for type hints."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError("Logits (batchsize x seqlen) and labels must have the same shape.")
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0  # dummy token
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * loss_mask), loss_mask.sum(-1)


def run_official_wspo(spec) -> dict:
    """The official step (CustomWSPOTrainer.get_batch_loss_metrics / concatenated_forward): the LLaMA-Factory
    pairwise batch (chosen rows then rejected rows, right-padded, labels -100 outside the responses, passed to
    the model as LLaMA-Factory does, so the model also computes its own unused LM loss); the policy, the strong
    reference and both weak models all forward the whole batch with full fp32 logits; the token-level loss on
    the chosen half. Gradient checkpointing on the policy (LLaMA-Factory's default), HF Trainer's clip 1.0."""
    args = wspo_args(spec["gc"])  # only for the optimizer / scheduler settings shared with ours
    device = Accelerator().device
    load = lambda name: AutoModelForCausalLM.from_pretrained(CTX.paths[name], dtype=torch.float32, attn_implementation="sdpa").to(device)
    ref_model, weak_base_model, weak_aligned_model = (load(n).eval() for n in ("strong", "weak_ref", "weak_aligned"))
    model = load("strong")
    if spec["gc"]:
        model.gradient_checkpointing_enable()

    def collate_fn(rows):
        b = wspo.collate(rows, PAD, False, keys=("chosen_ids", "rejected_ids"))
        ids = b["input_ids"]
        labels = torch.full_like(ids, -100)
        labels[:, 1:] = torch.where(b["loss_mask"][:, :-1], ids[:, 1:], -100)  # label t = token t where t is a response token
        return {"input_ids": ids, "attention_mask": b["attention_mask"], "labels": labels}

    def concatenated_forward(m, batch):
        batch = {k: v.detach().clone() for k, v in batch.items()}
        all_logits = m(**batch, return_dict=True, use_cache=False).logits.to(torch.float32)
        all_logps, valid_length = get_wspo_batch_logps(logits=all_logits, labels=batch["labels"])
        n = batch["input_ids"].size(0) // 2
        chosen_logps, rejected_logps = all_logps.split(n, dim=0)
        chosen_logits, rejected_logits = all_logits.split(n, dim=0)
        chosen_length, _ = valid_length.split(n, dim=0)
        return chosen_logps, rejected_logps, chosen_logits, rejected_logits, chosen_length

    def loss_fn(model, batch):
        pc, pr, pcl, prl, valid_length = concatenated_forward(model, batch)
        with torch.no_grad():
            rc, *_ = concatenated_forward(ref_model, batch)
            wref_c, *_ = concatenated_forward(weak_base_model, batch)
            wal_c, *_ = concatenated_forward(weak_aligned_model, batch)
        losses = args.beta * (pc - rc) - (wal_c - wref_c)
        losses = torch.sum(losses**2, dim=-1) / valid_length
        chosen_rewards = args.beta * pc.detach()
        m = {"rewards/chosen": chosen_rewards.mean().cpu(), "logps/rejected": pr.detach().mean().cpu(),
             "logps/chosen": pc.detach().mean().cpu(), "logits/rejected": prl.detach().mean().cpu(),
             "logits/chosen": pcl.detach().mean().cpu()}
        return losses.mean(), m

    return ours_training(model, args, loss_fn, loader(pair_batches(CTX.pairs), collate_fn), spec)


# ---------------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------------
def sft_steps(packed: bool) -> list[list[dict]]:
    """Each step's conversations. padded: batch_size conversations. packed: the conversations of batch_size
    consecutive bins of TRL's best-fit-decreasing packing (the same pack_dataset call SFTTrainer makes)."""
    b, n = CTX.size.batch_size, CTX.size.warmup + CTX.size.steps
    if not packed:
        rows = CTX.sft.select(range(b * n)).to_list()
        return [rows[i * b : (i + 1) * b] for i in range(n)]
    bins = CTX.packed.select(range(b * n)).to_list()
    steps = []
    for i in range(n):
        convs = []
        for row in bins[i * b : (i + 1) * b]:
            start = 0
            for length in row["seq_lengths"]:
                convs.append({"input_ids": row["input_ids"][start : start + length], "labels": row["labels"][start : start + length]})
                start += length
        steps.append(convs)
    return steps


def run_ours_sft(spec) -> dict:
    size = CTX.size
    args = sft.Args(model_name_or_path=CTX.paths["strong"], gradient_checkpointing=spec["gc"], packing=spec["packed"],
                    per_device_train_batch_size=size.batch_size, gradient_accumulation_steps=1, max_length=size.max_length,
                    learning_rate=size.learning_rate)
    model = sft.load_model(args, CTX.tokenizer)

    def loss_fn(model, batch):
        loss_sum, n_tokens = sft.sft_loss_sum(model, batch)
        return loss_sum / n_tokens, {"loss": loss_sum.detach().double(), "tokens": torch.tensor(batch["input_ids"].numel())}

    collate_fn = lambda rows: sft.collate(rows, PAD, args.packing)
    return ours_training(model, args, loss_fn, loader(sft_steps(spec["packed"]), collate_fn), spec)


def run_trl_sft(spec) -> dict:
    timer = StepTimer(spec.get("profile", False))
    n = CTX.size.batch_size * (CTX.size.warmup + CTX.size.steps)
    ds = CTX.sft if spec["packed"] else CTX.sft.select(range(n))
    cfg = SFTConfig(**trl_common(spec), packing=spec["packed"])
    trainer = SFTTrainer(model=CTX.paths["strong"], args=cfg, train_dataset=ds, processing_class=CTX.tokenizer, callbacks=[timer])
    return trl_run(trainer, timer)


# ---------------------------------------------------------------------------------------------
# the plan, the ratios and the report
# ---------------------------------------------------------------------------------------------
def plan(args: Args) -> list[dict]:
    """(name, runner, options) of every configuration, theirs before ours within a section."""
    extra = args.no_gc_rows and not args.quick
    s = set(args.sections)
    specs = []
    add = lambda name, fn, **kw: specs.append({"name": name, "fn": fn.__name__, **kw})
    if s & {"dpo", "wpo"}:
        add("dpo/prepass", run_prepass_dpo)
    if "dpo" in s:
        add("dpo/trl", run_trl_dpo, gc=True, weighting=False, theirs=True)
    if s & {"dpo", "wpo"}:
        add("dpo/ours", run_ours_pairs, gc=True, script="dpo")
        if extra:
            add("dpo/ours-nogc", run_ours_pairs, gc=False, script="dpo")
    if "wpo" in s:
        add("wpo/trl", run_trl_dpo, gc=True, weighting=True, theirs=True)
        add("wpo/ours", run_ours_pairs, gc=True, script="wpo")
    if "wspo" in s:
        add("wspo/prepass", run_prepass_wspo)
        add("wspo/official", run_official_wspo, gc=True, theirs=True)
        add("wspo/ours", run_ours_wspo, gc=True)
        if extra:
            add("wspo/ours-nogc", run_ours_wspo, gc=False)
    if "sft" in s:
        for mode, packed in (("padded", False), ("packed", True)):
            add(f"sft-{mode}/trl", run_trl_sft, gc=True, packed=packed, theirs=True)
            add(f"sft-{mode}/ours", run_ours_sft, gc=True, packed=packed)
            if extra and not packed:
                add(f"sft-{mode}/ours-nogc", run_ours_sft, gc=False, packed=packed)
    return specs


def step_workload(name: str) -> list[tuple[int, int]]:
    """(examples, real tokens) of each step of a configuration: identical for ours and theirs."""
    if name.startswith("sft"):
        return [(len(rows), sum(len(r["input_ids"]) for r in rows)) for rows in sft_steps(name.startswith("sft-packed"))]
    return [(len(rows), sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows))
            for rows in pair_batches(CTX.pairs)]


def summarise(name: str, r: dict) -> dict:
    """Median and min..max over the measured (post-warm-up) steps."""
    w = CTX.size.warmup
    work = step_workload(name)[w:]
    t, c = r["step_s"][w:], r["cpu_s"][w:]
    per = lambda f, secs: [f(x) / s for x, s in zip(work, secs)]
    ex, tok, ex_cpu = per(lambda x: x[0], t), per(lambda x: x[1], t), per(lambda x: x[0], c)
    return {"step": statistics.median(t), "step_range": (min(t), max(t)), "ex_s": statistics.median(ex),
            "ex_range": (min(ex), max(ex)), "tok_s": statistics.median(tok), "cpu_step": statistics.median(c),
            "ex_cpu_s": statistics.median(ex_cpu), "peak": r["peak_gb"],
            "first_loss": r["losses"][0] if r["losses"] else float("nan"), "load": r["load"]}


def ratios(res: dict, epoch_pairs: int) -> dict:
    """Ours / theirs. Memory: ours' peak is the larger of its training and pre-pass processes (one run does both)."""
    out = {}
    s = {k: v["summary"] for k, v in res.items() if "summary" in v}
    pre = lambda sec: res.get(f"{sec}/prepass")
    for sec, theirs, ours, pre_sec in (("dpo", "dpo/trl", "dpo/ours", "dpo"), ("wpo", "wpo/trl", "wpo/ours", "dpo"),
                                       ("wspo", "wspo/official", "wspo/ours", "wspo"), ("sft-padded", "sft-padded/trl", "sft-padded/ours", None),
                                       ("sft-packed", "sft-packed/trl", "sft-packed/ours", None)):
        if theirs not in s or ours not in s:
            continue
        out[f"{sec}/throughput"] = s[ours]["ex_s"] / s[theirs]["ex_s"]
        out[f"{sec}/throughput_cpu"] = s[ours]["ex_cpu_s"] / s[theirs]["ex_cpu_s"]
        peak = s[ours]["peak"]
        if pre_sec and pre(pre_sec):
            p = pre(pre_sec)
            per_pair = p["prepass_s"] / p["items"]
            amortised = 1 / (1 / s[ours]["ex_s"] + per_pair)  # epoch_pairs / (epoch time + epoch_pairs * per_pair)
            out[f"{sec}/throughput_amortised"] = amortised / s[theirs]["ex_s"]
            out[f"{sec}/prepass_epoch_s"] = per_pair * epoch_pairs
            peak = max(peak, p["peak_gb"])
        out[f"{sec}/memory"] = peak / s[theirs]["peak"]
    if "wpo/ours" in s and "dpo/ours" in s:
        out["wpo/step_vs_dpo"] = s["wpo/ours"]["step"] / s["dpo/ours"]["step"]
        out["wpo/step_vs_dpo_cpu"] = s["wpo/ours"]["cpu_step"] / s["dpo/ours"]["cpu_step"]
    if "wpo/ours-nogc" in s and "dpo/ours-nogc" in s:
        out["wpo/step_vs_dpo_nogc"] = s["wpo/ours-nogc"]["step"] / s["dpo/ours-nogc"]["step"]
    return out


def verdicts(rat: dict) -> list[tuple]:
    """(key, what, bound, op, wall-clock ratio, met, CPU-time ratio or None, met or None) per target measured."""
    ok = lambda v, bound, op: None if v is None else (v >= bound if op == ">=" else v <= bound)
    return [(key, what, bound, op, rat[key], ok(rat[key], bound, op), rat.get(key + "_cpu"), ok(rat.get(key + "_cpu"), bound, op))
            for key, what, bound, op in TARGETS if key in rat]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    try:
        import peft
        peft_v = peft.__version__
    except ImportError:
        peft_v = "-"
    # device_count, not get_device_name: this process forks the measured ones and must not initialise CUDA
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem, "gpu": f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "datasets": datasets.__version__, "accelerate": __import__("accelerate").__version__, "peft": peft_v,
            "threads": os.environ.get("OMP_NUM_THREADS", "unset")}


def others() -> str:
    """uptime and the busiest processes that are not this benchmark (the machine is shared)."""
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()
    mine = {os.getpid()}
    busy = [line[:150] for line in ps[1:] if int(line.split()[0]) not in mine and float(line.split()[1]) >= 5.0 and " ps " not in line]
    return "\n".join([up] + busy[:8])


def report(args: Args, res: dict, rat: dict, info: dict, command: str) -> str:
    size, m = CTX.size, info["machine"]
    fmt_r = lambda a, b, f: f"{f.format(a)}..{f.format(b)}"
    L = ["# Benchmarks: our scripts vs TRL and the official WSPO formulation", "",
         f"Generated by `benchmarks/bench.py` on {time.strftime('%Y-%m-%d %H:%M', time.localtime(info['start']))}, "
         f"total wall time {info['wall'] / 60:.1f} min.", "", "```", command, "```", "",
         *(["**Smoke run (--quick)**: a tiny model and 2 measured steps; it shows that every configuration runs, its "
            "figures say nothing about speed (tiny operators are dominated by per-op overhead and thread scheduling).", ""]
           if args.quick else []),
         "## Machine and setting", "",
         f"- {m['cpu']}, {m['cores']} cores, {m['mem_gb']:.0f} GiB RAM" + (f", GPU {m['gpu']}" if m["gpu"] else ", CPU only")
         + f"; OMP_NUM_THREADS={m['threads']}; one configuration at a time, each in its own process.",
         f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, datasets {m['datasets']}, "
         f"accelerate {m['accelerate']}, peft {m['peft']}.",
         f"- Model: Qwen2 from a config, vocab {size.vocab}, hidden {size.hidden}, {size.layers} layers, {size.heads} heads / "
         f"{size.kv_heads} KV heads, intermediate {size.intermediate} ({info['params']['strong'] / 1e6:.1f}M parameters, fp32). "
         f"WSPO weak pair: hidden {size.weak_hidden}, {size.weak_layers} layers, intermediate {size.weak_intermediate} "
         f"({info['params']['weak_ref'] / 1e6:.1f}M parameters each, differently initialised).",
         f"- Data: synthetic token ids, ChatML-shaped prompts of {size.prompt_len[0]}..{size.prompt_len[1]} tokens, responses of "
         f"{size.response_len[0]}..{size.response_len[1]} tokens (uniform; chosen and rejected independent), max length {size.max_length}. "
         f"Batch {size.batch_size} pairs / sequences (SFT packed: {size.batch_size} bins of TRL's bfd packing), no accumulation, "
         f"{size.warmup} warm-up + {size.steps} measured steps per configuration; ours and theirs get the same batches in the same order.",
         "- Throughput = examples (pairs or conversations) per second, median over the measured steps with min..max; tokens/s "
         "counts the real (unpadded) tokens of a step's examples (prompt counted once per response). Peak = peak RSS of the "
         "configuration's process" + (" (torch.cuda.max_memory_allocated on GPU)." if m["gpu"] else "."),
         f"- GC = gradient checkpointing. TRL runs with its defaults except fp32 (bf16=False), a sequential sampler and logging every "
         f"step; its DPO reference model is live (its default, precompute_ref_log_probs=False). The official WSPO step is re-created "
         f"in the benchmark (run_official_wspo); it and ours gave first-batch losses {rat.get('wspo/first_loss', ('-', '-'))[0]} and "
         f"{rat.get('wspo/first_loss', ('-', '-'))[1]} (asserted equal).", "",
         "Load on the shared machine (other engineers' jobs were running when the load average exceeds the benchmark's own ~2):", "",
         "```", "before: " + info["others_before"], "after:  " + info["others_after"], "```", "",
         *([f"Machine speed probes (benchmarks/bench.py run_probe), start / end: matmul {info['probe_before']['matmul_gflops']:.0f} / "
            f"{info['probe_after']['matmul_gflops']:.0f} GFLOP/s; multiply into fresh memory {info['probe_before']['fresh_elementwise_gbs']:.1f} / "
            f"{info['probe_after']['fresh_elementwise_gbs']:.1f} GB/s. The second bounds the full-vocabulary logits ops that take "
            "much of TRL's step.", ""] if "probe_before" in info else []),
         "## Results", "",
         "| configuration | GC | step s (median, min..max) | examples/s (median, min..max) | tokens/s | CPU s / step | peak GB | first-step loss | load 1-min (start/end) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if "summary" not in r:
            continue
        s = r["summary"]
        L.append(f"| {name} | {'on' if r['spec'].get('gc') else 'off'} | {s['step']:.2f} ({fmt_r(*s['step_range'], '{:.2f}')}) | "
                 f"{s['ex_s']:.3f} ({fmt_r(*s['ex_range'], '{:.3f}')}) | {s['tok_s']:.0f} | {s['cpu_step']:.1f} | {s['peak']:.2f} | {s['first_loss']:.4f} | "
                 f"{s['load'][0]:.1f}/{s['load'][1]:.1f} |")
    same = [(k.split("/")[0], v) for k, v in rat.items() if k.endswith("/first_loss") and len(v) == 3]
    if same:
        L += ["", "First-step loss, theirs vs ours (same weights, same first batch): " + "; ".join(
            f"{sec} {a} vs {b} ({'equal' if ok else '**differ**'})" for sec, (a, b, ok) in same) + "."]
    pres = [(n, r) for n, r in res.items() if n.endswith("/prepass")]
    if pres:
        L += ["", "## Pre-passes (one-time, amortised over one epoch)", "",
              f"| pre-pass | pairs timed | time s | s per pair | one epoch of {args.epoch_pairs} pairs | peak GB |", "|---|---|---|---|---|---|"]
        for n, r in pres:
            parts = "; ".join(f"{k} {v:.1f} s" for k, v in r.get("prepass_parts", {}).items())
            L.append(f"| {n}{' (' + parts + ')' if parts else ''} | {r['items']} | {r['prepass_s']:.1f} | {r['prepass_s'] / r['items']:.3f} | "
                     f"{r['prepass_s'] / r['items'] * args.epoch_pairs / 60:.0f} min | {r['peak_gb']:.2f} |")
        L += ["", "Amortised throughput = 1 / (1 / steady-state examples/s + pre-pass s per pair): the epoch's training time plus "
              "its pre-pass, per pair (wpo.py reuses dpo.py's reference pre-pass; the cache key is the same)."]
    verdict = lambda ok: "" if ok is None else ("met" if ok else "**missed**")
    L += ["", "## Ratios and targets", "",
          "Wall-clock ratios are what the targets are about; CPU-time ratios (process CPU seconds per step, all threads) are "
          "the cross-check on a shared machine, where other jobs stretch wall time unevenly between configurations.", "",
          "| comparison | wall-clock | CPU time | target | wall-clock | CPU time |", "|---|---|---|---|---|---|"]
    for key, what, bound, op, val, ok, cval, cok in verdicts(rat):
        L.append(f"| {what} | {val:.2f}x | {'-' if cval is None else f'{cval:.2f}x'} | {op} {bound}x | {verdict(ok)} | {verdict(cok)} |")
    extra = [("dpo/throughput_amortised", "dpo.py incl. pre-pass / TRL DPOTrainer, throughput"),
             ("wpo/throughput_amortised", "wpo.py incl. pre-pass / TRL use_weighting, throughput"),
             ("wspo/throughput_amortised", "wspo.py incl. pre-pass / official WSPO, throughput"),
             ("wpo/step_vs_dpo_nogc", "wpo.py / dpo.py step time, both no GC"),
             ("sft-padded/memory", "sft.py / TRL SFTTrainer padded, peak memory"),
             ("sft-packed/memory", "sft.py / TRL SFTTrainer packed, peak memory"),
             ("wpo/memory", "wpo.py / TRL use_weighting, peak memory")]
    for key, what in extra:
        if key in rat:
            L.append(f"| {what} | {rat[key]:.2f}x | - | (no target) | | |")
    nogc = [(n, r) for n, r in res.items() if n.endswith("-nogc") and "summary" in r]
    if nogc:
        L += ["", "Our scripts with gradient checkpointing off (their default except wpo.py) against the same TRL / official runs:", "",
              "| ours, no GC | throughput ratio, wall-clock | CPU time | peak memory ratio |", "|---|---|---|---|"]
        for n, r in nogc:
            o, theirs = r["summary"], res[n.split("/")[0] + ("/official" if n.startswith("wspo") else "/trl")]["summary"]
            L.append(f"| {n} | {o['ex_s'] / theirs['ex_s']:.2f}x | {o['ex_cpu_s'] / theirs['ex_cpu_s']:.2f}x | {o['peak'] / theirs['peak']:.2f}x |")
    profiles = [(n, r) for n, r in res.items() if r.get("profile")]
    if profiles:
        L += ["", "## Profiles of missed targets", "",
              "One step after warm-up under torch.profiler (CPU, memory and FLOP counting on; the profiler slows the step), "
              "top operators by self CPU time, then the same split by input shapes:"]
        for n, r in profiles:
            L += ["", f"### {n} (for {', '.join(r['missed'])})", "", "```", r["profile"].rstrip(), "```"]
    return "\n".join(L) + "\n"


@dataclass
class Context:
    """What every forked configuration process inherits: settings, paths, tokenizer and data."""
    args: Args
    size: Size
    paths: dict
    tokenizer: object
    pairs: Dataset
    sft: Dataset
    packed: Dataset


CTX: Context = None  # set in main before any fork


def main():
    global CTX
    args = tyro.cli(Args)
    if not set(args.sections) <= set(SECTIONS):
        raise SystemExit(f"--sections: choose from {SECTIONS}")
    size = QUICK if args.quick else FULL
    out = args.out or (os.path.join(args.workdir, "benchmarks-quick.md") if args.quick else os.path.join(ROOT, "docs", "benchmarks.md"))
    command = "OMP_NUM_THREADS={} python benchmarks/bench.py {}".format(os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(sys.argv[1:])).strip()
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(os.path.join(args.workdir, "results"))
    info = {"start": time.time(), "machine": machine(), "others_before": others()}
    print(f"[bench] {command}\n[bench] load before: {info['others_before'].splitlines()[0]}", flush=True)

    rng = random.Random(args.seed)
    n_pairs = max(size.prepass_pairs, size.batch_size * (size.warmup + size.steps))
    pairs = make_pairs(n_pairs, size, rng)
    convs = sft_rows(make_pairs(3 * size.batch_size * (size.warmup + size.steps), size, rng))
    CTX = Context(args=args, size=size, paths={k: os.path.join(args.workdir, "models", k) for k in ("strong", "weak_ref", "weak_aligned")},
                  tokenizer=build_tokenizer(size.vocab), pairs=pairs, sft=convs,
                  packed=pack_dataset(convs.select_columns(["input_ids", "labels"]), size.max_length, "bfd"))
    info["params"] = isolated(lambda spec: build_models(CTX), {"name": "setup/models"})
    cpu_probe = not torch.cuda.is_available() and not args.quick
    if cpu_probe:
        info["probe_before"] = isolated(run_probe, {"name": "probe/start"})

    runners = {f.__name__: f for f in (run_prepass_dpo, run_ours_pairs, run_trl_dpo, run_prepass_wspo, run_official_wspo,
                                       run_ours_wspo, run_trl_sft, run_ours_sft)}
    res = {}
    for spec in plan(args):
        r = isolated(runners[spec["fn"]], spec)
        r["spec"] = spec
        if "step_s" in r:
            r["summary"] = summarise(spec["name"], r)
        res[spec["name"]] = r

    rat = ratios(res, args.epoch_pairs)
    if "wspo/official" in res and "wspo/ours" in res:
        a, b = res["wspo/official"]["losses"][0], res["wspo/ours"]["losses"][0]
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6), f"WSPO first-batch loss: official {a} vs ours {b}"
        rat["wspo/first_loss"] = (f"{a:.6f}", f"{b:.6f}")
    for sec in ("dpo", "wpo", "sft-padded", "sft-packed"):  # same weights, same first batch: the same loss
        if f"{sec}/trl" in res and f"{sec}/ours" in res:
            a, b = res[f"{sec}/trl"]["summary"]["first_loss"], res[f"{sec}/ours"]["summary"]["first_loss"]
            rat[f"{sec}/first_loss"] = (f"{a:.4f}", f"{b:.4f}", math.isclose(a, b, rel_tol=2e-3))  # TRL logs 4 digits
    missed = {}
    for key, what, *_, ok, _, cok in verdicts(rat):
        if not ok or cok is False:
            ours = {"wpo/step_vs_dpo": "wpo/ours"}.get(key, key.split("/")[0] + "/ours")
            missed.setdefault(ours, []).append(what)
    if args.profile_missed:
        for name, what in missed.items():
            vs_theirs = args.profile_theirs and any("TRL" in w or "official" in w for w in what)
            theirs = [name.split("/")[0] + t for t in ("/trl", "/official")] if vs_theirs else []
            for target in [name] + [t for t in theirs if t in res]:
                spec = {**res[target]["spec"], "name": target + "-profile", "profile": True}
                r = isolated(runners[spec["fn"]], spec)
                res[target + "-profile"] = {"profile": r["profile"], "missed": what, "spec": spec}
    info["others_after"] = others()
    if cpu_probe:
        info["probe_after"] = isolated(run_probe, {"name": "probe/end"})
    info["wall"] = time.time() - info["start"]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    notes = ""
    if os.path.exists(out):  # hand-written analysis below the marker survives a rerun
        with open(out) as f:
            text = f.read()
        notes = text[text.index(NOTES):] if NOTES in text else ""
    with open(out, "w") as f:
        f.write(report(args, res, rat, info, command) + "\n" + (notes or NOTES + "\n"))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"ratios": rat, "results": {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in res.items()}}, f, indent=1)
    print(f"[bench] wrote {out} ({info['wall'] / 60:.1f} min)")
    for key, what, bound, op, val, ok, cval, cok in verdicts(rat):
        print(f"  {what:<55} {val:6.2f}x  target {op} {bound}x  {'met' if ok else 'MISSED'}"
              + ("" if cval is None else f"   (CPU time {cval:.2f}x, {'met' if cok else 'MISSED'})"))


if __name__ == "__main__":
    main()
