"""weak_to_strong_cls.py: the three losses against REFERENCE.md, last-token pooling, bad input,
gradient accumulation and distributed equivalence (logconf's whole-batch threshold included), seeds
aggregation, the offline pipeline end to end (weak < strong ceiling, PGR, JSON and PNG, cache reuse), and the
unlabeled pre-training corpus and the pre-trained students of tiny/cls.py. The size sweep: test_w2s_sweep.py."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from conftest import load_script, run_script, not_a_model_folders
from datasets import load_from_disk
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tiny import cls

w2s = load_script("weak_to_strong_cls")

# one torch thread: tiny matrices crawl when two threads fight other jobs for two cores
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY_RECIPE = RECIPES / "tiny" / "weak_to_strong_cls.yaml"  # what --preset tiny stands for
QWEN_SMALL = "hidden_size=16,intermediate_size=32,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def overrides(size: str) -> str:
    """A tiny/cls.py student's config as --X_config_overrides."""
    return ",".join(f"{k}={v}" for k, v in cls.SIZES[size][0].items())


def cli(tiny: Path, out: Path, *extra: str) -> list[str]:
    """The tiny preset on the test's data, its students (tiny-s -> tiny-l) built from their configs without
    pre-training, at the preset's learning rates."""
    return ["weak_to_strong_cls.py", "--preset", "tiny", "--ds_name", str(tiny / "cls"), "--tokenizer_name",
            str(tiny / "tokenizer"), "--output_dir", str(out), "--weak_model_type", "qwen2", "--weak_config_overrides",
            overrides("tiny-s"), "--weak_lr", "3e-3", "--strong_model_type", "qwen2", "--strong_config_overrides",
            overrides("tiny-l"), "--strong_lr", "1e-4", *extra]


def cli_pretrained(tiny: Path, models: Path, out: Path, *extra: str) -> list[str]:
    """The tiny preset on the test's data with pre-trained students (conftest.cls_models): the preset's code path."""
    return ["weak_to_strong_cls.py", "--preset", "tiny", "--ds_name", str(tiny / "cls"), "--output_dir", str(out),
            "--weak_model_name_or_path", str(models / "tiny-s"), "--strong_model_name_or_path", str(models / "tiny-l"),
            *extra]


def scratch_spec(tiny: Path, model_type: str = "qwen2", overrides: str = QWEN_SMALL) -> dict:
    """A model built from a config with the tiny tokenizer, as build_model takes it."""
    return {"name_or_path": None, "model_type": model_type, "config_overrides": overrides, "tokenizer": str(tiny / "tokenizer")}


def stage_dir(out: Path, name: str, seed: int = 0) -> Path:
    (found,) = (out / f"seed_{seed}").glob(f"{name}_*")
    return found


# ------------------------------------------------------------------------------------------------
# losses: REFERENCE.md "Weak-to-strong classification", written out in numpy
def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def xent_ref(z, target):
    return float(np.mean(-(target * np.log(softmax(z))).sum(-1)))


@pytest.fixture
def logits_labels():
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(11, 2, generator=g)
    p1 = torch.rand(11, generator=g)
    return logits, torch.stack([1 - p1, p1], dim=1)  # soft weak labels, mean of class 1 not a round number


def grad_of(loss_fn, logits, labels, **kw):
    z = logits.clone().requires_grad_(True)
    loss = loss_fn(z, labels, **kw)
    loss.backward()
    return loss.item(), z.grad


def test_xent_is_cross_entropy_on_soft_labels(logits_labels):
    z, y = logits_labels
    expected = xent_ref(z.double().numpy(), y.double().numpy())
    assert w2s.xent_loss(z, y, step_frac=0.3).item() == pytest.approx(expected, rel=1e-5)
    hard = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0])  # ground truth as one-hot soft labels
    one_hot = torch.nn.functional.one_hot(hard, 2).float()
    assert w2s.xent_loss(z, one_hot, 0.0).item() == pytest.approx(torch.nn.functional.cross_entropy(z, hard).item(), rel=1e-6)


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0)])
def test_product_loss_matches_reference(logits_labels, alpha, beta):
    z, y = logits_labels
    zn, yn = z.double().numpy(), y.double().numpy()
    target = softmax(zn) ** beta * yn**alpha
    target /= target.sum(-1, keepdims=True)
    loss, grad = grad_of(w2s.product_loss, z, y, step_frac=0.5, alpha=alpha, beta=beta)
    assert loss == pytest.approx(xent_ref(zn, target), rel=1e-5)
    # the target is detached: the gradient is that of a cross-entropy against a constant
    np.testing.assert_allclose(grad.numpy(), (softmax(zn) - target) / len(zn), atol=1e-6)


