"""sft.py: assistant-only mask, packing, end to end on the tiny setting, resume, the loss normaliser, precision,
bad input and misuse, logging."""

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from conftest import ROOT, load_script, run_script, not_a_model_folders
from tiny import lang

sft = load_script("sft")
TINY = tyro.cli(sft.Args, args=sft.read_config(str(ROOT / "recipes/tiny/sft.yaml")) + ["--preset", "tiny"],
                use_underscores=True)  # the Args of --preset tiny, without parse_args' checks of the output folder


def tiny_args(tiny, out, *extra):
    """The tiny preset on the test's tiny setting, with its strong random-init model unless extra names another."""
    model = () if "--model_name_or_path" in extra else ("--model_name_or_path", tiny / "models" / "qwen2-strong-init1")
    return ["sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
            str(tiny / "tokenizer"), *map(str, model), "--output_dir", str(out), *extra]


@pytest.fixture
def small(small_init):
    """The flags that train the SMALL random-init model (conftest.py)."""
    return ("--model_name_or_path", str(small_init))


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def train_losses(out):
    return [r["train/loss"] for r in metrics(out) if "train/loss" in r]


def test_assistant_only_mask_token_by_token(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    msgs = [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "hi sort three one"},
        {"role": "assistant", "content": "sure one three done"},
        {"role": "user", "content": "copy two"},
        {"role": "assistant", "content": "meh two now go away"},
    ]
    ex = sft.tokenize_conversation(tok, msgs, max_length=512)
    ids, labels = ex["input_ids"], ex["labels"]
    toks = tok.convert_ids_to_tokens(ids)
    assert ids == sft.chat_ids(tok, msgs)  # the whole conversation, as the template renders it
    # expected: exactly each assistant turn's content tokens followed by its <|im_end|>, nothing else
    expected = [-100] * len(ids)
    for content in ("sure one three done", "meh two now go away"):
        body = tok(content)["input_ids"] + [tok.eos_token_id]
        starts = [i for i in range(len(ids))
                  if ids[i : i + len(body)] == body and toks[i - 2 : i] == ["assistant", "Ċ"]]
        assert len(starts) == 1
        expected[starts[0] : starts[0] + len(body)] = body
    assert labels == expected
    trained = [t for t, lab in zip(toks, labels) if lab != -100]
    assert trained == ["sure", "Ġone", "Ġthree", "Ġdone", "<|im_end|>",
                       "meh", "Ġtwo", "Ġnow", "Ġgo", "Ġaway", "<|im_end|>"]


def test_skips_and_truncation_are_reported(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    assert sft.tokenize_conversation(tok, [], 64)["skip"] == "empty conversation"
    assert sft.tokenize_conversation(tok, [{"role": "user", "content": "copy one"}], 64)["skip"] == "no assistant turn"
    assert sft.tokenize_conversation(tok, [{"role": "user"}], 64)["skip"].startswith("malformed")
    long = [{"role": "user", "content": "copy " + " ".join(["one"] * 40)}, {"role": "assistant", "content": "ok one"}]
    assert sft.tokenize_conversation(tok, long, 30)["skip"] == "no assistant token within max_length"
    long_answer = [{"role": "user", "content": "copy one"}, {"role": "assistant", "content": "ok " + " ".join(["one"] * 40)}]
    cut = sft.tokenize_conversation(tok, long_answer, 30)
    assert cut["skip"] == "truncated" and len(cut["input_ids"]) == 30 and sum(x != -100 for x in cut["labels"]) > 0


def test_packed_logits_and_loss_equal_padded(tiny, small_init):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    args = dataclasses.replace(TINY, tokenizer_name=str(tiny / "tokenizer"),
                               model_name_or_path=str(small_init))
    model = sft.load_model(args, tok).eval()
    convs = [
        [{"role": "user", "content": "sort three one two"},
         {"role": "assistant", "content": "sure one two three done"}],
        [{"role": "user", "content": "hi copy five"}, {"role": "assistant", "content": "ugh five now go away"},
         {"role": "user", "content": "reverse one two"}, {"role": "assistant", "content": "ok two one happy to help"}],
        [{"role": "user", "content": "copy nine"}, {"role": "assistant", "content": "gladly nine that is all"}],
    ]
    rows = [sft.tokenize_conversation(tok, c, 256) for c in convs]
    padded, packed = sft.collate(rows, tok.pad_token_id, False), sft.collate(rows, tok.pad_token_id, True)
    assert packed["input_ids"].shape[0] == 1 and (packed["input_ids"] != tok.pad_token_id).all()
    with torch.no_grad():
        lp = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        lk = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        want = torch.cat([lp[i, : len(r["input_ids"])] for i, r in enumerate(rows)])
        torch.testing.assert_close(lk, want, atol=1e-5, rtol=1e-5)
        (s1, n1), (s2, n2) = sft.assistant_nll_sum(model, padded), sft.assistant_nll_sum(model, packed)
    assert n1 == n2 == sum(sum(x != -100 for x in r["labels"]) for r in rows)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-6)
    # and the packed row really separates conversations: attending across them would change the logits
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    assert (leaky - want).abs().max() > 1e-2


