"""Speed and memory of sft.py, dpo.py, wpo.py and wspo.py against TRL and the official WSPO formulation, run the
way users run them (issue 19).

Every configuration is one command line in its own process, on dataset files this benchmark writes in the hub
schemas (UltraFeedback binarized pairs for dpo / wpo / wspo, UltraChat messages for sft) and on the same model
folders (a Qwen2 built from a config, saved with save_pretrained, with a synthesised byte-level BPE tokenizer and a
ChatML chat template: offline, any vocabulary size):

    ours    python dpo.py / wpo.py / wspo.py / sft.py --dataset_name FILE.jsonl --eval_split None ... (their defaults,
            plus the flags of a variant)
    theirs  python benchmarks/theirs.py trl_dpo | trl_sft | official_wspo ... (TRL 1.16 DPOTrainer and SFTTrainer with
            their defaults; the official WSPO step, four models live, re-created there)

Throughput and peak memory come from each run's metrics.jsonl: the per-window rows (perf/tokens_per_s, and
perf/pairs_per_s or perf/examples_per_s where a script logs them) and perf/peak_memory_gb; benchmarks/theirs.py logs
the same through a callback; the benchmark imports nothing from the scripts. Steady state = the logging windows after
the first W = min(3, steps // 2) optimizer steps (the windows are W steps long: the first one is skipped), the mean
of their rates. Peak memory = torch.cuda.max_memory_allocated on a GPU (the nvidia-smi peak,
sampled by this process every 0.2 s, is shown next to it), peak RSS of the process on a CPU. Model FLOPs utilisation
MFU = 6 x parameters x non-padding tokens per second through the trained model / the device's peak (bf16 dense
tensor-core peak on a GPU; on a CPU the matmul rate this process measures): the attention term is not included,
nor the reference / frozen models' forwards of TRL and the official step, nor the recompute of checkpointing.

    OMP_NUM_THREADS=2 python benchmarks/bench.py                 # CPU table, writes docs/benchmarks.md (20 min on the
                                                                 # shared 2-core VM at load 3-4; --budget_s S bounds it)
    OMP_NUM_THREADS=2 python benchmarks/bench.py --quick         # CPU smoke run, < 2 minutes
    python benchmarks/bench.py --gpu                             # GPU table, Qwen2-0.5B config, bf16 autocast
    python benchmarks/bench.py --gpu --sizes qwen2-0.5b qwen2-1.5b   # also the Qwen2-1.5B config
    python benchmarks/bench.py --gpu --tiny                      # the GPU plan at a tiny size (dry run on a CPU)
"""

import itertools
import json
import os
import platform
import random
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTES = "<!-- notes: everything below this line is written by hand and kept when the benchmark rewrites the file -->"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
# bf16 dense tensor-core peak (no sparsity), TFLOP/s, by the device name nvidia-smi gives
GPU_PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
                   ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0)]


@dataclass
class Args:
    gpu: bool = False
    """the GPU table: bf16 autocast on both sides, the Qwen2-0.5B config, layout variants of dpo.py"""
    quick: bool = False
    """CPU smoke run: a small model, 2 steps, the main rows only (< 2 minutes)"""
    tiny: bool = False
    """with --gpu: every size shrunk to a tiny model and short sequences (a dry run of the GPU plan on a CPU)"""
    sizes: tuple[str, ...] = ()
    """model sizes to run (cpu, quick, qwen2-0.5b, qwen2-1.5b); default: qwen2-0.5b with --gpu, cpu, or quick with --quick"""
    steps: int | None = None
    """optimizer steps per run (default: the size's); the first min(3, steps // 2) are warm-up"""
    only: tuple[str, ...] = ()
    """run only the configurations whose name starts with one of these (e.g. dpo/ sft/trl)"""
    budget_s: float | None = None
    """stop starting new runs when a run would not finish within this many seconds from the start (runs are ordered
    by importance); every finished run is in the report"""
    run_timeout_s: float = 900.0
    """a run that takes longer is killed and reported as timed out"""
    workdir: str = "/tmp/w2s-benchmarks"
    """models, data, run folders and logs (wiped at the start)"""
    out: str | None = None
    """markdown report (default: docs/benchmarks.md for the CPU table, WORKDIR/benchmarks.md otherwise)"""
    seed: int = 0
    """seed of the synthetic data and of the model weights"""


@dataclass
class Size:
    """Model and data shapes (Qwen2 architecture); the WSPO weak pair is the same config with fewer layers."""
    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    weak_layers: int
    prompt_len: tuple[int, int]
    response_len: tuple[int, int]
    max_length: int
    batch_size: int = 8
    steps: int = 5
    tie_embeddings: bool = True
    learning_rate: float = 1e-6


SIZES = {
    "cpu": Size("cpu", vocab=32000, hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1536, weak_layers=2,
                prompt_len=(24, 128), response_len=(32, 383), max_length=512, steps=5, tie_embeddings=False),
    "quick": Size("quick", vocab=4096, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, weak_layers=1,
                  prompt_len=(24, 48), response_len=(8, 96), max_length=160, batch_size=4, steps=2),
    # Qwen/Qwen2-0.5B and Qwen/Qwen2-1.5B config.json (hidden, layers, heads, KV heads, intermediate, vocab, tied)
    "qwen2-0.5b": Size("qwen2-0.5b", vocab=151936, hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864,
                       weak_layers=6, prompt_len=(64, 512), response_len=(64, 768), max_length=1536, steps=20),
    "qwen2-1.5b": Size("qwen2-1.5b", vocab=151936, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                       weak_layers=7, prompt_len=(64, 512), response_len=(64, 768), max_length=1536, steps=20),
}
TINY = dict(vocab=2048, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, weak_layers=1, prompt_len=(24, 48),
            response_len=(8, 64), max_length=128, batch_size=4, steps=4)


