"""Answers of trained models for the papers' chat benchmarks AlpacaEval 2, Arena-Hard (v0.1) and MT-Bench, in each
benchmark's own answer-file format (WSPO reports all three, WPO AlpacaEval 2 and MT-Bench). This script only
writes answers; judging (GPT-4-class API calls) is left to each benchmark's own tool.

For each model (a folder written by sft.py / dpo.py / wpo.py / wspo.py, or a hub id) and each prompt of the
benchmark, in the benchmark's order:
    conversation = [system prompt if --system_prompt] + [user turn 1]      (the model's chat template)
    answer_1     = model.generate(conversation)
    MT-Bench / multi-turn Arena-Hard: conversation += [assistant answer_1, user turn 2], answer_2 = ..., etc.
Batching: prompts of one temperature, longest first, --batch_size at a time, left-padded with positions counted
from each prompt's first token, so a greedy batched answer equals the prompt's answer alone (tested). Processes
take contiguous shares of each round (accelerate); answers are gathered and written in the benchmark's order.
Sampling is seeded by (--seed, process): reproducible for the same seed, processes, batch size and resume history.
Resumable: the answer file is rewritten after every round (temporary file, then renamed); --resume skips its
answered prompts if the settings saved next to it (FILE.args.json) are unchanged. Cut answers are counted in the log.

Answer files (`{output_dir}/{model_id}.json` or `.jsonl`; output_dir defaults to answers/BENCHMARK):
  alpaca_eval  a JSON list, in the eval set's order:
               {"instruction": str, "output": str, "generator": model_id, "dataset": the prompt's "dataset"}
  arena_hard   JSONL (Arena-Hard-Auto `model_answer/{model_id}.jsonl`): {"question_id", "answer_id", "model_id",
               "choices": [{"index": 0, "turns": [{"content", "token_len" (the model's tokens)}]}], "tstamp"}
  mt_bench     JSONL, one line per question (FastChat llm_judge `data/mt_bench/model_answer/{model_id}.jsonl`):
               {"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [str, str]}], "tstamp"}
answer_id hashes (model_id, question_id, seed): reruns and shardings write the same ids.

Prompt sets (--prompts): default the published hub set (BENCHMARKS below), or a local file in its schema
(alpaca_eval.json; Arena-Hard-Auto's question.jsonl; FastChat's mt_bench question.jsonl), or a folder holding
alpaca_eval.json / arena_hard.jsonl / mt_bench.jsonl (what `python -m tiny.prompts` writes).

Sampling defaults: each benchmark's own answer generator (BENCHMARKS, MT_BENCH_TEMPERATURE below); other decoding
(WSPO's Anthropic-HH comparison samples at T = 0.25, 0.7, 1.0) is --temperature, --top_p, --max_new_tokens.
top-k is off and these values override the model's generation_config.

Launch (GPU; bf16 weights on a GPU with --dtype auto):
    accelerate launch generate.py --benchmark alpaca_eval --model_name_or_path runs/qwen2-7b-wspo runs/qwen2-7b-dpo
    accelerate launch generate.py --benchmark mt_bench --model_name_or_path runs/llama3-8b-instruct-wpo-hb \
        --output_dir FastChat/fastchat/llm_judge/data/mt_bench/model_answer
Judge: each benchmark's own tool, not run here (commands: README, "Reproducing the paper tables").
Offline tiny setting (CPU; `python -m tiny --out data/tiny` writes prompts in the tiny language; no judge):
    python generate.py --preset tiny --benchmark mt_bench --model_name_or_path runs/tiny/wspo-strong
"""

import argparse
import glob
import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, fields
from difflib import get_close_matches
from typing import Literal, NoReturn
from urllib.parse import urlparse

