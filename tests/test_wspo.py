"""wspo.py: the loss against the official four-models-live formulation, the cached pre-pass,
tokenizer checks and clear errors. (End to end ordering: tests/test_pipeline.py.)"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import tyro
from accelerate import Accelerator
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from conftest import ROOT, load_script, run_script, not_a_model_folders

wspo = load_script("wspo")
TINY_RECIPE = ROOT / "recipes" / "tiny" / "wspo.yaml"
TINY = tyro.cli(wspo.Args, args=wspo.read_config(str(TINY_RECIPE)), use_underscores=True)  # what --preset tiny reads


def make_model(tok, path, seed, hidden=32):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def four(tiny, tmp_path_factory):
    """Four random tiny models sharing the tiny tokenizer: strong, strong ref, weak ref, weak aligned."""
    root = tmp_path_factory.mktemp("four")
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    return {name: make_model(tok, root / name, seed, hidden)
            for seed, (name, hidden) in enumerate([("strong", 48), ("sref", 48), ("wref", 32), ("wal", 32)])}


def live_token_logps(path, ids, n_prompt):
    """Official-style: a full forward, full log-softmax, then the response tokens."""
    m = Qwen2ForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        lp = torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return torch.stack([lp[t - 1, ids[t]] for t in range(n_prompt, len(ids))])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_equals_official_formula_with_four_live_models(tiny, four, tmp_path, level):
    args = dataclasses.replace(TINY, dataset_name=str(tiny / "ultrafeedback"), strong=four["strong"],
                               strong_ref=four["sref"], weak_ref=four["wref"], weak_aligned=four["wal"],
                               cache_dir=str(tmp_path / "cache"), prepass_batch_size=3, loss_level=level,
                               beta=0.1, weak_coef=1.0)  # the official values, as in the formula below
    tok = AutoTokenizer.from_pretrained(four["strong"])
    raw = wspo.load_split(args.dataset_name, None, "test_prefs").select(range(5))
    ds, _, _ = wspo.prepare_split(raw, None, tok, args, "train", "test_prefs", print)
    acc = Accelerator(cpu=True)
    pad, batches = tok.pad_token_id, wspo.chunks(list(range(5)), 3)
    caches = {k: wspo.prepass(four[k], ds, batches, ("chosen_ids",), args, acc, pad, print) for k in ("sref", "wref", "wal")}
    again = wspo.prepass(four["wal"], ds, batches, ("chosen_ids",), args, acc, pad, print)  # from the cache file
    assert torch.equal(again["values"], caches["wal"]["values"]) and len(list((tmp_path / "cache").iterdir())) == 3

    policy = Qwen2ForCausalLM.from_pretrained(four["strong"]).eval()
    batch = wspo.collate([ds[i] for i in range(5)], pad, False,
                         cache={"ref": caches["sref"], "weak_ref": caches["wref"], "weak_aligned": caches["wal"]})
    with torch.no_grad():
        lp = wspo.token_logps(policy, batch)
    # the loop's lines: the strong and weak log-ratios, d_t, the loss of each response
    d_t = args.beta * (lp.double() - batch["ref_logps"].double()) - args.weak_coef * batch["weak_logratio"].double()
    losses = wspo.wspo_loss(d_t, batch, level)

    want = []
    for r in range(5):
        ex = ds[r]
        ids, n_prompt = ex["prompt_ids"] + ex["chosen_ids"], len(ex["prompt_ids"])
        pi, sref, wref, wal = (live_token_logps(four[k], ids, n_prompt) for k in ("strong", "sref", "wref", "wal"))
        # the cached pre-pass values equal live ones, token by token
        torch.testing.assert_close(wspo.cached_tokens(caches["sref"], [r]).double(), sref, atol=1e-5, rtol=0)
        if level == "token":  # official trainer: d_t = beta (pi - sref) - (wal - wref); sum_t d_t^2 / |y|
            d = 0.1 * (pi - sref) - 1.0 * (wal - wref)
            want.append((d**2).sum() / len(d))
        else:  # the paper's sequence-level form
            want.append((0.1 * (pi - sref).sum() - (wal - wref).sum()) ** 2)
    torch.testing.assert_close(losses, torch.stack(want), atol=1e-6, rtol=1e-6)
    assert losses.mean() > 0


def test_rejected_are_never_forwarded_in_training(tiny, four):
    args = dataclasses.replace(TINY)
    tok = AutoTokenizer.from_pretrained(four["strong"])
    raw = wspo.load_split(str(tiny / "ultrafeedback"), None, "test_prefs").select(range(4))
    train, with_rej, _ = wspo.prepare_split(raw, None, tok, args, "train", "test_prefs", print)
    assert not with_rej and all(len(r) == 0 for r in train["rejected_ids"])
    batch = wspo.collate([train[i] for i in range(4)], tok.pad_token_id, False)
    assert batch["n_seqs"] == 4 and batch["input_ids"].shape[0] == 4
    ev, with_rej, _ = wspo.prepare_split(raw, None, tok, args, "eval", "test_prefs", print)
    assert with_rej and all(len(r) > 0 for r in ev["rejected_ids"])


def wspo_argv(tiny, four, tmp_path, *extra, out="o"):
    return ["--preset", "tiny", "--dataset_name", str(tiny / "ultrafeedback"), "--strong", four["strong"],
            "--weak_ref", four["wref"], "--weak_aligned", four["wal"], "--output_dir", str(tmp_path / out),
            "--cache_dir", str(tmp_path / "c"), "--max_train_samples", "64", "--max_eval_samples", "32",
            "--max_steps", "2", *extra]


def run_wspo(tiny, four, tmp_path, *extra, check=False, env=None, out="o"):
    return run_script("wspo.py", *wspo_argv(tiny, four, tmp_path, *extra, out=out), check=check, env=env)


def test_mismatched_tokenizer_stops_before_training(tiny, four, tmp_path):
    sys.path.insert(0, str(ROOT))
    from tiny.__main__ import build_tokenizer
    from tiny import cls, lang

    other = build_tokenizer(sorted(set(lang.words()) | set(cls.words()) | {"zebra", "aardvark"}))  # shifted ids
    bad = make_model(other, tmp_path / "bad_weak", 7)
    p = run_wspo(tiny, four, tmp_path, "--weak_aligned", bad)
    assert p.returncode != 0 and "tokenizer mismatch" in p.stderr and "train example 0" in p.stderr
    assert "pre-pass" not in p.stdout and not (tmp_path / "o" / "model.safetensors").exists()


def test_end_to_end_small_run_writes_model_and_metrics(tiny, four, tmp_path):
    p = run_wspo(tiny, four, tmp_path, "--logging_steps", "1", check=True)
    assert p.stdout.count("identical definition") == 2
    m = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    keys = set().union(*m)
    for k in ("train/loss", "train/abs_d", "train/rewards/chosen", "train/logratio_corr", "eval/rewards/accuracies",
              "perf/tokens_per_s"):
        assert k in keys, k
    assert (tmp_path / "o" / "model.safetensors").exists()
    p2 = run_wspo(tiny, four, tmp_path, "--overwrite_output_dir", check=True)
    assert p2.stdout.count("reusing the cache") == 6  # 3 frozen models x (train, eval)


def test_missing_model_and_missing_column_are_clear_errors(tiny, four, tmp_path):
    p = run_wspo(tiny, four, tmp_path, "--weak_ref", str(tmp_path / "no_such_model"))
    assert p.returncode != 0 and "no_such_model" in p.stderr and "Traceback" not in p.stderr
    p = run_wspo(tiny, four, tmp_path, "--response_column", "answer")
    assert p.returncode != 0 and "no column 'answer'" in p.stderr and "--response_column" in p.stderr


def test_resume_reproduces_the_uninterrupted_run(tiny, four, tmp_path):
    import shutil

    from safetensors.torch import load_file

    common = ("--max_steps", "6", "--logging_steps", "1", "--eval_split", "None", "--max_train_samples", "96",
              "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_wspo(tiny, four, tmp_path, *common, "--save_steps", "3", "--save_total_limit", "5", out="full", check=True)
    (cut / "checkpoints").mkdir(parents=True)  # a run killed right after step 3
    shutil.copytree(full / "checkpoints" / "step-3", cut / "checkpoints" / "step-3")
    run_wspo(tiny, four, tmp_path, *common, "--resume", out="cut", check=True)
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    la = {r["step"]: r["train/loss"] for r in map(json.loads, open(full / "metrics.jsonl")) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in map(json.loads, open(cut / "metrics.jsonl")) if "train/loss" in r}
    assert sorted(lb) == [4, 5, 6] and all(abs(la[s] - lb[s]) < 1e-6 for s in lb)


def test_lora_trains_and_saves_a_merged_plain_model(tiny, four, tmp_path):
    from safetensors.torch import load_file

    run_wspo(tiny, four, tmp_path, "--use_lora", "--lora_r", "4", "--learning_rate", "1e-2", "--max_steps", "3",
             "--eval_split", "None", check=True)
    merged, base = load_file(tmp_path / "o" / "model.safetensors"), load_file(f"{four['strong']}/model.safetensors")
    assert not any("lora" in k for k in merged) and set(merged) == set(base)
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 1e-4


def test_empty_or_malformed_responses_are_counted_skips(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    args = TINY
    u = lambda p: {"role": "user", "content": p}
    assert wspo.tokenize_example(tok, {"prompt": "copy one", "chosen": [u("copy one"), {"role": "assistant", "content": " "}]},
                                 args, False)["skip"] == "empty response"
    assert wspo.tokenize_example(tok, {"prompt": "copy one", "chosen": [u("copy one")]}, args, False)["skip"] == \
        "response is not a conversation ending in an assistant turn"
    ok = wspo.tokenize_example(tok, {"prompt": "copy one", "chosen": "ok one done"}, args, False)
    assert ok["skip"] == "" and tok.decode(ok["chosen_ids"]) == "ok one done<|im_end|>"


def test_tokenized_data_is_cached_by_what_tokenizing_reads(tiny, tmp_path, monkeypatch):
    """issue 27: the tokenize map's cache key is the input's fingerprint, the tokenizer, the Args fields it reads and
    the script's code: the same data tokenized again (a new tokenizer object, another --output_dir) writes no new
    cache file; another --max_length does, and gives other ids; so does an edited copy of the script."""
    from datasets import load_dataset

    data = tmp_path / "data"
    load_dataset(str(tiny / "ultrafeedback")).save_to_disk(data)
    cache_files = lambda: sorted(f.name for f in data.rglob("cache-*.arrow"))

    def tokenized(**changes):
        tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
        raw = wspo.load_split(str(data), None, "train_prefs")
        return wspo.prepare_split(raw, 50, tok, dataclasses.replace(TINY, **changes), "train", str(data), print)[0]

    first = tokenized()
    files = cache_files()
    assert files and tokenized(output_dir=str(tmp_path / "other"))[:] == first[:] and cache_files() == files
    shorter = tokenized(max_length=30, max_prompt_length=28)  # prompts of ~24 tokens: responses cut
    assert len(cache_files()) > len(files) and list(shorter["chosen_ids"]) != list(first["chosen_ids"])
    files = cache_files()
    edited = tmp_path / "wspo.py"  # a researcher's edit of the script: its old tokenization is not reused
    edited.write_bytes(Path(wspo.__file__).read_bytes() + b"\n# edited\n")
    monkeypatch.setattr(wspo, "__file__", str(edited))
    assert tokenized()[:] == first[:] and len(cache_files()) > len(files)


def test_no_usable_example_error_prints_plain_counts(tiny, capsys):
    """issue 26 case 16: the skip counts of the error are plain strings and ints, not numpy reprs."""
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    rows = [{"prompt": "copy one", "chosen": [{"role": "user", "content": "copy one"}]}] * 2
    with pytest.raises(SystemExit) as e:
        wspo.prepare_split(Dataset.from_list(rows), None, tok, TINY, "train", "bad.jsonl", print)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "np." not in err
    assert ("error: no usable example in the train data (bad.jsonl; {'response is not a conversation ending in an "
            "assistant turn': 2})") in err


def test_same_seed_same_loss_curve_bit_for_bit(tiny, four, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for name in ("a", "b"):
        run_wspo(tiny, four, tmp_path, "--eval_split", "None", "--max_steps", "4", "--logging_steps", "1",
                 "--per_device_train_batch_size", "8", out=name, check=True)
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        runs[name] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(runs["a"]) == 4 and runs["a"] == runs["b"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------------------------------
# issue 14: precision, dropout, normaliser
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_strong_logratio_is_exactly_zero_at_step_0(tiny, four, tmp_path, precision):
    """The pre-pass forwards the strong reference in the run's own batches under the policy's autocast: before the
    first update every strong log-ratio is exactly 0 (eval at step 0, and both micro-batches of step 1), also in
    bf16. 70 examples leave 6 outside epoch 0: the pre-pass still covers them."""
    run_wspo(tiny, four, tmp_path, "--max_train_samples", "70", "--max_eval_samples", "37", "--logging_steps", "1",
             "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2",
             "--per_device_eval_batch_size", "16", check=True, env={"ACCELERATE_MIXED_PRECISION": precision})
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    assert rows[0]["step"] == 0 and rows[1]["step"] == 1
    for k in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/rewards/accuracies"):
        assert rows[0][k] == 0.0, (k, rows[0][k])
    assert rows[1]["train/rewards/chosen"] == 0.0 and rows[1]["train/loss"] > 1e-3  # the weak target is not 0
    assert rows[-1]["eval/rewards/margins"] != 0.0  # after two updates the policy has moved


def test_bf16_logsoftmax_gradient_keeps_fp32_precision():
    """token_logps' chunked log-softmax upcasts to fp32 before the softmax, so its gradient (onehot - softmax) is
    built in fp32 and rounded to bf16 once: on confident tokens (p > 0.9) it matches fp32 autograd within 1% (median;
    on tokens with 1 - p near 1e-6 the fp32 cancellation itself, in either formula, dominates the worst case)."""
    torch.manual_seed(0)
    logits32 = torch.randn(512, 1000) * 2
    targets = torch.randint(0, 1000, (512,))
    logits32[torch.arange(256), targets[:256]] += 14  # half the rows confident in their target
    logits = logits32.bfloat16().requires_grad_()
    upstream = torch.randn(512)
    with torch.enable_grad():
        ours = torch.cat([torch.utils.checkpoint.checkpoint(wspo._chunk_logps, logits[i: i + 128], targets[i: i + 128],
                                                            use_reentrant=False) for i in range(0, 512, 128)])
        (ours * upstream).sum().backward()
        ref_logits = logits.detach().float().requires_grad_()
        ref = torch.log_softmax(ref_logits, -1).gather(-1, targets[:, None])[:, 0]
        (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # fp32 from the same bf16 logits
    p = torch.softmax(ref_logits.detach(), -1).gather(-1, targets[:, None])[:, 0]
    confident = p > 0.9
    assert confident.sum() >= 200
    got = logits.grad.float()[confident].gather(-1, targets[confident][:, None])[:, 0]
    want = ref_logits.grad[confident].gather(-1, targets[confident][:, None])[:, 0]
    rel = ((got - want).abs() / want.abs()).median().item()  # the measure: the median over such tokens
    assert rel < 0.01, rel
    row_rel = ((logits.grad.float() - ref_logits.grad).norm(dim=-1) / ref_logits.grad.norm(dim=-1))[confident]
    assert row_rel.median().item() < 0.01


def test_disable_dropout_turns_off_attention_and_lora_dropout(tiny):
    from peft import LoraConfig, get_peft_model

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5)
    model = get_peft_model(Qwen2ForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.5, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)  # so that the LoRA branch (and its dropout) changes the output
    model.train()
    ids = torch.randint(0, len(tok), (2, 12))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    wspo.disable_dropout(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_gradient_is_the_same_for_any_split_of_the_batch(tiny, four, tmp_path):
    """Per-sequence loss, mean over sequences: 8 x 1 and 4 x 2 give the same loss curve and weights."""
    from safetensors.torch import load_file

    out = {}
    for name, bs, acc in (("a", "8", "1"), ("b", "4", "2")):
        run_wspo(tiny, four, tmp_path, "--eval_split", "None", "--max_steps", "3", "--logging_steps", "1",
                 "--learning_rate", "1e-3", "--per_device_train_batch_size", bs, "--gradient_accumulation_steps", acc,
                 out=name, check=True)
        out[name] = [r["train/loss"] for r in map(json.loads, open(tmp_path / name / "metrics.jsonl")) if "train/loss" in r]
    assert len(out["a"]) == 3 and out["a"] == pytest.approx(out["b"], abs=1e-6)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# issue 15: no silent failure
# ---------------------------------------------------------------------------------------------------------------------
def parse(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["wspo.py", *argv])
    return wspo.parse_args()


def test_preset_with_equals_sign_and_flags_override(monkeypatch):
    args = parse(monkeypatch, "--preset=tiny", "--beta", "0.2")
    assert args.strong == "runs/tiny/sft-strong" and args.beta == 0.2 and args.max_length == 128
    assert parse(monkeypatch, "--preset", "tiny").per_device_train_batch_size == 32
    assert parse(monkeypatch).strong == "Qwen/Qwen2-7B"


# ---------------------------------------------------------------------------------------------------------------------
# issue 29: recipes (--config FILE.yaml; --preset tiny is recipes/tiny/wspo.yaml) and --chat_template
# ---------------------------------------------------------------------------------------------------------------------
def test_config_file_sets_args_of_every_kind_and_command_line_flags_win(monkeypatch, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# a comment\nlearning_rate: 1e-3\nbeta: 0.3\nuse_lora: true\ndisable_dropout: false\n"
                      "eval_split: null\nresume_allow_changes: [beta, seed]\nloss_level: sequence\nmax_steps: 7\n")
    args = parse(monkeypatch, "--config", str(recipe), "--beta", "0.2", "--disable_dropout")
    assert (args.learning_rate, args.beta, args.use_lora, args.disable_dropout) == (1e-3, 0.2, True, True)
    assert (args.eval_split, args.resume_allow_changes, args.loss_level, args.max_steps) == (None, ("beta", "seed"),
                                                                                              "sequence", 7)
    assert args.config == str(recipe) and args.preset is None
    assert args.config_sha256 == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert parse(monkeypatch, f"--config={recipe}", "--max_steps", "None").max_steps is None


def test_preset_tiny_is_the_tiny_recipe(monkeypatch):
    by_preset, by_config = parse(monkeypatch, "--preset", "tiny"), parse(monkeypatch, "--config", str(TINY_RECIPE))
    assert by_preset.config == by_config.config == str(TINY_RECIPE) and by_preset.preset == "tiny"
    assert dataclasses.replace(by_preset, preset=None) == by_config == dataclasses.replace(TINY, config_sha256=
                                                                                           by_config.config_sha256)
    assert (by_config.strong, by_config.beta, by_config.learning_rate, by_config.max_length) == \
        ("runs/tiny/sft-strong", 0.25, 5e-4, 128)  # the PRESETS dict's values, beta 0.25 since issue 23


@pytest.mark.parametrize("content, message", [
    ("learning_rat: 1e-5\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("world_size: 4\n", "unknown key 'world_size' (did you mean"),  # filled in at runtime, not a setting
    ("preset: tiny\n", "unknown key 'preset' (did you mean"),
    ("beta: [0.1\n", "cannot read it as YAML"),
    ("- beta\n- 0.1\n", "is not a mapping of Args fields"),
    (None, "cannot read it as YAML ([Errno 2] No such file or directory"),
])
def test_bad_config_files_exit_2_naming_the_file(monkeypatch, capsys, tmp_path, content, message):
    recipe = tmp_path / "r.yaml"
    if content is not None:
        recipe.write_text(content)
    with pytest.raises(SystemExit) as e:
        parse(monkeypatch, "--config", str(recipe), "--output_dir", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --config {recipe}") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_config_and_preset_together_and_bad_values_are_refused(monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        parse(monkeypatch, "--preset", "tiny", "--config", str(TINY_RECIPE))
    assert e.value.code == 2 and "--preset tiny is --config recipes/tiny/wspo.yaml: pass one of them" in \
        capsys.readouterr().err
    (tmp_path / "r.yaml").write_text("max_steps: many\n")  # a value is type-checked as on the command line
    p = run_script("wspo.py", "--config", str(tmp_path / "r.yaml"), "--output_dir", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "max_steps" in p.stderr and "'many'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_every_wspo_recipe_parses(monkeypatch):
    recipes = sorted((ROOT / "recipes").glob("*/wspo*.yaml"))
    assert [str(r.relative_to(ROOT / "recipes")) for r in recipes] == ["tiny/wspo.yaml", "wspo/wspo-qwen2-7b-full.yaml",
                                                                       "wspo/wspo-qwen2-7b-lora.yaml"]
    full, lora = (parse(monkeypatch, "--config", str(r)) for r in recipes[1:])
    assert (full.learning_rate, full.num_train_epochs, full.gradient_accumulation_steps, full.beta) == (1e-5, 1, 4, 0.1)
    assert (lora.learning_rate, lora.num_train_epochs, lora.gradient_accumulation_steps) == (5e-6, 3, 8)
    assert (lora.use_lora, lora.lora_r, lora.lora_alpha, lora.lora_dropout) == (True, 8, 16, 0.0)
    assert full.max_length == lora.max_length == 4096 and full.weak_aligned == "runs/qwen2-1.5b-dpo"


def test_resume_accepts_the_same_settings_from_another_config_file(tiny, four, finished, tmp_path, monkeypatch,
                                                                   capsys):
    root, _ = finished
    copy = tmp_path / "tiny.yaml"  # another path and content hash, the same settings
    copy.write_text(TINY_RECIPE.read_text() + "# a copy\n")
    same = ("--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "8")
    args = parse(monkeypatch, "--config", str(copy), *wspo_argv(tiny, four, root, *same, "--resume")[2:])
    with pytest.raises(SystemExit) as e:
        wspo.validate(args)
    assert e.value.code == 0 and f"run in {root / 'o'} already finished (step 4)" in capsys.readouterr().out


def without_chat_template(folder, to):
    """A copy of a model folder whose tokenizer ships no chat template."""
    import shutil

    shutil.copytree(folder, to)
    (to / "chat_template.jinja").unlink(missing_ok=True)
    config = json.load(open(to / "tokenizer_config.json"))
    config.pop("chat_template", None)
    json.dump(config, open(to / "tokenizer_config.json", "w"))
    assert AutoTokenizer.from_pretrained(to).chat_template is None
    return str(to)


def test_base_tokenizers_train_with_chat_template_and_the_saved_tokenizer_has_it(tiny, four, tmp_path):
    template = AutoTokenizer.from_pretrained(four["strong"]).chat_template
    (tmp_path / "chat.jinja").write_text(template)
    bare = {k: without_chat_template(four[k], tmp_path / k) for k in ("strong", "wref", "wal")}
    models = ("--strong", bare["strong"], "--weak_ref", bare["wref"], "--weak_aligned", bare["wal"])
    p = run_wspo(tiny, four, tmp_path, *models, "--eval_split", "None")
    assert p.returncode == 2 and (f"error: tokenizer of '{bare['strong']}' has no chat template: pass --chat_template "
                                  "(a Jinja string or a .jinja file)") in p.stderr and not (tmp_path / "o").exists()
    p = run_wspo(tiny, four, tmp_path, *models, "--eval_split", "None", "--chat_template", str(tmp_path / "chat.jinja"),
                 check=True)
    # all four tokenizers got it: the weak ones have the strong one's definition
    assert all(f"tokenizer check: {bare[k]} has the strong model's tokenizer" in p.stdout for k in ("wref", "wal"))
    assert AutoTokenizer.from_pretrained(tmp_path / "o").chat_template == template
    assert json.load(open(tmp_path / "o" / "args.json"))["chat_template"] == str(tmp_path / "chat.jinja")


def test_chat_template_string_applies_only_to_tokenizers_that_ship_none(four, tmp_path):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    args = dataclasses.replace(TINY, chat_template=template)
    bare = without_chat_template(four["strong"], tmp_path / "s")
    assert wspo.load_pretrained(AutoTokenizer, bare, args).chat_template == template
    assert wspo.load_pretrained(AutoTokenizer, four["strong"], args).chat_template == \
        AutoTokenizer.from_pretrained(four["strong"]).chat_template != template


@pytest.mark.parametrize("argv, message", [
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be positive (got -1)"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be positive (got 0)"),
    (["--learning_rate", "-1e-5"], "--learning_rate must be non-negative (got -1e-05)"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1] (got 1.5)"),
    (["--beta", "0"], "--beta must be positive (got 0.0)"),
    (["--max_steps", "0"], "--max_steps must be positive (got 0)"),
    (["--save_total_limit", "0"], "--save_total_limit must be positive (got 0)"),
    (["--max_prompt_length", "128"], "--max_prompt_length (128) must be below --max_length (128)"),
    (["--eval_fraction", "1.0"], "--eval_fraction must be in (0, 1) (got 1.0)"),
    (["--resume", "--overwrite_output_dir"], "pass one of them"),
    (["--resume_allow_changes", "beta"], "--resume_allow_changes only applies with --resume"),
    (["--resume", "--resume_allow_changes", "betta"], "unknown arguments ['betta']"),
    (["--eval_fraction", "0.1", "--eval_dataset_name", "x.jsonl"], "pass one of them"),
    (["--eval_split", "train_prefs"], "is the training split"),
    (["--chat_template", "no/such/template.jinja"], "--chat_template no/such/template.jinja does not exist"),
])
def test_bad_arguments_fail_before_anything_is_loaded(monkeypatch, capsys, tmp_path, argv, message):
    args = parse(monkeypatch, "--preset", "tiny", "--output_dir", str(tmp_path / "o"), *argv)
    with pytest.raises(SystemExit) as e:
        wspo.validate(args)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_batch_size_exits_2_on_the_command_line_and_writes_nothing(tmp_path):
    p = run_script("wspo.py", "--preset", "tiny", "--per_device_train_batch_size", "-1", "--output_dir",
                   str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c"), check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: --per_device_train_batch_size must be positive (got -1)"
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def finished(tiny, four, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4), shared by the tests below (they copy it before changing it)."""
    root = tmp_path_factory.mktemp("finished")
    p = run_wspo(tiny, four, root, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2",
                 "--per_device_train_batch_size", "8", check=True)
    return root, p