@pytest.mark.parametrize("aux_coef, warmup_frac", [(0.5, 0.1), (0.3, 0.25)])
@pytest.mark.parametrize("step_frac", [0.0, 0.05, 0.1, 0.2, 0.7])
def test_logconf_loss_matches_reference(logits_labels, step_frac, aux_coef, warmup_frac):
    z, y = logits_labels
    zn, yn = z.double().numpy(), y.double().numpy()
    # the official warm-up: c = aux_coef * step_frac while step_frac <= warmup_frac, aux_coef after
    coef = aux_coef * (step_frac if step_frac <= warmup_frac else 1.0)
    p = softmax(zn)
    threshold = np.quantile(p[:, 0], yn[:, 1].mean())  # batch quantile of p(0) at the weak labels' mean of class 1
    hardened = np.stack([p[:, 0] >= threshold, p[:, 0] < threshold], axis=1).astype(float)
    target = (1 - coef) * yn + coef * hardened
    loss, grad = grad_of(w2s.logconf_loss, z, y, step_frac=step_frac, aux_coef=aux_coef, warmup_frac=warmup_frac)
    assert loss == pytest.approx(xent_ref(zn, target), rel=1e-5)
    np.testing.assert_allclose(grad.numpy(), (p - target) / len(zn), atol=1e-6)
    # the hardened strong predictions take the weak labels' class balance (to one example)
    assert abs(hardened[:, 1].mean() - yn[:, 1].mean()) <= 1 / len(zn)


def test_logconf_coefficient_values():
    """The ramp on numbers: at 5% of training the target is 2.5% hardened, after warm-up 50%."""
    z = torch.tensor([[3.0, -3.0], [-3.0, 3.0]])  # confident, one per class
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # the weak labels say the opposite; mean of class 1 = 0.5
    for step_frac, c in [(0.05, 0.025), (0.5, 0.5)]:
        target = (1 - c) * y + c * torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        expected = torch.nn.functional.cross_entropy(z, target).item()
        assert w2s.logconf_loss(z, y, step_frac).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# model: last-token pooling
def test_last_token_index_from_the_mask():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert w2s.last_token_index(mask).tolist() == [2, 4, 4, 0, 4]


@pytest.mark.parametrize("model_type, overrides", [
    ("qwen2", QWEN_SMALL),
    ("gpt2", "n_embd=16,n_layer=2,n_head=2,n_positions=64"),
])
def test_pooling_same_logits_with_left_and_right_padding(tiny, model_type, overrides):
    torch.manual_seed(0)
    tokenizer, model = w2s.build_model(scratch_spec(tiny, model_type, overrides), w2s.Args())
    assert model.score.bias is None and torch.count_nonzero(model.score.weight) == 0  # zero init, no bias
    torch.nn.init.normal_(model.score.weight)  # a non-zero head, so the pooled hidden state shows in the logits
    model.eval()
    pad = tokenizer.pad_token_id
    seqs = [[5, 6, 7, 8, 9], [10, 11, pad], [12]]  # the second one ends with the pad id as a real token

    def alone(s):
        return model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]

    expected = torch.stack([alone(s) for s in seqs])
    assert not torch.allclose(alone([10, 11]), expected[1], atol=1e-4)  # the real pad-id token matters
    with torch.no_grad():
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = w2s.collate(tokenizer, [{"input_ids": s, "soft_label": [1.0, 0.0]} for s in seqs])
            assert batch["attention_mask"].sum(1).tolist() == [5, 3, 1]
            torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), expected, atol=1e-5, rtol=1e-4)


def test_linear_probe_freezes_the_body(tiny):
    _, model = w2s.build_model(scratch_spec(tiny), w2s.Args(linear_probe=True))
    assert not any(p.requires_grad for p in model.body.parameters())
    assert model.score.weight.requires_grad


# ------------------------------------------------------------------------------------------------
# gradient accumulation really accumulates (in process), and 2 processes equal 1 (torchrun)
def train_in_process(tiny, ds, loss_fn, accumulation: int, batch_size: int) -> tuple[dict, dict]:
    """w2s.train, one epoch of `ds` at lr 1e-2, on a model built from scratch (seed 0) and a fresh Accelerator: the
    weights before and after."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = w2s.Accelerator(gradient_accumulation_steps=accumulation)
    args = w2s.Args(batch_size=batch_size, gradient_accumulation_steps=accumulation,
                    micro_batch_size=batch_size // accumulation)
    torch.manual_seed(0)
    tokenizer, model = w2s.build_model(scratch_spec(tiny), args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows, _ = w2s.tokenize(ds, tokenizer, 64)
    model = w2s.train(model, rows, tokenizer, loss_fn, 1e-2, 1, 0, args, accelerator, "test", None)
    after = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    accelerator.free_memory()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return before, after


def train_tiny(tiny, accumulation: int) -> dict:
    ds = w2s.load_cls_dataset(str(tiny / "cls"), 32, 8, seed=0)["train"]
    before, after = train_in_process(tiny, ds, w2s.xent_loss, accumulation, batch_size=8)
    return {"before": before, "after": after}


def test_gradient_accumulation_equals_the_full_batch(tiny):
    full, accumulated = train_tiny(tiny, 1), train_tiny(tiny, 4)  # 4 optimizer steps of 8 = 8 x 1 or 2 x 4
    for k, v in full["after"].items():
        torch.testing.assert_close(accumulated["after"][k], v, atol=1e-5, rtol=1e-4)
    # and training did move the body (after the zero head's first step) and the head
    assert not torch.allclose(full["after"]["score.weight"], full["before"]["score.weight"])
    moved = [k for k in full["after"] if not torch.allclose(full["after"][k], full["before"][k])]
    assert any(k.startswith("body.layers.0.") for k in moved)


def test_two_processes_match_one(tiny, tmp_path):
    small = ("--n_docs", "512", "--n_test_docs", "100", "--gt_epochs", "3", "--losses", "xent", "logconf",
             "--no_save_models")  # logconf: its hardening over both processes' rows (gathered) equals one process'

    run_script(*cli(tiny, tmp_path / "one", *small), env=SINGLE_THREAD)
    p = run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", *cli(tiny, tmp_path / "two", *small),
                   env={**SINGLE_THREAD, "ACCELERATE_USE_CPU": "1"})
    assert "= 16 x 1 accumulated x 2 processes" in p.stdout
    for stage in ("weak", "strong_ceiling", "w2s_xent", "w2s_logconf"):
        one, two = (load_file(stage_dir(tmp_path / d, stage) / "test_predictions.safetensors") for d in ("one", "two"))
        assert torch.equal(one["idx"], two["idx"])
        torch.testing.assert_close(two["probs"], one["probs"], atol=1e-5, rtol=1e-4)
    assert load_from_disk(str(stage_dir(tmp_path / "two", "weak") / "weak_labels")).num_rows == 256


# ------------------------------------------------------------------------------------------------
# end to end on the offline tiny setting
def pgr(transfer_acc: float, r: dict) -> float:
    """REFERENCE.md: PGR = (w2s - weak) / (strong - weak), from the JSON's own accuracies."""
    return (transfer_acc - r["weak_acc"]) / (r["strong_acc"] - r["weak_acc"])