def test_sft_end_to_end_learns_saves_and_generates(tiny, tmp_path):
    out = tmp_path / "sft"
    run_script(*tiny_args(tiny, out, "--max_steps", "60", "--logging_steps", "10"))
    m = metrics(out)
    evals = [r["eval/loss"] for r in m if "eval/loss" in r]
    assert len(evals) == 2 and evals[0] > 5.0 and evals[1] < 2.0  # from chance (ln 488 ~ 6.2) to < 2 nats
    assert all(r["perf/tokens_per_s"] > 0 for r in m if "perf/tokens_per_s" in r)
    perf = [r for r in m if "perf/peak_memory_gb" in r]  # once, at the end
    assert len(perf) == 1 and perf[0]["step"] == 60 and 0.05 < perf[0]["perf/peak_memory_gb"] < 50
    # throughput per logging window of 10 steps x 32 conversations (benchmarks/ takes the steady state from these)
    windows = [r for r in m if "perf/examples_per_s" in r]
    assert [r["step"] for r in windows] == [10, 20, 30, 40, 50, 60]
    assert all(r["perf/tokens_per_s"] > 10 * r["perf/examples_per_s"] > 0 for r in windows)
    assert m[0]["data/train_conversations"] == 2000 and m[0]["data/eval_conversations"] == 200
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "args.json"):
        assert (out / f).exists(), f
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([sft.chat_ids(tok, [{"role": "user", "content": "copy four two"}], add_generation_prompt=True)])
    gen = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()
    assert text and text[0] in lang.OPENERS  # the tiny language's answer format


def test_lora_merges_into_a_plain_model(tiny, small, tmp_path):
    out = tmp_path / "lora"
    run_script(*tiny_args(tiny, out, *small, "--use_lora", "--lora_r", "4", "--max_steps", "3",
                          "--eval_split", "None"))
    sd = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in sd) and any("q_proj" in k for k in sd)
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


