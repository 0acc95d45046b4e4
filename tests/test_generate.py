"""generate.py: each benchmark's answer file (schema, order), batched left-padded greedy answers equal to
one-prompt-at-a-time `model.generate`, two processes equal to one, resume, the cut count, and the user errors.
Prompts: the tiny prompt files (tiny/prompts.py); model: the tiny preset after 60 SFT steps (it answers in the
tiny language and ends its turns)."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, load_script, run_script, not_a_model_folders

gen = load_script("generate")
TINY = tyro.cli(gen.Args, args=gen.read_config(str(ROOT / "recipes/tiny/generate.yaml")) + ["--preset", "tiny"],
                use_underscores=True)  # the Args of --preset tiny, before parse_args fills in the benchmark's defaults
FIELDS = {"arena_hard": ["question_id", "answer_id", "model_id", "choices", "tstamp"],
          "mt_bench": ["question_id", "answer_id", "model_id", "choices", "tstamp"]}


@pytest.fixture(scope="module")
def prompts(tiny, tmp_path_factory):
    from tiny.prompts import write_prompts

    return write_prompts(tmp_path_factory.mktemp("prompts"))


def generate(benchmark, prompts, models, out, *extra, check=True):
    return run_script("generate.py", "--preset", "tiny", "--benchmark", benchmark, "--prompts", str(prompts),
                      "--model_name_or_path", *map(str, models), "--output_dir", str(out), "--temperature", "0", *extra,
                      check=check)


def read(path):
    return json.load(open(path)) if str(path).endswith(".json") else [json.loads(line) for line in open(path)]


def without_tstamp(rows):
    return [{k: v for k, v in r.items() if k != "tstamp"} for r in rows]


@torch.no_grad()
def greedy_alone(model, tok, conv, max_new_tokens=24):
    """The reference: one conversation, no padding, plain greedy model.generate."""
    ids = torch.tensor([gen.chat_ids(tok, conv, add_generation_prompt=True)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
    return tok.decode(out, skip_special_tokens=True).strip(), len(out)


# ---------------------------------------------------------------------------------------------
# answer files
# ---------------------------------------------------------------------------------------------
def test_answer_files_schema_order_and_greedy_answers(prompts, tiny_sft, small_sft, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_sft).eval()
    tok = AutoTokenizer.from_pretrained(tiny_sft)

    # alpaca_eval, two models: one JSON list each, the eval set's order, the four fields
    p = generate("alpaca_eval", prompts, [tiny_sft, small_sft], tmp_path, "--model_id", "tiny-sft", "tiny-small")
    assert "alpaca_eval: 40 prompts from" in p.stdout and "tiny-sft: wrote 40 answers" in p.stdout
    src = json.load(open(prompts / "alpaca_eval.json"))
    for model_id in ("tiny-sft", "tiny-small"):
        rows = read(tmp_path / f"{model_id}.json")
        assert [r["instruction"] for r in rows] == [s["instruction"] for s in src]
        assert all(list(r) == ["instruction", "output", "generator", "dataset"] for r in rows)
        assert {r["generator"] for r in rows} == {model_id} and {r["dataset"] for r in rows} == {"tiny"}
    rows = read(tmp_path / "tiny-sft.json")
    # batched, left-padded, length-sorted answers are exactly the one-prompt-at-a-time greedy answers
    assert [r["output"] for r in rows] == [greedy_alone(model, tok, [{"role": "user", "content": s["instruction"]}])[0]
                                           for s in src]
    assert "0 of 40 answer turns generated now stopped at --max_new_tokens 24" in p.stdout  # each ended its turn
    assert len({r["output"] for r in rows}) >= 5  # answers differ from prompt to prompt: the equality means something

    # arena_hard: one JSONL line per question, Arena-Hard-Auto's model_answer schema, token_len = the answer's tokens
    generate("arena_hard", prompts, [tiny_sft], tmp_path, "--model_id", "tiny-sft")
    src = [json.loads(line) for line in open(prompts / "arena_hard.jsonl")]
    rows = read(tmp_path / "tiny-sft.jsonl")
    assert [r["question_id"] for r in rows] == [s["question_id"] for s in src]
    for r, s in zip(rows, src):
        assert list(r) == FIELDS["arena_hard"] and r["model_id"] == "tiny-sft" and len(r["answer_id"]) == 22
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0 and len(r["choices"][0]["turns"]) == 1
        text, n = greedy_alone(model, tok, [{"role": "user", "content": s["turns"][0]["content"]}])
        assert r["choices"][0]["turns"][0] == {"content": text, "token_len": n}

    # mt_bench: two turns per question (FastChat's model_answer schema); turn 2 sees turn 1's own answer
    out = tmp_path / "mt"
    generate("mt_bench", prompts, [tiny_sft], out, "--model_id", "tiny-sft")
    src = [json.loads(line) for line in open(prompts / "mt_bench.jsonl")]
    rows = read(out / "tiny-sft.jsonl")
    assert [r["question_id"] for r in rows] == list(range(81, 97)) == [s["question_id"] for s in src]
    for r, s in zip(rows, src):
        assert list(r) == FIELDS["mt_bench"] and r["choices"][0]["index"] == 0
        first, second = r["choices"][0]["turns"]
        conv = [{"role": "user", "content": s["turns"][0]}]
        assert first == greedy_alone(model, tok, conv)[0]
        conv += [{"role": "assistant", "content": first}, {"role": "user", "content": s["turns"][1]}]
        assert second == greedy_alone(model, tok, conv)[0]
    saved = json.load(open(out / "tiny-sft.jsonl.args.json"))
    assert saved["temperature"] == 0.0 and saved["max_new_tokens"] == 24
    assert saved["model_name_or_path"] == str(tiny_sft) and saved["model_id"] == "tiny-sft"


def test_batched_generation_equals_one_at_a_time(prompts, tiny_sft):
    """In-process: a batch of prompts of different lengths (left padding up to 6 tokens) gives each prompt's answer
    alone, for a batch size that splits them unevenly."""
    model = AutoModelForCausalLM.from_pretrained(tiny_sft).eval()
    tok = AutoTokenizer.from_pretrained(tiny_sft)
    args = dataclasses.replace(TINY, temperature=0.0, max_new_tokens=24)
    convs = [[{"role": "user", "content": s["instruction"]}] for s in json.load(open(prompts / "alpaca_eval.json"))]
    widths = [len(gen.chat_ids(tok, c, add_generation_prompt=True)) for c in convs]
    assert max(widths) - min(widths) >= 5
    alone = [greedy_alone(model, tok, c) for c in convs]
    for size in (40, 7):
        batched = [a for i in range(0, len(convs), size)
                   for a in gen.generate_batch(model, tok, convs[i : i + size], 0.0, args)]
        assert [(text, n) for text, n, _ in batched] == alone
        assert not any(cut for _, _, cut in batched)


def test_two_processes_equal_one(prompts, tiny_sft, tmp_path):
    """torchrun, 2 CPU processes (gloo): rounds of 2 x 3 prompts, the last one uneven; same file as one process."""
    generate("mt_bench", prompts, [tiny_sft], tmp_path / "one", "--batch_size", "3")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
           "generate.py", "--preset", "tiny", "--benchmark", "mt_bench", "--prompts", str(prompts),
           "--model_name_or_path", str(tiny_sft), "--output_dir", str(tmp_path / "two"), "--temperature", "0",
           "--batch_size", "3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 process(es), batch 3 per process" in p.stdout and p.stdout.count("wrote 16 answers") == 1  # rank 0 logs
    one, two = read(tmp_path / "one" / "sft.jsonl"), read(tmp_path / "two" / "sft.jsonl")
    assert len(one) == 16 and without_tstamp(one) == without_tstamp(two)


# ---------------------------------------------------------------------------------------------
# resume and the token limit
# ---------------------------------------------------------------------------------------------
def test_resume_skips_answers_already_written(prompts, tiny_sft, tmp_path):
    generate("alpaca_eval", prompts, [tiny_sft], tmp_path, "--max_prompts", "10")
    path = tmp_path / "sft.json"
    rows = read(path)
    assert len(rows) == 10
    rows[3]["output"] = "an answer written earlier"  # a resumed run must keep it, not regenerate it
    json.dump(rows, open(path, "w"))

    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path, check=False)  # no --resume: refused, file untouched
    assert p.returncode == 2 and f"error: the answer file {path} already exists; pass --resume" in p.stderr
    assert read(path) == rows
    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path, "--resume", "--max_new_tokens", "12", check=False)
    assert p.returncode == 2 and "--resume: " in p.stderr and "max_new_tokens: 24 -> 12" in p.stderr

    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path, "--resume")
    assert "10 prompts already answered" in p.stdout and "30 to answer" in p.stdout and "wrote 40 answers" in p.stdout
    resumed = read(path)
    src = json.load(open(prompts / "alpaca_eval.json"))
    assert [r["instruction"] for r in resumed] == [s["instruction"] for s in src] and resumed[:10] == rows
    assert resumed[3]["output"] == "an answer written earlier"
    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path / "fresh")
    assert read(tmp_path / "fresh" / "sft.json")[10:] == resumed[10:]  # the rest as one uninterrupted run writes it

    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path, "--resume")  # complete: nothing left to answer
    assert "40 prompts already answered" in p.stdout and "0 to answer" in p.stdout and read(path) == resumed

    os.remove(str(path) + ".args.json")  # settings unknown: resume refuses; --overwrite_output_dir starts afresh
    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path, "--resume", check=False)
    assert p.returncode == 2 and f"error: --resume: {path} has no sft.json.args.json" in p.stderr
    generate("alpaca_eval", prompts, [tiny_sft], tmp_path, "--overwrite_output_dir", "--max_prompts", "5")
    assert read(path) == read(tmp_path / "fresh" / "sft.json")[:5] and os.path.exists(str(path) + ".args.json")


def test_answers_cut_at_the_token_limit_are_counted(prompts, tiny_sft, tmp_path):
    p = generate("arena_hard", prompts, [tiny_sft], tmp_path, "--max_new_tokens", "3")
    assert "24 of 24 answer turns generated now stopped at --max_new_tokens 3 without an end-of-turn token" in p.stdout
    assert {r["choices"][0]["turns"][0]["token_len"] for r in read(tmp_path / "sft.jsonl")} == {3}


# ---------------------------------------------------------------------------------------------
# user errors: exit code 2, one message, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(model_name_or_path=()), "pass --model_name_or_path with one or more model folders or hub ids"),
    (dict(model_id=("a",)), "--model_id names 1 models but --model_name_or_path gives 2"),
    (dict(model_id=("a", "a")), "two models would write the same answer file (model ids ['a', 'a'])"),
    (dict(temperature=-0.5), "--temperature must be 0 (greedy) or above (got -0.5)"),
    (dict(top_p=0.0), "--top_p must be in (0, 1] (got 0.0)"),
    (dict(batch_size=0), "--batch_size must be at least 1 (got 0)"),
    (dict(max_new_tokens=0), "--max_new_tokens must be at least 1 (got 0)"),
    (dict(resume=True, overwrite_output_dir=True), "--resume continues the answer files and --overwrite_output_dir"),
])
def test_argument_errors_exit_2(change, message, capsys, tmp_path):
    valid = dict(model_name_or_path=("m1", "m2"), model_id=("m1", "m2"), output_dir=str(tmp_path), max_new_tokens=24)
    args = dataclasses.replace(TINY, **{**valid, **change})
    with pytest.raises(SystemExit) as e:
        gen.validate(args)
    assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_bad_prompts_and_models_exit_2(prompts, tiny_sft, tmp_path):
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps({"question_id": 1, "turns": ["sort one two", "copy three"]}) + "\n{oops\n")
    wrong_schema = tmp_path / "arena.jsonl"
    wrong_schema.write_text(json.dumps({"question_id": "q1", "turns": ["a plain string, not {content}"]}) + "\n")
    cases = [
        ("mt_bench", ["--prompts", str(bad_line)], f"{bad_line}, line 2: not valid JSON"),
        ("arena_hard", ["--prompts", str(wrong_schema)], f"{wrong_schema}: prompt 1 (1-based, in file order) lacks "
                                                         '"question_id" and "turns" (a list of {"content": string})'),
        ("alpaca_eval", ["--prompts", str(tmp_path / "none.json")],
         f"could not load the prompts '{tmp_path / 'none.json'}'"),
        ("alpaca_eval", ["--model_name_or_path", str(tmp_path / "no_model")],
         f"could not load model '{tmp_path / 'no_model'}': no such local folder"),
    ]
    folder = tmp_path / "prompt_folder"  # a --prompts folder holding a broken file (issue 26 case 12)
    folder.mkdir()
    (folder / "questions.jsonl").write_text(bad_line.read_text())
    empty, checkpoint = not_a_model_folders(tmp_path)  # issue 26 case 15: folders that exist
    cases += [
        ("mt_bench", ["--prompts", str(folder)], f"{folder / 'questions.jsonl'}, line 2: not valid JSON"),
        ("alpaca_eval", ["--model_name_or_path", str(empty)],
         f"could not load model '{empty}': an empty folder; pass one holding a saved model"),
        ("alpaca_eval", ["--model_name_or_path", str(checkpoint)], f"could not load model '{checkpoint}': a training "
         "checkpoint (optimizer state), not a saved model; pass the run's output folder"),
    ]
    duplicate = tmp_path / "mt.jsonl"
    duplicate.write_text("".join(json.dumps({"question_id": 81, "category": "math", "turns": [t]}) + "\n"
                                 for t in ("sort one two", "copy three")))
    no_template = tmp_path / "no_template"
    tok = AutoTokenizer.from_pretrained(tiny_sft)
    tok.chat_template = None
    tok.save_pretrained(no_template)
    cases += [
        ("mt_bench", ["--prompts", str(duplicate)], f"{duplicate}: two prompts share one question_id"),
        ("alpaca_eval", ["--tokenizer_name", str(no_template)],
         f"the tokenizer of '{no_template}' has no chat template"),
    ]
    for benchmark, extra, message in cases:
        p = generate(benchmark, prompts, [tiny_sft], tmp_path / "out", *extra, check=False)
        assert p.returncode == 2 and f"error: {message}" in p.stderr and "Traceback" not in p.stderr, (extra, p.stderr)
        assert not (tmp_path / "out").exists()


def test_no_network_fails_fast_with_the_fix(prompts, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a closed loopback port: refused at once
    cmd = [sys.executable, "generate.py", "--benchmark", "mt_bench", "--model_name_or_path", "some-org/some-model",
           "--output_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and not (tmp_path / "out").exists()
    assert ("error: no network: cannot reach the Hugging Face Hub for 'some-org/some-model'. Set HF_HUB_OFFLINE=1 "
            "to use the local cache, or pass a local path.") in p.stderr


def test_tiny_prompt_files_are_deterministic(tmp_path):
    from tiny.prompts import write_prompts

    a, b = write_prompts(tmp_path / "a"), write_prompts(tmp_path / "b")
    for f in ("alpaca_eval.json", "arena_hard.jsonl", "mt_bench.jsonl"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    other = write_prompts(tmp_path / "c", seed=1)
    assert (other / "mt_bench.jsonl").read_bytes() != (a / "mt_bench.jsonl").read_bytes()


def test_help_documents_every_flag():
    p = run_script("generate.py", "--help")
    for f in dataclasses.fields(gen.Args):
        assert (f"--{f.name}" in p.stdout) == (f.name != "config_sha256"), f.name  # set after parsing: not a flag


def test_config_file_and_command_line_flags(monkeypatch, capsys, tmp_path):
    parse = lambda *argv: monkeypatch.setattr(sys, "argv", ["generate.py", *argv]) or gen.parse_args()
    tiny_file = str(ROOT / "recipes" / "tiny" / "generate.yaml")
    preset, config = parse("--preset", "tiny", "--model_name_or_path", "m"), parse("--config", tiny_file,
                                                                                   "--model_name_or_path", "m")
    assert preset == dataclasses.replace(config, preset="tiny") and config.max_new_tokens == 24
    assert config.config_sha256 == hashlib.sha256(open(tiny_file, "rb").read()).hexdigest()
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: [runs/a, runs/b]\nbenchmark: arena_hard\ntemperature: 0.0\n")
    args = parse("--config", str(recipe), "--benchmark", "mt_bench")
    assert args.model_name_or_path == ("runs/a", "runs/b") and args.model_id == ("a", "b")
    assert (args.benchmark, args.temperature, args.max_new_tokens) == ("mt_bench", 0.0, 1024)  # the flag won
    recipe.write_text("benchmarks: mt_bench\n")
    with pytest.raises(SystemExit) as e:
        parse("--config", str(recipe))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: --config {recipe}: unknown key 'benchmarks' (did you mean 'benchmark'?)\n"


def test_base_tokenizer_answers_with_chat_template(prompts, tiny_sft, tmp_path):
    """A tokenizer without a chat template is refused with the fix; --chat_template (a Jinja string here) gives the
    answers of the model's own tokenizer, and is a setting of the answer file that --resume checks."""
    tok = AutoTokenizer.from_pretrained(tiny_sft)
    template, tok.chat_template = tok.chat_template, None
    tok.save_pretrained(tmp_path / "base_tokenizer")
    base = ("--tokenizer_name", str(tmp_path / "base_tokenizer"), "--max_prompts", "4")
    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path / "out", *base, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "out").exists()
    assert "has no chat template; the benchmarks judge chat answers: pass --chat_template (a Jinja string" in p.stderr
    generate("alpaca_eval", prompts, [tiny_sft], tmp_path / "out", *base, "--chat_template", template)
    generate("alpaca_eval", prompts, [tiny_sft], tmp_path / "own", "--max_prompts", "4")
    answers = read(tmp_path / "out" / "sft.json")
    assert len(answers) == 4 and answers == read(tmp_path / "own" / "sft.json")
    saved = json.load(open(tmp_path / "out" / "sft.json.args.json"))
    tiny_file = ROOT / "recipes" / "tiny" / "generate.yaml"
    assert saved["chat_template"] == template and saved["config"] == str(tiny_file)
    assert saved["config_sha256"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    p = generate("alpaca_eval", prompts, [tiny_sft], tmp_path / "out", *base, "--chat_template", template + " ",
                 "--resume", check=False)
    assert p.returncode == 2 and "was written with other settings (chat_template: " in p.stderr