def test_end_to_end_weak_strong_gap_pgr_and_cache(tiny, tmp_path):
    out = tmp_path / "run"
    # from scratch (no pre-training), at the lr a model trained from scratch needs (the preset's 1e-4 is for a
    # pretrained student)
    args = cli(tiny, out, "--n_docs", "3000", "--n_test_docs", "200", "--gt_epochs", "16", "--strong_lr", "1e-3",
               "--losses", "xent", "logconf")
    first = run_script(*args, env=SINGLE_THREAD)
    summary = json.loads((out / "results.json").read_text())
    r = summary["per_seed"]["0"]
    assert set(r) == {"weak_acc", "strong_acc", "weak_label_acc", "transfer_acc_xent", "pgr_xent", "agreement_xent",
                      "transfer_acc_logconf", "pgr_logconf", "agreement_logconf"}
    # the capability gap: a 1-layer bag of words vs a 2-layer model that learns negation (measured 0.77 vs 0.96)
    assert r["strong_acc"] > r["weak_acc"] + 0.1, r
    assert 0.6 < r["weak_acc"] < 0.9 and r["strong_acc"] > 0.85
    assert 0.6 < r["weak_label_acc"] < 0.9  # the weak labels on half 2 are as wrong as the weak model
    for loss in ("xent", "logconf"):
        acc = r[f"transfer_acc_{loss}"]
        assert 0.5 < acc <= 1.0
        assert r[f"pgr_{loss}"] == pytest.approx(pgr(acc, r))
        assert 0.5 < r[f"agreement_{loss}"] <= 1.0
        # agreement recomputed from the saved predictions
        student, teacher = (load_file(stage_dir(out, s) / "test_predictions.safetensors") for s in (f"w2s_{loss}", "weak"))
        assert torch.equal(student["idx"], teacher["idx"])
        agree = (student["probs"].argmax(-1) == teacher["probs"].argmax(-1)).float().mean().item()
        assert r[f"agreement_{loss}"] == pytest.approx(agree)
    assert summary["mean"] == pytest.approx({k: v for k, v in r.items()}) and all(v == 0 for v in summary["std"].values())
    assert "pgr_xent" in first.stdout and "wrote" in first.stdout
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # the stages on disk: weak labels as a dataset, models as safetensors, nothing dropped at max_ctx 64
    weak = stage_dir(out, "weak")
    labels = load_from_disk(str(weak / "weak_labels"))
    assert labels.num_rows == 1500 and set(labels.column_names) == {"text", "label", "idx", "soft_label"}
    soft = torch.tensor(labels["soft_label"])
    torch.testing.assert_close(soft.sum(-1), torch.ones(len(soft)))
    assert (soft.argmax(-1) == torch.tensor(labels["label"])).float().mean().item() == pytest.approx(r["weak_label_acc"])
    stage_results = json.loads((weak / "results.json").read_text())
    assert stage_results["n_train"] == 1500 and stage_results["n_dropped_long"] == {"train": 0, "test": 0, "labelled": 0}
    for stage in ("weak", "strong_ceiling", "w2s_xent", "w2s_logconf"):
        model_dir = stage_dir(out, stage) / "model"
        assert (model_dir / "model.safetensors").exists() and (model_dir / "config.json").exists()
        assert torch.count_nonzero(load_file(model_dir / "score.safetensors")["weight"]) > 0  # the head trained
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))

    # rerun: every stage comes from the cache, same numbers; a new loss trains only its own stage
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("test_predictions.safetensors")}
    second = run_script(*args, env=SINGLE_THREAD)
    assert len(re.findall(r"cached in .*, skipped", second.stdout)) == 4
    assert json.loads((out / "results.json").read_text())["per_seed"] == summary["per_seed"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("test_predictions.safetensors")} == mtimes
    third = run_script(*args[:-2], "xent", "logconf", "product", env=SINGLE_THREAD)
    assert len(re.findall(r"cached in .*, skipped", third.stdout)) == 4 and "w2s_product: test acc" in third.stdout
    r3 = json.loads((out / "results.json").read_text())["per_seed"]["0"]
    assert r3["pgr_product"] == pytest.approx(pgr(r3["transfer_acc_product"], r))