import torch
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class Args:
    # models and benchmark
    model_name_or_path: tuple[str, ...] = ()
    """one or more model folders or hub ids; each gets its own answer file"""
    model_id: tuple[str, ...] = ()
    """the names written into the answer files (generator / model_id), one per model (default: each folder's name)"""
    benchmark: Literal["alpaca_eval", "arena_hard", "mt_bench"] = "alpaca_eval"
    """which benchmark's prompts and answer format"""
    prompts: str | None = None
    """hub dataset id, local file in the benchmark's schema, or a folder holding one (default: the published set)"""
    prompts_split: str = "train"
    """split of a hub / folder prompt dataset (the published MT-Bench and Arena-Hard sets have one, 'train')"""
    max_prompts: int | None = None
    """answer only the first N prompts (a quick check)"""
    system_prompt: str | None = None
    """a system message before every conversation (default: none; the chat template may add its own)"""
    config: str | None = None
    """YAML file of Args fields (settings kept as files are in recipes/); flags given on the command line override it"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # of the --config file, set after parsing (in FILE.args.json)
    preset: Literal["tiny"] | None = None
    """`tiny` = --config recipes/tiny/generate.yaml, the offline tiny setting (data/tiny/prompts)"""

    # model loading
    tokenizer_name: str | None = None
    """tokenizer hub id or path for every model (default: each model's own)"""
    chat_template: str | None = None
    """Jinja chat template, or a path to a .jinja file, for every model (for a tokenizer that ships none)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """weights' dtype; auto = bfloat16 on a GPU, float32 on the CPU"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, flash_attention_2"""

    # generation
    temperature: float | None = None
    """sampling temperature for every prompt; 0 = greedy (default: the benchmark's, see the header)"""
    top_p: float = 1.0
    """nucleus sampling: keep the smallest token set with this much probability (1.0 = off)"""
    max_new_tokens: int | None = None
    """longest answer per turn, in tokens (default: alpaca_eval 2048, arena_hard 4096, mt_bench 1024)"""
    batch_size: int = 16
    """prompts per generate call per process"""
    seed: int = 1
    """seed of the sampling"""

    # output
    output_dir: str | None = None
    """folder of the answer files, one per model (default: answers/BENCHMARK)"""
    resume: bool = False
    """continue an answer file: prompts already answered in it are skipped"""
    overwrite_output_dir: bool = False
    """replace existing answer files of these models"""
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this program (log prefix)"""


# the published prompt sets, the answer-file names and each benchmark's own generation defaults
BENCHMARKS = {
    "alpaca_eval": {"hub": "tatsu-lab/alpaca_eval", "hub_file": "alpaca_eval.json", "file": "alpaca_eval.json",
                    "temperature": 0.7, "max_new_tokens": 2048},
    "arena_hard": {"hub": "lmarena-ai/arena-hard-auto-v0.1", "hub_file": None, "file": "arena_hard.jsonl",
                   "temperature": 0.0, "max_new_tokens": 4096},
    "mt_bench": {"hub": "HuggingFaceH4/mt_bench_prompts", "hub_file": None, "file": "mt_bench.jsonl",
                 "temperature": None, "max_new_tokens": 1024},
}
# FastChat llm_judge common.py temperature_config; categories not listed sample at 0.7
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
# the generation settings an answer file depends on: --resume refuses to continue a file made with others
SETTINGS = ("model_name_or_path", "benchmark", "prompts", "prompts_split", "system_prompt", "tokenizer_name", "dtype",
            "temperature", "top_p", "max_new_tokens", "seed", "chat_template")


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
        fail("--preset tiny stands for --config recipes/tiny/generate.yaml: pass one of them")
    path = given.config or given.preset and f"{os.path.dirname(os.path.abspath(__file__))}/recipes/tiny/generate.yaml"
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = path and hashlib.sha256(open(path, "rb").read()).hexdigest()
    # filled in at runtime: the benchmark's defaults where a flag was left out
    args.output_dir = args.output_dir or os.path.join("answers", args.benchmark)
    args.max_new_tokens = args.max_new_tokens or BENCHMARKS[args.benchmark]["max_new_tokens"]
    args.model_id = args.model_id or tuple(os.path.basename(m.rstrip("/")) for m in args.model_name_or_path)
    validate(args)
    return args


def answer_file(args: Args, model_id: str) -> str:
    return os.path.join(args.output_dir, model_id + (".json" if args.benchmark == "alpaca_eval" else ".jsonl"))


def validate(args: Args) -> None:
    """Every argument error, before anything is loaded or written."""
    if not args.model_name_or_path:
        fail("pass --model_name_or_path with one or more model folders or hub ids")
    if len(args.model_id) != len(args.model_name_or_path):
        fail(f"--model_id names {len(args.model_id)} models but --model_name_or_path gives "
             f"{len(args.model_name_or_path)}; pass one id per model")
    if len(set(args.model_id)) != len(args.model_id):
        fail(f"two models would write the same answer file (model ids {list(args.model_id)}); pass distinct --model_id")
    for name in ("batch_size", "max_new_tokens", "max_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.temperature is not None and args.temperature < 0:
        fail(f"--temperature must be 0 (greedy) or above (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        fail(f"--top_p must be in (0, 1] (got {args.top_p})")
    if (args.chat_template or "").endswith(".jinja") and not os.path.isfile(args.chat_template):
        fail(f"--chat_template {args.chat_template}: no such file; pass a .jinja file or the template itself")
    if args.resume and args.overwrite_output_dir:
        fail("--resume continues the answer files and --overwrite_output_dir replaces them; pass one of them")
    if os.path.isfile(args.output_dir):
        fail(f"output_dir {args.output_dir} is a file; pass a folder as --output_dir")
    for model_id in args.model_id:
        path = answer_file(args, model_id)
        if os.path.exists(path) and not (args.resume or args.overwrite_output_dir):
            fail(f"the answer file {path} already exists; pass --resume to answer only the prompts it lacks, "
                 "--overwrite_output_dir to replace it, or another --output_dir / --model_id")


def check_hub(names: list[str | None]) -> None:
    """With the hub online and some name not a local path: fail fast (3 s) when the hub cannot be reached."""
    from huggingface_hub import constants

    remote = [n for n in names if n is not None and not os.path.exists(n)]
    if not remote or hub_offline():
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        fail(f"no network: cannot reach the Hugging Face Hub for '{remote[0]}'. Set HF_HUB_OFFLINE=1 to use the "
             "local cache, or pass a local path.")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


# prompts: each benchmark's schema -> {"key", "question_id", "turns", "category", "dataset"}, in file order
def read_rows(path: str) -> list[dict]:
    """A .json list or a .jsonl file; a bad line is reported by its 1-based number."""
    with open(path) as f:
        text = f.read()
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    fail(f"{path}, line {n}: not valid JSON ({e.msg}); fix or remove that line")
                if not isinstance(rows[-1], dict):
                    fail(f"{path}, line {n}: expected a JSON object (one prompt per line)")
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{path}, line {e.lineno}: not valid JSON ({e.msg})")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        fail(f"{path}: expected a JSON list of objects (AlpacaEval's alpaca_eval.json schema)")
    return rows


def load_prompt_rows(args: Args) -> tuple[list[dict], str]:
    """The raw prompt rows and where they came from."""
    spec, name = BENCHMARKS[args.benchmark], args.prompts
    if name is not None and os.path.isdir(name) and os.path.isfile(os.path.join(name, spec["file"])):
        name = os.path.join(name, spec["file"])
    if name is not None and os.path.isfile(name):
        if not name.endswith((".json", ".jsonl")):
            fail(f"cannot read prompt file {name}: use .json or .jsonl in the {args.benchmark} schema")
        return read_rows(name), name
    if name is not None and os.path.isdir(name):  # a folder's .jsonl files: a bad line named by file and line
        for file in sorted(glob.glob(os.path.join(glob.escape(name), "**", "*.jsonl"), recursive=True)):
            read_rows(file)
    name = name or spec["hub"]
    try:
        if name == spec["hub"] and spec["hub_file"] is not None:
            from huggingface_hub import hf_hub_download

            return read_rows(hf_hub_download(name, spec["hub_file"], repo_type="dataset")), f"{name}/{spec['hub_file']}"
        from datasets import load_dataset

        return list(load_dataset(name, split=args.prompts_split)), f"{name} ({args.prompts_split})"
    except Exception as e:  # not found, or a file that `datasets` cannot read (its error's cause says why)
        e = e.__cause__ or e
        where = "a folder whose files cannot be read as a dataset" if os.path.isdir(name) else \
            "no such local file or folder, and not a hub dataset" + (" in the local cache" if hub_offline() else "")
        fail(f"could not load the prompts '{name}': {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def normalize(rows: list[dict], benchmark: str, source: str) -> list[dict]:
    """One record per prompt: `key` (what resume matches on), `question_id`, `turns` (user messages), `category`,
    `dataset`. A row missing its benchmark's fields is reported by its position."""
    out = []
    for k, row in enumerate(rows):
        if benchmark == "alpaca_eval":
            turns, qid = [row.get("instruction")], k
        elif benchmark == "arena_hard":
            turns = [t.get("content") if isinstance(t, dict) else None for t in row.get("turns") or [None]]
            qid = row.get("question_id")
        else:  # FastChat's question.jsonl (question_id, turns) or HuggingFaceH4/mt_bench_prompts (prompt_id, prompt)
            turns, qid = row.get("turns", row.get("prompt")), row.get("question_id", row.get("prompt_id"))
        usable = isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)
        if not usable or qid is None:
            need = {"alpaca_eval": '"instruction" (a string)',
                    "arena_hard": '"question_id" and "turns" (a list of {"content": string})',
                    "mt_bench": '"question_id" and "turns" (a list of strings), or "prompt_id" and "prompt"'}[benchmark]
            fail(f"{source}: prompt {k + 1} (1-based, in file order) lacks {need}; it is not in the {benchmark} schema")
        out.append({"key": turns[0] if benchmark == "alpaca_eval" else qid, "question_id": qid, "turns": turns,
                    "category": row.get("category"), "dataset": row.get("dataset", "")})
    keys = [r["key"] for r in out]
    if len(set(map(json.dumps, keys))) != len(keys):
        what = "instruction" if benchmark == "alpaca_eval" else "question_id"
        fail(f"{source}: two prompts share one {what}; answer files are matched to prompts by it")
    return out


