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
    # a rerun reuses both caches, and cached reference log-probs equal live ones
    live = tmp_path / "live"
    p2 = run_script(*dpo_args(tiny, small_sft, tmp_path / "again", cache, "--max_steps", "2", "--logging_steps", "1"))
    assert p2.stdout.count("reusing the cache") == 2 and "computed" not in p2.stdout
    run_script(*dpo_args(tiny, small_sft, live, cache, "--max_steps", "2", "--logging_steps", "1", "--ref_mode", "live"))
    a, b = metrics(tmp_path / "again"), metrics(live)
    for ra, rb in zip(a, b):
        for k in ra:
            # both steps still run the initial policy (the first update has lr 0, in warm-up): every margin is float
            # noise of size 1e-8 (the pre-pass batches its forwards differently), and its sign, the accuracy, arbitrary
            if k == "train/rewards/accuracies" and abs(ra["train/rewards/margins"]) < 1e-6:
                assert rb["train/rewards/margins"] == 0 and rb[k] == 0  # live: the same forward, exactly zero
                continue
            assert ra[k] == pytest.approx(rb[k], abs=1e-5) or k.startswith("perf/"), k


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