def snapshot(folder):
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in folder.rglob("*")}


def test_run_logs_run_id_data_counts_and_per_window_perf(finished):
    root, p = finished
    rows = [json.loads(line) for line in open(root / "o" / "metrics.jsonl")]
    assert len({r["run_id"] for r in rows}) == 1 and rows[0]["run_id"].startswith("wspo__1__")
    assert rows[0]["data/train_examples"] == 64 and rows[0]["data/eval_examples"] == 32
    assert rows[0]["data/train_dropped"] == 0 and "data/train_prompts_cut" in rows[0]
    last, windows = rows[-1], [r for r in rows if "train/loss" in r]
    assert last["step"] == 4 and last["perf/peak_memory_gb"] > 0.05
    # issue 27: throughput per logging window (2 steps x 8 examples each); benchmarks/ derives the steady state
    assert [r["step"] for r in windows] == [2, 4] and all(r["perf/examples_per_s"] > 0 for r in windows)
    assert all(r["perf/tokens_per_s"] > 10 * r["perf/examples_per_s"] for r in windows)
    saved = json.load(open(root / "o" / "args.json"))
    assert saved["completed_steps"] == 4 and saved["run_id"] == rows[0]["run_id"]
    # issue 29: --preset tiny read recipes/tiny/wspo.yaml; args.json names the file and its content hash
    assert saved["config"] == str(TINY_RECIPE) and saved["preset"] == "tiny"
    assert saved["config_sha256"] == hashlib.sha256(TINY_RECIPE.read_bytes()).hexdigest()
    assert sorted(os.listdir(root / "o" / "checkpoints")) == ["step-2", "step-4"]


