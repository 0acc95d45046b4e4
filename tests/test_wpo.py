"""wpo.py: the weight against the official code and TRL, no gradient through it, end to end on the tiny
setting. (The hybrid pair builder and its tests live in hybrid_pairs.py / tests/test_hybrid_pairs.py.)"""

import dataclasses
import json
import difflib
import math
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from conftest import ROOT, load_script, run_script

wpo = load_script("wpo")

def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


# ---------------------------------------------------------------------------------------------
# the weight
# ---------------------------------------------------------------------------------------------
def official_get_batch_logps(logits, labels, label_pad_token_id=-100):
    """WPOTrainer.get_batch_logps of the official code (github.com/wzhouad/WPO, scripts/run_wpo.py), its
    lines unchanged (decoder-only, average_log_prob=False): summed log-probs and the detached pair weight."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0

    logprobs = F.log_softmax(logits, dim=-1)
    per_token_logps = torch.gather(logprobs, dim=2, index=labels.unsqueeze(2)).squeeze(2)
    logps = (per_token_logps * loss_mask).sum(-1)

    probs = F.softmax(logits, dim=-1)
    exp_probs = torch.log((probs ** 2).sum(-1))
    per_token_logps = per_token_logps - exp_probs

    avg_log_probs = (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    chosen_probs = avg_log_probs[:avg_log_probs.size(0) // 2]
    rejected_probs = avg_log_probs[avg_log_probs.size(0) // 2:]
    weight = torch.clamp(torch.exp(chosen_probs + rejected_probs), max=1)
    return logps, weight.detach()


def identity_head(vocab, dtype=torch.float32):
    """An LM head that returns its input: hidden states = logits."""
    head = torch.nn.Linear(vocab, vocab, bias=False, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab, dtype=dtype))
    return head


class FixedLogits:
    """Stands in for a causal LM whose final hidden states are the given logits and whose LM head is the identity,
    so that wpo.py's LM head on the response positions yields exactly those logits."""

    def __init__(self, logits):
        self.logits, self.head = logits, identity_head(logits.shape[-1], logits.dtype)

    def get_output_embeddings(self):
        return self.head

    def __call__(self, **inputs):
        return SimpleNamespace(hidden_states=(self.logits,))


