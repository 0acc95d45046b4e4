"""The main job (run_tiny.sh) at one seed, 6, that the docs' table (seeds 1-5) does not use, with the docs' evaluation
(200 held-out prompts x 4 samples). It asserts each ordering that held in every one of seeds 1-6 on the project's
machine (docs/results.md), at a threshold below that six-seed minimum; the minimum is written next to each."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT


def test_pipeline_orderings(tmp_path):
    env = {**os.environ, "USE_CURRENT_PYTHON": "1", "OUT": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"),
           "SEED": "6", "N_PROMPTS": "200", "SAMPLES": "4"}
    p = subprocess.run(["bash", "run_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = {r["name"]: r for r in json.load(open(tmp_path / "runs" / "results.json"))}
    assert {r["seed"] for r in res.values()} == {6}
    gold = {k: r["gold_reward_mean"] for k, r in res.items()}
    tone = {k: r["tone_mean"] for k, r in res.items()}
    assert gold["weak DPO"] - gold["weak SFT"] >= 0.05, gold  # seeds 1-6: min +0.098
    assert gold["strong DPO"] - gold["strong SFT"] >= 0.15, gold  # min +0.312
    assert gold["strong WPO"] - gold["strong SFT"] >= 0.15, gold  # min +0.310
    assert gold["strong WSPO"] - gold["strong SFT"] >= 0.10, gold  # min +0.240
    assert tone["weak DPO"] - tone["weak SFT"] >= 0.1, tone  # min +0.199
    assert tone["strong DPO"] - tone["strong SFT"] >= 0.2, tone  # min +0.381
    assert tone["strong WSPO"] - tone["strong SFT"] >= 0.3, tone  # min +0.562
    assert res["weak DPO"]["pref_accuracy"] > 0.8 and res["strong DPO"]["pref_accuracy"] > 0.85  # min 0.885, 0.940
    assert res["strong WSPO"]["pref_accuracy"] > 0.6  # min 0.680
    assert (tmp_path / "runs" / "results.png").stat().st_size > 5000
    assert "WSPO recovers" in (tmp_path / "runs" / "results.md").read_text()

    # a second run into the same OUT is refused before anything runs; the first run's results stay as they were
    before = (tmp_path / "runs" / "results.json").read_bytes()
    again = subprocess.run(["bash", "run_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already holds a run; set OVERWRITE=1" in again.stderr
    assert (tmp_path / "runs" / "results.json").read_bytes() == before


def fake_results(seed: int, gold: dict, acc: float) -> list[dict]:
    """One seed's evaluate.py rows with the given gold rewards (correctness = gold, tone 0)."""
    return [{"name": m, "seed": seed, "gold_reward_mean": g, "correctness_mean": g, "tone_mean": 0.0,
             "pref_accuracy": acc if m == "strong WSPO" else 0.9} for m, g in gold.items()]


def test_seeds_table_means_minimum_and_claims(tmp_path):
    """tiny/seeds.py: mean +- std over seeds, the minimum, WSPO's share per seed, and a claim that fails in one seed
    is reported as failing (holds in 2 of 3), with the CLI writing JSON, table and plot."""
    from tiny import seeds

    base = {"weak SFT": 0.4, "weak DPO": 0.6, "strong SFT": 1.0, "strong WSPO": 1.3, "strong DPO": 1.4, "strong WPO": 1.5}
    runs = {1: fake_results(1, base, 0.6), 2: fake_results(2, {**base, "weak DPO": 0.42}, 0.7),
            3: fake_results(3, {**base, "strong WSPO": 1.5}, 0.8)}
    for s, rows in runs.items():
        (tmp_path / f"seed-{s}").mkdir()
        (tmp_path / f"seed-{s}" / "results.json").write_text(json.dumps(rows))
    summary = seeds.aggregate(runs)
    weak_dpo = summary["models"]["weak DPO"]["gold_reward_mean"]
    assert weak_dpo["mean"] == pytest.approx((0.6 + 0.42 + 0.6) / 3) and weak_dpo["min"] == pytest.approx(0.42)
    assert weak_dpo["std"] == pytest.approx(statistics.pstdev([0.6, 0.42, 0.6]))
    assert summary["wspo_share"]["per_seed"] == pytest.approx({"1": 0.75, "2": 0.75, "3": 1.25})
    claims = {c["claim"]: c for c in summary["claims"]}
    assert claims["weak DPO - weak SFT, gold reward"]["holds_in"] == 2  # 0.02 < 0.05 in seed 2
    assert claims["weak DPO - weak SFT, gold reward"]["min"] == pytest.approx(0.02)
    assert claims["strong WSPO held-out preference accuracy"]["holds_in"] == 3
    text = seeds.table(summary)
    assert "| weak DPO - weak SFT, gold reward | 0.05 |" in text and "NO: 2 of 3 seeds" in text
    assert "WSPO recovers 0.92 +- 0.24 of the strong alignment gap on gold reward (mean +- std over the 3 of 3" in text
    # no gap to recover in a seed (strong DPO not above strong SFT): its share is undefined and left out of the mean
    runs[4] = fake_results(4, {**base, "strong DPO": 0.9}, 0.8)
    summary = seeds.aggregate(runs)
    assert summary["wspo_share"]["per_seed"]["4"] is None and summary["wspo_share"]["n_defined"] == 3
    assert summary["wspo_share"]["mean"] == pytest.approx((0.75 + 0.75 + 1.25) / 3)
    assert "| 4 | 0.400 | 0.600 | 1.000 | 1.300 | 0.900 | 1.500 | undefined |" in seeds.table(summary)
    del runs[4]

    cli = subprocess.run([sys.executable, "-m", "tiny.seeds", "--runs", *(str(tmp_path / f"seed-{s}") for s in runs),
                          "--out", str(tmp_path / "results.json"), "--table", str(tmp_path / "results.md"),
                          "--plot", str(tmp_path / "results.png")], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [1, 2, 3]
    assert (tmp_path / "results.md").read_text() == text + "\n"
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same seed twice is refused (it would count one draw as two)
    twice = subprocess.run([sys.executable, "-m", "tiny.seeds", "--runs", str(tmp_path / "seed-1"), str(tmp_path / "seed-1"),
                            "--out", str(tmp_path / "again.json")], cwd=ROOT, capture_output=True, text=True)
    assert twice.returncode != 0 and "both used seed 1" in twice.stderr and not (tmp_path / "again.json").exists()