def test_seeds_are_aggregated(tiny, tmp_path):
    run_script(*cli(tiny, tmp_path, "--n_docs", "512", "--n_test_docs", "100", "--gt_epochs", "2", "--losses", "xent",
                    "--n_seeds", "2", "--no_save_models"), env=SINGLE_THREAD)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert sorted(summary["per_seed"]) == ["0", "1"] and summary["n_seeds"] == 2
    for k in ("weak_acc", "strong_acc", "transfer_acc_xent", "agreement_xent"):
        values = [summary["per_seed"][s][k] for s in ("0", "1")]
        assert summary["mean"][k] == pytest.approx(np.mean(values)) and summary["std"][k] == pytest.approx(np.std(values))
    assert (tmp_path / "seed_1").is_dir() and (tmp_path / "results.png").exists()


# ------------------------------------------------------------------------------------------------
# bad input: clear errors
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def good_rows(n):
    return [{"text": f"good film {i}", "label": i % 2} for i in range(n)]


@pytest.mark.parametrize("bad, message", [
    ({"text": "good film", "label": 2}, "label 2 is not 0 or 1"),
    ({"text": "good film", "label": 0.5}, "label 0.5 is not 0 or 1"),
    ({"text": "good film", "label": -1}, "label -1 is not 0 or 1"),
    ({"text": "", "label": 1}, "empty text"),
    ({"text": "   ", "label": 0}, "empty text"),
])
def test_bad_rows_are_named(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", good_rows(30) + [bad] + good_rows(30))
    with pytest.raises(ValueError, match=re.escape(message)):
        w2s.load_cls_dataset(str(path), n_docs=1000, n_test_docs=10, seed=0)


def test_missing_columns_and_unknown_names(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"sentence": "good", "target": 1}] * 40)
    with pytest.raises(ValueError, match="`text` and 0/1 `label` columns"):
        w2s.load_cls_dataset(str(path), 100, 10, 0)
    with pytest.raises(ValueError, match="neither one of"):
        w2s.load_cls_dataset(str(tmp_path / "nowhere"), 100, 10, 0)