def fixed_batch(n_pairs=4, length=9, vocab=13, seed=0):
    """Random logits and labels in the official layout (chosen rows first, -100 on prompt and padding),
    and the same data as wpo.py's batch (loss_mask[t] marks the position predicting label t + 1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * n_pairs, length, vocab, generator=g) * 2.0
    labels = torch.full((2 * n_pairs, length), -100)
    for i in range(2 * n_pairs):
        start, end = 2 + i % 3, length - (i % 2)  # prompts of 2-4 tokens, some right padding
        labels[i, start:end] = torch.randint(vocab, (end - start,), generator=g)
        if i in (0, n_pairs):  # pair 0: labels = the argmax, so its weight exceeds 1 before the clamp
            labels[i, start:end] = logits[i, start - 1 : end - 1].argmax(-1)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    part = {"loss_mask": mask, "targets": torch.cat([labels[:, 1:].clamp(min=0), torch.zeros_like(labels[:, :1])], 1),
            "seq_id": torch.arange(2 * n_pairs)[:, None].expand_as(labels), "input_ids": torch.zeros_like(labels)}
    batch = {"n_seqs": 2 * n_pairs, "parts": [part]}
    return logits, labels, batch


def test_weight_equals_the_official_formula_on_fixed_logits():
    logits, labels, batch = fixed_batch()
    want_logps, want_w = official_get_batch_logps(logits, labels)
    logps, lengths, sq_sums = wpo.sequence_logps(FixedLogits(logits), batch)
    w = wpo.wpo_weight(logps, lengths, sq_sums)
    torch.testing.assert_close(logps, want_logps, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=1e-6)
    # the clamp is exercised: pair 0 sits at 1 only because of it; the others are strictly inside (0, 1)
    raw = wpo.wpo_weight(logps, lengths, sq_sums, clamp=False)
    assert raw[0] > 1.5 and w[0] == 1.0
    assert ((w[1:] > 1e-4) & (w[1:] < 1)).all()
    torch.testing.assert_close(raw[1:], want_w[1:], atol=1e-6, rtol=1e-6)
    # --no_weight_sum_sq: the plain length-normalised probabilities, exp(mean logp_w + mean logp_l)
    n = len(w)
    plain = torch.exp(logps[:n] / lengths[:n] + logps[n:] / lengths[n:]).clamp(max=1)
    torch.testing.assert_close(wpo.wpo_weight(logps, lengths, sq_sums, sum_sq=False), plain, atol=1e-7, rtol=1e-6)
    # chunking (as on long batches) changes nothing
    (part,) = batch["parts"]
    hidden, targets, head = logits[part["loss_mask"]], part["targets"][part["loss_mask"]], identity_head(13)
    lp, sq = wpo.token_logps(head, hidden, targets, chunk_elements=5 * 13)
    lp1, sq1 = wpo.token_logps(head, hidden, targets)
    torch.testing.assert_close(lp, lp1, atol=0, rtol=0)
    torch.testing.assert_close(sq, sq1, atol=0, rtol=0)


def tiny_lm(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def pair_rows(tok):
    prompts = ["sort three one two", "hi copy five", "reverse one two four", "copy nine"]
    answers = [("sure one two three hope this helps", "ugh one two three now go away"),
               ("ok five done", "whatever five six do not ask again"),
               ("gladly four two one happy to help", "meh four two one"),
               ("certainly nine that is all", "here eight that is all")]
    args = wpo.Args(max_length=64, max_prompt_length=32)
    rows = []
    for i, (p, (c, r)) in enumerate(zip(prompts, answers)):
        u = [{"role": "user", "content": p}]
        ex = wpo.tokenize_pair(tok, {"prompt": p, "chosen": u + [{"role": "assistant", "content": c}],
                                     "rejected": u + [{"role": "assistant", "content": r}]}, args)
        rows.append({**ex, "row": i})
    return rows


def test_weight_equals_trls_use_weighting_weight_below_one(tiny):
    from trl.trainer.utils import add_fused_lm_head

    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    model = tiny_lm(len(tok))
    batch = wpo.collate(pair_rows(tok), tok.pad_token_id, padding_free=False)  # one padded part, as TRL's batch
    (part,) = batch["parts"]
    with torch.no_grad():
        logps, lengths, sq_sums = wpo.sequence_logps(model, batch)
    ours_raw = wpo.wpo_weight(logps, lengths, sq_sums, clamp=False)
    ours = wpo.wpo_weight(logps, lengths, sq_sums)

    # TRL 1.16 DPOTrainer(use_weighting=True): its fused LM head (trl/trainer/utils.py add_fused_lm_head, outputs
    # "log_sum_sq_probs") and the lines of DPOTrainer._compute_loss (trl/trainer/dpo_trainer.py) that use it
    add_fused_lm_head(model, outputs=("log_probs", "log_sum_sq_probs"))
    completion_mask = torch.cat([torch.zeros_like(part["loss_mask"][:, :1]), part["loss_mask"][:, :-1]], 1).long()
    shift_completion_mask = completion_mask[..., 1:]
    labels = part["input_ids"].masked_fill(completion_mask == 0, -100)
    with torch.no_grad():
        outputs = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False, labels=labels,
                        fused_lm_head=True)
    seq_len = shift_completion_mask.size(1)
    per_token_logps = outputs.log_probs[:, -seq_len:]
    completion_lengths = shift_completion_mask.sum(dim=1).clamp_min(1)
    aligned_logps = (per_token_logps - outputs.log_sum_sq_probs[:, -seq_len:]) * shift_completion_mask
    mean_logps = aligned_logps.sum(dim=1) / completion_lengths
    weights = torch.exp(mean_logps)
    chosen_weights, rejected_weights = weights.chunk(2, dim=0)
    trl_weight = chosen_weights * rejected_weights

    torch.testing.assert_close(logps, per_token_logps.sum(1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours_raw, trl_weight, atol=1e-6, rtol=1e-5)  # --no_clamp_weight is TRL's form
    below = trl_weight < 1
    assert below.any() and (~below).any()  # this random model gives both cases
    torch.testing.assert_close(ours[below], trl_weight[below], atol=1e-6, rtol=1e-5)
    assert (ours[~below] == 1).all()


def chunked_token_logps(logits, targets, rows_per_chunk=2048):
    """wpo.token_logps on given logits (the LM head is the identity), `rows_per_chunk` rows per chunk."""
    vocab = logits.shape[-1]
    return wpo.token_logps(identity_head(vocab, logits.dtype), logits, targets, chunk_elements=rows_per_chunk * vocab)


def test_token_logps_and_sum_sq_equal_softmax_formulas_with_gradients():
    torch.manual_seed(0)
    logits = (4 * torch.randn(29, 40)).requires_grad_(True)
    targets = torch.randint(0, 40, (29,))
    upstream = torch.randn(29)
    lp, sq = chunked_token_logps(logits, targets, 7)
    p = torch.softmax(logits.double(), -1)
    want_lp = p.log().gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(lp.double(), want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(sq.double(), p.square().sum(-1).log(), atol=1e-5, rtol=0)
    assert not sq.requires_grad
    (g1,) = torch.autograd.grad((lp * upstream).sum(), logits)
    (g2,) = torch.autograd.grad((want_lp * upstream.double()).sum(), logits)
    torch.testing.assert_close(g1.double(), g2.double(), atol=1e-6, rtol=0)


def peaked_logits(rows=64, vocab=300, seed=0):
    """bf16 logits whose first half of the rows put more than 0.9 of the mass on their target."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(rows, vocab, generator=g)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    logits[: rows // 2].scatter_(-1, targets[: rows // 2, None], 16.0)
    return logits.bfloat16(), targets


