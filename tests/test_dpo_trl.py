"""dpo.py's DPO loss, implicit rewards and gradients against TRL 1.16's DPOTrainer, on the same tiny models and
the same token ids.

TRL's side is its own code path: a DPOTrainer(policy, ref_model, DPOConfig(...)) built on a few tiny-setting
pairs, its own tokenized dataset (`trainer.train_dataset`) or dpo.py's ids, batched by its own data collator, and
`trainer.compute_loss` (DPOTrainer._compute_loss: fused LM head log-probs, the loss, and the `rewards/*` and
`logps/*` metrics it logs, read back from `trainer._metrics`). dpo.py's side is `collate` + `sequence_logps` (the
reference) + `sequence_logps` and `compute_loss` (the policy, the loss and the metrics), its training code path.
Policy and reference are random tiny Qwen2 models seeded differently, so rewards are non-zero and of both signs.
Compared, pair by pair (batches of one) and on the padded batch of 8: the loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, and on the batch the gradient of the loss.

Tolerance: |dpo.py - TRL| <= 1e-5 + 1e-6 |TRL|. The models run in fp64, but both sides take the log-softmax in
fp32 by design (dpo.py's `TokenLogps`, TRL's chunked log-prob kernel), and summed log-probs of ~100 nats carry
~1e-5 of fp32 rounding (measured: <= 1.6e-5 on logps of ~99, <= 1.8e-5 on an ipo loss of ~39, <= 8e-6 on rewards).

Differences between TRL 1.16 and dpo.py / REFERENCE.md (DPO section), and what is asserted instead:
- Tokenization: TRL takes the response as everything the chat template appends to the prompt, so it ends in
  `<|im_end|>` + "\\n" (the Qwen template's newline after the end-of-turn token); dpo.py cuts the response after
  its last end-of-turn token (the EOS), without the "\\n". Prompt ids are identical. `test_tokenization` asserts
  exactly this; the loss comparisons then run on identical ids, both TRL's and dpo.py's.
- sigmoid with label smoothing: TRL 1.16's `loss_type="sigmoid"` ignores `label_smoothing` (it only enters its
  "robust" loss, ((1 - e) (-logsigmoid(beta h)) - e (-logsigmoid(-beta h))) / (1 - 2e), and "exo_pair"), so no TRL
  loss equals REFERENCE.md's conservative DPO -logsigmoid(beta h)(1 - e) - logsigmoid(-beta h) e. Asserted: TRL's
  sigmoid loss with label_smoothing = e equals -logsigmoid(its reward margin) (e ignored), and dpo.py's smoothed
  loss equals (1 - e) TRL(batch) + e TRL(batch with chosen and rejected swapped), values and gradients.
- ipo: the loss agrees (TRL also divides the summed log-ratios by the completion lengths), and so do the implicit
  rewards: beta (logp_pi - logp_ref) on *summed* log-probs for every loss type (= REFERENCE.md).
  `test_ipo_rewards_match_trl` checks this pair by pair (this test found dpo.py logging length-averaged ipo rewards).
- hinge: identical (relu(1 - beta h)).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import tyro
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl import DPOConfig, DPOTrainer

from conftest import ROOT, load_script

dpo = load_script("dpo")
TINY = tyro.cli(dpo.Args, args=dpo.read_config(str(ROOT / "recipes" / "tiny" / "dpo.yaml")))  # --preset tiny's Args

N_PAIRS = 8
ATOL = 1e-5
RTOL = 1e-6
POLICY_SEED, REF_SEED = 0, 100
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")
KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
REWARD_KEYS = KEYS[:4]
# id: (loss_type, beta, label_smoothing). beta 0.5 for hinge puts some pairs past the hinge (loss 0), some not.
CASES = {"sigmoid": ("sigmoid", 0.1, 0.0), "sigmoid_label_smoothing": ("sigmoid", 0.5, 0.2), "ipo": ("ipo", 0.1, 0.0),
         "hinge": ("hinge", 0.5, 0.0)}


@pytest.fixture(scope="module")
def setting(tiny):
    """The tokenizer, the first N test pairs that dpo.py keeps uncut, as raw message lists and as dpo.py's ids."""
    tok = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    args = dataclasses.replace(TINY, dataset_name=str(tiny / "ultrafeedback"))
    raw, rows = [], []
    for ex in dpo.load_split(args.dataset_name, None, "test_prefs"):
        t = dpo.tokenize_pair(tok, ex, args)
        if t["skip"] == "":  # neither cut nor skipped: TRL's collator (max_length) cuts nothing either
            raw.append({"chosen": ex["chosen"], "rejected": ex["rejected"]})  # implicit prompt: TRL extracts it
            rows.append({k: t[k] for k in IDS})
        if len(rows) == N_PAIRS:
            break
    assert len({len(r["chosen_ids"]) for r in rows} | {len(r["rejected_ids"]) for r in rows}) > 1  # padding is exercised
    return tok, args, raw, rows


