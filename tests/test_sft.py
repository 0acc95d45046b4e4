"""sft.py: assistant-only mask, packing, end to end on the tiny setting, resume, bad input, logging."""

import dataclasses
import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMALL, load_script, run_script
from tiny import lang

sft = load_script("sft")



def tiny_args(tiny, out, *extra):
    return ["sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
            str(tiny / "tokenizer"), "--output_dir", str(out), *extra]


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


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
        starts = [i for i in range(len(ids)) if ids[i : i + len(body)] == body and toks[i - 2 : i] == ["assistant", "Ċ"]]
        assert len(starts) == 1
        expected[starts[0] : starts[0] + len(body)] = body
    assert labels == expected
    trained = [t for t, lab in zip(toks, labels) if lab != -100]
    assert trained == ["sure", "Ġone", "Ġthree", "Ġdone", "<|im_end|>", "meh", "Ġtwo", "Ġnow", "Ġgo", "Ġaway", "<|im_end|>"]


def test_skips_and_truncation_are_reported(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    assert sft.tokenize_conversation(tok, [], 64)["skip"] == "empty conversation"
    assert sft.tokenize_conversation(tok, [{"role": "user", "content": "copy one"}], 64)["skip"] == "no assistant turn"
    assert sft.tokenize_conversation(tok, [{"role": "user"}], 64)["skip"].startswith("malformed")
    long = [{"role": "user", "content": "copy " + " ".join(["one"] * 40)}, {"role": "assistant", "content": "ok one"}]
    assert sft.tokenize_conversation(tok, long, 30)["skip"] == "no assistant token within max_length"
    cut = sft.tokenize_conversation(tok, [{"role": "user", "content": "copy one"}, {"role": "assistant", "content": "ok " + " ".join(["one"] * 40)}], 30)
    assert cut["skip"] == "truncated" and len(cut["input_ids"]) == 30 and sum(x != -100 for x in cut["labels"]) > 0


def test_packed_logits_and_loss_equal_padded(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    torch.manual_seed(0)
    args = dataclasses.replace(sft.PRESETS["tiny"], tokenizer_name=str(tiny / "tokenizer"), config_overrides=SMALL)
    model = sft.load_model(args, tok).eval()
    convs = [
        [{"role": "user", "content": "sort three one two"}, {"role": "assistant", "content": "sure one two three done"}],
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
        (s1, n1), (s2, n2) = sft.sft_loss_sum(model, padded), sft.sft_loss_sum(model, packed)
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
    for f in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "args.json"):
        assert (out / f).exists(), f
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([sft.chat_ids(tok, [{"role": "user", "content": "copy four two"}], add_generation_prompt=True)])
    gen = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()
    assert text and text[0] in lang.OPENERS  # the tiny language's answer format


def test_lora_merges_into_a_plain_model(tiny, tmp_path):
    out = tmp_path / "lora"
    run_script(*tiny_args(tiny, out, "--config_overrides", SMALL, "--use_lora", "--lora_r", "4", "--max_steps", "3",
                          "--eval_split", "None"))
    sd = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in sd) and any("q_proj" in k for k in sd)
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 32


def test_resume_reproduces_the_uninterrupted_run(tiny, tmp_path):
    common = ("--config_overrides", SMALL, "--max_steps", "8", "--logging_steps", "1", "--eval_split", "None",
              "--max_train_samples", "400", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2")
    full = tmp_path / "full"
    run_script(*tiny_args(tiny, full, *common, "--save_steps", "4", "--save_total_limit", "5"))
    # a run killed right after step 4: its output folder holds just what the run had written by then
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-4", cut / "checkpoints" / "step-4")
    (cut / "checkpoints" / "tmp-step-8").mkdir()  # a half-written checkpoint must be ignored
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


def test_bad_rows_are_counted_not_fatal(tiny, tmp_path):
    good = [{"messages": [{"role": "user", "content": "copy one"}, {"role": "assistant", "content": "ok one done"}]}] * 8
    bad = [{"messages": []}, {"messages": [{"role": "user", "content": "copy one"}]},
           {"messages": [{"role": "user", "content": "copy " + " ".join(["two"] * 300)}, {"role": "assistant", "content": "ok"}]}]
    data = write_jsonl(tmp_path / "mixed.jsonl", good + bad)
    p = run_script(*tiny_args(tiny, tmp_path / "o", "--dataset_name", str(data), "--train_split", "train",
                              "--eval_split", "None", "--config_overrides", SMALL, "--per_device_train_batch_size", "4",
                              "--max_steps", "1"))
    assert ("train: 8 of 11 conversations kept; 1 empty conversation, 1 no assistant token within max_length, "
            "1 no assistant turn") in p.stdout


def test_missing_column_fails_before_training_with_a_fix(tiny, tmp_path):
    data = write_jsonl(tmp_path / "wrong.jsonl", [{"conversation": [{"role": "user", "content": "hi"}]}] * 4)
    p = run_script(*tiny_args(tiny, tmp_path / "o", "--dataset_name", str(data), "--train_split", "train",
                              "--eval_split", "None"), check=False)
    assert p.returncode != 0
    assert "no column 'messages'" in p.stderr and "--messages_column" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_unreachable_hub_model_fails_fast_pointing_offline(tmp_path):
    t = time.time()
    p = run_script("sft.py", "--model_name_or_path", "Qwen/Qwen2-7B", "--output_dir", str(tmp_path / "o"), check=False,
                   env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0 and time.time() - t < 120
    assert "Qwen/Qwen2-7B" in p.stderr and "python -m tiny" in p.stderr and "--preset tiny" in p.stderr


def test_help_documents_every_flag():
    p = run_script("sft.py", "--help")
    for f in dataclasses.fields(sft.Args):
        assert f"--{f.name}" in p.stdout, f.name
    assert "peak learning rate" in p.stdout


def test_track_writes_an_offline_wandb_run(tiny, tmp_path):
    out = tmp_path / "tracked"
    run_script(*tiny_args(tiny, out, "--config_overrides", SMALL, "--max_steps", "4", "--logging_steps", "2", "--track",
                          "--max_eval_samples", "32"), env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    log = runs[0].read_bytes()  # wandb's record log (protobuf): config and history keys are stored as text
    for key in (b"learning_rate", b"model_name_or_path", b"train/loss", b"eval/loss", b"perf/tokens_per_s"):
        assert key in log, key


def test_same_seed_same_loss_curve_bit_for_bit(tiny, tmp_path):
    common = ("--config_overrides", SMALL, "--max_steps", "6", "--logging_steps", "1", "--eval_split", "None",
              "--max_train_samples", "256", "--per_device_train_batch_size", "8")
    run_script(*tiny_args(tiny, tmp_path / "a", *common))
    run_script(*tiny_args(tiny, tmp_path / "b", *common))
    la = [r["train/loss"] for r in metrics(tmp_path / "a")]
    lb = [r["train/loss"] for r in metrics(tmp_path / "b")]
    assert len(la) == 6 and la == lb  # exact equality, not a tolerance
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoint(tiny, tmp_path):
    out = tmp_path / "nan"
    p = run_script(*tiny_args(tiny, out, "--config_overrides", SMALL, "--learning_rate", "1e30", "--warmup_ratio", "0",
                              "--max_steps", "6", "--save_steps", "1", "--eval_split", "None", "--max_train_samples", "256",
                              "--per_device_train_batch_size", "8"), check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    msg = [line for line in p.stderr.splitlines() if "non-finite loss or gradient at step" in line]
    assert msg and "no update was applied" in msg[0]
    bad_step = int(msg[0].split("at step ")[1].split()[0])
    assert bad_step >= 2
    kept = sorted(d.name for d in (out / "checkpoints").iterdir())
    assert kept[-1] == f"step-{bad_step - 1}" and not any(d.startswith("tmp-") for d in kept)
    assert not (out / "model.safetensors").exists()


def test_template_that_rewrites_earlier_turns_is_a_clear_error(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    # like "thinking" templates: earlier assistant turns are rendered differently from the last one
    tok.chat_template = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{%- if m['role'] == 'assistant' and not loop.last %}ok{% else %}{{ m['content'] }}{% endif %}"
                         "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    msgs = [{"role": "user", "content": "copy one"}, {"role": "assistant", "content": "sure one done"},
            {"role": "user", "content": "copy two"}, {"role": "assistant", "content": "sure two done"}]
    with pytest.raises(SystemExit, match="does not render conversations incrementally"):
        sft.tokenize_conversation(tok, msgs, 512)