def test_log_sum_sq_is_fp32_and_exact_for_bf16_logits():
    logits, targets = peaked_logits()
    lp, sq = chunked_token_logps(logits, targets, 7)
    assert lp.dtype == sq.dtype == torch.float32
    # the reference: an fp32 (here fp64) softmax of the same bf16 logits
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(sq.double(), p.square().sum(-1).log(), atol=2e-6, rtol=0)
    torch.testing.assert_close(lp.double(), p.log().gather(-1, targets[:, None])[:, 0], atol=2e-6, rtol=0)
    # a softmax taken in bf16 is far off on the same rows: the test sees the difference
    bf16_sq = torch.softmax(logits, -1).square().sum(-1).double().log()
    assert (bf16_sq - p.square().sum(-1).log()).abs().max() > 1e-3
    # one pass: every chunk size gives the same bits
    for chunk in (1, 5, 64, 2048):
        lp_c, sq_c = chunked_token_logps(logits, targets, chunk)
        assert torch.equal(lp_c, lp) and torch.equal(sq_c, sq)


def test_weight_from_bf16_logits_equals_the_official_formula_in_fp32():
    logits, labels, batch = fixed_batch(n_pairs=6, length=12, vocab=50, seed=3)
    logits = logits.bfloat16()
    want_logps, want_w = official_get_batch_logps(logits.double(), labels)
    logps, lengths, sq_sums = wpo.sequence_logps(FixedLogits(logits), batch)
    torch.testing.assert_close(logps.double(), want_logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(wpo.wpo_weight(logps, lengths, sq_sums).double(), want_w, atol=1e-6, rtol=1e-5)


def test_weight_under_bf16_autocast_equals_the_official_formula_on_the_same_bf16_logits(tiny):
    """A real model under bf16 autocast: the LM head gives bf16 logits, and the weight from them is the official
    formula's taken in fp64 on those logits (the sum of squares is never rounded to bf16)."""
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    model = tiny_lm(len(tok))
    batch = wpo.collate(pair_rows(tok), tok.pad_token_id, padding_free=False)
    (part,) = batch["parts"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logps, lengths, log_sum_sq = wpo.sequence_logps(model, batch)
        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], use_cache=False).logits
    assert logits.dtype == torch.bfloat16 and logps.dtype == log_sum_sq.dtype == torch.float32
    completion_mask = torch.cat([torch.zeros_like(part["loss_mask"][:, :1]), part["loss_mask"][:, :-1]], 1)
    labels = part["input_ids"].masked_fill(~completion_mask, -100)
    want_logps, want_w = official_get_batch_logps(logits.double(), labels)
    torch.testing.assert_close(logps.double(), want_logps, atol=1e-4, rtol=0)
    weight = wpo.wpo_weight(logps, lengths, log_sum_sq, clamp=False)
    torch.testing.assert_close(weight.double().clamp(max=1), want_w, atol=1e-6, rtol=1e-5)
    assert (want_w < 1).any()