def temperature_of(prompt: dict, args: Args) -> float:
    """--temperature, else the benchmark's default (MT-Bench: by category, as FastChat)."""
    if args.temperature is not None:
        return args.temperature
    if args.benchmark == "mt_bench":
        return MT_BENCH_TEMPERATURE.get(prompt["category"], 0.7)
    return BENCHMARKS[args.benchmark]["temperature"]


# answer files
def answer_record(prompt: dict, answer: dict, model_id: str, args: Args) -> dict:
    """One answer in the benchmark's own schema (see the header)."""
    if args.benchmark == "alpaca_eval":
        return {"instruction": prompt["turns"][0], "output": answer["turns"][0], "generator": model_id,
                "dataset": prompt["dataset"]}
    answer_id = hashlib.sha256(f"{model_id}|{prompt['question_id']}|{args.seed}".encode()).hexdigest()[:22]
    turns = answer["turns"]
    if args.benchmark == "arena_hard":
        turns = [{"content": text, "token_len": n} for text, n in zip(answer["turns"], answer["token_lens"])]
    return {"question_id": prompt["question_id"], "answer_id": answer_id, "model_id": model_id,
            "choices": [{"index": 0, "turns": turns}], "tstamp": answer["tstamp"]}


def read_answers(path: str, prompts: list[dict], args: Args) -> dict:
    """The records of an existing answer file, by prompt key (only those of prompts in this prompt set)."""
    rows = read_rows(path)
    field = "instruction" if args.benchmark == "alpaca_eval" else "question_id"
    keys = {json.dumps(p["key"]) for p in prompts}
    if any(field not in r for r in rows):
        fail(f"{path} is not a {args.benchmark} answer file (a record lacks {field!r}); pass --overwrite_output_dir "
             "to replace it or another --output_dir")
    return {json.dumps(r[field]): r for r in rows if json.dumps(r[field]) in keys}


