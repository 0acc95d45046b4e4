"""dpo.py: the losses against REFERENCE.md, cached vs live reference, padding-free batches, bad input,
and end to end on the tiny setting."""

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import tyro
from transformers import AutoTokenizer

from conftest import ROOT, load_script, run_script, not_a_model_folders

dpo = load_script("dpo")


def tiny_recipe(script):
    """The Args --preset tiny gives: recipes/tiny/<script>.yaml read as the script reads it."""
    return tyro.cli(script.Args, args=script.read_config(str(ROOT / "recipes" / "tiny" / f"{script.__name__}.yaml")))


TINY = tiny_recipe(dpo)


def dpo_args(tiny, small_sft, out, cache, *extra):
    return ["dpo.py", "--preset", "tiny", "--model_name_or_path", str(small_sft), "--dataset_name",
            str(tiny / "ultrafeedback"), "--output_dir", str(out), "--cache_dir", str(cache), *extra]


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


# fixed log-probs: policy chosen/rejected, reference chosen/rejected
PC, PR = torch.tensor([-10.0, -22.5, -7.25, -30.0]), torch.tensor([-12.0, -20.0, -9.0, -31.5])
RC, RR = torch.tensor([-11.0, -21.0, -8.0, -29.0]), torch.tensor([-11.5, -21.5, -8.5, -30.0])


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_loss_matches_reference_formula(beta, eps):
    losses, rc, rr = dpo.dpo_loss(PC, PR, RC, RR, beta, "sigmoid", eps)
    h = (PC - RC) - (PR - RR)
    want = [-(1 - eps) * torch.log(torch.sigmoid(beta * x)) - eps * torch.log(torch.sigmoid(-beta * x)) for x in h]
    torch.testing.assert_close(losses, torch.stack(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(rc, beta * (PC - RC))
    torch.testing.assert_close(rr, beta * (PR - RR))
    assert float(losses[0]) == pytest.approx(-(1 - eps) * F.logsigmoid(torch.tensor(beta * 1.5)).item()
                                             - eps * F.logsigmoid(torch.tensor(-beta * 1.5)).item(), abs=1e-6)


def test_ipo_and_hinge_match_reference_formula():
    beta = 0.1
    h = (PC - RC) - (PR - RR)
    torch.testing.assert_close(dpo.dpo_loss(PC, PR, RC, RR, beta, "ipo")[0], (h - 1 / (2 * beta)) ** 2)
    torch.testing.assert_close(dpo.dpo_loss(PC, PR, RC, RR, beta, "hinge")[0], torch.clamp(1 - beta * h, min=0))
    assert dpo.dpo_loss(PC, PR, RC, RR, beta, "hinge")[0][0].item() == pytest.approx(1 - 0.1 * 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_equal_log_softmax_and_gradients_match(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 50)).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (37,))
    targets[:5] = logits[:5].argmax(-1)  # some rows where the target carries most of the mass
    upstream = torch.randn(37)  # as from the loss: a different gradient per token
    got = dpo.TokenLogps.apply(logits, targets)
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    (g1,) = torch.autograd.grad((got * upstream).sum(), logits)
    (g2,) = torch.autograd.grad((want * upstream.double()).sum(), logits)
    assert g1.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the gradient buffer has the logits' dtype
    torch.testing.assert_close(g1.double(), g2.double(), atol=tol, rtol=0)
    if dtype == torch.float32:  # bit for bit the closed form: -softmax * grad (max-shifted), then + grad at the target
        shifted = logits.detach() - logits.detach().max(-1, keepdim=True).values
        closed = (shifted - shifted.exp().sum(-1, keepdim=True).log()).exp() * -upstream[:, None]
        closed[torch.arange(37), targets] += upstream
        assert torch.equal(g1, closed)


def test_token_logps_bf16_gradient_keeps_its_precision_on_confident_tokens():
    """onehot - softmax is built in fp32 and cast once: on target tokens with p > 0.9 the bf16 gradient is within 1%
    of fp32 autograd (rounding -softmax * grad to bf16 before adding the onehot term gave errors of 8-25%)."""
    torch.manual_seed(1)
    n, vocab = 400, 1000
    logits = torch.randn(n, vocab).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,))
    logits[torch.arange(n), targets] = torch.linspace(4, 16, n).to(torch.bfloat16)  # p of the target from ~0.05 to ~1
    upstream = torch.rand(n) + 0.5
    x = logits.clone().requires_grad_(True)
    (got,) = torch.autograd.grad((dpo.TokenLogps.apply(x, targets) * upstream).sum(), x)
    y = logits.float().requires_grad_(True)
    (want,) = torch.autograd.grad((torch.log_softmax(y, -1).gather(-1, targets[:, None])[:, 0] * upstream).sum(), y)
    p = torch.softmax(logits.float(), -1)[torch.arange(n), targets]
    confident = p > 0.9
    assert 50 < confident.sum() < n
    rows = torch.arange(n)[confident]
    rel = ((got[rows, targets[confident]].float() - want[rows, targets[confident]]).abs()
           / want[rows, targets[confident]].abs())
    assert rel.max() < 0.01, rel.max()
    old = (x.detach().float() - x.detach().float().logsumexp(-1, keepdim=True)).exp().mul(-upstream[:, None])
    old = old.to(torch.bfloat16).scatter_add(-1, targets[:, None], upstream[:, None].to(torch.bfloat16))
    old_rel = (old[rows, targets[confident]].float() - want[rows, targets[confident]]).abs() / want[rows, targets[confident]].abs()
    assert old_rel.median() > 0.05  # the old formula: the error this test guards against