def tiny_qwen2(tok, seed):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.3, pad_token_id=tok.pad_token_id)
    return Qwen2ForCausalLM(cfg).double().eval()  # fp64 backbone: only the fp32 log-softmax rounds (see the docstring)


def make(setting, tmp_path, loss_type, beta, eps):
    """TRL's trainer (policy, reference: fresh tiny models) and dpo.py's Args for the same loss."""
    tok, args, raw, _ = setting
    policy, ref = tiny_qwen2(tok, POLICY_SEED), tiny_qwen2(tok, REF_SEED)
    config = DPOConfig(output_dir=str(tmp_path), report_to=[], beta=beta, loss_type=loss_type, label_smoothing=eps,
                       max_length=args.max_length, per_device_train_batch_size=N_PAIRS, bf16=False, use_cpu=True,
                       gradient_checkpointing=False, precompute_ref_log_probs=False, save_strategy="no", seed=1)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=Dataset.from_list(raw), processing_class=tok)
    return trainer, policy, ref, dataclasses.replace(args, loss_type=loss_type, beta=beta, label_smoothing=eps)


def trl_side(trainer, rows, swap=False):
    """TRL's batch loss (with graph) and logged batch-mean metrics for `rows`, through its collator and compute_loss."""
    rows = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["rejected_ids"], "rejected_ids": r["chosen_ids"]} if swap else r
            for r in rows]
    batch = trainer._prepare_inputs(trainer.data_collator([{k: r[k] for k in IDS} for r in rows]))
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, {k: trainer._metrics[mode][k][-1] for k in KEYS}


def dpo_side(policy, ref, rows, args, pad_id):
    """dpo.py's batch loss (with graph) and batch-mean metrics: collate, reference log-probs, compute_loss."""
    batch = dpo.collate([{**r, "row": i} for i, r in enumerate(rows)], pad_id, False, args.length_groups)  # the CPU default: up to 4 forwards
    n = len(rows)
    with torch.no_grad():
        ref_logps, _ = dpo.sequence_logps(ref, batch)
    policy_logps, lengths = dpo.sequence_logps(policy, batch)
    loss, m = dpo.compute_loss(policy_logps[:n], policy_logps[n:], ref_logps[:n], ref_logps[n:], lengths[:n], lengths[n:], args)
    return loss, {k: v.double().sum().item() / n for k, v in m.items() if k != "pairs"}  # per-pair or summed values


def grads(loss, model):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def close(got, want, what):
    assert abs(got - want) <= ATOL + RTOL * abs(want), f"{what}: dpo.py {got!r} vs TRL {want!r} (diff {abs(got - want):.3g})"


def ids_of(setting, trainer, source):
    """The token ids both sides get: TRL's own tokenization of the pairs, or dpo.py's tokenize_pair."""
    return [{k: trainer.train_dataset[i][k] for k in IDS} for i in range(N_PAIRS)] if source == "trl" else setting[3]