def test_csv_json_array_and_parquet_files_load_with_their_types(tmp_path):
    """A csv's labels are integers (csv.DictReader's strings were refused as labels), and a bad row is named by its
    line (the header is line 1); a JSON array and a parquet file load as well."""
    from datasets import Dataset

    rows = good_rows(40)
    (tmp_path / "data.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    (tmp_path / "data.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(tmp_path / "data.parquet")
    for ext in ("csv", "json", "parquet"):
        ds = w2s.load_cls_dataset(str(tmp_path / f"data.{ext}"), 100, 10, 0)
        assert ds["train"].num_rows == 30 and ds["test"].num_rows == 10
        assert sorted([*ds["train"]["text"], *ds["test"]["text"]]) == sorted(r["text"] for r in rows)
        assert sum([*ds["train"]["label"], *ds["test"]["label"]]) == 20
    (tmp_path / "bad.csv").write_text("text,label\n" + "good film,1\n" * 30 + "good film,2\n")
    with pytest.raises(w2s.DataError, match=re.escape("bad.csv line 32: label 2 is not 0 or 1")):
        w2s.load_cls_dataset(str(tmp_path / "bad.csv"), 100, 1, 0)


def test_too_small_to_split(tmp_path):
    ds = w2s.load_cls_dataset(str(write_jsonl(tmp_path / "data.jsonl", good_rows(50))), 100, 10, 0)
    assert ds["train"].num_rows == 40 and ds["test"].num_rows == 10
    with pytest.raises(ValueError, match="too few to split 50/50"):
        w2s.split_halves(ds["train"], 0, batch_size=32)
    assert [h.num_rows for h in w2s.split_halves(ds["train"], 0, batch_size=8)] == [20, 20]


def test_long_examples_are_dropped_and_counted(tiny):
    ds = w2s.load_cls_dataset(str(tiny / "cls"), 200, 10, 0)["train"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny / "tokenizer")
    rows, dropped = w2s.tokenize(ds, tokenizer, max_ctx=10)
    n_long = sum(len(t.split()) >= 10 for t in ds["text"])  # one token per word
    assert dropped == n_long > 0 and len(rows) == 200 - n_long and all(len(r["input_ids"]) < 10 for r in rows)


def test_cli_says_what_is_wrong(tiny, tmp_path):
    data = tmp_path / "small"
    data.mkdir()
    write_jsonl(data / "train.jsonl", good_rows(40))
    write_jsonl(data / "test.jsonl", good_rows(10))
    p = run_script(*cli(tiny, tmp_path / "out", "--ds_name", str(data)), check=False, env=SINGLE_THREAD)
    assert p.returncode != 0 and "too few to split 50/50" in p.stderr and "raise --n_docs" in p.stderr


# ------------------------------------------------------------------------------------------------
# logconf's threshold over the whole optimizer-step batch (issue 14 item 5)
def train_logconf(tiny, accumulation: int, batch_size: int = 32) -> tuple[dict, list[float]]:
    ds = w2s.load_cls_dataset(str(tiny / "cls"), 400, 8, seed=0)["train"]
    # distinct texts: equal texts tie at the quantile, where float noise of another padding length decides the side
    ds = ds.select([i for i, t in enumerate(ds["text"]) if ds["text"].index(t) == i][:128])
    p1 = torch.rand(len(ds), generator=torch.Generator().manual_seed(1))  # soft weak labels, not a round balance
    ds = ds.add_column("soft_label", torch.stack([1 - p1, p1], 1).tolist())
    losses = []

    def logging_loss(logits, labels, step_frac, hardened=None):  # logconf, each micro batch's loss recorded
        loss = w2s.logconf_loss(logits, labels, step_frac, warmup_frac=0.0, hardened=hardened)
        losses.append(loss.item())
        return loss

    _, after = train_in_process(tiny, ds, logging_loss, accumulation, batch_size)
    return after, losses


def test_logconf_threshold_over_the_whole_batch(tiny):
    """32 x 1 and 16 x 2 accumulated: the same step losses and weights (within 1e-5), since the hardening
    threshold is the quantile over all 32 examples, not over each micro batch of 16 (2 processes: below)."""
    full, full_losses = train_logconf(tiny, 1)
    split, split_losses = train_logconf(tiny, 2)
    assert len(full_losses) == 4 and len(split_losses) == 8  # 128 rows / 32 = 4 steps
    step_losses = [np.mean(split_losses[i: i + 2]) for i in range(0, 8, 2)]
    np.testing.assert_allclose(step_losses, full_losses, atol=1e-5)
    for k, v in full.items():
        torch.testing.assert_close(split[k], v, atol=1e-5, rtol=1e-4)
    # the per-micro-batch quantile (the earlier code) gives another loss on the same logits and labels
    g = torch.Generator().manual_seed(0)
    logits, p1 = torch.randn(32, 2, generator=g), torch.rand(32, generator=g)
    labels = torch.stack([1 - p1, p1], 1)
    whole = w2s.logconf_loss(logits, labels, 1.0)
    hardened = w2s.harden(torch.softmax(logits, -1)[:, 0], labels[:, 1])
    halves = (slice(0, 16), slice(16, 32))
    halves_whole = [w2s.logconf_loss(logits[s], labels[s], 1.0, hardened=hardened[s]) for s in halves]
    halves_own = [w2s.logconf_loss(logits[s], labels[s], 1.0) for s in halves]
    assert (halves_whole[0] + halves_whole[1]).item() / 2 == pytest.approx(whole.item(), abs=1e-6)
    assert abs((halves_own[0] + halves_own[1]).item() / 2 - whole.item()) > 1e-3


# ------------------------------------------------------------------------------------------------
# pre-training: the unlabeled corpus (issue 17) and the pre-trained students (tiny/cls.py)
def read_jsonl_folder(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def test_corpus_has_the_concept_but_no_label_and_no_test_text(tiny, corpus):
    from tiny import cls

    docs = read_jsonl_folder(corpus)
    assert len(docs) == 20000 and all(set(d) == {"text"} for d in docs)  # no label column
    test_texts = {json.loads(line)["text"] for f in (tiny / "cls").glob("test-*.jsonl")
                  for line in f.read_text().splitlines()}
    assert len(test_texts) > 150
    reviews = [cls.review_of(d["text"]) for d in docs]
    assert not test_texts & set(reviews) and not test_texts & {d["text"] for d in docs}
    # the verdict word follows the review's sentiment, negations included; no classification word is a verdict
    verdicts = {w for ws in cls.VERDICTS.values() for w in ws}
    assert not verdicts & set(cls.words())
    for doc, review in zip(docs, reviews):
        assert doc["text"].split()[-1] in cls.VERDICTS[cls.label_of(review)]
    assert 0.4 < np.mean([cls.label_of(r) for r in reviews]) < 0.6
    assert sum(cls.NEGATOR in r.split() for r in reviews) > 5000  # negations are common


def test_write_models_writes_pretrained_students_that_load_as_model_paths(tiny, cls_models, tmp_path):
    """tiny/cls.py write_models (20 steps each here): a save_pretrained folder per student (safetensors, config,
    tokenizer, its pre-training settings), the next-token loss fallen, the same weights again from the same seed; the
    folder loads as a --weak / --strong model: its body, with a fresh zero head, is what fine-tuning starts from."""
    for size, (config, _) in cls.SIZES.items():
        settings = json.loads((cls_models / size / "pretraining.json").read_text())
        assert settings["steps"] == 20 and settings["n_docs"] == 20000 and settings["seed"] == 0
        assert settings["final_loss"] < 5.9  # next-token loss fell from ln(vocab) = 6.2
        lm = AutoModelForCausalLM.from_pretrained(cls_models / size)
        assert {k: getattr(lm.config, k) for k in config} == config
        assert not list((cls_models / size).glob("*.bin")) and not list((cls_models / size).glob("*.pkl"))
    again = tmp_path / "again"  # the same tokenizer and corpus in another folder: the same weights, bit for bit
    again.mkdir()
    for name in ("tokenizer", "cls_corpus"):
        (again / name).symlink_to(tiny / name)
    cls.write_models(again, 0, sizes=("tiny-s",), steps=20)
    first, second = (load_file(d / "tiny-s" / "model.safetensors") for d in (cls_models, again / "models" / "cls"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    spec = {"name_or_path": str(cls_models / "tiny-l"), "model_type": None, "config_overrides": None, "tokenizer": None}
    _, model = w2s.build_model(spec, w2s.Args())
    body = load_file(cls_models / "tiny-l" / "model.safetensors")
    torch.testing.assert_close(model.body.embed_tokens.weight, body["model.embed_tokens.weight"])
    assert torch.count_nonzero(model.score.weight) == 0


# ------------------------------------------------------------------------------------------------
# arguments, output folder and data files: one message, exit code 2, nothing written (issue 15)
@pytest.mark.parametrize("extra, message", [
    (["--batch_size", "0"], "--batch_size 0: must be a positive integer"),
    (["--gt_epochs", "-1"], "--gt_epochs -1: must be a positive integer"),
    (["--strong_lr", "-0.1"], "--strong_lr -0.1: must not be negative"),
    (["--logconf_aux_coef", "1.5"], "--logconf_aux_coef 1.5: a mixing weight, must lie in [0, 1]"),
    (["--batch_size", "32", "--gradient_accumulation_steps", "3"],
     "--batch_size 32 must be a multiple of --gradient_accumulation_steps 3"),
    (["--weak_model_type", "None", "--weak_model_name_or_path", "None"], "give exactly one of --weak_model_name_or_path"),
    (["--weak_model_name_or_path", "runs/lm"], "give exactly one of --weak_model_name_or_path"),  # and a model type
])
def test_bad_arguments_exit_2_before_anything(tiny, tmp_path, extra, message, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", cli(tiny, out, *extra))
    with pytest.raises(SystemExit) as exit_info:
        w2s.parse_args()
    assert exit_info.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_foreign_output_dir_is_refused(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    p = run_script(*cli(tiny, out), check=False, env=SINGLE_THREAD)  # the command line: exit code 2, no traceback
    assert p.returncode == 2 and "already holds files this script did not write (model.safetensors)" in p.stderr
    assert "--overwrite_output_dir" in p.stderr and "Traceback" not in p.stderr
    assert sorted(x.name for x in out.iterdir()) == ["model.safetensors"]


def test_preset_with_equals_and_flags_override(monkeypatch):
    parsed = {}
    for argv in (["--preset", "tiny"], ["--preset=tiny"]):
        monkeypatch.setattr("sys.argv", ["weak_to_strong_cls.py", *argv])
        parsed[argv[-1]] = w2s.parse_args()
    assert parsed["tiny"] == parsed["--preset=tiny"] and parsed["tiny"].ds_name == "data/tiny/cls"
    # a model type on the command line replaces the preset's pretrained model; an explicit path is kept as given
    monkeypatch.setattr("sys.argv", ["weak_to_strong_cls.py", "--preset", "tiny", "--strong_model_name_or_path",
                                     "runs/some-lm", "--weak_model_type", "qwen2", "--tokenizer_name", "tok",
                                     "--weak_lr", "1e-3"])
    args = w2s.parse_args()
    assert args.strong_model_name_or_path == "runs/some-lm" and args.strong_model_type is None
    assert args.strong_config_overrides is None and args.weak_model_type == "qwen2"


@pytest.mark.parametrize("lines, message", [
    (['{"text": "good", "label": 1}', '{"text": "bad", "label": 0', '{"text": "ok", "label": 1}'],
     "data.jsonl line 2: not valid JSON"),
    ([], "data.jsonl is empty: it holds no rows"),
    (['{"text": "good", "label": 1}'] * 30 + ['{"text": "good", "label": 2}'],
     "data.jsonl line 31: label 2 is not 0 or 1"),
    (['{"text": "good", "label": 1}'] * 3 + ['{"sentence": "good", "label": 1}'], "data.jsonl line 4: no `text` field"),
    (['{"text": "good", "label": 1}', '[1, 2]'], "data.jsonl line 2: a list, not an object"),
])
def test_data_errors_name_file_and_line(tiny, tmp_path, lines, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(w2s.DataError, match=re.escape(message)):
        w2s.load_cls_dataset(str(path), 1000, 1, seed=0)
    if message.endswith("not 0 or 1"):  # the command line: the same message, exit code 2, no traceback, no output
        p = run_script(*cli(tiny, tmp_path / "out", "--ds_name", str(path), "--n_test_docs", "1"), check=False,
                       env=SINGLE_THREAD)
        assert p.returncode == 2 and f"error: {path} line 31: label 2" in p.stderr and "Traceback" not in p.stderr
        assert not (tmp_path / "out").exists()


def test_bad_model_path_and_no_network_say_what_failed(tiny, cls_models, tmp_path):
    out = tmp_path / "out"
    p = run_script(*cli_pretrained(tiny, cls_models, out, "--weak_model_name_or_path", "runs/nowhere", "--n_docs",
                                   "512"), check=False, env=SINGLE_THREAD)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "error: could not load model 'runs/nowhere': no such local folder and not a hub id" in p.stderr
    assert not out.exists()
    # no network and HF_HUB_OFFLINE unset: said at once (a closed loopback port refuses the connection)
    p = run_script(*cli_pretrained(tiny, cls_models, out, "--weak_model_name_or_path", "some-org/some-model"),
                   check=False, env={**SINGLE_THREAD, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert p.returncode == 2 and "error: no network: cannot reach the Hugging Face Hub for 'some-org/some-model'. " \
        "Set HF_HUB_OFFLINE=1" in p.stderr, p.stderr
    assert not out.exists()


def test_inputs_are_checked_before_any_stage_runs(tiny, cls_models, tmp_path):
    """issue 26 case 13: a broken data file or a wrong model path is reported before any stage trains, and nothing
    is written; case 15: an empty or checkpoint folder as a model is named as one."""
    out, broken = tmp_path / "out", tmp_path / "data.jsonl"
    broken.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n')
    empty, checkpoint = not_a_model_folders(tmp_path)
    cases = [
        (["--ds_name", str(broken)], f"error: {broken} line 2: not valid JSON"),
        (["--weak_model_name_or_path", "runs/nowhere"],
         "error: could not load model 'runs/nowhere': no such local folder and not a hub id"),
        (["--strong_model_name_or_path", str(empty)], f"error: could not load model '{empty}' from that folder: it is "
         "empty; pass a folder holding a saved model, or a hub id"),
        (["--strong_model_name_or_path", str(checkpoint)], f"error: could not load model '{checkpoint}' from that "
         "folder: it holds a training checkpoint (optimizer state), not a saved model"),
    ]
    for extra, message in cases:  # the weak model's stage would train first without the checks
        p = run_script(*cli_pretrained(tiny, cls_models, out, *extra), check=False, env=SINGLE_THREAD)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (extra, p.stderr[-2000:])
        assert "pretrain:" not in p.stdout + p.stderr and not out.exists(), extra  # no stage ran, nothing written


def test_pgr_is_undefined_when_the_strong_ceiling_is_not_above_the_weak_model(tiny, tmp_path, monkeypatch):
    """issue 26 case 4: a strong model that does not learn (lr 0: its zero head predicts one class) is worse than the
    weak one; PGR is null in the JSON, 'undefined' in the table and on the plot, and the run completes."""
    p = run_script(*cli(tiny, tmp_path, "--n_docs", "1024", "--n_test_docs", "200", "--gt_epochs", "4", "--losses",
                        "xent", "--strong_lr", "0", "--no_save_models"), env=SINGLE_THREAD)
    summary = json.loads((tmp_path / "results.json").read_text())
    r = summary["per_seed"]["0"]
    assert r["strong_acc"] < r["weak_acc"] - 0.1, r  # measured 0.470 vs 0.735
    assert r["pgr_xent"] is None and summary["mean"]["pgr_xent"] is None and summary["std"]["pgr_xent"] is None
    assert summary["mean"]["transfer_acc_xent"] == r["transfer_acc_xent"]  # the other numbers are reported as usual
    assert summary["pgr_undefined"] == [0]  # the seeds, as w2s_sweep.py's sweep.json lists the pairs
    assert re.search(r"pgr_xent +undefined\n", p.stdout)
    assert ("PGR undefined: the strong ceiling is not above the weak model in seed(s) [0], so there is no gap to "
            "recover") in p.stdout
    texts = []  # the bar labels of the plot
    monkeypatch.setattr(w2s.plt.Axes, "text", lambda ax, x, y, s, **kw: texts.append(s))
    w2s.plot(summary, ("xent",), tmp_path / "again.png", "title")
    assert texts[-1] == f"{r['transfer_acc_xent']:.3f}\nPGR undefined\n(strong <= weak)"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# --config FILE.yaml: the recipes (issue 29)
def parse_argv(monkeypatch, *argv: str):
    monkeypatch.setattr("sys.argv", ["weak_to_strong_cls.py", *argv])
    return w2s.parse_args()


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*/weak_to_strong_cls*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses_to_the_values_it_names(recipe, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the recipes' output folders are relative
    monkeypatch.setattr(w2s.constants, "HF_HUB_OFFLINE", True)  # no hub check for the hub ids
    assert recipe.read_text().startswith("# ")  # its source, in a comment at the top
    args = parse_argv(monkeypatch, "--config", str(recipe))
    for key, value in yaml.safe_load(recipe.read_text()).items():
        assert getattr(args, key) == (tuple(value) if isinstance(value, list) else value), key
    assert args.config == str(recipe) and args.config_sha256 == hashlib.sha256(recipe.read_bytes()).hexdigest()


def test_preset_tiny_is_the_tiny_recipe_and_flags_override_a_file(monkeypatch, tmp_path):
    by_file = parse_argv(monkeypatch, "--config", str(TINY_RECIPE))
    assert dataclasses.replace(by_file, preset="tiny") == parse_argv(monkeypatch, "--preset", "tiny")
    assert (by_file.ds_name, by_file.n_docs, by_file.losses) == ("data/tiny/cls", 8000,
                                                                 ("xent", "logconf", "product"))
    config = tmp_path / "run.yaml"  # every kind of value: int, bool, 1e-5 (a string to PyYAML), list, null
    config.write_text("n_docs: 512\nsave_models: false\nweak_lr: 1e-5\nlosses: [product]\nstrong_lr: null\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    args = parse_argv(monkeypatch, "--config", str(config))
    assert (args.n_docs, args.save_models, args.weak_lr) == (512, False, 1e-5)
    assert (args.losses, args.strong_lr) == (("product",), None)
    assert args.n_test_docs == w2s.Args().n_test_docs  # a field the file does not name keeps its default
    args = parse_argv(monkeypatch, "--config", str(config), "--n_docs", "64", "--save_models", "--losses", "xent",
                      "logconf")  # the command line wins, before or after the file's values
    assert (args.n_docs, args.save_models, args.weak_lr, args.losses) == (64, True, 1e-5, ("xent", "logconf"))
    assert parse_argv(monkeypatch, "--n_docs=64", "--config", str(config)).n_docs == 64


@pytest.mark.parametrize("text, argv, message", [
    ("weak_lrr: 1e-5\n", (), "--config {config}: unknown key 'weak_lrr' (did you mean 'weak_lr'?)"),
    ("n_doc: 64\n", (), "--config {config}: unknown key 'n_doc' (did you mean 'n_docs'?)"),
    ("micro_batch_size: 4\n", (), "--config {config}: unknown key 'micro_batch_size' (did you mean 'batch_size'?)"),
    ("preset: tiny\n", (), "--config {config}: unknown key 'preset'"),
    ("- n_docs\n", (), "--config {config} is not a mapping of Args fields"),
    ("n_docs: [64\n", (), "--config {config}: cannot be read as YAML (ParserError"),
    (None, (), "--config {config}: cannot be read as YAML (FileNotFoundError"),
    ("n_docs: 64\n", ("--preset", "tiny"), "pass one of --config and --preset"),
])
def test_bad_config_exits_2_naming_the_file(text, argv, message, monkeypatch, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    if text is not None:
        config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_argv(monkeypatch, "--config", str(config), "--output_dir", str(tmp_path / "out"), *argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert f"error: {message.format(config=config)}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if text is None else ["run.yaml"])


def test_config_run_records_the_file_and_shares_the_cache_with_the_preset(tiny, tmp_path):
    """results.json's args name the --config file and its sha256; a stage's cache key holds the settings, not the
    file: the same settings through --preset tiny reuse every stage."""
    config, out = tmp_path / "tiny.yaml", tmp_path / "out"
    config.write_bytes(TINY_RECIPE.read_bytes())
    small = ("--n_docs", "128", "--n_test_docs", "50", "--gt_epochs", "1", "--losses", "xent", "--no_save_models")
    argv = cli(tiny, out, *small)
    assert argv[1:3] == ["--preset", "tiny"]
    run_script(argv[0], "--config", str(config), *argv[3:], env=SINGLE_THREAD)
    first = json.loads((out / "results.json").read_text())
    assert first["args"]["config"] == str(config) and first["args"]["preset"] == "paper"
    assert first["args"]["config_sha256"] == hashlib.sha256(TINY_RECIPE.read_bytes()).hexdigest()
    assert first["args"]["n_docs"] == 128 and first["args"]["max_ctx"] == 64  # the command line's, the file's
    second = run_script(*argv, env=SINGLE_THREAD)
    assert len(re.findall(r"cached in .*, skipped", second.stdout)) == 3  # weak, strong ceiling, w2s_xent
    again = json.loads((out / "results.json").read_text())
    assert again["args"]["config"] == str(TINY_RECIPE) and again["per_seed"] == first["per_seed"]


def test_missing_tiny_students_say_how_to_write_them(tiny, tmp_path):
    """--preset tiny before `python -m tiny --models cls`: exit 2 naming the folder and the command that writes it."""
    p = run_script(str(Path(__file__).parents[1] / "weak_to_strong_cls.py"), "--preset", "tiny", "--ds_name",
                   str(tiny / "cls"), "--output_dir", str(tmp_path / "out"), cwd=tmp_path, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "could not load model 'data/tiny/models/cls/tiny-s'" in p.stderr
    assert "python -m tiny --out data/tiny --models cls writes it" in p.stderr
    assert not (tmp_path / "out").exists()