def test_token_logps_gradient_keeps_fp32_precision_in_bf16():
    logits, targets = peaked_logits()
    logits.requires_grad_(True)
    upstream = torch.randn(len(targets), generator=torch.Generator().manual_seed(1))
    lp, _ = chunked_token_logps(logits, targets, 7)
    (got,) = torch.autograd.grad((lp * upstream).sum(), logits)
    assert got.dtype == torch.bfloat16
    # plain autograd through an fp32 log_softmax of the same bf16 logits
    ref_logits = logits.detach().float().requires_grad_(True)
    want_lp = torch.log_softmax(ref_logits, -1).gather(-1, targets[:, None])[:, 0]
    (want,) = torch.autograd.grad((want_lp * upstream).sum(), ref_logits)
    rows = torch.arange(len(targets))
    high = torch.softmax(ref_logits.detach(), -1)[rows, targets] > 0.9
    assert high.sum() == len(targets) // 2
    at_target = lambda g: g.float()[rows[high], targets[high]]  # (1 - p) * upstream: small where p > 0.9
    rel = (at_target(got) - at_target(want)).abs() / at_target(want).abs()
    assert rel.max() < 0.01, rel.max()  # one rounding of an fp32 value to bf16: at most 2^-8
    torch.testing.assert_close(got.float(), want, atol=0.02 * upstream.abs().max().item(), rtol=0.01)


