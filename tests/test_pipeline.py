"""The main job (run_tiny.sh), CI-sized: the same training, fewer evaluation samples (150 prompts x 2).
(One SFT epoch is not enough: DPO then lowers the gold reward of the half-trained SFT models.)
It must show the orderings the project claims: weak DPO > weak SFT and WSPO > strong SFT on gold
reward, and WSPO's held-out preference accuracy above 0.5."""

import json
import os
import subprocess

from conftest import ROOT


def test_pipeline_orderings(tmp_path):
    env = {**os.environ, "USE_CURRENT_PYTHON": "1", "OUT": str(tmp_path / "runs"), "DATA": str(tmp_path / "data"),
           "SFT_EPOCHS": "3", "N_PROMPTS": "150", "SAMPLES": "2"}
    p = subprocess.run(["bash", "run_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    res = {r["name"]: r for r in json.load(open(tmp_path / "runs" / "results.json"))}
    gold = {k: r["gold_reward_mean"] for k, r in res.items()}
    assert gold["weak DPO"] > gold["weak SFT"] + 0.03, gold
    assert gold["strong WSPO"] > gold["strong SFT"] + 0.03, gold
    assert res["strong WSPO"]["pref_accuracy"] > 0.55 and res["weak DPO"]["pref_accuracy"] > 0.55
    assert res["strong WSPO"]["tone_mean"] > res["strong SFT"]["tone_mean"]
    assert (tmp_path / "runs" / "results.png").stat().st_size > 5000
    assert "WSPO recovers" in (tmp_path / "runs" / "results.md").read_text()

    # a second run into the same OUT is refused before anything runs; the first run's results stay as they were
    before = (tmp_path / "runs" / "results.json").read_bytes()
    again = subprocess.run(["bash", "run_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 2, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already holds a run; set OVERWRITE=1" in again.stderr
    assert (tmp_path / "runs" / "results.json").read_bytes() == before
