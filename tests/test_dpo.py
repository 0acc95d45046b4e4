"""dpo.py: the losses against REFERENCE.md, cached vs live reference, padding-free batches, bad input,
and end to end on the tiny setting."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from conftest import load_script, run_script

dpo = load_script("dpo")



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
    got = dpo.token_logps(logits, targets, chunk=8)
    want = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None])[:, 0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    (g1,) = torch.autograd.grad((got * upstream).sum(), logits)
    (g2,) = torch.autograd.grad((want * upstream.double()).sum(), logits)
    assert g1.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the gradient buffer has the logits' dtype
    torch.testing.assert_close(g1.double(), g2.double(), atol=tol, rtol=0)
    if dtype == torch.float32:  # bit for bit the closed form: -softmax * grad, then + grad at the target
        closed = (logits.detach() - logits.detach().logsumexp(-1, keepdim=True)).exp() * -upstream[:, None]
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
    (got,) = torch.autograd.grad((dpo.token_logps(x, targets, chunk=64) * upstream).sum(), x)
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


def pair_batch(tiny, model_dir, padding_free, length_groups=1):
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = dataclasses.replace(dpo.PRESETS["tiny"], dataset_name=str(tiny / "ultrafeedback"))
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
    args = dataclasses.replace(dpo.PRESETS["tiny"], max_length=12, max_prompt_length=8)
    msg = lambda p, r: [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    ex = {"prompt": "copy one two", "chosen": msg("copy one two", "sure one two " + "done " * 10),
          "rejected": msg("copy one two", "meh one two now go away")}
    out = dpo.tokenize_pair(tok, ex, args)
    assert len(out["prompt_ids"]) == 8  # cut from the left
    assert out["prompt_ids"] == dpo.chat_ids(tok, ex["chosen"][:1], add_generation_prompt=True)[-8:]
    assert len(out["prompt_ids"]) + len(out["chosen_ids"]) == 12 and out["chosen_ids"][-1] == tok.eos_token_id
    assert out["skip"] == "truncated"
    plain = dpo.tokenize_pair(tok, {"prompt": "copy one", "chosen": "ok one done", "rejected": "meh one done"},
                              dataclasses.replace(args, max_length=64, max_prompt_length=32))
    assert tok.decode(plain["chosen_ids"]) == "ok one done<|im_end|>" and plain["skip"] == ""
    same = dpo.tokenize_pair(tok, {"prompt": "p", "chosen": "ok one", "rejected": "ok one"}, args)
    assert same["skip"] == "chosen identical to rejected"
    empty = dpo.tokenize_pair(tok, {"prompt": "p", "chosen": " ", "rejected": "ok one"}, args)
    assert empty["skip"] == "empty chosen or rejected"
    tight = dpo.tokenize_pair(tok, ex, dataclasses.replace(args, max_length=9, max_prompt_length=8))
    assert tight["skip"] == "prompt leaves no room for a response"


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
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    out, cache = tmp_path / "o", tmp_path / "c"
    run_script(*dpo_args(tiny, small_sft, out, cache, "--max_steps", "1", "--logging_steps", "1", "--max_eval_samples",
                         "64", "--max_train_samples", "128"), env={"ACCELERATE_MIXED_PRECISION": precision})
    m = metrics(out)
    for row, split in ((m[0], "eval"), (m[1], "train")):  # eval at step 0; the first step runs the initial policy
        assert row["step"] == (0 if split == "eval" else 1)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert row[f"{split}/{k}"] == 0.0, (split, k, row)
        assert row[f"{split}/loss"] == pytest.approx(0.693147, abs=1e-6)
    # the live cross-check: the eval cache against the initial policy run on the eval batches, in fp32
    if precision == "no":
        tok = AutoTokenizer.from_pretrained(small_sft)
        args = dataclasses.replace(dpo.PRESETS["tiny"], dataset_name=str(tiny / "ultrafeedback"), max_eval_samples=64)
        ds = dpo.prepare_split(args, tok, "eval", lambda _: None)
        model = AutoModelForCausalLM.from_pretrained(small_sft).eval()
        loader = torch.utils.data.DataLoader(ds, batch_size=args.per_device_eval_batch_size,
                                             collate_fn=lambda r: dpo.collate(r, tok.pad_token_id, False, args.length_groups))
        with torch.no_grad():
            live = torch.cat([dpo.sequence_logps(model, b)[0].view(2, -1) for b in loader], 1)
        caches = [safetensors.torch.load_file(f) for f in cache.glob("*.safetensors")]
        (cached,) = [c for c in caches if len(c["chosen"]) == 64]
        assert torch.equal(cached["chosen"].float(), live[0]) and torch.equal(cached["rejected"].float(), live[1])


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
    off, on = metrics(tmp_path / "off")[0], metrics(tmp_path / "on")[0]
    assert off["train/rewards/margins"] == 0.0 and off["train/rewards/chosen"] == 0.0
    assert abs(on["train/rewards/chosen"]) > 1e-4


def test_missing_column_is_a_clear_error(tiny, small_sft, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "copy one", "good": "ok one", "rejected": "meh one"}) + "\n")
    p = run_script(*dpo_args(tiny, small_sft, tmp_path / "o", tmp_path / "c", "--dataset_name", str(data),
                             "--train_split", "train", "--eval_split", "None"), check=False)
    assert p.returncode != 0 and "no column ['chosen']" in p.stderr and "--chosen_column" in p.stderr
    assert "Traceback" not in p.stderr


def test_length_groups_below_one_is_a_clear_error(tiny, small_sft, tmp_path):
    p = run_script(*dpo_args(tiny, small_sft, tmp_path / "o", tmp_path / "c", "--length_groups", "0"), check=False)
    assert p.returncode != 0 and "--length_groups must be at least 1 (got 0)" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "o").exists()


def test_bad_pairs_are_counted(tiny, small_sft, tmp_path):
    rows = [{"prompt": f"copy {w}", "chosen": f"ok {w} done", "rejected": f"meh {w} now go away"} for w in ("one", "two", "three", "four")]
    rows += [rows[0], rows[1]]  # exact duplicates
    rows += [{"prompt": "copy one", "chosen": "", "rejected": "meh one"},
             {"prompt": "copy one", "chosen": "ok one", "rejected": "ok one"},
             {"prompt": "copy " + " ".join(["one"] * 200), "chosen": "ok one", "rejected": "meh one"}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_script(*dpo_args(tiny, small_sft, tmp_path / "o", tmp_path / "c", "--dataset_name", str(data),
                             "--train_split", "train", "--eval_split", "None", "--per_device_train_batch_size", "2",
                             "--max_prompt_length", "300", "--max_length", "128", "--max_steps", "1"))
    assert ("train: 4 of 9 pairs kept; 1 chosen identical to rejected, 2 duplicate pair, 1 empty chosen or rejected, "
            "1 prompt leaves no room for a response") in p.stdout


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
    args = dpo.PRESETS["tiny"]
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
    la, lb = ([r["train/loss"] for r in metrics(tmp_path / n)] for n in ("a", "b"))
    assert len(la) == 4 and la == lb
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