def test_token_logps_fp32_values_and_gradient_bit_for_bit():
    """In fp32 the log-probs are log_softmax's as dpo.py takes them (from logits shifted by their row maximum), and
    the gradient is (onehot - softmax) * grad from the forward's normaliser, bit for bit: the sum of squares changes
    neither."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(37, 50)).requires_grad_(True)
    targets = torch.randint(0, 50, (37,))
    upstream = torch.randn(37)
    lp, _ = chunked_token_logps(logits, targets, 8)
    z = logits.detach()
    m = z.max(-1, keepdim=True).values
    log_s = (z - m).exp().sum(-1).log()
    assert torch.equal(lp, z.gather(-1, targets[:, None])[:, 0] - m[:, 0] - log_s)
    (got,) = torch.autograd.grad((lp * upstream).sum(), logits)
    want = (z - m - log_s[:, None]).exp() * -upstream[:, None]
    assert torch.equal(got, want.scatter_add(-1, targets[:, None], upstream[:, None]))


def test_weight_is_the_same_in_every_layout(tiny):
    """One padded forward, length groups (the CPU default) and padding-free packing (the GPU default) give the same
    log-probs, log sum p^2 sums and weights: the weight's terms are summed per sequence like the log-probs."""
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    model = tiny_lm(len(tok))
    rows = pair_rows(tok)
    out = {}
    for name, padding_free, groups in (("padded", False, 1), ("groups", False, 3), ("packed", True, 1)):
        batch = wpo.collate(rows, tok.pad_token_id, padding_free=padding_free, length_groups=groups)
        assert len(batch["parts"]) == groups
        with torch.no_grad():
            logps, lengths, log_sum_sq = wpo.sequence_logps(model, batch)
        out[name] = (logps, lengths, log_sum_sq, wpo.wpo_weight(logps, lengths, log_sum_sq, clamp=False))
    assert out["packed"][0].shape == (8,) and (out["padded"][2] < 0).all()
    for name in ("groups", "packed"):
        assert torch.equal(out[name][1], out["padded"][1])
        for a, b in zip(out[name], out["padded"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_the_weight_carries_no_gradient(tiny):
    logits, _, batch = fixed_batch()
    logits.requires_grad_(True)
    (part,) = batch["parts"]
    lp, sq = chunked_token_logps(logits[part["loss_mask"]], part["targets"][part["loss_mask"]])
    assert lp.requires_grad and not sq.requires_grad

    # the loss's gradient is the DPO gradient scaled by a constant weight: nothing flows through the weight
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    model = tiny_lm(len(tok)).train()
    batch = wpo.collate(pair_rows(tok), tok.pad_token_id, padding_free=False, length_groups=3)  # 3 forwards, one loss
    assert len(batch["parts"]) == 3
    args = dataclasses.replace(wpo.Args(), beta=0.5)
    ref_c, ref_r = torch.tensor([-20.0, -15, -30, -12]), torch.tensor([-18.0, -25, -14, -16])
    logps, lengths, sq_sums = wpo.sequence_logps(model, batch)
    w = wpo.wpo_weight(logps, lengths, sq_sums)  # as the training loop calls them
    loss, m = wpo.compute_loss(logps[:4], logps[4:], ref_c, ref_r, lengths[:4], lengths[4:], w, args)
    got = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    assert not w.requires_grad and w.grad_fn is None
    assert ((w > 0) & (w <= 1)).all() and (w < 1).any()
    losses, _, _ = wpo.dpo_loss(logps[:4], logps[4:], ref_c, ref_r, args.beta, "sigmoid")
    want = torch.autograd.grad((w.clone() * losses).mean(), list(model.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(m["weight"], w, atol=0, rtol=0)  # the per-pair weights that are logged


# ---------------------------------------------------------------------------------------------
# end to end on the tiny setting
# ---------------------------------------------------------------------------------------------
def wpo_args(tiny, tiny_sft, out, *extra):
    return ["wpo.py", "--preset", "tiny", "--model_name_or_path", str(tiny_sft), "--dataset_name", str(tiny / "ultrafeedback"),
            "--output_dir", str(out), "--cache_dir", str(out.parent / "cache"), *extra]


def test_wpo_end_to_end_trains_with_weights_in_range(tiny, tiny_sft, tmp_path):
    out = tmp_path / "wpo"
    run_script(*wpo_args(tiny, tiny_sft, out, "--max_steps", "40", "--logging_steps", "5", "--max_eval_samples", "200"))
    m = metrics(out)
    train = [r for r in m if "train/loss" in r]
    evals = [r for r in m if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30, 35, 40] and len(evals) == 2
    for r in train + evals:
        k = "train" if "train/loss" in r else "eval"
        lo, mean, hi = r[f"{k}/weight_min"], r[f"{k}/weight"], r[f"{k}/weight_max"]
        assert 0 < lo <= mean <= hi <= 1, r
    assert max(r["train/weight_min"] for r in train) < 1 and evals[1]["eval/weight"] < 0.9  # not all clamped
    assert evals[0]["eval/loss"] > evals[1]["eval/loss"]
    assert evals[1]["eval/rewards/accuracies"] > 0.5  # held-out implicit-reward accuracy
    assert evals[1]["eval/rewards/margins"] > 0
    for f in ("model.safetensors", "config.json", "tokenizer.json", "args.json"):
        assert (out / f).exists(), f
    # the output folder is protected, and resuming the finished run trains nothing (dpo.py's start-up, derived)
    rows = (out / "metrics.jsonl").read_text()
    p = run_script(*wpo_args(tiny, tiny_sft, out, "--max_steps", "40", "--logging_steps", "5", "--max_eval_samples",
                             "200"), check=False)
    assert p.returncode == 2 and f"output_dir {out} already holds files" in p.stderr and "--overwrite_output_dir" in p.stderr
    p = run_script(*wpo_args(tiny, tiny_sft, out, "--max_steps", "40", "--logging_steps", "5", "--max_eval_samples",
                             "200", "--resume"), check=False)
    assert p.returncode == 0 and f"run in {out} already finished (step 40); nothing to do" in p.stdout
    assert (out / "metrics.jsonl").read_text() == rows and len({r["run_id"] for r in m}) == 1


def test_step_0_rewards_are_exactly_zero_in_bf16_and_fp32(tiny, small_sft, tmp_path):
    """At step 0 the policy is the reference: the pre-pass and the policy's forward run under the same precision,
    so every implicit reward is exactly 0, whatever the mixed precision."""
    step0 = {}
    for precision in ("bf16", "no"):
        out = tmp_path / precision
        run_script("wpo.py", "--preset", "tiny", "--model_name_or_path", str(small_sft), "--dataset_name",
                   str(tiny / "ultrafeedback"), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
                   "--max_steps", "1", "--max_eval_samples", "64", "--max_train_samples", "64",
                   env={"ACCELERATE_MIXED_PRECISION": precision})
        step0[precision] = m = next(r for r in metrics(out) if r["step"] == 0 and "eval/loss" in r)
        for k in ("eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins", "eval/rewards/accuracies"):
            assert m[k] == 0.0, (precision, k, m[k])
        assert 0 < m["eval/weight_min"] <= m["eval/weight"] <= m["eval/weight_max"] <= 1
        # h = 0 for every pair: each loss is w * log 2
        assert m["eval/loss"] == pytest.approx(math.log(2) * m["eval/weight"], rel=1e-6)
    # bf16 really ran: the log-probs themselves differ from fp32's
    assert step0["bf16"]["eval/logps/chosen"] != step0["no"]["eval/logps/chosen"]
    assert step0["bf16"]["eval/logps/chosen"] == pytest.approx(step0["no"]["eval/logps/chosen"], rel=1e-2)


def test_dropout_is_off_so_the_first_training_step_has_zero_rewards(tiny, small_sft, tmp_path):
    """The first micro-batch is the one the pre-pass scored: with dropout off (the default) the policy's log-probs
    equal the reference's bit for bit, in training mode too; with --no_disable_dropout they do not."""
    model_dir = tmp_path / "with_dropout"
    shutil.copytree(small_sft, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    first = {}
    for flag in ("--disable_dropout", "--no_disable_dropout"):
        out = tmp_path / flag
        run_script("wpo.py", "--preset", "tiny", "--model_name_or_path", str(model_dir), "--dataset_name",
                   str(tiny / "ultrafeedback"), "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"),
                   "--max_steps", "1", "--logging_steps", "1", "--eval_split", "None", "--max_train_samples", "64", flag)
        first[flag] = next(r for r in metrics(out) if r["step"] == 1 and "train/loss" in r)
    m = first["--disable_dropout"]
    for k in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins", "train/rewards/accuracies"):
        assert m[k] == 0.0, (k, m[k])
    assert m["train/loss"] == pytest.approx(math.log(2) * m["train/weight"], rel=1e-6)
    assert abs(first["--no_disable_dropout"]["train/rewards/margins"]) > 1e-4


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------
def parse(monkeypatch, *argv):
    monkeypatch.setattr("sys.argv", ["wpo.py", *argv])
    return wpo.parse_args()


def test_defaults_are_the_official_llama3_setting(monkeypatch, tmp_path):
    args = parse(monkeypatch, "--output_dir", str(tmp_path / "o"))
    assert (args.beta, args.learning_rate, args.num_train_epochs) == (0.01, 1e-6, 2)
    assert (args.max_length, args.max_prompt_length) == (2048, 1800)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 8)  # x 8 GPUs = 128 pairs
    assert (args.lr_scheduler_type, args.warmup_ratio, args.loss_type) == ("cosine", 0.1, "sigmoid")
    assert args.gradient_checkpointing and args.clamp_weight and args.weight_sum_sq and args.disable_dropout
    assert args.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_tiny_preset_with_equals_sign_and_explicit_flags_override(monkeypatch, tmp_path):
    args = parse(monkeypatch, "--preset=tiny", "--output_dir", str(tmp_path / "o"))
    assert (args.preset, args.max_length, args.beta, args.gradient_checkpointing) == ("tiny", 128, 0.1, False)
    assert args.output_dir == str(tmp_path / "o") and args.clamp_weight
    args = parse(monkeypatch, "--preset", "tiny", "--output_dir", str(tmp_path / "o"), "--beta", "0.3",
                 "--gradient_checkpointing", "--no_clamp_weight", "--model_name_or_path", "my/model")
    assert (args.beta, args.gradient_checkpointing, args.clamp_weight) == (0.3, True, False)
    assert args.model_name_or_path == "my/model" and args.max_length == 128


@pytest.mark.parametrize("argv,message", [
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size must be at least 1 (got -1)"),
    (["--beta", "0"], "--beta must be positive (got 0.0)"),
    (["--learning_rate", "-1e-6"], "--learning_rate must be non-negative (got -1e-06)"),
    (["--max_prompt_length", "128"], "--max_prompt_length (128) must be below --max_length (128)"),
    (["--resume", "--overwrite_output_dir"], "--resume continues the run in output_dir, --overwrite_output_dir"),
])
def test_bad_arguments_fail_before_anything_is_loaded(monkeypatch, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as e:
        parse(monkeypatch, "--preset", "tiny", "--output_dir", str(tmp_path / "o"), *argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_wpo_is_dpo_plus_the_weight():
    """wpo.py is derived from dpo.py: the diff holds the weight, its logging and defaults, and little else."""
    dpo_lines, wpo_lines = (open(os.path.join(ROOT, f)).read().splitlines() for f in ("dpo.py", "wpo.py"))
    changed = [d for d in difflib.unified_diff(dpo_lines, wpo_lines, n=0, lineterm="")
               if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    assert 50 < len(changed) < 150, f"{len(changed)} changed lines between dpo.py and wpo.py"