def write_answers(path: str, prompts: list[dict], records: dict, args: Args) -> None:
    """The whole file, in the prompt set's order, through a temporary file: never half-written."""
    ordered = [records[json.dumps(p["key"])] for p in prompts if json.dumps(p["key"]) in records]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if args.benchmark == "alpaca_eval":
            json.dump(ordered, f, indent=2, ensure_ascii=False)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
    os.replace(tmp, path)


# generation
def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@torch.no_grad()
def generate_batch(model, tokenizer, convs: list[list[dict]], temperature: float, args: Args) -> list[tuple]:
    """(answer text, answer tokens, stopped at max_new_tokens) per conversation, from one left-padded generate."""
    ids = [chat_ids(tokenizer, c, add_generation_prompt=True) for c in convs]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    eos = model.generation_config.eos_token_id
    eos = sorted({tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])})
    # greedy at temperature 0 (FastChat: below 1e-4); sampling overrides the model's own generation_config
    sampling = dict(do_sample=True, temperature=temperature, top_p=args.top_p, top_k=0) if temperature >= 1e-4 else \
        dict(do_sample=False, temperature=None, top_p=None)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **sampling)
    answers = []
    for row in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        tokens = row if stop is None else row[:stop]
        answers.append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens), stop is None))
    return answers


