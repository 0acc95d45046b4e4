"""wspo.py: the loss against the official four-models-live formulation, the cached pre-pass,
tokenizer checks and clear errors. (End to end ordering: tests/test_pipeline.py.)"""

import dataclasses
import json
import sys

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from conftest import ROOT, load_script, run_script

wspo = load_script("wspo")


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
    args = dataclasses.replace(wspo.PRESETS["tiny"], dataset_name=str(tiny / "ultrafeedback"), strong=four["strong"],
                               strong_ref=four["sref"], weak_ref=four["wref"], weak_aligned=four["wal"],
                               cache_dir=str(tmp_path / "cache"), prepass_batch_size=3, loss_level=level,
                               beta=0.1, weak_coef=1.0)  # the official values, as in the formula below
    tok = AutoTokenizer.from_pretrained(four["strong"])
    raw = wspo.load_split(args.dataset_name, None, "test_prefs").select(range(5))
    ds, _ = wspo.prepare_dataset(raw, tok, args, "train", print)
    acc = Accelerator(cpu=True)
    collate_fn = lambda rows, keys=("chosen_ids",): wspo.collate(rows, tok.pad_token_id, False, keys)
    caches = {k: wspo.prepass(four[k], ds, ("chosen_ids",), args, acc, collate_fn, print) for k in ("sref", "wref", "wal")}
    again = wspo.prepass(four["wal"], ds, ("chosen_ids",), args, acc, collate_fn, print)  # from the cache file
    assert torch.equal(again["values"], caches["wal"]["values"]) and len(list((tmp_path / "cache").iterdir())) == 3

    policy = Qwen2ForCausalLM.from_pretrained(four["strong"]).eval()
    batch = collate_fn([ds[i] for i in range(5)])
    with torch.no_grad():
        lp = wspo.token_logps(policy, batch)
    seq = batch["seq_id"][batch["loss_mask"]]
    rows = batch["row"]
    weak = wspo.lookup(caches["wal"], rows, 5) - wspo.lookup(caches["wref"], rows, 5)
    losses, _ = wspo.wspo_loss(lp.double(), wspo.lookup(caches["sref"], rows, 5).double(), weak.double(), seq, 5,
                               args.beta, args.weak_coef, level)

    want = []
    for r in range(5):
        ex = ds[r]
        ids, n_prompt = ex["prompt_ids"] + ex["chosen_ids"], len(ex["prompt_ids"])
        pi, sref, wref, wal = (live_token_logps(four[k], ids, n_prompt) for k in ("strong", "sref", "wref", "wal"))
        # the cached pre-pass values equal live ones, token by token
        torch.testing.assert_close(wspo.lookup(caches["sref"], torch.tensor([r]), 5).double(), sref, atol=1e-5, rtol=0)
        if level == "token":  # official trainer: d_t = beta (pi - sref) - (wal - wref); sum_t d_t^2 / |y|
            d = 0.1 * (pi - sref) - 1.0 * (wal - wref)
            want.append((d**2).sum() / len(d))
        else:  # the paper's sequence-level form
            want.append((0.1 * (pi - sref).sum() - (wal - wref).sum()) ** 2)
    torch.testing.assert_close(losses, torch.stack(want), atol=1e-6, rtol=1e-6)
    assert losses.mean() > 0


def test_rejected_are_never_forwarded_in_training(tiny, four):
    args = dataclasses.replace(wspo.PRESETS["tiny"])
    tok = AutoTokenizer.from_pretrained(four["strong"])
    raw = wspo.load_split(str(tiny / "ultrafeedback"), None, "test_prefs").select(range(4))
    train, with_rej = wspo.prepare_dataset(raw, tok, args, "train", print)
    assert not with_rej and all(len(r) == 0 for r in train["rejected_ids"])
    batch = wspo.collate([train[i] for i in range(4)], tok.pad_token_id, False)
    assert batch["n_seqs"] == 4 and batch["input_ids"].shape[0] == 4
    ev, with_rej = wspo.prepare_dataset(raw, tok, args, "eval", print)
    assert with_rej and all(len(r) > 0 for r in ev["rejected_ids"])


def run_wspo(tiny, four, tmp_path, *extra, check=False):
    return run_script("wspo.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrafeedback"), "--strong", four["strong"],
                      "--weak_ref", four["wref"], "--weak_aligned", four["wal"], "--output_dir", str(tmp_path / "o"),
                      "--cache_dir", str(tmp_path / "c"), "--max_train_samples", "64", "--max_eval_samples", "32",
                      "--max_steps", "2", *extra, check=check)


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
    p2 = run_wspo(tiny, four, tmp_path, check=True)
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
    base = ("wspo.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrafeedback"), "--strong", four["strong"],
            "--weak_ref", four["wref"], "--weak_aligned", four["wal"], "--cache_dir", str(tmp_path / "c"), *common)
    run_script(*base, "--output_dir", str(full), "--save_steps", "3", "--save_total_limit", "5")
    (cut / "checkpoints").mkdir(parents=True)  # a run killed right after step 3
    shutil.copytree(full / "checkpoints" / "step-3", cut / "checkpoints" / "step-3")
    run_script(*base, "--output_dir", str(cut), "--resume")
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
    args = wspo.PRESETS["tiny"]
    u = lambda p: {"role": "user", "content": p}
    assert wspo.tokenize_example(tok, {"prompt": "copy one", "chosen": [u("copy one"), {"role": "assistant", "content": " "}]},
                                 args, False)["skip"] == "empty response"
    assert wspo.tokenize_example(tok, {"prompt": "copy one", "chosen": [u("copy one")]}, args, False)["skip"] == \
        "response is not a conversation ending in an assistant turn"
    ok = wspo.tokenize_example(tok, {"prompt": "copy one", "chosen": "ok one done"}, args, False)
    assert ok["skip"] == "" and tok.decode(ok["chosen_ids"]) == "ok one done<|im_end|>"


def test_same_seed_same_loss_curve_bit_for_bit(tiny, four, tmp_path):
    from safetensors.torch import load_file

    runs = {}
    for name in ("a", "b"):
        run_script("wspo.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrafeedback"), "--strong", four["strong"],
                   "--weak_ref", four["wref"], "--weak_aligned", four["wal"], "--output_dir", str(tmp_path / name),
                   "--cache_dir", str(tmp_path / "c"), "--max_train_samples", "64", "--eval_split", "None",
                   "--max_steps", "4", "--logging_steps", "1", "--per_device_train_batch_size", "8")
        runs[name] = [json.loads(line)["train/loss"] for line in open(tmp_path / name / "metrics.jsonl")]
    assert len(runs["a"]) == 4 and runs["a"] == runs["b"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