def test_existing_output_dir_is_refused_without_overwrite(tiny, four, finished):
    root, _ = finished
    before = snapshot(root / "o")
    p = run_wspo(tiny, four, root, "--max_steps", "4")
    assert p.returncode == 2 and f"output_dir {root / 'o'} already holds files" in p.stderr
    assert "--overwrite_output_dir" in p.stderr and "--resume" in p.stderr and "Traceback" not in p.stderr
    assert snapshot(root / "o") == before


def test_resume_refuses_changed_arguments_and_a_finished_run_exits_0(tiny, four, finished, tmp_path):
    root, _ = finished
    before = snapshot(root / "o")
    same = ("--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "8")
    p = run_wspo(tiny, four, root, *same, "--resume", "--learning_rate", "1e-3")
    assert p.returncode == 2 and "learning_rate: 0.0005 -> 0.001" in p.stderr
    assert "--resume_allow_changes learning_rate" in p.stderr
    for allow in ((), ("--resume_allow_changes", "learning_rate")):  # allowed but unchanged: as dpo.py, nothing to do
        p = run_wspo(tiny, four, root, *same, "--resume", *allow)
        assert p.returncode == 0 and f"run in {root / 'o'} already finished (step 4); nothing to do" in p.stdout
        assert "pre-pass" not in p.stdout and snapshot(root / "o") == before


def test_resume_with_allowed_change_continues_and_never_passes_max_steps(tiny, four, finished, tmp_path):
    import shutil

    root, _ = finished
    shutil.copytree(root / "o", tmp_path / "o")
    shutil.copytree(root / "c", tmp_path / "c")
    shutil.rmtree(tmp_path / "o" / "checkpoints" / "step-4")  # as if stopped after step 2, then max_steps lowered
    p = run_wspo(tiny, four, tmp_path, "--max_steps", "3", "--save_steps", "2", "--logging_steps", "1",
                 "--per_device_train_batch_size", "8", "--resume", "--resume_allow_changes", "max_steps", check=True)
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    new = [r for r in rows if r["run_id"] != rows[0]["run_id"]]
    assert [r["step"] for r in new if "train/loss" in r] == [3] and max(r["step"] for r in new) == 3
    assert json.load(open(tmp_path / "o" / "args.json"))["completed_steps"] == 3
    assert "resumed from" in p.stdout and "(step 2)" in p.stdout


def test_single_file_dataset_needs_an_explicit_eval_source(tiny, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prefs.jsonl"
    wspo.load_split(str(tiny / "ultrafeedback"), None, "train_prefs").select(range(40)).to_json(data)
    base = ("--preset", "tiny", "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"))
    with pytest.raises(SystemExit) as e:
        wspo.validate(parse(monkeypatch, *base))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is a single file" in err
    assert all(fix in err for fix in ("--eval_dataset_name FILE", "--eval_fraction 0.05", "--eval_split None"))
    with pytest.raises(SystemExit):
        wspo.validate(parse(monkeypatch, *base, "--eval_dataset_name", str(data)))
    assert "is the training data" in capsys.readouterr().err
    args = parse(monkeypatch, *base, "--eval_fraction", "0.25")
    wspo.validate(args)
    logs = []
    train, ev = wspo.load_raw_splits(args, logs.append)
    assert (len(train), len(ev)) == (30, 10) and "10 examples held out" in logs[0]
    assert not set(map(json.dumps, train["prompt"])) & set(map(json.dumps, ev["prompt"]))


@pytest.mark.parametrize("content, message", [
    ("", "is empty: it holds no examples"),
    ('{"prompt": "a", "chosen": "b"}\n{"prompt": "a", "chosen": \n', "line 2 is not valid JSON"),
    ('{"prompt": "a", "chosen": "b"}\n\n{"prompt": "a", "chosen": 3}\n', "line 3: 'chosen' is a int, but a str on line 1"),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, capsys, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(SystemExit) as e:
        wspo.load_split(str(tmp_path / "d.jsonl"), None, None)
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "d.jsonl") in err and message in err and "Traceback" not in err


def test_malformed_jsonl_on_the_command_line_exits_2_without_traceback(tiny, four, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "chosen": "b"}\nnot json\n')
    p = run_wspo(tiny, four, tmp_path, "--dataset_name", str(tmp_path / "d.jsonl"), "--eval_split", "None")
    assert p.returncode == 2 and "line 2 is not valid JSON" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_bad_model_path_names_the_model_with_a_fitting_hint(tiny, four, tmp_path):
    p = run_wspo(tiny, four, tmp_path, "--strong", "runs/no_such_model")
    assert p.returncode == 2 and "could not load model 'runs/no_such_model'" in p.stderr
    assert "no such local folder" in p.stderr and "run_tiny.sh" in p.stderr and "tokenizer" not in p.stderr
    assert "pass --preset tiny" not in p.stderr and not (tmp_path / "o").exists()
    # issue 26 case 15: a folder that exists but holds no saved model is named for what it is
    empty, checkpoint = not_a_model_folders(tmp_path)
    for folder, why in ((empty, "the folder is empty"), (checkpoint, "that folder holds a training checkpoint "
                                                                     "(optimizer state), not a saved model")):
        p = run_wspo(tiny, four, tmp_path, "--strong", str(folder))
        assert p.returncode == 2 and f"could not load model '{folder}': {why}" in p.stderr, p.stderr[-2000:]
        assert "tokenizer" not in p.stderr and not (tmp_path / "o").exists()


def test_no_network_is_reported_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    start = time.time()
    p = subprocess.run([sys.executable, "wspo.py", "--output_dir", str(tmp_path / "o")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and time.time() - start < 30
    assert "no network: cannot reach the Hugging Face Hub for 'Qwen/Qwen2-7B'" in p.stderr and "HF_HUB_OFFLINE=1" in p.stderr


def test_prompt_truncation_drops_whole_turns_then_cuts_user_text_after_its_header(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    words = " ".join(["copy one two three"] * 6)
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": words},
              {"role": "assistant", "content": "one two"}, {"role": "user", "content": words}]
    full = wspo.chat_ids(tok, prompt, add_generation_prompt=True)
    last_turn = wspo.chat_ids(tok, prompt[:1] + prompt[3:], add_generation_prompt=True)
    ids, kept, cut = wspo.fit_prompt(tok, prompt, len(last_turn))  # room for the system message + last turn
    assert cut and ids == last_turn and kept == prompt[:1] + prompt[3:] and len(full) > len(last_turn)
    ids, kept, cut = wspo.fit_prompt(tok, prompt, len(last_turn) - 5)  # the oldest user text loses 5 tokens
    assert cut and len(ids) == len(last_turn) - 5
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("three<|im_end|>\n<|im_start|>assistant\n")
    assert wspo.fit_prompt(tok, prompt, 10) is None  # headers alone do not fit: a counted skip, never a cut header
    args = dataclasses.replace(TINY, max_prompt_length=len(last_turn) - 5)
    from datasets import Dataset

    ds = Dataset.from_list([{"chosen": prompt + [{"role": "assistant", "content": "one"}]},
                            {"chosen": [{"role": "user", "content": "copy one"}, {"role": "assistant", "content": "one"}]}])
    logs = []
    _, _, counts = wspo.prepare_split(ds, None, tok, args, "train", "mem", logs.append)
    assert counts["data/train_prompts_cut"] == 1 and counts["data/train_examples"] == 2
    assert "1 prompts cut, 0 responses cut" in logs[0]


def test_non_finite_loss_stops_without_updating_or_saving(tiny, four, tmp_path):
    from safetensors.torch import load_file, save_file

    import shutil

    nan_weak = tmp_path / "nan_weak"
    shutil.copytree(four["wal"], nan_weak)
    w = load_file(nan_weak / "model.safetensors")
    w["model.norm.weight"][:] = float("nan")  # every log-prob of the weak aligned model is NaN: the loss too
    save_file(w, nan_weak / "model.safetensors", metadata={"format": "pt"})
    p = run_wspo(tiny, four, tmp_path, "--weak_aligned", str(nan_weak), "--save_steps", "2", "--logging_steps", "3",
                 "--max_steps", "4", "--eval_split", "None")
    assert p.returncode == 1 and "non-finite loss or gradient at step 1: no update was applied" in p.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists() and not (tmp_path / "o" / "checkpoints").exists()