def answer_prompts(model, tokenizer, prompts: list[dict], temperature: float, args: Args) -> list[dict]:
    """Every turn of every prompt: turn t's conversation holds the earlier turns and the model's own answers."""
    system = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    history = [list(system) for _ in prompts]
    answers = [{"key": p["key"], "turns": [], "token_lens": [], "cut": 0} for p in prompts]
    for t in range(max(len(p["turns"]) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if t < len(p["turns"])]
        convs = [history[i] + [{"role": "user", "content": prompts[i]["turns"][t]}] for i in active]
        results = generate_batch(model, tokenizer, convs, temperature, args)
        for i, conv, (text, n_tokens, cut) in zip(active, convs, results):
            history[i] = conv + [{"role": "assistant", "content": text}]
            answers[i]["turns"].append(text)
            answers[i]["token_lens"].append(n_tokens)
            answers[i]["cut"] += cut
    for a in answers:
        a["tstamp"] = time.time()
    return answers


def load_model(name: str, args: Args, device):
    """The model and its tokenizer by folder or hub id; a bad name is a user error naming it."""
    auto = "bfloat16" if torch.cuda.is_available() else "float32"
    dtype = getattr(torch, auto if args.dtype == "auto" else args.dtype)
    tok_name = args.tokenizer_name or name
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_name, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=args.trust_remote_code,
                                                     attn_implementation=args.attn_implementation)
    except (OSError, ValueError) as e:
        held = os.listdir(name) if os.path.isdir(name) else None  # a folder: empty, a checkpoint, or what failed
        where = ("no such local folder" + (", and not a hub id in the local cache (HF_HUB_OFFLINE is set)"
                                           if hub_offline() else " and not a hub id") if held is None else
                 "an empty folder; pass one holding a saved model" if not held else "a training checkpoint "
                 "(optimizer state), not a saved model; pass the run's output folder" if "optimizer.bin" in held
                 else "a folder that transformers cannot load")
        fail(f"could not load model '{name}': {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if template := args.chat_template:  # for a base tokenizer
        tokenizer.chat_template = open(template).read() if template.endswith(".jinja") else template
    if tokenizer.chat_template is None:
        fail(f"the tokenizer of '{tok_name}' has no chat template; the benchmarks judge chat answers: pass "
             "--chat_template (a Jinja string or a .jinja file), or --tokenizer_name with one that has a template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer, dtype


if __name__ == "__main__":
    args = parse_args()
    check_hub([*args.model_name_or_path, args.tokenizer_name, args.prompts or BENCHMARKS[args.benchmark]["hub"]])
    # TRY NOT TO MODIFY: accelerator and logging
    accelerator = Accelerator()
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    rows, source = load_prompt_rows(args)
    prompts = normalize(rows, args.benchmark, source)[: args.max_prompts]
    if not prompts:
        fail(f"{source} holds no prompt")
    log(f"{args.benchmark}: {len(prompts)} prompts from {source}; {accelerator.num_processes} process(es), "
        f"batch {args.batch_size} per process, at most {args.max_new_tokens} new tokens per turn")

    for name, model_id in zip(args.model_name_or_path, args.model_id):
        path = answer_file(args, model_id)
        settings = {k: getattr(args, k) for k in SETTINGS} | {"model_name_or_path": name, "model_id": model_id}
        records = {}
        if args.resume and os.path.exists(path):
            if not os.path.exists(path + ".args.json"):
                fail(f"--resume: {path} has no {os.path.basename(path)}.args.json (its settings), so it cannot be "
                     "checked; pass --overwrite_output_dir to start it afresh, or another --output_dir")
            saved = json.load(open(path + ".args.json"))
            changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
            if changed:
                fail(f"--resume: {path} was written with other settings ({'; '.join(changed)}); pass the same "
                     "settings, --overwrite_output_dir to start it afresh, or another --output_dir")
            records = read_answers(path, prompts, args)
        model, tokenizer, dtype = load_model(name, args, accelerator.device)
        set_seed(args.seed, device_specific=True)
        todo = [p for p in prompts if json.dumps(p["key"]) not in records]
        log(f"{model_id} ({name}, {dtype}): {len(prompts) - len(todo)} prompts already answered in {path}, "
            f"{len(todo)} to answer")
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            if not records and os.path.exists(path):  # --overwrite_output_dir: no old answer outlives its settings
                os.remove(path)
            with open(path + ".args.json", "w") as f:
                json.dump(settings | {"config": args.config, "config_sha256": args.config_sha256}, f, indent=2)

        # rounds of batch_size x processes prompts of one temperature, longest prompts first
        groups = {}
        for p in todo:
            groups.setdefault(temperature_of(p, args), []).append(p)
        rounds, size = [], args.batch_size * accelerator.num_processes
        for temperature, group in sorted(groups.items()):
            group.sort(key=lambda p: -len(chat_ids(tokenizer, [{"role": "user", "content": p["turns"][0]}], True)))
            rounds += [(temperature, group[i : i + size]) for i in range(0, len(group), size)]
        n_turns = n_cut = 0
        bar = tqdm(total=len(todo), desc=model_id, disable=not accelerator.is_local_main_process)
        for temperature, batch in rounds:
            with accelerator.split_between_processes(batch) as mine:
                answers = answer_prompts(model, tokenizer, mine, temperature, args) if mine else []
            answers = gather_object(answers)
            n_turns += sum(len(a["turns"]) for a in answers)
            n_cut += sum(a["cut"] for a in answers)
            by_key = {json.dumps(p["key"]): p for p in batch}
            for a in answers:
                records[json.dumps(a["key"])] = answer_record(by_key[json.dumps(a["key"])], a, model_id, args)
            if accelerator.is_main_process:
                write_answers(path, prompts, records, args)
            bar.update(len(batch))
        bar.close()
        if accelerator.is_main_process and not todo:
            write_answers(path, prompts, records, args)
        log(f"{model_id}: wrote {len(records)} answers to {path}; {n_cut} of {n_turns} answer turns generated now "
            f"stopped at --max_new_tokens {args.max_new_tokens} without an end-of-turn token (cut)")
        del model
        accelerator.wait_for_everyone()
    accelerator.end_training()