@dataclass
class Run:
    """One configuration: a command line, what it is, and what it is compared with."""
    name: str
    argv: list
    side: str  # "ours" or "theirs"
    gc: bool | None = None  # gradient checkpointing, where the command line fixes it (None: the script's default)
    overrides: dict = field(default_factory=dict)  # ours: Args fields set on the command line (variants)
    base: str | None = None  # ours variants: the defaults run; a variant equal to it is not run again
    flags: str = ""


# ---------------------------------------------------------------------------------------------
# tokenizer, models, data
# ---------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
                 "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def build_tokenizer(vocab_size: int):
    """A Qwen2Tokenizer (byte-level BPE with Qwen2's pre-tokenizer, the class transformers picks for a qwen2 model
    folder) with vocab_size - 3 regular tokens: the 256 byte symbols, then every lowercase word of 1, 2, 3 (then 4)
    letters with its leading space as one token (each merge adds one word), and <|endoftext|> (pad),
    <|im_start|>, <|im_end|> (eos). Returns the tokenizer and its one-token words."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges, words, target = [], [], vocab_size - 3
    for n in range(1, 5):
        for letters in itertools.product(string.ascii_lowercase, repeat=n):
            if len(vocab) >= target:
                break
            w = "".join(letters)
            vocab["Ġ" + w] = len(vocab)
            merges.append(("Ġ" + w[:-1], w[-1]))
            words.append(w)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
                         clean_up_tokenization_spaces=False, model_max_length=32768)
    return tok, words


def qwen2_config(size: Size, layers: int, tok):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=size.vocab, hidden_size=size.hidden, num_hidden_layers=layers, num_attention_heads=size.heads,
                       num_key_value_heads=size.kv_heads, intermediate_size=size.intermediate,
                       max_position_embeddings=max(4096, 2 * size.max_length), tie_word_embeddings=size.tie_embeddings,
                       rope_theta=1e6, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=None)


def build_models(size: Size, tok, folder: str, seed: int) -> dict:
    """strong (policy init = strong reference) and the weak pair (weak_ref, weak_aligned: differently initialised, so
    the weak log-ratio is not zero), fp32 safetensors folders with the tokenizer. Returns parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM

    params = {}
    for i, (name, layers) in enumerate((("strong", size.layers), ("weak_ref", size.weak_layers), ("weak_aligned", size.weak_layers))):
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_config(qwen2_config(size, layers, tok), dtype=torch.float32)
        model.save_pretrained(os.path.join(folder, name))
        tok.save_pretrained(os.path.join(folder, name))
        params[name] = sum(p.numel() for p in model.parameters())
        del model
    return params