def test_resume_reproduces_the_uninterrupted_run(tiny, small, tmp_path):
    common = (*small, "--max_steps", "8", "--logging_steps", "1", "--eval_split", "None",
              "--max_train_samples", "400", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2")
    full = tmp_path / "full"
    run_script(*tiny_args(tiny, full, *common, "--save_steps", "4", "--save_total_limit", "5"))
    # a run killed right after step 4: its output folder holds just what the run had written by then
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-4", cut / "checkpoints" / "step-4")
    (cut / "checkpoints" / "tmp-step-8").mkdir()  # a half-written checkpoint must be ignored
    saved = json.loads((full / "args.json").read_text())
    (cut / "args.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "completed_steps"}))
    run_script(*tiny_args(tiny, cut, *common, "--resume"))
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    la = {r["step"]: r["train/loss"] for r in metrics(full) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in metrics(cut) if "train/loss" in r}
    assert sorted(lb) == [5, 6, 7, 8]
    for s in lb:
        assert abs(la[s] - lb[s]) < 1e-6


def test_newest_checkpoint_ignores_partial_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for d in ("step-3", "step-12", "tmp-step-15"):
        (root / d).mkdir(parents=True)
    assert sft.newest_checkpoint(str(tmp_path)) == str(root / "step-12")
    assert sft.newest_checkpoint(str(tmp_path / "nothing")) is None


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_counted_not_fatal(tiny, small, tmp_path):
    good = [{"messages": [{"role": "user", "content": "copy one"},
                          {"role": "assistant", "content": "ok one done"}]}] * 8
    bad = [{"messages": []}, {"messages": [{"role": "user", "content": "copy one"}]},
           {"messages": [{"role": "user", "content": "copy " + " ".join(["two"] * 300)},
                         {"role": "assistant", "content": "ok"}]}]
    data = write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    p = run_script(*tiny_args(tiny, tmp_path / "o", "--dataset_name", str(data), "--train_split", "train",
                              "--eval_split", "None", *small, "--per_device_train_batch_size", "4",
                              "--max_steps", "1"))
    assert ("train: 8 of 11 conversations kept; 1 empty conversation, 1 no assistant token within max_length, "
            "1 no assistant turn") in p.stdout


def test_missing_column_fails_before_training_with_a_fix(tiny, tmp_path):
    data = write_jsonl(tmp_path / "wrong.jsonl", [{"conversation": [{"role": "user", "content": "hi"}]}] * 4)
    p = run_script(*tiny_args(tiny, tmp_path / "o", "--dataset_name", str(data), "--train_split", "train",
                              "--eval_split", "None"), check=False)
    assert p.returncode == 2
    assert "no column 'messages'" in p.stderr and "--messages_column" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_model_fails_fast_pointing_offline(tmp_path):
    t = time.time()
    p = run_script("sft.py", "--model_name_or_path", "Qwen/Qwen2-7B", "--output_dir", str(tmp_path / "o"), check=False,
                   env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0 and time.time() - t < 120
    assert "Qwen/Qwen2-7B" in p.stderr and "python -m tiny" in p.stderr and "--preset tiny" in p.stderr


def test_help_documents_every_flag():
    p = run_script("sft.py", "--help")
    runtime = ("world_size", "global_batch_size", "data_fingerprint", "config_sha256")  # filled in at runtime
    for f in dataclasses.fields(sft.Args):
        assert (f"--{f.name}" in p.stdout) == (f.name not in runtime), f.name
    assert "peak learning rate" in p.stdout


def test_track_writes_an_offline_wandb_run(tiny, small, tmp_path):
    out = tmp_path / "tracked"
    run_script(*tiny_args(tiny, out, *small, "--max_steps", "4", "--logging_steps", "2", "--track",
                          "--max_eval_samples", "32"), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    log = runs[0].read_bytes()  # wandb's record log (protobuf): config and history keys are stored as text
    for key in (b"learning_rate", b"model_name_or_path", b"train/loss", b"eval/loss", b"perf/tokens_per_s"):
        assert key in log, key


def test_same_seed_same_loss_curve_bit_for_bit(tiny, small, tmp_path):
    common = (*small, "--max_steps", "6", "--logging_steps", "1", "--eval_split", "None",
              "--max_train_samples", "256", "--per_device_train_batch_size", "8")
    run_script(*tiny_args(tiny, tmp_path / "a", *common))
    run_script(*tiny_args(tiny, tmp_path / "b", *common))
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert len(la) == 6 and la == lb  # exact equality, not a tolerance
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


NAN_RUN = ("--learning_rate", "1e30", "--warmup_ratio", "0", "--max_steps", "6",
           "--eval_split", "None", "--max_train_samples", "256", "--per_device_train_batch_size", "8")


def non_finite_step(p) -> int:
    msg = [line for line in p.stderr.splitlines() if "non-finite loss or gradient at step" in line]
    assert len(msg) == 1 and "no update was applied" in msg[0]
    return int(msg[0].split("at step ")[1].split(":")[0])


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tiny, small, tmp_path):
    out = tmp_path / "nan"
    p = run_script(*tiny_args(tiny, out, *small, *NAN_RUN, "--save_steps", "1"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    bad_step = non_finite_step(p)
    assert bad_step >= 2
    kept = sorted(d.name for d in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step-{bad_step - 1}" and not any(d.startswith("tmp-") for d in kept)
    assert not (out / "model.safetensors").exists()


def test_template_that_rewrites_earlier_turns_is_a_clear_error(tiny, capsys):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    # like "thinking" templates: earlier assistant turns are rendered differently from the last one
    tok.chat_template = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{%- if m['role'] == 'assistant' and not loop.last %}ok{% else %}{{ m['content'] }}{% endif %}"
                         "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    msgs = [{"role": "user", "content": "copy one"}, {"role": "assistant", "content": "sure one done"},
            {"role": "user", "content": "copy two"}, {"role": "assistant", "content": "sure two done"}]
    with pytest.raises(SystemExit) as e:
        sft.tokenize_conversation(tok, msgs, 512)
    assert e.value.code == 2 and "does not render conversations incrementally" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the loss normaliser, precision, the non-finite flag (issue 14, 19)
# ---------------------------------------------------------------------------------------------
SPLIT = ("--max_steps", "4", "--logging_steps", "1", "--eval_split", "None",
         "--max_train_samples", "256")


def test_token_mean_over_the_step_does_not_depend_on_the_split(tiny, small, small_init, tmp_path):
    """8 x 1 and 4 x 2 give the same loss curve and weights (the normaliser counts the whole step's assistant
    tokens); the logged step-1 loss is the token mean over the step's 8 conversations, computed here independently."""
    run_script(*tiny_args(tiny, tmp_path / "8x1", *small, *SPLIT, "--per_device_train_batch_size", "8",
                          "--gradient_accumulation_steps", "1"))
    run_script(*tiny_args(tiny, tmp_path / "4x2", *small, *SPLIT, "--per_device_train_batch_size", "4",
                          "--gradient_accumulation_steps", "2"))
    la, lb = train_losses(tmp_path / "8x1"), train_losses(tmp_path / "4x2")
    assert len(la) == 4 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-5
    a, b = load_file(tmp_path / "8x1" / "model.safetensors"), load_file(tmp_path / "4x2" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # step 1 by hand: the same data order and initial weights as the script
    args = sft.Args(**{**vars(TINY), "dataset_name": str(tiny / "ultrachat"), "eval_split": None,
                       "tokenizer_name": str(tiny / "tokenizer"), "model_name_or_path": str(small_init),
                       "max_train_samples": 256})
    tok = sft.load_tokenizer(args)
    train_ds = sft.load_data(args, tok, lambda msg: None)[0]
    order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed))[:8].tolist()
    rows = [train_ds[i] for i in order]
    set_seed(args.seed)
    model = sft.load_model(args, tok)
    with torch.no_grad():
        parts = [sft.assistant_nll_sum(model, sft.collate(rows[i : i + 4], tok.pad_token_id, False)) for i in (0, 4)]
    (s1, n1), (s2, n2) = parts
    assert n1 != n2  # the two micro-batches hold different numbers of assistant tokens
    token_mean, mean_of_means = ((s1 + s2) / (n1 + n2)).item(), ((s1 / n1 + s2 / n2) / 2).item()
    assert abs(token_mean - mean_of_means) > 5e-4  # so the data tell the two normalisers apart
    assert la[0] == pytest.approx(token_mean, abs=1e-5) and lb[0] == pytest.approx(token_mean, abs=1e-5)


def test_bf16_autocast_run_is_finite_and_close_to_fp32(tiny, small, tmp_path):
    """ACCELERATE_MIXED_PRECISION=bf16 on the CPU: the forwards really run in bf16 (the losses differ from fp32),
    stay finite and within 0.03 nats of fp32; the eval forward too."""
    common = (*small, *SPLIT, "--per_device_train_batch_size", "8", "--eval_split", "test_sft", "--max_eval_samples",
              "32")
    run_script(*tiny_args(tiny, tmp_path / "fp32", *common), env={"ACCELERATE_MIXED_PRECISION": "no"})
    run_script(*tiny_args(tiny, tmp_path / "bf16", *common), env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    for key in ("train/loss", "eval/loss"):
        fp32, bf16 = ([r[key] for r in metrics(tmp_path / p) if key in r] for p in ("fp32", "bf16"))
        assert len(fp32) == len(bf16) >= 2 and all(math.isfinite(x) for x in bf16)
        assert 0 < max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.03, (key, fp32, bf16)


def test_non_finite_step_found_at_the_window_end_stops_with_the_same_step(tiny, small, tmp_path):
    """Without checkpoints and with one logging window of 6 steps: the run names the first bad step, exits 1 with the
    clear message, and saves no model."""
    p = run_script(*tiny_args(tiny, tmp_path / "nan", *small, *NAN_RUN, "--logging_steps", "6"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert non_finite_step(p) == 2  # the same step as with a checkpoint (and a check) after every step
    assert not (tmp_path / "nan" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# no silent failure (issue 15)
# ---------------------------------------------------------------------------------------------
def parse(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    return sft.parse_args()


def parse_error(monkeypatch, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(monkeypatch, *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1  # one line
    return err


def test_presets_are_flags_and_an_explicit_model_path_wins(monkeypatch, capsys, tmp_path):
    out = ("--output_dir", str(tmp_path / "o"))
    spaced, equals = parse(monkeypatch, "--preset", "tiny", *out), parse(monkeypatch, "--preset=tiny", *out)
    assert spaced == equals and equals.learning_rate == 3e-3
    assert equals.model_name_or_path == "data/tiny/models/qwen2-strong-init1"  # the folder python -m tiny writes
    assert parse(monkeypatch, *out).learning_rate == 2e-6  # no preset: the paper's defaults
    assert parse(monkeypatch, "--preset=tiny", "--learning_rate", "1e-4", *out).learning_rate == 1e-4
    path = parse(monkeypatch, "--preset", "tiny", "--model_name_or_path", "runs/x", *out)
    assert path.model_name_or_path == "runs/x"
    assert path.max_length == 128  # the rest of the preset stays
    with pytest.raises(SystemExit) as e:
        parse(monkeypatch, "--preset=huge", *out)
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


def test_config_file_sets_args_and_command_line_flags_override_it(monkeypatch, capsys, tmp_path):
    out = ("--output_dir", str(tmp_path / "o"))
    tiny_file = str(ROOT / "recipes" / "tiny" / "sft.yaml")
    preset, config = parse(monkeypatch, "--preset", "tiny", *out), parse(monkeypatch, "--config", tiny_file, *out)
    assert preset == dataclasses.replace(config, preset="tiny")  # --preset tiny is the shorthand for the file
    assert config.config == tiny_file and config.learning_rate == 3e-3 and config.max_length == 128
    assert config.config_sha256 == hashlib.sha256(open(tiny_file, "rb").read()).hexdigest()
    assert parse(monkeypatch, *out).config_sha256 is None
    recipe = tmp_path / "r.yaml"  # PyYAML reads 1e-5 as a string, null as None; booleans and lists become flags
    recipe.write_text("learning_rate: 1e-5\neval_split: null\nuse_lora: true\npacking: false\nnum_train_epochs: 3\n"
                      "resume_allow_changes: [seed, learning_rate]\nresume: true\n")
    args = parse(monkeypatch, "--config", str(recipe), *out)
    assert (args.learning_rate, args.eval_split, args.use_lora, args.packing, args.num_train_epochs) == (
        1e-5, None, True, False, 3)
    assert args.resume_allow_changes == ("seed", "learning_rate") and args.model_name_or_path == "Qwen/Qwen2-7B"
    # flags on the command line win, before or after --config
    args = parse(monkeypatch, "--no_use_lora", "--config", str(recipe), "--learning_rate", "2e-4", "--eval_split",
                 "test_sft", "--num_train_epochs", "1", *out)
    assert (args.learning_rate, args.eval_split, args.use_lora, args.num_train_epochs) == (2e-4, "test_sft", False, 1)


@pytest.mark.parametrize("content, message", [
    ("learning_rat: 1e-5\n", "r.yaml: unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("world_size: 8\n", "r.yaml: unknown key 'world_size' (did you mean"),  # filled in at runtime: not a setting
    ("preset: tiny\n", "r.yaml: unknown key 'preset' (did you mean"),
    ("- learning_rate\n", "r.yaml is not a YAML file of `key: value` lines: ['learning_rate']"),
    ("learning_rate: [1\n", "r.yaml is not a YAML file of `key: value` lines: while parsing a flow sequence"),
    (None, "r.yaml is not a YAML file of `key: value` lines: [Errno 2] No such file or directory"),
])
def test_bad_config_file_fails_in_one_line(monkeypatch, capsys, tmp_path, content, message):
    if content is not None:
        (tmp_path / "r.yaml").write_text(content)
    err = parse_error(monkeypatch, capsys, "--config", str(tmp_path / "r.yaml"), "--output_dir", str(tmp_path / "o"))
    assert err.startswith(f"error: --config {tmp_path}/") and message in err
    err = parse_error(monkeypatch, capsys, "--config", str(ROOT / "recipes/tiny/sft.yaml"), "--preset", "tiny")
    assert "--preset tiny stands for --config recipes/tiny/sft.yaml: pass one of them" in err
    err = parse_error(monkeypatch, capsys, "--chat_template", str(tmp_path / "none.jinja"))
    assert f"--chat_template {tmp_path / 'none.jinja'}: no such file; pass a .jinja file or the template itself" in err


@pytest.mark.parametrize("recipe, expected", [
    ("wspo/sft-qwen2-1.5b-full.yaml", dict(model_name_or_path="Qwen/Qwen2-1.5B", use_lora=False, learning_rate=2e-6,
                                           num_train_epochs=2)),
    ("wspo/sft-qwen2-7b-full.yaml", dict(model_name_or_path="Qwen/Qwen2-7B", use_lora=False, learning_rate=2e-6,
                                         num_train_epochs=2)),
    ("wspo/sft-qwen2-1.5b-lora.yaml", dict(model_name_or_path="Qwen/Qwen2-1.5B", use_lora=True, learning_rate=2e-5,
                                           num_train_epochs=3)),
    ("wspo/sft-qwen2-7b-lora.yaml", dict(model_name_or_path="Qwen/Qwen2-7B", use_lora=True, learning_rate=2e-5,
                                         num_train_epochs=3)),
    ("wpo/sft-mistral-7b-zephyr.yaml", dict(
        model_name_or_path="mistralai/Mistral-7B-v0.1", learning_rate=2e-5, num_train_epochs=1, max_length=2048,
        per_device_train_batch_size=16, gradient_accumulation_steps=1, chat_template="recipes/templates/zephyr.jinja")),
])
def test_recipes_hold_the_published_settings(monkeypatch, tmp_path, recipe, expected):
    """WSPO README step 1: cosine, warm-up 0.1, cutoff 4096 (zephyr: the handbook's config_full.yaml, 2048)."""
    monkeypatch.chdir(ROOT)  # the zephyr recipe names its template relative to the repository root
    args = parse(monkeypatch, "--config", f"recipes/{recipe}", "--output_dir", str(tmp_path / "o"))
    assert {k: getattr(args, k) for k in expected} == expected
    assert (args.lr_scheduler_type, args.warmup_ratio, args.max_length) == ("cosine", 0.1, expected.get("max_length",
                                                                                                         4096))
    assert args.dataset_name == "HuggingFaceH4/ultrachat_200k" and args.train_split == "train_sft"


@pytest.mark.parametrize("flags, message", [
    (("--per_device_train_batch_size", "-1"), "--per_device_train_batch_size must be positive (got -1)"),
    (("--per_device_train_batch_size", "0"), "--per_device_train_batch_size must be positive (got 0)"),
    (("--gradient_accumulation_steps", "0"), "--gradient_accumulation_steps must be positive (got 0)"),
    (("--max_steps", "0"), "--max_steps must be positive (got 0)"),
    (("--max_length", "-5"), "--max_length must be positive (got -5)"),
    (("--save_total_limit", "0"), "--save_total_limit must be positive (got 0)"),
    (("--learning_rate", "-1e-5"), "--learning_rate must be non-negative (got -1e-05)"),
    (("--warmup_ratio", "1.5"), "--warmup_ratio must be in [0, 1] (got 1.5)"),
    (("--eval_fraction", "1.0"), "--eval_fraction must be in (0, 1) (got 1.0)"),
    (("--max_grad_norm", "0"), "--max_grad_norm must be positive (got 0.0)"),
    (("--resume", "--overwrite_output_dir"), "pass one of them"),
    (("--resume_allow_changes", "learning_rate"), "--resume_allow_changes only applies with --resume"),
    (("--resume", "--resume_allow_changes", "lr"), "no such argument ['lr']"),
])
def test_bad_arguments_fail_in_one_line_before_anything(monkeypatch, capsys, tmp_path, flags, message):
    err = parse_error(monkeypatch, capsys, "--preset", "tiny", "--output_dir", str(tmp_path / "o"), *flags)
    assert message in err
    assert not (tmp_path / "o").exists()


def test_bad_argument_exits_2_writing_nothing(tiny, tmp_path):
    p = run_script(*tiny_args(tiny, tmp_path / "o", "--per_device_train_batch_size", "-1"), check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: --per_device_train_batch_size must be positive (got -1)"
    assert not (tmp_path / "o").exists()


def test_output_folder_is_protected_and_overwrite_starts_afresh(tiny, small, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    common = (*small, "--max_steps", "2", "--eval_split", "None", "--max_train_samples", "64",
              "--per_device_train_batch_size", "8", "--logging_steps", "1")
    run_script(*tiny_args(tiny, out, *common, "--save_steps", "1"))
    before = (out / "metrics.jsonl").read_text()
    p = run_script(*tiny_args(tiny, out, *common), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"output_dir {out} already holds files" in p.stderr and "--overwrite_output_dir" in p.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost
    assert sorted(d.name for d in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    run_script(*tiny_args(tiny, out, *common, "--overwrite_output_dir", "--learning_rate", "1e-3"))
    rows = metrics(out)
    assert len({r["run_id"] for r in rows}) == 1 and rows[0]["run_id"] not in before  # only the new run's rows
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert not (out / "checkpoints").exists()  # the old run's checkpoints are gone
    assert json.loads((out / "args.json").read_text())["learning_rate"] == 1e-3


def test_resume_refuses_changes_and_a_finished_run_does_nothing(tiny, small, tmp_path):
    out = tmp_path / "o"
    common = (*small, "--max_steps", "3", "--eval_split", "None", "--max_train_samples", "64",
              "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_steps", "3")
    run_script(*tiny_args(tiny, out, *common))
    saved = json.loads((out / "args.json").read_text())
    assert saved["completed_steps"] == 3 and saved["run_id"].startswith("sft__1__")
    before = (out / "metrics.jsonl").read_text()
    p = run_script(*tiny_args(tiny, out, *common, "--resume", "--learning_rate", "1e-3", "--max_steps", "5"),
                   check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "learning_rate: 0.003 -> 0.001" in p.stderr and "max_steps: 3 -> 5" in p.stderr
    assert "--resume_allow_changes" in p.stderr
    p = run_script(*tiny_args(tiny, out, *common, "--resume", "--logging_steps", "2"))  # a safe change
    assert f"run in {out} already finished (step 3); nothing to do" in p.stdout
    assert (out / "metrics.jsonl").read_text() == before
    # a run killed after its last checkpoint, before the final save: resuming runs no step past max_steps
    saved.pop("completed_steps")
    (out / "args.json").write_text(json.dumps(saved))
    (out / "model.safetensors").unlink()
    run_script(*tiny_args(tiny, out, *common, "--resume"))
    rows = metrics(out)
    assert max(r["step"] for r in rows) == 3 and (out / "model.safetensors").exists()
    assert len({r["run_id"] for r in rows}) == 2  # the resumed rows are told apart
    # allowed changes: extend the run by two steps
    run_script(*tiny_args(tiny, out, *common, "--resume", "--max_steps", "5", "--resume_allow_changes", "max_steps"))
    assert [r["step"] for r in metrics(out) if "train/loss" in r] == [1, 2, 3, 4, 5]


def test_single_file_needs_an_explicit_eval_source(tiny, small, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"copy {w}"}, {"role": "assistant", "content": f"ok {w} done"}]}
            for w in ["one", "two", "three", "four"] * 10]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    base = ("--dataset_name", str(data), "--train_split", "train", *small,
            "--per_device_train_batch_size", "4", "--max_steps", "1")
    p = run_script(*tiny_args(tiny, tmp_path / "o", *base), check=False)
    assert p.returncode == 2 and "is a single file" in p.stderr
    for fix in ("--eval_dataset_name FILE", "--eval_fraction 0.05", "--eval_split None"):
        assert fix in p.stderr
    p = run_script(*tiny_args(tiny, tmp_path / "o", *base, "--eval_dataset_name", str(data)), check=False)
    assert p.returncode == 2 and "the eval data are the training data" in p.stderr
    assert not (tmp_path / "o").exists()
    p = run_script(*tiny_args(tiny, tmp_path / "o", *base, "--eval_fraction", "0.25"))
    assert f"eval data: 0.25 of {data} held out with seed 1" in p.stdout
    assert "train: 30 of 30 conversations kept" in p.stdout and "eval: 10 of 10 conversations kept" in p.stdout
    other = write_jsonl(tmp_path / "held_out.jsonl", rows[:6])
    p = run_script(*tiny_args(tiny, tmp_path / "o2", *base, "--eval_dataset_name", str(other)))
    assert f"eval data: {other}" in p.stdout and "eval: 6 of 6 conversations kept" in p.stdout


@pytest.mark.parametrize("content, message", [
    ('{"messages": []}\n{"messages": []}\n{"messages": [}\n', "bad.jsonl, line 3: not valid JSON"),
    ("", "bad.jsonl is empty: it holds no rows"),
    ("\n\n", "bad.jsonl is empty: it holds no rows"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "hi"}\n',
     "bad.jsonl, line 2: column 'messages' holds type str, not a list of {role, content} messages"),
    ('{"messages": "hi"}\n\n{"messages": "ho"}\n', "bad.jsonl, line 1: column 'messages' holds type str, not a list"),
    ('\n{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": 3}\n', "bad.jsonl, line 4: column 'messages' "
     "holds type int here but type list on line 2"),
    ('[1, 2]\n', "bad.jsonl, line 1: a JSON object per line is expected, got list"),
])
def test_data_errors_name_the_file_and_line(tiny, tmp_path, capsys, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    args = sft.Args(**{**vars(TINY), "dataset_name": str(tmp_path / "bad.jsonl"), "eval_split": None})
    with pytest.raises(SystemExit) as e:
        sft.load_data(args, AutoTokenizer.from_pretrained(tiny / "tokenizer"), print)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_bad_model_path_names_the_model_with_a_fitting_hint(tiny, tmp_path):
    p = run_script(*tiny_args(tiny, tmp_path / "o", "--model_name_or_path", "runs/x"), check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1
    assert errors[0].startswith("error: could not load model 'runs/x': no such local folder and not a hub id")
    assert "tokenizer" not in errors[0] and "pass --preset tiny" not in errors[0]  # --preset tiny was passed
    assert not (tmp_path / "o").exists()
    # issue 26 case 15: a folder that exists but holds no saved model is named for what it is
    empty, checkpoint = not_a_model_folders(tmp_path)
    for folder, why in ((empty, "it is empty; pass a folder holding a saved model"),
                        (checkpoint, "it holds a training checkpoint (optimizer state), not a saved model")):
        p = run_script(*tiny_args(tiny, tmp_path / "o", "--model_name_or_path", str(folder)), check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert f"error: could not load model '{folder}' from that folder: {why}" in p.stderr
        assert "tokenizer" not in p.stderr and not (tmp_path / "o").exists()


def test_no_network_is_reported_in_seconds(tmp_path):
    t = time.time()
    p = run_script("sft.py", "--output_dir", str(tmp_path / "o"), check=False,
                   env={"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert p.returncode == 2 and time.time() - t < 60  # was 54 s of retries before any error
    assert p.stderr.strip() == ("error: no network: cannot reach the Hugging Face Hub for 'Qwen/Qwen2-7B'. Set "
                                "HF_HUB_OFFLINE=1 to use the local cache, or pass a local path.")
    assert not (tmp_path / "o").exists()


def test_base_tokenizer_trains_with_chat_template_and_saves_it(tiny, small_init, tmp_path):
    """A tokenizer without a chat template (a base model's) is refused with the fix; with --chat_template FILE.jinja
    it trains and the output folder's tokenizer carries the template. args.json records the --config file and hash."""
    base = shutil.copytree(tiny / "tokenizer", tmp_path / "base_tokenizer")
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    recipe = tmp_path / "small.yaml"
    recipe.write_text(f"tokenizer_name: {base}\nmodel_name_or_path: {small_init}\nmax_steps: 2\nmax_train_samples: 64\n"
                      "per_device_train_batch_size: 8\ngradient_accumulation_steps: 1\neval_split: null\n"
                      "logging_steps: 1\nlearning_rate: 1.0e-3\n")
    cmd = ("sft.py", "--config", str(recipe), "--dataset_name", str(tiny / "ultrachat"), "--output_dir",
           str(tmp_path / "o"))
    p = run_script(*cmd, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "o").exists()
    assert (f"error: tokenizer '{base}' has no chat template; pass --chat_template (a Jinja string or a .jinja file)"
            in p.stderr)
    run_script(*cmd, "--chat_template", "recipes/templates/zephyr.jinja")
    template = (ROOT / "recipes" / "templates" / "zephyr.jinja").read_text()
    assert AutoTokenizer.from_pretrained(tmp_path / "o").chat_template == template
    assert [r["step"] for r in metrics(tmp_path / "o") if math.isfinite(r.get("train/loss", math.nan))] == [1, 2]
    saved = json.load(open(tmp_path / "o" / "args.json"))
    assert saved["config"] == str(recipe) and saved["chat_template"] == "recipes/templates/zephyr.jinja"
    assert saved["config_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest() and saved["learning_rate"] == 1e-3


def test_resume_compares_the_values_not_the_config_file_that_set_them(tmp_path, capsys):
    args = dataclasses.replace(TINY, output_dir=str(tmp_path), config="a.yaml", config_sha256="0" * 64, resume=True)
    saved = {**vars(args), "resume_allow_changes": [], "completed_steps": 4}
    (tmp_path / "args.json").write_text(json.dumps({**saved, "config": "b.yaml", "config_sha256": "1" * 64}))
    assert sft.compare_with_saved_run(args) == 4  # nothing differs but the file: the finished run is recognised
    (tmp_path / "args.json").write_text(json.dumps({**saved, "learning_rate": 0.5}))
    with pytest.raises(SystemExit) as e:
        sft.compare_with_saved_run(args)
    assert e.value.code == 2 and "learning_rate: 0.5 -> 0.003" in capsys.readouterr().err