@pytest.mark.parametrize("chunk_elements", [50 * 7, 50 * 1000])  # 7 rows per chunk (6 chunks), or one chunk
def test_chunked_lm_head_equals_log_softmax_of_full_logits_values_and_gradients(chunk_elements):
    """token_logps applies the LM head chunk by chunk and recomputes each chunk's logits in backward: the log-probs
    and the gradients (hidden states and head weight) equal autograd through log_softmax of the full logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).double()
    hidden = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (40,))
    upstream = torch.randn(40, dtype=torch.float64)
    got = dpo.token_logps(head, hidden, targets, chunk_elements=chunk_elements)
    want = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # the same fp32 log-softmax, row by row
    g_got = torch.autograd.grad((got.double() * upstream).sum(), [hidden, head.weight])
    g_want = torch.autograd.grad((want.double() * upstream).sum(), [hidden, head.weight])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        assert b.abs().max() > 1e-2


def pair_batch(tiny, model_dir, padding_free, length_groups=1):
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = dataclasses.replace(TINY, dataset_name=str(tiny / "ultrafeedback"))
    ds = dpo.load_split(args.dataset_name, None, "test_prefs").select(range(6))
    rows = [{**dpo.tokenize_pair(tok, ex, args), "row": i} for i, ex in enumerate(ds)]
    return dpo.collate(rows, tok.pad_token_id, padding_free, length_groups), rows, tok


def test_padding_free_and_length_groups_equal_padded(tiny, small_sft):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_sft).eval()
    padded, rows, tok = pair_batch(tiny, small_sft, False)
    packed, _, _ = pair_batch(tiny, small_sft, True)
    grouped, _, _ = pair_batch(tiny, small_sft, False, length_groups=5)
    assert len(padded["parts"]) == 1 and len(packed["parts"]) == 1 and packed["parts"][0]["input_ids"].shape[0] == 1
    # 12 sequences sorted by length in 5 groups (sizes 2, 2, 3, 2, 3), each padded to its own longest:
    # every sequence exactly once, less padding than one part
    lengths = sorted(len(r["prompt_ids"] + r[k]) for k in ("chosen_ids", "rejected_ids") for r in rows)
    assert [p["input_ids"].shape[0] for p in grouped["parts"]] == [2, 2, 3, 2, 3]
    assert sorted(torch.cat([p["seq_id"][:, 0] for p in grouped["parts"]]).tolist()) == list(range(12))
    assert [p["input_ids"].shape[1] for p in grouped["parts"]] == [lengths[i] for i in (1, 3, 6, 8, 11)]
    assert sum(p["input_ids"].numel() for p in grouped["parts"]) < padded["parts"][0]["input_ids"].numel()
    with torch.no_grad():
        lp, np_ = dpo.sequence_logps(model, padded)
        lk, nk = dpo.sequence_logps(model, packed)
        lg, ng = dpo.sequence_logps(model, grouped)
    torch.testing.assert_close(lp, lk, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lp, lg, atol=1e-4, rtol=1e-5)
    assert nk.tolist() == [len(r["chosen_ids"]) for r in rows] + [len(r["rejected_ids"]) for r in rows] == np_.tolist() == ng.tolist()
    # and against a plain full-logits computation
    one = padded["parts"][0]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits, -1)
    for i, r in enumerate(rows):
        ids = r["prompt_ids"] + r["chosen_ids"]
        want = sum(full[i, t - 1, ids[t]].item() for t in range(len(r["prompt_ids"]), len(ids)))
        assert lp[i].item() == pytest.approx(want, abs=1e-4)


def test_tokenize_pair_truncation_and_skips(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    args = dataclasses.replace(TINY, max_length=30, max_prompt_length=19)
    msg = lambda p, r: [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    ex = {"prompt": "copy one two", "chosen": msg("copy one two", "sure one two " + "done " * 10),
          "rejected": msg("copy one two", "meh one two now go away")}
    out = dpo.tokenize_pair(tok, ex, args)
    # 21 prompt tokens (the template's default system message, then the user turn) > 19: the user text loses its
    # start; the role headers and the generation prompt stay whole
    assert len(dpo.chat_ids(tok, ex["chosen"][:1], add_generation_prompt=True)) == 21
    assert out["prompt_ids"] == dpo.chat_ids(tok, [{"role": "user", "content": " two"}], add_generation_prompt=True)
    assert len(out["prompt_ids"]) == 19 and out["prompt_cut"]
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 30 and out["chosen_ids"][-1] == tok.eos_token_id
    assert out["skip"] == "" and out["responses_cut"] == 1  # the rejected response fits
    plain = dpo.tokenize_pair(tok, {"prompt": "copy one", "chosen": "ok one done", "rejected": "meh one done"},
                              dataclasses.replace(args, max_length=64, max_prompt_length=32))
    assert tok.decode(plain["chosen_ids"]) == "ok one done<|im_end|>" and plain["skip"] == ""
    assert not plain["prompt_cut"] and plain["responses_cut"] == 0
    same = dpo.tokenize_pair(tok, {"prompt": "p", "chosen": "ok one", "rejected": "ok one"}, args)
    assert same["skip"] == "chosen identical to rejected"
    empty = dpo.tokenize_pair(tok, {"prompt": "p", "chosen": " ", "rejected": "ok one"}, args)
    assert empty["skip"] == "empty chosen or rejected"
    tight = dpo.tokenize_pair(tok, ex, dataclasses.replace(args, max_length=20, max_prompt_length=19))
    assert tight["skip"] == "prompt leaves no room for a response"
    system_only = dpo.tokenize_pair(tok, ex, dataclasses.replace(args, max_prompt_length=17))  # an empty user text: 18
    assert system_only["skip"] == "prompt too long to cut (system message)"


def test_prompt_truncation_drops_earlier_turns_first_and_never_cuts_a_role_header(tiny):
    """system (13 tokens) + user (8) + assistant (8) + user (10) + generation prompt (3) = 42 tokens."""
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    system, user1 = {"role": "system", "content": "be brief"}, {"role": "user", "content": "copy one two"}
    asst1, user2 = {"role": "assistant", "content": "ok one two"}, {"role": "user", "content": "copy three four five six"}
    prompt = [system, user1, asst1, user2]
    answer = lambda text: prompt + [{"role": "assistant", "content": text}]
    ex = {"prompt": "x", "chosen": answer("ok three"), "rejected": answer("meh three")}
    cut = lambda n: dpo.tokenize_pair(tok, ex, dataclasses.replace(TINY, max_length=64, max_prompt_length=n))
    assert len(dpo.chat_ids(tok, prompt, add_generation_prompt=True)) == 42 and not cut(42)["prompt_cut"]
    # 26: the first user / assistant turns go whole; the system message stays
    assert cut(26)["prompt_ids"] == dpo.chat_ids(tok, [system, user2], add_generation_prompt=True) and cut(26)["prompt_cut"]
    # 24: then the oldest remaining user text loses its first words, after its header
    out = cut(24)
    assert len(out["prompt_ids"]) <= 24 and out["prompt_cut"]
    assert tok.decode(out["prompt_ids"]) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n four five six"
                                             "<|im_end|>\n<|im_start|>assistant\n")
    # 15: the system message alone leaves no room for a user turn: a counted skip
    assert cut(15)["skip"] == "prompt too long to cut (system message)"


def test_end_to_end_learns_and_reuses_the_cache(tiny, small_sft, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "dpo"
    p = run_script(*dpo_args(tiny, small_sft, out, cache, "--max_steps", "40", "--logging_steps", "10"))
    assert "computed" in p.stdout and len(list(cache.glob("ref-logps-*.safetensors"))) == 2
    m = metrics(out)
    evals = [r for r in m if "eval/loss" in r]
    assert evals[0]["eval/rewards/accuracies"] == 0.0 and evals[0]["eval/loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[-1]["eval/rewards/accuracies"] > 0.75 and evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.01
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    # a rerun reuses both caches
    p2 = run_script(*dpo_args(tiny, small_sft, tmp_path / "again", cache, "--max_steps", "2", "--logging_steps", "1"))
    assert p2.stdout.count("reusing the cache") == 2 and "computed" not in p2.stdout


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_step0_rewards_are_exactly_zero_and_the_cache_equals_a_live_reference(tiny, small_sft, tmp_path, precision):
    """At step 0 the policy is the reference: the pre-pass scores each pair in the batch it is evaluated (trained) in,
    under the same autocast, so every reward is exactly 0 (bf16 autocast on the CPU too), and the cached reference
    log-probs equal the policy's own (live) log-probs on those batches bit for bit."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    out, cache = tmp_path / "o", tmp_path / "c"
    run_script(*dpo_args(tiny, small_sft, out, cache, "--max_steps", "1", "--logging_steps", "1", "--max_eval_samples",
                         "64", "--max_train_samples", "128"), env={"ACCELERATE_MIXED_PRECISION": precision})
    m = metrics(out)
    assert m[0]["data/eval_pairs"] == 64 and m[0]["data/train_pairs"] == 128  # the data counts come first
    for row, split in ((m[1], "eval"), (m[2], "train")):  # eval at step 0; the first step runs the initial policy
        assert row["step"] == (0 if split == "eval" else 1)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert row[f"{split}/{k}"] == 0.0, (split, k, row)
        assert row[f"{split}/loss"] == pytest.approx(0.693147, abs=1e-6)
    # the live cross-check: the eval cache against the initial policy run on the eval batches, in fp32
    if precision == "no":
        tok = AutoTokenizer.from_pretrained(small_sft)
        args = dataclasses.replace(TINY, dataset_name=str(tiny / "ultrafeedback"), max_eval_samples=64,
                                   max_train_samples=8)
        ds = dpo.load_data(args, tok, lambda _: None)[1]
        model = AutoModelForCausalLM.from_pretrained(small_sft).eval()
        loader = torch.utils.data.DataLoader(ds, batch_size=args.per_device_eval_batch_size,
                                             collate_fn=lambda r: dpo.collate(r, tok.pad_token_id, False, args.length_groups))
        with torch.no_grad():
            live = torch.cat([dpo.sequence_logps(model, b)[0].view(2, -1) for b in loader], 1)
        caches = [safetensors.torch.load_file(f) for f in cache.glob("*.safetensors")]
        (cached,) = [c for c in caches if len(c["chosen"]) == 64]
        assert torch.equal(cached["chosen"].float(), live[0]) and torch.equal(cached["rejected"].float(), live[1])