def write_data(size: Size, tok, words: list[str], folder: str, seed: int, pair_factor: int = 1) -> dict:
    """pairs.jsonl (HuggingFaceH4/ultrafeedback_binarized schema) and chat.jsonl (HuggingFaceH4/ultrachat_200k
    schema). A text is 'a' then one-token words, so its length in tokens is exact: prompt lengths (chat template
    included, through the assistant header) and response lengths (through the end-of-turn token) are uniform in
    the size's ranges, chosen and rejected independent. SFT conversations are the pairs' prompts and chosen responses,
    three times as many as a run needs padded (TRL's packing puts about two in a bin). pair_factor: more pairs, for
    the larger-batch variants."""
    rng = random.Random(seed)
    text = lambda n: " ".join(["a"] + rng.choices(words, k=n - 1))
    header = len(tok.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]) - 1
    n_pairs = size.batch_size * (size.steps + 1) * pair_factor
    pairs, chats = [], []
    for i in range(3 * n_pairs):
        prompt = text(rng.randint(*size.prompt_len) - header)
        chosen, rejected = (text(rng.randint(*size.response_len) - 1) for _ in range(2))  # + <|im_end|>
        user = {"role": "user", "content": prompt}
        conv = lambda r: [user, {"role": "assistant", "content": r}]
        if i < n_pairs:
            pairs.append({"prompt": prompt, "prompt_id": f"{i:08d}", "chosen": conv(chosen), "rejected": conv(rejected),
                          "messages": conv(chosen), "score_chosen": 8.0, "score_rejected": 4.0})
        chats.append({"prompt": prompt, "prompt_id": f"{i:08d}", "messages": conv(chosen)})
    os.makedirs(folder, exist_ok=True)
    files = {"pairs": os.path.join(folder, "pairs.jsonl"), "chat": os.path.join(folder, "chat.jsonl")}
    for key, rows in (("pairs", pairs), ("chat", chats)):
        with open(files[key], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    check = tok.apply_chat_template(pairs[0]["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert len(check) <= size.prompt_len[1] + size.response_len[1] + 1 <= size.max_length, (len(check), size)
    return files


# ---------------------------------------------------------------------------------------------
# the plan: command lines, ordered by importance (a time budget drops the tail)
# ---------------------------------------------------------------------------------------------
FLAGS: dict = {}
HELP: dict = {}


def help_default(script: str, name: str):
    """A field's default as the script's --help states it ("(default: False)"), or None if it cannot be read."""
    script_flags(script)
    lines = HELP[script].splitlines()
    for i, line in enumerate(lines):
        if line.strip("│ ").startswith(f"--{name}"):
            text = " ".join(x.strip("│ ") for x in lines[i : i + 6])
            if "(default: " in text:
                value = text.split("(default: ", 1)[1].split(")", 1)[0]
                return {"True": True, "False": False}.get(value, value)
    return None


def script_flags(script: str) -> set[str]:
    """The flags a script has now (from --help, read once), so that variants follow whatever dpo.py offers."""
    if script in FLAGS:
        return FLAGS[script]
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **ENV, "COLUMNS": "200"})
    HELP[script] = out.stdout
    names = set()
    for line in out.stdout.splitlines():  # option lines of tyro's help box: "│ --name, --no_name   help text"
        head = line.strip("│ ").split("  ")[0]
        if head.startswith("--"):
            names |= {w.split()[0] for w in head.split(", ")}
    FLAGS[script] = names
    return FLAGS[script]


def plan(args: Args, size: Size, models: str, files: dict, rundir: str, bf16: bool) -> list[Run]:
    s, steps = size, size.steps
    logging = max(1, min(3, steps // 2))  # windows aligned with the warm-up, so per-window rows can stand in
    common = ["--max_steps", steps, "--per_device_train_batch_size", s.batch_size, "--max_length", s.max_length,
              "--logging_steps", logging, "--learning_rate", s.learning_rate]
    ours_common = common + ["--gradient_accumulation_steps", 1, "--eval_split", "None"]
    strong, weak_ref, weak_aligned = (os.path.join(models, n) for n in ("strong", "weak_ref", "weak_aligned"))
    runs: list[Run] = []
    name_of = lambda n: f"{s.name}:{n}"

    def out(n):
        return ["--output_dir", os.path.join(rundir, n.replace("/", "--"))]

    def ours(n, script, overrides=None, base=None):
        """overrides: one dict of Args fields, or a list of alternatives (the first whose flags the script has)."""
        for o in (overrides if isinstance(overrides, list) else [overrides or {}]):
            extra = []
            for k, v in o.items():
                extra += ([f"--{k}" if v else f"--no_{k}"] if isinstance(v, bool) else [f"--{k}", v])
            needed = {a for a in extra if isinstance(a, str) and a.startswith("--")} - {"--gradient_checkpointing",
                                                                                         "--no_gradient_checkpointing"}
            if not needed or needed <= script_flags(script):
                break
        else:
            return  # the script has none of these flags (any more); checkpointing flags are fixed by SPEC 6
        data = files["chat"] if script == "sft.py" else files["pairs"]
        model = (["--strong", strong, "--weak_ref", weak_ref, "--weak_aligned", weak_aligned] if script == "wspo.py"
                 else ["--model_name_or_path", strong])
        prompt = [] if script == "sft.py" else ["--max_prompt_length", s.max_length // 2, "--cache_dir", os.path.join(rundir, "cache")]
        base_argv = [*model, *ours_common, *prompt]
        for k in o:  # a variant's value replaces the common one
            if f"--{k}" in base_argv:
                i = base_argv.index(f"--{k}")
                del base_argv[i : i + 2]
        argv = [sys.executable, script, "--dataset_name", data, *base_argv, *out(n), *extra]
        runs.append(Run(name_of(n), [str(a) for a in argv], "ours", o.get("gradient_checkpointing"), o,
                        name_of(base) if base else None, " ".join(str(a) for a in extra) or "(defaults)"))

    def theirs(n, what, gc=True, extra=()):
        data = files["chat"] if what == "trl_sft" else files["pairs"]
        weak = ["--weak_ref", weak_ref, "--weak_aligned", weak_aligned] if what == "official_wspo" else []
        argv = [sys.executable, "benchmarks/theirs.py", what, "--model_name_or_path", strong, *weak, "--dataset_name", data,
                *common, *out(n), "--gradient_checkpointing" if gc else "--no_gradient_checkpointing", *extra,
                *(["--bf16"] if bf16 else [])]
        runs.append(Run(name_of(n), [str(a) for a in argv], "theirs", gc, flags=" ".join([what, *extra]) + ("" if gc else " no GC")))

    gc_on, gc_off = {"gradient_checkpointing": True}, {"gradient_checkpointing": False}
    if args.gpu:  # each side's defaults first, then the same checkpointing setting on both sides
        ours("dpo/ours", "dpo.py")
        theirs("dpo/trl", "trl_dpo")
        theirs("dpo/trl-nogc", "trl_dpo", gc=False)
        ours("dpo/ours-gc", "dpo.py", gc_on, "dpo/ours")
        ours("dpo/ours-nogc", "dpo.py", gc_off, "dpo/ours")
        ours("wpo/ours", "wpo.py")
        theirs("wpo/trl", "trl_dpo", extra=["--use_weighting"])
        ours("sft/ours", "sft.py")
        theirs("sft/trl-padded", "trl_sft")
        theirs("sft/trl-packed", "trl_sft", extra=["--packing"])
        ours("wspo/ours", "wspo.py")
        theirs("wspo/official", "official_wspo")
    else:  # the CPU targets compare with checkpointing on both sides: those runs first, each script's defaults last
        for sec, script, their_runs in (("dpo", "dpo.py", [("dpo/trl", "trl_dpo", [])]),
                                        ("wpo", "wpo.py", [("wpo/trl", "trl_dpo", ["--use_weighting"])]),
                                        ("wspo", "wspo.py", [("wspo/official", "official_wspo", [])]),
                                        ("sft", "sft.py", [("sft/trl-padded", "trl_sft", []), ("sft/trl-packed", "trl_sft", ["--packing"])])):
            for n, what, extra in their_runs:
                theirs(n, what, extra=extra)
            ours(f"{sec}/ours-gc", script, gc_on)
        for sec in ("dpo", "wpo", "wspo", "sft"):
            ours(f"{sec}/ours", f"{sec}.py", None, f"{sec}/ours-gc")  # = ours-gc if checkpointing is the default
    if args.gpu:  # dpo.py's layouts (as its flags spell them now), for choosing the per-device defaults
        groups = lambda g: [{"layout": "padded", "length_groups": g}, {"padding_free": False, "length_groups": g}]
        free = [{"layout": "padding_free"}, {"padding_free": True}]
        for n, o in (("dpo/ours-groups1", groups(1)), ("dpo/ours-groups4", groups(4)), ("dpo/ours-padding-free", free),
                     ("dpo/ours-batch16", {"per_device_train_batch_size": 16}),  # >= 16k tokens a step (MFU target)
                     ("sft/ours-batch24", {"per_device_train_batch_size": 24}),
                     ("dpo/ours-groups1-gc", [{**x, **gc_on} for x in groups(1)]),
                     ("dpo/ours-groups4-gc", [{**x, **gc_on} for x in groups(4)]),
                     ("dpo/ours-padding-free-gc", [{**x, **gc_on} for x in free]), ("sft/ours-packing", {"packing": True}),
                     ("wpo/ours-nogc", gc_off), ("wpo/ours-gc", gc_on), ("wspo/ours-gc", gc_on), ("sft/ours-gc", gc_on),
                     ("dpo/ours-lora", {"use_lora": True})):
            ours(n, n.split("/")[0] + ".py", o, n.split("/")[0] + "/ours")
    if args.only:
        runs = [r for r in runs if r.name.split(":", 1)[1].startswith(tuple(args.only))]
    if args.quick:
        runs = [r for r in runs if not r.base]
    return runs


# ---------------------------------------------------------------------------------------------
# running one command and reading its metrics.jsonl
# ---------------------------------------------------------------------------------------------
def gpu_memory_used_gb() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=5).stdout
        return max(float(x) for x in out.split()) * 2**20 / 1e9  # MiB
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


EXAMPLE_RATES = ("perf/pairs_per_s", "perf/examples_per_s")  # per-window names: dpo.py / wpo.py, theirs.py


def read_metrics(path: str, steps: int, examples_per_step: int, wall_s: float | None) -> dict:
    """Steady state (SPEC 6) from the per-window rows: the windows that start at or after step W = min(3, steps // 2),
    the mean of their rates. Examples/s where a script logs only tokens per window: the steady steps' examples over
    wall_s, the seconds between its rows of step W and of the last step, seen from outside (CpuWindow)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    out = {"first_loss": next((r["train/loss"] for r in rows if "train/loss" in r), None)}
    warm = min(3, steps // 2)
    windows = [r for r in rows if "perf/tokens_per_s" in r]
    starts = [0] + [r["step"] for r in windows[:-1]]
    windows = [r for r, start in zip(windows, starts) if start >= warm]
    if not windows:
        return out
    mean = lambda k: sum(r[k] for r in windows) / len(windows)
    rate = next((k for k in EXAMPLE_RATES if all(k in r for r in windows)), None)
    steady_steps = windows[-1]["step"] - warm
    out.update(tokens_s=mean("perf/tokens_per_s"), steady_steps=steady_steps, steady_s=wall_s,
               examples_s=mean(rate) if rate else (steady_steps * examples_per_step / wall_s if wall_s else None),
               peak_gb=next((r["perf/peak_memory_gb"] for r in reversed(rows) if "perf/peak_memory_gb" in r), None))
    return out


class CpuWindow:
    """The process CPU time (all its threads) and the wall time spent in the steady-state window, seen from outside:
    from the moment metrics.jsonl gets its first row at step >= W (the row written after step W) to its first row at
    step >= the last step. On a shared machine, examples per CPU second is the cross-check of examples per wall
    second."""

    def __init__(self, path: str, pid: int, warmup: int, steps: int):
        self.path, self.pid, self.warmup, self.steps = path, pid, warmup, steps
        self.pos, self.start, self.end, self.wall = 0, None, None, [None, None]

    def _cpu(self) -> float | None:
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            return None

    def poll(self):
        if self.end is not None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            f.seek(self.pos)
            text = f.read()
        lines = text.split("\n")
        self.pos += len(text) - len(lines[-1])  # keep a partly written last line for the next poll
        for line in lines[:-1]:
            try:
                step = json.loads(line).get("step", -1)
            except json.JSONDecodeError:
                continue
            if self.start is None and step >= self.warmup:
                self.start, self.wall[0] = self._cpu(), time.time()
            if self.start is not None and step >= self.steps:
                self.end, self.wall[1] = self._cpu(), time.time()
                break

    def cpu_s(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start

    def wall_s(self) -> float | None:
        return None if None in self.wall else self.wall[1] - self.wall[0]


CURRENT: list = []  # the process group of the run in progress


def stop_on_sigterm(signum, frame):
    """An outer timeout: kill the run in progress (its own process group) and leave through the normal exit."""
    for pgid in CURRENT:
        try:
            os.killpg(pgid, 9)
        except ProcessLookupError:
            pass
    raise SystemExit(f"[bench] stopped by signal {signum}")


def execute(run: Run, env: dict, timeout: float, logdir: str) -> dict:
    log_path = os.path.join(logdir, run.name.replace("/", "--").replace(":", "--") + ".log")
    out_dir = run.argv[run.argv.index("--output_dir") + 1]
    t0 = time.time()
    peak_smi, stop = [None], threading.Event()

    def poll():
        while not stop.is_set():
            used = gpu_memory_used_gb()
            if used is not None:
                peak_smi[0] = max(peak_smi[0] or 0.0, used)
            stop.wait(0.2)

    with open(log_path, "w") as log:
        log.write(" ".join(run.argv) + "\n\n")
        log.flush()
        proc = subprocess.Popen(run.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        CURRENT[:] = [proc.pid]
        watcher = threading.Thread(target=poll, daemon=True) if shutil.which("nvidia-smi") else None
        if watcher:
            watcher.start()
        status, rusage, timed_out = None, None, False
        steps = int(run.argv[run.argv.index("--max_steps") + 1])
        window = CpuWindow(os.path.join(out_dir, "metrics.jsonl"), proc.pid, min(3, steps // 2), steps)
        while status is None:
            window.poll()
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, rusage = os.waitstatus_to_exitcode(st), ru
                proc.returncode = status
            elif time.time() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, 9)
            else:
                time.sleep(0.1)
        stop.set()
        CURRENT.clear()
    res = {"name": run.name, "rc": status, "wall_s": time.time() - t0, "timed_out": timed_out, "log": log_path,
           "child_maxrss_gb": rusage.ru_maxrss * 1024 / 1e9, "smi_peak_gb": peak_smi[0], "window_cpu_s": window.cpu_s()}
    batch = int(run.argv[run.argv.index("--per_device_train_batch_size") + 1])  # accumulation 1, one process
    res.update(read_metrics(os.path.join(out_dir, "metrics.jsonl"), steps, batch, window.wall_s()))
    if res["window_cpu_s"] and res.get("steady_s") and res.get("examples_s"):  # per CPU second over the same window
        res["examples_cpu_s"] = res["examples_s"] * res["steady_s"] / res["window_cpu_s"]
        res["tokens_cpu_s"] = res["tokens_s"] * res["steady_s"] / res["window_cpu_s"]
    if res.get("peak_gb") is None and not gpu_name() and res.get("tokens_s"):  # not logged (yet): the process's peak RSS
        res.update(peak_gb=res["child_maxrss_gb"], fallback=True)
    args_json = os.path.join(out_dir, "args.json")
    if run.side == "ours" and os.path.exists(args_json):
        with open(args_json) as f:
            res["args"] = {k: v for k, v in json.load(f).items() if isinstance(v, (bool, int, float, str)) or v is None}
    if status != 0:
        with open(log_path) as f:
            res["error"] = f.read()[-1500:]
    return res


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else None


def gpu_peak_flops(name: str | None) -> float | None:
    return next((tf * 1e12 for key, tf in GPU_PEAK_TFLOPS if name and key in name), None)


def run_probe() -> dict:
    """How fast the (shared) CPU is right now: a compute-bound fp32 matmul (the MFU denominator on a CPU) and a
    multiply into a fresh [4096 x 32000] fp32 tensor per call (memory bandwidth and page faults)."""
    import torch

    a, b, x = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.randn(4096, 32000)
    a @ b, x * 2.0
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    mm = 10 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for _ in range(5):
        x * 2.0
    return {"matmul_gflops": mm, "fresh_elementwise_gbs": 5 * 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9}


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    versions = {}
    for mod in ("trl", "datasets", "accelerate", "peft", "tyro"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "-"
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem, "gpu": gpu_name(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, **versions,
            "threads": os.environ.get("OMP_NUM_THREADS", "unset")}


def code_version() -> str:
    """The commit the scripts come from, and whether they differ from it (a snapshot without .git: $BENCH_COMMIT)."""
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True)
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return os.environ.get("BENCH_COMMIT", "unknown (no git)")
    dirty = git("status", "--porcelain", "--", "sft.py", "dpo.py", "wpo.py", "wspo.py", "benchmarks").stdout.split("\n")
    changed = [line[3:] for line in dirty if line.strip()]
    return head.stdout.strip() + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def others() -> str:
    """uptime and the busiest processes that are not this benchmark (the machine may be shared)."""
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()
    busy = [line[:150] for line in ps[1:] if int(line.split()[0]) != os.getpid() and float(line.split()[1]) >= 5.0 and " ps " not in line]
    return "\n".join([up] + busy[:8])


# ---------------------------------------------------------------------------------------------
# ratios, targets and the report
# ---------------------------------------------------------------------------------------------
def comparisons(gpu: bool) -> list[tuple]:
    """(ours, theirs, quantity, what, target) with target = (op, bound) or None. Quantities: examples (pairs/s for
    dpo / wpo / wspo), tokens (SFT: TRL's packing puts a varying number of conversations in a step), memory, step
    (time per pair, ours over ours). "defaults" = each side's defaults; GC = gradient checkpointing, on / off on both."""
    if gpu:
        return [
            ("dpo/ours", "dpo/trl", "examples", "dpo.py vs TRL DPOTrainer, both defaults: pairs/s", (">=", 1.5)),
            ("dpo/ours", "dpo/trl", "memory", "dpo.py vs TRL DPOTrainer, both defaults: peak memory", ("<=", 1.0)),
            ("dpo/ours-gc", "dpo/trl", "examples", "dpo.py vs TRL DPOTrainer, GC on both: pairs/s", (">=", 1.3)),
            ("dpo/ours-gc", "dpo/trl", "memory", "dpo.py vs TRL DPOTrainer, GC on both: peak memory", None),
            ("dpo/ours-nogc", "dpo/trl-nogc", "examples", "dpo.py vs TRL DPOTrainer, GC off both: pairs/s", (">=", 1.3)),
            ("dpo/ours-nogc", "dpo/trl-nogc", "memory", "dpo.py vs TRL DPOTrainer, GC off both: peak memory", None),
            ("wpo/ours", "wpo/trl", "examples", "wpo.py vs TRL use_weighting, both defaults: pairs/s", (">=", 1.5)),
            ("wpo/ours", "wpo/trl", "memory", "wpo.py vs TRL use_weighting, both defaults: peak memory", None),
            ("wpo/ours", "dpo/ours@wpo", "step", "wpo.py vs dpo.py (same GC setting): time per pair", ("<=", 1.1)),
            ("wspo/ours", "wspo/official", "examples", "wspo.py vs official WSPO, both defaults: pairs/s", (">=", 4.0)),
            ("wspo/ours", "wspo/official", "memory", "wspo.py vs official WSPO, both defaults: peak memory", ("<=", 0.4)),
            ("sft/ours", "sft/trl-padded", "tokens", "sft.py vs TRL SFTTrainer padded, both defaults: tokens/s", (">=", 1.2)),
            ("sft/ours", "sft/trl-packed", "tokens", "sft.py vs TRL SFTTrainer packed, both defaults: tokens/s", (">=", 1.0)),
            ("sft/ours", "sft/trl-padded", "memory", "sft.py vs TRL SFTTrainer padded: peak memory", None),
        ]
    return [  # the CPU targets of the earlier benchmark: checkpointing on both sides (TRL's / the official default)
        ("dpo/ours-gc", "dpo/trl", "examples", "dpo.py vs TRL DPOTrainer, GC on both: pairs/s", (">=", 3.0)),
        ("dpo/ours-gc", "dpo/trl", "memory", "dpo.py vs TRL DPOTrainer, GC on both: peak memory", ("<=", 0.5)),
        ("dpo/ours", "dpo/trl", "examples", "dpo.py vs TRL DPOTrainer, both defaults: pairs/s", None),
        ("dpo/ours", "dpo/trl", "memory", "dpo.py vs TRL DPOTrainer, both defaults: peak memory", None),
        ("wpo/ours-gc", "wpo/trl", "examples", "wpo.py vs TRL use_weighting, GC on both: pairs/s", (">=", 3.0)),
        ("wpo/ours-gc", "wpo/trl", "memory", "wpo.py vs TRL use_weighting, GC on both: peak memory", None),
        ("wpo/ours-gc", "dpo/ours-gc", "step", "wpo.py vs dpo.py, GC on both: time per pair", ("<=", 1.1)),
        ("wspo/ours-gc", "wspo/official", "examples", "wspo.py vs official WSPO, GC on both: pairs/s", (">=", 4.0)),
        ("wspo/ours-gc", "wspo/official", "memory", "wspo.py vs official WSPO, GC on both: peak memory", ("<=", 0.4)),
        ("wspo/ours", "wspo/official", "examples", "wspo.py vs official WSPO, both defaults: pairs/s", None),
        ("sft/ours-gc", "sft/trl-padded", "tokens", "sft.py vs TRL SFTTrainer padded, GC on both: tokens/s", (">=", 1.2)),
        ("sft/ours-gc", "sft/trl-packed", "tokens", "sft.py vs TRL SFTTrainer packed, GC on both: tokens/s", (">=", 1.0)),
        ("sft/ours-gc", "sft/trl-padded", "memory", "sft.py vs TRL SFTTrainer padded, GC on both: peak memory", None),
        ("sft/ours", "sft/trl-padded", "tokens", "sft.py vs TRL SFTTrainer padded, both defaults: tokens/s", None),
    ]


def resolve(res: dict, size: str, name: str) -> dict | None:
    """A result by short name; "dpo/ours@wpo" = the dpo.py run with wpo.py's checkpointing setting."""
    if name.endswith("@wpo"):
        wpo = res.get(f"{size}:wpo/ours", {}).get("args", {})
        gc = wpo.get("gradient_checkpointing")
        for cand in ("dpo/ours", "dpo/ours-gc", "dpo/ours-nogc"):
            r = res.get(f"{size}:{cand}")
            if r and r.get("args", {}).get("gradient_checkpointing") == gc:
                return r
        return None
    return res.get(f"{size}:{name}")


def ratio_rows(res: dict, size: str, gpu: bool) -> list[dict]:
    rows = []
    for ours, theirs, q, what, target in comparisons(gpu):
        a, b = resolve(res, size, ours), resolve(res, size, theirs)
        key = {"examples": "examples_s", "tokens": "tokens_s", "memory": "peak_gb", "step": "examples_s"}[q]
        if not a or not b or not a.get(key) or not b.get(key):
            if target is not None:
                rows.append({"what": what, "ratio": None, "target": target, "ok": None})
            continue
        ratio = b[key] / a[key] if q == "step" else a[key] / b[key]
        check = lambda r: None if target is None or r is None else (r >= target[1] if target[0] == ">=" else r <= target[1])
        ck = {"examples": "examples_cpu_s", "tokens": "tokens_cpu_s", "step": "examples_cpu_s"}.get(q)
        cpu = None
        if ck and a.get(ck) and b.get(ck):
            cpu = b[ck] / a[ck] if q == "step" else a[ck] / b[ck]
        rows.append({"what": what, "ratio": ratio, "target": target, "ok": check(ratio), "ours": a[key], "theirs": b[key],
                     "cpu_ratio": cpu, "cpu_ok": check(cpu)})
    return rows


def mfu(r: dict, params: int, peak_flops: float | None) -> float | None:
    if not peak_flops or not r.get("tokens_s"):
        return None
    return 6 * params * r["tokens_s"] / peak_flops


def fmt(x, f="{:.2f}", none="-"):
    return none if x is None else f.format(x)


def report(args: Args, sizes: list[Size], res: dict, info: dict, command: str) -> str:
    m, gpu = info["machine"], args.gpu
    device = f"GPU {m['gpu']}" if m["gpu"] else f"CPU only ({m['cores']} cores, OMP_NUM_THREADS={m['threads']})"
    peak = info.get("peak_flops")
    peak_what = (f"{peak / 1e12:.0f} TFLOP/s bf16 dense peak of this GPU" if peak else
                 "the device's peak (not reported on a CPU: a shared CPU has no fixed peak; see the speed probes)")
    L = ["# Benchmarks: our scripts vs TRL and the official WSPO formulation" if not gpu else "# GPU benchmark", "",
         f"Generated by `benchmarks/bench.py` on {time.strftime('%Y-%m-%d %H:%M', time.localtime(info['start']))}, total wall "
         f"time {info['wall'] / 60:.1f} min.", "", "```", command, "```", "",
         *(["**Smoke run (--quick)**: a tiny model and 2 steps; it shows that every configuration runs, not how fast.", ""]
           if args.quick else []),
         *(["**Dry run (--tiny)**: the GPU plan at a tiny size; the figures say nothing about speed.", ""] if args.tiny else []),
         "## Machine and setting", "",
         f"- Device: **{device}**; {m['cpu']}, {m['cores']} cores, {m['mem_gb']:.0f} GiB RAM. Code: commit {info['code']}.",
         f"- Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, datasets {m['datasets']}, "
         f"accelerate {m['accelerate']}, peft {m['peft']}, tyro {m['tyro']}.",
         "- Each configuration is one command line in its own process (table: its flags), one at a time; ours are the "
         "scripts, theirs `benchmarks/theirs.py` (TRL DPOTrainer / SFTTrainer with their defaults, the official WSPO step "
         "re-created). Same data files, same model folder, same batch, steps, max length and learning rate on both sides; "
         + ("bf16 autocast (accelerate mixed_precision=bf16) with fp32 weights on both sides."
            if info["bf16"] else "fp32 on both sides."),
         "- Throughput and peak memory are what each run wrote to its metrics.jsonl (SPEC 6: steady state = the mean of "
         "the logging windows after the first min(3, steps // 2) steps); pairs/s for dpo / wpo / wspo, conversations/s for SFT, tokens/s = "
         "non-padding tokens through the trained model. Peak memory: " + (
             "torch.cuda.max_memory_allocated (GB = 1e9 bytes); nvidia-smi's peak (this process samples it every 0.2 s: "
             "allocator cache and CUDA context included) next to it." if gpu else "peak RSS of the process (GB = 1e9 bytes)."),
         f"- MFU = 6 x parameters x tokens/s / {peak_what}. The attention term is not included (nor the reference or "
         "frozen models' forwards of TRL and the official step, nor checkpointing's recompute): it is the model-FLOPs "
         "share of the trained model alone.", ""]
    for size in sizes:
        p = info["params"][size.name]
        L += [f"## {size.name}: Qwen2 config, vocab {size.vocab}, hidden {size.hidden}, {size.layers} layers, "
              f"{size.heads} heads / {size.kv_heads} KV heads, intermediate {size.intermediate}", "",
              f"{p['strong'] / 1e6:.1f}M parameters (embedding {'tied' if size.tie_embeddings else 'untied'}); WSPO weak pair: the same "
              f"config with {size.weak_layers} layers ({p['weak_ref'] / 1e6:.1f}M parameters each, differently initialised). Batch "
              f"{size.batch_size} pairs / conversations, accumulation 1, {size.steps} steps, prompts of {size.prompt_len[0]}.."
              f"{size.prompt_len[1]} and responses of {size.response_len[0]}..{size.response_len[1]} tokens (uniform), max "
              f"length {size.max_length}; data: {info['files'][size.name]}.", "",
              "| run | flags | GC | examples/s | tokens/s | MFU | peak GB | nvidia-smi GB | steady steps / s | CPU s in window | process s | first loss | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in res.items():
            if not name.startswith(size.name + ":"):
                continue
            gc = r.get("args", {}).get("gradient_checkpointing", r.get("gc"))
            status = ("ok" if r.get("rc") == 0 else "timed out" if r.get("timed_out") else r.get("skipped") or f"exit {r.get('rc')}")
            if r.get("fallback"):
                status += " (peak: RSS seen from outside)"
            if r.get("same_as"):
                status = f"= {r['same_as'].split(':', 1)[1]} (same arguments)"
            L.append(f"| {name.split(':', 1)[1]} | {r.get('flags', '')} | {'-' if gc is None else 'on' if gc else 'off'} | "
                     f"{fmt(r.get('examples_s'))} | {fmt(r.get('tokens_s'), '{:.0f}')} | {fmt(mfu(r, p['strong'], peak), '{:.1%}')} | "
                     f"{fmt(r.get('peak_gb'))} | {fmt(r.get('smi_peak_gb'))} | "
                     f"{fmt(r.get('steady_steps'), '{:.0f}')} / {fmt(r.get('steady_s'), '{:.1f}')} | {fmt(r.get('window_cpu_s'), '{:.1f}')} | "
                     f"{fmt(r.get('wall_s'), '{:.0f}')} | "
                     f"{fmt(r.get('first_loss'), '{:.4f}')} | {status} |")
        cpu_col = not gpu
        L += ["", "| comparison (ours / theirs) | ours | theirs | ratio | target | verdict |" + (" CPU-time ratio | verdict |" if cpu_col else ""),
              "|---|---|---|---|---|---|" + ("---|---|" if cpu_col else "")]
        verdict = lambda ok, r: "not measured" if r is None else "" if ok is None else ("met" if ok else "**missed**")
        for row in ratio_rows(res, size.name, gpu):
            t = row["target"]
            L.append(f"| {row['what']} | {fmt(row.get('ours'))} | {fmt(row.get('theirs'))} | {fmt(row['ratio'], '{:.2f}x')} | "
                     f"{'-' if t is None else f'{t[0]} {t[1]}x'} | {verdict(row['ok'], row['ratio'])} |"
                     + (f" {fmt(row.get('cpu_ratio'), '{:.2f}x')} | {verdict(row.get('cpu_ok'), row.get('cpu_ratio')) if row.get('cpu_ratio') else ''} |"
                        if cpu_col else ""))
        if cpu_col:
            L += ["", "CPU-time ratio: the same ratio with each run's process CPU seconds (all threads) in its steady-state "
                  "window in place of wall seconds (read from /proc while the run writes its window rows): on a shared "
                  "machine, other jobs stretch wall time unevenly between runs, CPU time much less."]
        L.append("")
    L += ["Load on the machine (other jobs running when the load average exceeds the benchmark's own):", "", "```",
          "before: " + info["others_before"], "after:  " + info.get("others_after", "(unfinished)"), "```", ""]
    if "probe_before" in info:
        pb, pa = info["probe_before"], info.get("probe_after", {})
        L += [f"CPU speed probes (start / end): fp32 matmul {pb['matmul_gflops']:.0f} / {fmt(pa.get('matmul_gflops'), '{:.0f}')} "
              f"GFLOP/s; multiply into fresh memory {pb['fresh_elementwise_gbs']:.1f} / {fmt(pa.get('fresh_elementwise_gbs'), '{:.1f}')} GB/s.", ""]
    failed = [(n, r) for n, r in res.items() if r.get("error")]
    for n, r in failed:
        L += [f"### {n}: exit {r['rc']}", "", "```", r["error"].strip()[-1200:], "```", ""]
    return "\n".join(L)


def write_report(args, sizes, res, info, command, out):
    notes = ""
    if os.path.exists(out):  # hand-written text below the marker survives a rerun
        with open(out) as f:
            text = f.read()
        notes = text[text.index(NOTES):] if NOTES in text else ""
    with open(out, "w") as f:
        f.write(report(args, sizes, res, info, command) + "\n" + (notes or NOTES + "\n"))
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"info": info, "results": res}, f, indent=1, default=str)


def main():
    import tyro

    args = tyro.cli(Args)
    names = args.sizes or (("qwen2-0.5b",) if args.gpu else ("quick",) if args.quick else ("cpu",))
    sizes = []
    for n in names:
        if n not in SIZES:
            raise SystemExit(f"--sizes: choose from {sorted(SIZES)}")
        s = SIZES[n]
        s = replace(s, **TINY, name=s.name + "-tiny") if args.tiny else s
        sizes.append(replace(s, steps=args.steps) if args.steps else s)
    out = args.out or (os.path.join(ROOT, "docs", "benchmarks.md") if not (args.gpu or args.quick or args.tiny or args.only or args.steps)
                       else os.path.join(args.workdir, "benchmarks.md"))
    command = " ".join(([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else [])
                       + ["python benchmarks/bench.py"] + sys.argv[1:])
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(os.path.join(args.workdir, "logs"))
    start = time.time()
    bf16 = args.gpu
    info = {"start": start, "machine": machine(), "others_before": others(), "bf16": bf16, "params": {}, "files": {},
            "code": code_version()}
    print(f"[bench] {command}\n[bench] device: {info['machine']['gpu'] or info['machine']['cpu']}\n[bench] load: "
          f"{info['others_before'].splitlines()[0]}", flush=True)
    if args.gpu and not info["machine"]["gpu"] and not args.tiny:
        raise SystemExit("--gpu: no GPU found (nvidia-smi); use --gpu --tiny for a dry run on a CPU")
    if not info["machine"]["gpu"] and not args.quick and not args.tiny:
        info["probe_before"] = run_probe()
    # MFU only on a GPU: a shared CPU has no fixed peak (its probes are in the report instead)
    info["peak_flops"] = gpu_peak_flops(info["machine"]["gpu"]) if info["machine"]["gpu"] else None
    # bf16 autocast through accelerate for the scripts (theirs.py gets --bf16); fp32: "no", whatever the shell says
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "ACCELERATE_MIXED_PRECISION": "bf16" if bf16 else "no"}
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    res, durations = {}, []
    for size in sizes:
        t = time.time()
        folder = os.path.join(args.workdir, size.name)
        tok, words = build_tokenizer(size.vocab)
        info["files"][size.name] = ", ".join(os.path.basename(f) for f in write_data(size, tok, words, folder, args.seed,
                                                                                          2 if args.gpu else 1).values())
        files = {k: os.path.join(folder, f"{k}.jsonl") for k in ("pairs", "chat")}
        info["params"][size.name] = build_models(size, tok, os.path.join(folder, "models"), args.seed)
        print(f"[bench] {size.name}: models and data in {time.time() - t:.0f} s "
              f"({info['params'][size.name]['strong'] / 1e6:.1f}M parameters)", flush=True)
        runs = plan(args, size, os.path.join(folder, "models"), files, os.path.join(folder, "runs"), bf16)
        for run in runs:
            base = res.get(run.base) if run.base else None
            if base and not run.overrides:  # a defaults run after its variant: equal if the variant only set a default
                script = run.argv[1]
                same = bool(base.get("overrides")) and all(help_default(script, k) == v for k, v in base["overrides"].items())
            else:
                same = bool(base and base.get("args")) and all(base["args"].get(k) == v for k, v in run.overrides.items())
            if same:
                res[run.name] = {**base, "flags": run.flags, "same_as": run.base}
                continue
            elapsed = time.time() - start
            expect = max(durations) if durations else 0.0
            if args.budget_s is not None and elapsed + expect > args.budget_s:
                res[run.name] = {"flags": run.flags, "gc": run.gc, "skipped": "skipped (time budget)"}
                print(f"  {run.name:<36} skipped (time budget: {elapsed:.0f} s used, a run takes ~{expect:.0f} s)", flush=True)
                continue
            timeout = args.run_timeout_s if args.budget_s is None else max(10.0, min(args.run_timeout_s, args.budget_s - elapsed))
            r = execute(run, env, timeout, os.path.join(args.workdir, "logs"))
            r.update(flags=run.flags, gc=run.gc, overrides=run.overrides)
            res[run.name] = r
            durations.append(r["wall_s"])
            print(f"  {run.name:<36} {r['wall_s']:6.1f} s  rc {r['rc']}  examples/s {fmt(r.get('examples_s'))}  tokens/s "
                  f"{fmt(r.get('tokens_s'), '{:.0f}')}  peak {fmt(r.get('peak_gb'))} GB" + ("  (fallback)" if r.get("fallback") else "")
                  + ("  TIMED OUT" if r["timed_out"] else ""), flush=True)
            info["wall"] = time.time() - start
            write_report(args, sizes, res, info, command, out)  # after every run: a killed benchmark still leaves a report
    info["others_after"] = others()
    if "probe_before" in info:
        info["probe_after"] = run_probe()
    info["wall"] = time.time() - start
    write_report(args, sizes, res, info, command, out)
    print(f"[bench] wrote {out} ({info['wall'] / 60:.1f} min)")
    for size in sizes:
        for row in ratio_rows(res, size.name, args.gpu):
            if row["ratio"] is not None:
                t = row["target"]
                print(f"  {size.name}: {row['what']:<70} {row['ratio']:6.2f}x" + (
                    "" if t is None else f"  target {t[0]} {t[1]}x  {'met' if row['ok'] else 'MISSED'}")
                    + ("" if row.get("cpu_ratio") is None else f"  (CPU time {row['cpu_ratio']:.2f}x)"))
    failed = [n for n, r in res.items() if r.get("rc") not in (0, None)]
    if failed:
        print(f"[bench] failed runs: {', '.join(failed)} (logs in {args.workdir}/logs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