def test_tokenization(setting, tmp_path):
    """TRL's ids = dpo.py's ids, plus the template's "\\n" after <|im_end|> in each response; both collators build
    the same input_ids / attention_mask, and dpo.py's loss_mask[t] = TRL's completion_mask[t + 1]."""
    tok, _, _, rows = setting
    trainer, *_ = make(setting, tmp_path, "sigmoid", 0.1, 0.0)
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and rows[0]["chosen_ids"][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    for i, r in enumerate(rows):
        t = trainer.train_dataset[i]
        assert t["prompt_ids"] == r["prompt_ids"]
        assert t["chosen_ids"] == r["chosen_ids"] + newline and t["rejected_ids"] == r["rejected_ids"] + newline
    for source in ("trl", "dpo"):
        ids = ids_of(setting, trainer, source)
        theirs = trainer.data_collator(ids)
        (ours,) = dpo.collate([{**r, "row": i} for i, r in enumerate(ids)], tok.pad_token_id, False)["parts"]
        assert torch.equal(theirs["input_ids"], ours["input_ids"])
        assert torch.equal(theirs["attention_mask"], ours["attention_mask"])
        assert torch.equal(theirs["completion_mask"][:, 1:].bool(), ours["loss_mask"][:, :-1]) and not ours["loss_mask"][:, -1].any()
        assert torch.equal(ours["targets"][:, :-1], ours["input_ids"][:, 1:])


@pytest.mark.parametrize("source", ["trl", "dpo"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_rewards_and_gradients_match_trl(setting, tmp_path, case, source):
    loss_type, beta, eps = CASES[case]
    tok = setting[0]
    trainer, policy, ref, args = make(setting, tmp_path, loss_type, beta, eps)
    rows = ids_of(setting, trainer, source)
    # the reward keys of ipo differ by design of dpo.py (see the module docstring and test_ipo_rewards_match_trl)
    keys = [k for k in KEYS if loss_type != "ipo" or k not in REWARD_KEYS]

    def trl_loss(rows):
        """TRL's loss (with e: REFERENCE.md's cDPO built from TRL's sigmoid, which ignores e), its plain loss, metrics."""
        loss, m = trl_side(trainer, rows)
        if eps == 0:
            return loss, loss, m
        swapped, ms = trl_side(trainer, rows, swap=True)
        assert ms["rewards/chosen"] == pytest.approx(m["rewards/rejected"], abs=ATOL)
        return (1 - eps) * loss + eps * swapped, loss, m

    # pair by pair (a batch of one on each side)
    per_pair = []
    for i in range(N_PAIRS):
        with torch.no_grad():
            (theirs, plain, mt), (ours, mo) = trl_loss(rows[i : i + 1]), dpo_side(policy, ref, rows[i : i + 1], args, tok.pad_token_id)
        close(ours.item(), theirs.item(), f"pair {i} loss")
        for k in keys:
            close(mo[k], mt[k], f"pair {i} {k}")
        per_pair.append((ours.item(), plain.item(), mt))

    # the whole batch (padded on both sides): mean loss, mean metrics, and the gradient of the loss
    theirs, _, mt = trl_loss(rows)
    ours, mo = dpo_side(policy, ref, rows, args, tok.pad_token_id)
    close(ours.item(), theirs.item(), "batch loss")
    for k in keys:
        close(mo[k], mt[k], f"batch {k}")
    g_theirs, g_ours = grads(theirs, policy), grads(ours, policy)
    assert g_theirs.abs().max() > 1e-3
    torch.testing.assert_close(g_ours, g_theirs, atol=ATOL, rtol=1e-4)

    # the setting exercises what it claims: rewards of both signs, non-zero margins; hinge on both sides of the
    # hinge; label smoothing that changes the loss, and TRL's sigmoid ignoring it
    assert 0 < sum(m["rewards/accuracies"] for *_, m in per_pair) < N_PAIRS
    assert all(abs(m["rewards/margins"]) > 1e-3 for *_, m in per_pair)
    if loss_type == "hinge":
        zero = [ours == 0 for ours, *_ in per_pair]
        assert any(zero) and not all(zero)
    if eps > 0:
        for ours, plain, m in per_pair:
            unsmoothed = -F.logsigmoid(torch.tensor(m["rewards/margins"], dtype=torch.float64)).item()
            assert plain == pytest.approx(unsmoothed, abs=ATOL)  # TRL 1.16: label_smoothing has no effect on sigmoid
            assert abs(ours - unsmoothed) > 1e-3  # dpo.py: it does


def test_ipo_rewards_match_trl(setting, tmp_path):
    """Under ipo, TRL's rewards are beta (logp_pi - logp_ref) with summed log-probs (as for every loss type, and as
    REFERENCE.md defines them); dpo.py's compute_loss once reported them with length-averaged log-probs."""
    tok = setting[0]
    trainer, policy, ref, args = make(setting, tmp_path, *CASES["ipo"])
    rows = setting[3]
    for i in range(N_PAIRS):  # the loss is length-averaged, the rewards are not
        with torch.no_grad():
            (_, mt), (_, mo) = trl_side(trainer, rows[i : i + 1]), dpo_side(policy, ref, rows[i : i + 1], args, tok.pad_token_id)
        for k in REWARD_KEYS:
            close(mo[k], mt[k], f"pair {i} {k}")