def test_fp32_lm_head_grad_trains_under_bf16_with_the_plain_forward_and_reference_cache(tiny, small_sft, tmp_path,
                                                                                         monkeypatch):
    """--fp32_lm_head_grad routes the policy's LM head through ChunkedTokenLogps in dpo.py and wpo.py: the same
    log-probs bit for bit (only the weight gradient's sum is fp32), so the reference cache is shared (not in cache_key)
    and a 2-step bf16-autocast run starts at rewards exactly 0; it changes gradients, so --resume does not accept a
    new value silently (not in RESUME_SAFE)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    wpo = load_script("wpo")
    tok = AutoTokenizer.from_pretrained(small_sft)
    args = dataclasses.replace(TINY, dataset_name=str(tiny / "ultrafeedback"), max_eval_samples=16,
                               max_train_samples=8)
    ds = dpo.load_data(args, tok, lambda _: None)[1]
    batch = dpo.collate([ds[i] for i in range(16)], tok.pad_token_id, False, args.length_groups)
    model = AutoModelForCausalLM.from_pretrained(small_sft)
    for script in (dpo, wpo):
        chunked = []
        apply = script.ChunkedTokenLogps.apply
        monkeypatch.setattr(script.ChunkedTokenLogps, "apply", lambda *a: chunked.append(len(a[0])) or apply(*a))
        logps, grads = [], []
        for flag in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logps.append(script.sequence_logps(model, batch, flag)[0])
            logps[-1].sum().backward()
            grads.append(model.lm_head.weight.grad)
            model.zero_grad()
        assert sum(chunked) == sum(int(part["loss_mask"].sum()) for part in batch["parts"]), script  # every position
        assert torch.equal(logps[0], logps[1]), script
        assert 0 < (grads[1] - grads[0]).norm() < 2e-2 * grads[0].norm(), script  # bf16 rounding apart, not equal
        assert "fp32_lm_head_grad" not in script.RESUME_SAFE
        keys = {script.cache_key(dataclasses.replace(tiny_recipe(script), fp32_lm_head_grad=flag), str(small_sft),
                                 ds, "eval", SimpleNamespace(mixed_precision="bf16")) for flag in (False, True)}
        assert len(keys) == 1, script

    out = tmp_path / "o"
    run_script(*dpo_args(tiny, small_sft, out, tmp_path / "c", "--max_steps", "2", "--logging_steps", "1",
                         "--max_eval_samples", "64", "--max_train_samples", "128", "--fp32_lm_head_grad"),
               env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    train, evals = ([r for r in metrics(out) if f"{split}/loss" in r] for split in ("train", "eval"))
    assert [r["step"] for r in train] == [1, 2] and json.load(open(out / "args.json"))["fp32_lm_head_grad"] is True
    assert train[0]["train/rewards/margins"] == 0.0 and train[0]["train/loss"] == pytest.approx(0.693147, abs=1e-6)
    # the second step's update (the first has lr 0, warm-up) moved the policy: measured eval loss 0.69281
    assert [r["step"] for r in evals] == [0, 2] and evals[1]["eval/rewards/margins"] != 0.0
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"] == pytest.approx(0.693147, abs=1e-6)
    assert (out / "model.safetensors").exists()


def test_dropout_is_off_in_the_policy_lora_included(tiny, small_sft, tmp_path):
    """A model with attention dropout 0.5 and LoRA dropout 0.5: with --disable_dropout (default) the first step's
    rewards are exactly 0 (policy = reference); with it off, dropout makes them non-zero."""
    import shutil

    model = tmp_path / "dropout_model"
    shutil.copytree(small_sft, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.5}))
    common = ("--max_steps", "1", "--logging_steps", "1", "--eval_split", "None", "--max_train_samples", "64",
              "--use_lora", "--lora_dropout", "0.5")
    run_script(*dpo_args(tiny, model, tmp_path / "off", tmp_path / "c", *common))
    run_script(*dpo_args(tiny, model, tmp_path / "on", tmp_path / "c", *common, "--no_disable_dropout"))
    off, on = (next(r for r in metrics(tmp_path / name) if "train/loss" in r) for name in ("off", "on"))
    assert off["train/rewards/margins"] == 0.0 and off["train/rewards/chosen"] == 0.0
    assert abs(on["train/rewards/chosen"]) > 1e-4


def test_missing_column_is_a_clear_error(tiny, small_sft, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "copy one", "good": "ok one", "rejected": "meh one"}) + "\n")
    p = run_script(*dpo_args(tiny, small_sft, tmp_path / "o", tmp_path / "c", "--dataset_name", str(data),
                             "--train_split", "train", "--eval_split", "None"), check=False)
    assert p.returncode == 2 and "no column ['chosen']" in p.stderr and "--chosen_column" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "o").exists()


def parse_error(monkeypatch, capsys, *argv) -> str:
    """dpo.parse_args on argv (validation included): must exit with code 2; returns the message."""
    monkeypatch.setattr("sys.argv", ["dpo.py", *argv])
    with pytest.raises(SystemExit) as e:
        dpo.parse_args()
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be at least 1 (got -1)"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1 (got 0)"),
    (["--length_groups", "0"], "--length_groups must be at least 1 (got 0)"),
    (["--max_steps", "0"], "--max_steps must be at least 1 (got 0)"),
    (["--learning_rate", "-1e-5"], "--learning_rate must be non-negative (got -1e-05)"),
    (["--beta", "0"], "--beta must be positive (got 0.0)"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio must be in [0, 1] (got 1.5)"),
    (["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5) (got 0.5)"),
    (["--label_smoothing", "0.1", "--loss_type", "ipo"], "--label_smoothing applies to --loss_type sigmoid only"),
    (["--max_prompt_length", "128", "--max_length", "128"], "--max_prompt_length (128) must be below --max_length (128)"),
    (["--eval_fraction", "1.0"], "--eval_fraction must be in (0, 1) (got 1.0)"),
    (["--resume", "--overwrite_output_dir"], "--resume continues the run in output_dir, --overwrite_output_dir"),
    (["--resume_allow_changes", "learning_rate"], "--resume_allow_changes only applies with --resume"),
    (["--resume", "--resume_allow_changes", "lr"], "--resume_allow_changes: no such argument ['lr']"),
])
def test_bad_arguments_fail_before_anything_is_loaded(monkeypatch, capsys, tmp_path, argv, message):
    err = parse_error(monkeypatch, capsys, "--preset", "tiny", "--output_dir", str(tmp_path / "o"), *argv)
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_preset_with_equals_sign_and_explicit_flags_override(monkeypatch):
    monkeypatch.setattr("sys.argv", ["dpo.py", "--preset=tiny", "--model_name_or_path", "my/model", "--beta", "0.3"])
    args = dpo.parse_args()
    assert args.preset == "tiny" and args.max_length == 128 and args.model_name_or_path == "my/model" and args.beta == 0.3


@pytest.mark.parametrize("name, flags", [("dpo", ("--chat_template", "recipes/")),
                                         ("wpo", ("--no_clamp_weight", "--no_weight_sum_sq"))])
def test_help_documents_every_flag(name, flags):
    p = run_script(f"{name}.py", "--help")
    runtime = ("world_size", "global_batch_size", "data_fingerprint", "config_sha256")  # filled in at runtime: not flags
    for f in dataclasses.fields(load_script(name).Args):
        assert (f"--{f.name}" in p.stdout) == (f.name not in runtime), f.name
    assert all(flag in p.stdout for flag in flags)


# ---- --config FILE.yaml and --preset tiny (dpo.py and wpo.py read them the same way) ----------------------------------
def parse(monkeypatch, script, *argv):
    monkeypatch.setattr("sys.argv", [f"{script.__name__}.py", *argv])
    return script.parse_args()


@pytest.mark.parametrize("name", ["dpo", "wpo"])
def test_preset_tiny_is_the_tiny_recipe_file(monkeypatch, tmp_path, name):
    script = load_script(name)
    recipe = ROOT / "recipes" / "tiny" / f"{name}.yaml"
    by_preset = parse(monkeypatch, script, "--preset", "tiny", "--output_dir", str(tmp_path / "o"))
    by_config = parse(monkeypatch, script, "--config", str(recipe), "--output_dir", str(tmp_path / "o"))
    assert by_preset.preset == "tiny" and by_config.preset is None
    assert dataclasses.replace(by_preset, preset=None) == by_config
    assert by_config.config == str(recipe) and by_config.config_sha256 == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert (by_config.max_length, by_config.per_device_train_batch_size, by_config.learning_rate) == (128, 32, 1e-4)
    assert by_config.dataset_name == "data/tiny/ultrafeedback" and by_config.cache_dir == "runs/tiny/cache"


@pytest.mark.parametrize("name", ["dpo", "wpo"])
def test_config_values_are_typed_as_flags_and_flags_given_override_them(monkeypatch, tmp_path, name):
    script = load_script(name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("beta: 0.3\nlearning_rate: 1e-5  # PyYAML reads a string: parsed as a float\nuse_lora: true\n"
                      "disable_dropout: false\neval_split: null\nmax_steps: 7\nlora_target_modules: q_proj,v_proj\n"
                      "resume: true\nresume_allow_changes: [learning_rate, beta]\n")
    args = parse(monkeypatch, script, "--config", str(recipe), "--output_dir", str(tmp_path / "o"))
    assert (args.beta, args.learning_rate, args.use_lora, args.disable_dropout, args.eval_split) == (
        0.3, 1e-5, True, False, None)
    assert (args.max_steps, args.lora_target_modules, args.resume_allow_changes) == (7, "q_proj,v_proj",
                                                                                     ("learning_rate", "beta"))
    args = parse(monkeypatch, script, "--beta", "0.5", "--config", str(recipe), "--no_use_lora", "--output_dir",
                 str(tmp_path / "o"), "--eval_split", "test_prefs", "--resume_allow_changes", "seed")
    assert (args.beta, args.use_lora, args.eval_split, args.resume_allow_changes) == (0.5, False, "test_prefs", ("seed",))
    assert (args.learning_rate, args.max_steps, args.disable_dropout) == (1e-5, 7, False)  # the file's, not overridden


@pytest.mark.parametrize("name", ["dpo", "wpo"])
@pytest.mark.parametrize("content,message", [
    ("learning_rat: 1.0e-5\n", "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("bta: 0.1\n", "unknown key 'bta' (did you mean 'beta'?)"),
    ("global_batch_size: 128\n", "unknown key 'global_batch_size'"),  # filled in at runtime: no key
    ("preset: tiny\n", "unknown key 'preset'"),
    ("- beta\n", "must hold `key: value` lines of Args fields, not a list"),
    ("beta: [0.1\n", "while parsing a flow sequence"),
])
def test_bad_config_file_is_one_clear_error(monkeypatch, capsys, tmp_path, name, content, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    with pytest.raises(SystemExit) as e:
        parse(monkeypatch, load_script(name), "--config", str(recipe), "--output_dir", str(tmp_path / "o"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: --config {recipe}") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


WPO_BATCH = dict(per_device_train_batch_size=2, gradient_accumulation_steps=8, gradient_checkpointing=True, seed=42)


@pytest.mark.parametrize("recipe, published", [  # REFERENCE.md's published settings
    ("wspo/dpo-qwen2-1.5b-full.yaml", dict(beta=0.1, learning_rate=1e-5, num_train_epochs=1, use_lora=False,
                                           model_name_or_path="runs/qwen2-1.5b-sft")),
    ("wspo/dpo-qwen2-1.5b-lora.yaml", dict(beta=0.01, learning_rate=5e-6, num_train_epochs=3, use_lora=True,
                                           lora_r=8, lora_alpha=16, lora_dropout=0.0)),
    ("wpo/wpo-mistral-7b-offpolicy.yaml", dict(beta=0.01, learning_rate=5e-7, num_train_epochs=1, max_length=1024,
                                               max_prompt_length=512, **WPO_BATCH)),
    ("wpo/wpo-llama3-8b-instruct-offpolicy.yaml", dict(beta=0.01, learning_rate=1e-6, num_train_epochs=2,
                                                       max_length=2048, max_prompt_length=1800, **WPO_BATCH)),
    ("wpo/wpo-llama3-8b-instruct-hybrid.yaml", dict(beta=0.01, learning_rate=1e-6, num_train_epochs=2, max_length=2048,
                                                    max_prompt_length=1800, dataset_name="data/llama3-hybrid",
                                                    **WPO_BATCH)),
])
def test_paper_recipes_hold_the_published_settings(monkeypatch, tmp_path, recipe, published):
    script = load_script(os.path.basename(recipe).split("-")[0])
    args = parse(monkeypatch, script, "--config", str(ROOT / "recipes" / recipe), "--output_dir", str(tmp_path / "o"))
    assert {k: getattr(args, k) for k in published} == published
    assert (args.lr_scheduler_type, args.warmup_ratio, args.loss_type) == ("cosine", 0.1, "sigmoid")
    assert (ROOT / "recipes" / recipe).read_text().startswith("# ") and "Source: " in (ROOT / "recipes" / recipe).read_text()


def test_missing_config_file_and_config_with_preset_are_refused(monkeypatch, capsys, tmp_path):
    for argv, message in (
            (["--config", str(tmp_path / "nope.yaml")], f"error: --config {tmp_path / 'nope.yaml'}: [Errno 2] No such "
                                                        "file or directory"),
            (["--config", "recipes/tiny/dpo.yaml", "--preset", "tiny"], "error: --config recipes/tiny/dpo.yaml and "
                                                                         "--preset tiny (recipes/tiny) both name a "
                                                                         "recipe file: pass one of them")):
        with pytest.raises(SystemExit) as e:
            parse(monkeypatch, dpo, *argv, "--output_dir", str(tmp_path / "o"))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("name, form", [("dpo", "file"), ("wpo", "string")])
def test_base_tokenizer_trains_with_chat_template_and_the_output_carries_it(tiny, small_sft, tmp_path, name, form):
    """A tokenizer that ships no chat template: refused with a message naming --chat_template; with it (a .jinja file
    or the template itself) the run trains and the saved tokenizer has it. args.json records the --config file and
    its sha256, which --resume does not compare (the values it set are compared)."""
    template = AutoTokenizer.from_pretrained(tiny / "tokenizer").chat_template
    base = shutil.copytree(tiny / "tokenizer", tmp_path / "base_tokenizer")
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    assert template and AutoTokenizer.from_pretrained(base).chat_template is None
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "recipes" / "tiny" / f"{name}.yaml").read_text() + f"tokenizer_name: {base}\n"
                      f"model_name_or_path: {small_sft}\ndataset_name: {tiny / 'ultrafeedback'}\n")
    out, small = tmp_path / "o", ("--max_steps", "1", "--max_train_samples", "32", "--eval_split", "None",
                                  "--cache_dir", str(tmp_path / "c"))
    p = run_script(f"{name}.py", "--config", str(recipe), "--output_dir", str(out), *small, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not out.exists()
    assert f"error: tokenizer '{base}' has no chat template: pass --chat_template (a Jinja string or a .jinja file)" \
        in p.stderr
    if form == "file":
        (tmp_path / "t.jinja").write_text(template)
    given = str(tmp_path / "t.jinja") if form == "file" else template
    run_script(f"{name}.py", "--config", str(recipe), "--output_dir", str(out), *small, "--chat_template", given)
    assert AutoTokenizer.from_pretrained(out).chat_template == template
    saved = json.loads((out / "args.json").read_text())
    assert (saved["config"], saved["chat_template"], saved["completed_steps"]) == (str(recipe), given, 1)
    assert saved["config_sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    moved = tmp_path / "moved.yaml"  # the same values from another file: not a change of the run
    moved.write_text("# the same recipe, moved\n" + recipe.read_text())
    p = run_script(f"{name}.py", "--config", str(moved), "--output_dir", str(out), *small, "--chat_template", given,
                   "--resume")
    assert f"run in {out} already finished (step 1); nothing to do" in p.stdout


def test_single_file_eval_data_are_never_the_training_file(monkeypatch, capsys, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "copy one", "chosen": "ok one", "rejected": "meh one"}) + "\n")
    common = ("--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--dataset_name", str(data))
    err = parse_error(monkeypatch, capsys, *common)
    assert f"--dataset_name {data} is a single file, so it has no eval split 'test_prefs'" in err
    assert "--eval_dataset_name FILE" in err and "--eval_fraction 0.05" in err and "--eval_split None" in err
    err = parse_error(monkeypatch, capsys, *common, "--eval_dataset_name", str(data))
    assert f"the eval data are the training data ({data}" in err
    err = parse_error(monkeypatch, capsys, *common, "--eval_dataset_name", str(data), "--eval_fraction", "0.1")
    assert "pass one of them" in err


def test_eval_fraction_holds_out_seeded_training_pairs(tiny, small_sft, tmp_path):
    rows = [{"prompt": f"copy {w}", "chosen": f"ok {w} done", "rejected": f"meh {w} no"} for w in
            ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_script(*dpo_args(tiny, small_sft, tmp_path / "o", tmp_path / "c", "--dataset_name", str(data),
                             "--eval_fraction", "0.2", "--per_device_train_batch_size", "4", "--max_steps", "1"))
    assert f"eval data: 0.2 of {data} held out with seed 1" in p.stdout
    assert "train: 8 of 8 pairs kept" in p.stdout and "eval: 2 of 2 pairs kept" in p.stdout
    assert metrics(tmp_path / "o")[0]["data/eval_pairs"] == 2


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n',
     "pairs.jsonl, line 2: not valid JSON"),
    ("", "pairs.jsonl is empty: it holds no rows"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n["a", "b", "c"]\n',
     "pairs.jsonl, line 3: a JSON object per line is expected, got list"),
])
def test_bad_data_files_name_the_file_and_line(capsys, tmp_path, content, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text(content)
    with pytest.raises(SystemExit) as e:
        dpo.load_split(str(data), None, "train")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_model_path_names_the_model(tiny, tmp_path):
    p = run_script("dpo.py", "--preset", "tiny", "--model_name_or_path", str(tmp_path / "no_such_model"),
                   "--dataset_name", str(tiny / "ultrafeedback"), "--output_dir", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"could not load model '{tmp_path / 'no_such_model'}': no such local folder and not a hub id" in p.stderr
    assert "tokenizer" not in p.stderr and not (tmp_path / "o").exists()


def test_empty_or_checkpoint_folder_as_model_is_named_for_what_it_is(tiny, tmp_path):
    """issue 26 case 15: a folder that exists but holds no saved model, said so (not "the backend tokenizer")."""
    empty, checkpoint = not_a_model_folders(tmp_path)
    for folder, why in ((empty, "it is empty; pass a folder holding a saved model (a run's output folder) or a hub id"),
                        (checkpoint, "it holds a training checkpoint (optimizer state), not a saved model; pass the "
                                     "run's output folder, which holds its final model")):
        p = run_script("dpo.py", "--preset", "tiny", "--model_name_or_path", str(folder), "--dataset_name",
                       str(tiny / "ultrafeedback"), "--output_dir", str(tmp_path / "o"), check=False)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert f"error: could not load model '{folder}' from that folder: {why}" in p.stderr
        assert "tokenizer" not in p.stderr and not (tmp_path / "o").exists()


def test_no_usable_pair_error_prints_plain_counts(tiny, capsys):
    """issue 26 case 16: the skip counts of the error are plain strings and ints, not numpy reprs."""
    from datasets import Dataset

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    rows = [{"prompt": "copy one", "chosen": "", "rejected": "meh one"}] * 2
    rows += [{"prompt": "copy two", "chosen": "ok two", "rejected": "ok two"}]
    with pytest.raises(SystemExit) as e:
        dpo.prepare_dataset(Dataset.from_list(rows), tok, TINY, "train", "bad.jsonl", print)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "np." not in err
    assert ("error: no usable pair in the train data (bad.jsonl: {'chosen identical to rejected': 1, 'empty chosen or "
            "rejected': 2})") in err


def test_no_network_is_reported_at_once(tiny, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "dpo.py", "--preset", "tiny", "--model_name_or_path", "some-org/some-model",
                        "--dataset_name", str(tiny / "ultrafeedback"), "--output_dir", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})
    # seconds (mostly the imports, longer on a loaded machine), not the minute of hub retries it took before
    assert p.returncode == 2 and time.time() - t0 < 45 and "retry" not in p.stderr.lower()
    assert ("no network: cannot reach the Hugging Face Hub for 'some-org/some-model'. Set HF_HUB_OFFLINE=1 to use the "
            "local cache, or pass a local path.") in p.stderr
    assert not (tmp_path / "o").exists()


def test_bad_pairs_are_counted(tiny, small_sft, tmp_path):
    rows = [{"prompt": f"copy {w}", "chosen": f"ok {w} done", "rejected": f"meh {w} now go away"} for w in ("one", "two", "three", "four")]
    rows += [rows[0], rows[1]]  # exact duplicates
    rows += [{"prompt": "copy one", "chosen": "", "rejected": "meh one"},
             {"prompt": "copy one", "chosen": "ok one", "rejected": "ok one"},
             {"prompt": "copy " + " ".join(["one"] * 200), "chosen": "ok one", "rejected": "meh one"},
             {"prompt": "copy " + " ".join(["two"] * 200), "chosen": "ok two " + "done " * 90, "rejected": "meh two"}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_script(*dpo_args(tiny, small_sft, tmp_path / "o", tmp_path / "c", "--dataset_name", str(data),
                             "--train_split", "train", "--eval_split", "None", "--per_device_train_batch_size", "2",
                             "--max_prompt_length", "100", "--max_length", "128", "--max_steps", "1"))
    assert ("train: 6 of 10 pairs kept; 2 prompts cut (earlier turns dropped or oldest user text shortened), "
            "1 responses cut; 1 chosen identical to rejected, 2 duplicate pair, 1 empty chosen or rejected") in p.stdout
    m = metrics(tmp_path / "o")[0]
    assert (m["data/train_pairs"], m["data/train_dropped"], m["data/train_prompts_cut"], m["data/train_responses_cut"]) \
        == (6, 4, 2, 1)


def test_resume_reproduces_the_uninterrupted_run(tiny, small_sft, tmp_path):
    import shutil

    from safetensors.torch import load_file

    common = ("--max_steps", "8", "--logging_steps", "1", "--eval_split", "None", "--max_train_samples", "128",
              "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_script(*dpo_args(tiny, small_sft, full, tmp_path / "c", *common, "--save_steps", "4", "--save_total_limit", "5"))
    (cut / "checkpoints").mkdir(parents=True)  # a run killed right after step 4
    shutil.copytree(full / "checkpoints" / "step-4", cut / "checkpoints" / "step-4")
    run_script(*dpo_args(tiny, small_sft, cut, tmp_path / "c", *common, "--resume"))
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    la = {r["step"]: r["train/loss"] for r in metrics(full) if "train/loss" in r}
    lb = {r["step"]: r["train/loss"] for r in metrics(cut) if "train/loss" in r}
    assert sorted(lb) == [5, 6, 7, 8] and all(abs(la[s] - lb[s]) < 1e-6 for s in lb)
    assert len({r["run_id"] for r in metrics(full)}) == 1 and {r["run_id"] for r in metrics(cut)}.isdisjoint(
        r["run_id"] for r in metrics(full))
    # the output folder is protected: a second run is refused, a finished run is not rerun, changes are refused
    before = (full / "metrics.jsonl").read_text()
    p = run_script(*dpo_args(tiny, small_sft, full, tmp_path / "c", *common), check=False)
    assert p.returncode == 2 and f"output_dir {full} already holds files" in p.stderr and "--overwrite_output_dir" in p.stderr
    p = run_script(*dpo_args(tiny, small_sft, full, tmp_path / "c", *common, "--resume"))
    assert f"run in {full} already finished (step 8); nothing to do" in p.stdout
    p = run_script(*dpo_args(tiny, small_sft, full, tmp_path / "c", *common, "--resume", "--learning_rate", "1e-3"),
                   check=False)
    assert p.returncode == 2 and "learning_rate: 0.0001 -> 0.001" in p.stderr and "--resume_allow_changes" in p.stderr
    assert (full / "metrics.jsonl").read_text() == before and sorted(os.listdir(full / "checkpoints")) == ["step-4", "step-8"]
    assert json.loads((full / "args.json").read_text())["completed_steps"] == 8


def test_non_finite_step_stops_the_run_before_its_update(tiny, small_sft, tmp_path):
    """lr 1e30 makes step 3's loss non-finite (step 1 is warm-up at lr 0, step 2 blows the weights up): the check
    before optimizer.step() stops the run at step 3, before its update, naming step 3, with exit code 1, no final
    model, and the step-2 checkpoint kept (step 4's logging window is never reached)."""
    from safetensors.torch import load_file

    out = tmp_path / "o"
    p = run_script(*dpo_args(tiny, small_sft, out, tmp_path / "c", "--learning_rate", "1e30", "--max_steps", "6",
                             "--logging_steps", "4", "--save_steps", "2", "--eval_split", "None",
                             "--max_train_samples", "192", "--per_device_train_batch_size", "16"), check=False)
    assert p.returncode == 1 and "non-finite loss or gradient at step 3: no update was applied from that step on" in p.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"] and not (out / "model.safetensors").exists()
    weights = load_file(out / "checkpoints" / "step-2" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not any("train/loss" in r for r in metrics(out))  # the window with the bad step is never logged


def test_lora_trains_and_saves_a_merged_plain_model(tiny, small_sft, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    p = run_script(*dpo_args(tiny, small_sft, out, tmp_path / "c", "--use_lora", "--lora_r", "4", "--max_steps", "3",
                             "--learning_rate", "1e-2", "--eval_split", "None", "--max_train_samples", "96"))
    assert "computed" in p.stdout  # the reference pre-pass ran on the base model (adapters disabled)
    merged, base = load_file(out / "model.safetensors"), load_file(small_sft / "model.safetensors")
    assert not any("lora" in k for k in merged) and set(merged) == set(base)
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 1e-4  # the merged adapters changed it
    AutoModelForCausalLM.from_pretrained(out)


def test_malformed_pairs_are_counted_skips(tiny):
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    args = TINY
    u = lambda p: {"role": "user", "content": p}
    a = lambda r: {"role": "assistant", "content": r}
    other_prompt = {"prompt": "x", "chosen": [u("copy one"), a("ok one")], "rejected": [u("copy two"), a("ok two")]}
    assert dpo.tokenize_pair(tok, other_prompt, args)["skip"] == "malformed pair (chosen and rejected have different prompts)"
    no_answer = {"prompt": "x", "chosen": [u("copy one")], "rejected": [u("copy one"), a("ok one")]}
    assert dpo.tokenize_pair(tok, no_answer, args)["skip"].startswith("malformed pair (chosen/rejected must end")


def test_same_seed_same_loss_curve_bit_for_bit(tiny, small_sft, tmp_path):
    from safetensors.torch import load_file

    common = ("--max_steps", "4", "--logging_steps", "1", "--eval_split", "None", "--max_train_samples", "64",
              "--per_device_train_batch_size", "8")
    for name in ("a", "b"):
        run_script(*dpo_args(tiny, small_sft, tmp_path / name, tmp_path / "c", *common))
    la, lb = ([r["train/loss"] for r in metrics(tmp_path / n) if "train/loss" in r] for n in ("a", "b"))
    assert len(la) == 4 and la == lb
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
