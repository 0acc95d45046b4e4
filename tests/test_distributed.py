"""Distributed equivalence: two CPU processes (torchrun, gloo; DDP, and FSDP2 for sft.py and dpo.py) give the same
per-step losses, eval metrics and final weights as one process with the matching batch (sft.py: one micro-batch of 8
against 2 processes x 4, so the loss normaliser must count the assistant tokens of every process; dpo.py, wspo.py:
the matching gradient accumulation). The eval split
is sized so that it does not divide into whole batches per process (accelerate pads the last batch
with duplicates, which the scripts must not count). The sharded pre-passes of dpo.py and wspo.py
are computed once, written by rank 0 only, and reused."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script

TOL = 1e-5


FSDP = {"ACCELERATE_USE_FSDP": "1", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
        "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_RESHARD_AFTER_FORWARD": "true"}  # = configs/fsdp.yaml, on CPU


GLOO_EXIT_ABORT = "terminate called without an active exception"


def torchrun(*args, port, env_extra=None):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0 and GLOO_EXIT_ABORT in p.stderr and "saved the model" in p.stdout:
        # Gloo's C++ threads on CPU can abort a rank as the interpreter exits, after the run finished and saved
        # (seen once in eight runs of the FSDP2 dpo.py test, under CI load; pytorch/pytorch#190489 reports the
        # same message). That teardown race is not what these tests check: the run is repeated once from scratch,
        # then compared as always. (The scripts now free the model before the process group, which removed the
        # related exit deadlock of pytorch#56297; whether it also removes this abort is not established, so the
        # rerun stays.)
        warnings.warn(f"a rank aborted at exit ({GLOO_EXIT_ABORT!r}); rerunning {args[0]} once")
        for flag in ("--output_dir", "--cache_dir"):
            if flag in args:
                shutil.rmtree(args[args.index(flag) + 1], ignore_errors=True)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def compare(one, two):
    """Same metrics (perf/* and the run id aside) at the same steps, logged once (rank 0 only), same weights."""
    ma = [json.loads(line) for line in open(one / "metrics.jsonl")]
    mb = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert [r["step"] for r in ma] == [r["step"] for r in mb] and len(ma) > 3
    for ra, rb in zip(ma, mb):
        for k in ra:
            # at step 0 the policy is the reference: every implicit reward is 0 up to float noise (the
            # cached reference came from other batch shapes), so which of two zeros is larger is arbitrary
            if k.endswith("rewards/accuracies") and abs(ra[k.replace("accuracies", "margins")]) < 1e-5:
                continue
            if not k.startswith("perf/") and k != "run_id":
                assert ra[k] == pytest.approx(rb[k], abs=TOL), (ra["step"], k, ra[k], rb[k])
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sft_two_processes_equal_one_big_batch(tiny, small_init, tmp_path, mode):
    common = ["sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
              str(tiny / "tokenizer"), "--model_name_or_path", str(small_init), "--max_steps", "4",
              "--logging_steps", "1", "--max_train_samples", "256", "--max_eval_samples", "37",
              "--per_device_eval_batch_size", "8", "--gradient_accumulation_steps", "1"]
    run_script(*common, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one"))
    p = torchrun(*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"),
                 port=29541 if mode == "ddp" else 29544, env_extra=FSDP if mode == "fsdp" else None)
    assert "4 x 1 accumulation x 2 processes = 8" in p.stdout
    compare(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_dpo_two_processes_equal_one_and_share_the_prepass(tiny, small_sft, tmp_path, mode):
    """4 pairs per micro-batch = 8 sequences in 4 length groups: four forwards before each backward, under DDP and FSDP2."""
    common = ["dpo.py", "--preset", "tiny", "--model_name_or_path", str(small_sft), "--dataset_name",
              str(tiny / "ultrafeedback"), "--max_steps", "4", "--logging_steps", "1", "--max_train_samples", "96",
              "--max_eval_samples", "37", "--per_device_eval_batch_size", "8", "--per_device_train_batch_size", "4"]
    run_script(*common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one"),
               "--cache_dir", str(tmp_path / "c1"))
    p = torchrun(*common, "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "two"),
                 "--cache_dir", str(tmp_path / "c2"), port=29542 if mode == "ddp" else 29545, env_extra=FSDP if mode == "fsdp" else None)
    assert p.stdout.count("computed") == 2  # train and eval pre-pass, announced once (rank 0)
    for f in os.listdir(tmp_path / "c1"):  # the sharded pre-pass wrote the same cache as one process
        a, b = load_file(tmp_path / "c1" / f), load_file(tmp_path / "c2" / f)
        assert torch.allclose(a["chosen"], b["chosen"], atol=TOL) and torch.allclose(a["rejected"], b["rejected"], atol=TOL)
    compare(tmp_path / "one", tmp_path / "two")


def test_wspo_two_processes_equal_one_and_share_the_prepass(tiny, small_sft, tmp_path):
    weak_al = tmp_path / "weak_al"
    run_script("dpo.py", "--preset", "tiny", "--model_name_or_path", str(small_sft), "--dataset_name",
               str(tiny / "ultrafeedback"), "--max_steps", "3", "--eval_split", "None", "--max_train_samples", "96",
               "--output_dir", str(weak_al), "--cache_dir", str(tmp_path / "c0"))
    common = ["wspo.py", "--preset", "tiny", "--strong", str(small_sft), "--weak_ref", str(small_sft), "--weak_aligned",
              str(weak_al), "--dataset_name", str(tiny / "ultrafeedback"), "--max_steps", "4", "--logging_steps", "1",
              "--max_train_samples", "96", "--max_eval_samples", "37", "--per_device_eval_batch_size", "8",
              "--per_device_train_batch_size", "4", "--prepass_batch_size", "8"]
    run_script(*common, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "one"),
               "--cache_dir", str(tmp_path / "c1"))
    p = torchrun(*common, "--gradient_accumulation_steps", "1", "--output_dir", str(tmp_path / "two"),
                 "--cache_dir", str(tmp_path / "c2"), port=29543)
    assert p.stdout.count("cached in") == 4  # (weak aligned, strong ref) x (train, eval); weak ref = strong ref here
    assert sorted(os.listdir(tmp_path / "c1")) == sorted(os.listdir(tmp_path / "c2"))
    for f in os.listdir(tmp_path / "c1"):
        a, b = load_file(tmp_path / "c1" / f), load_file(tmp_path / "c2" / f)
        assert torch.equal(a["offsets"], b["offsets"]) and torch.allclose(a["values"], b["values"], atol=TOL)
    compare(tmp_path / "one", tmp_path / "two")


ONE_RANK_FAILS = """import os, runpy, sys
from accelerate import Accelerator
load_state = Accelerator.load_state
def load_state_failing_on_rank_1(self, path, *args, **kwargs):
    if os.environ["RANK"] == "1" and path.endswith("step-4"):
        raise OSError("rank 1 cannot read it")
    return load_state(self, path, *args, **kwargs)
Accelerator.load_state = load_state_failing_on_rank_1
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_resume_agrees_on_one_step_when_one_rank_cannot_load_the_newest_checkpoint(tiny, small_init, tmp_path):
    # rank 0 loads step-4, rank 1 cannot: both resume at step 2 (not at different steps, which would hang or diverge)
    common = ["sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
              str(tiny / "tokenizer"), "--model_name_or_path", str(small_init), "--logging_steps", "1",
              "--max_train_samples", "128", "--per_device_train_batch_size", "4", "--eval_split", "None",
              "--save_steps", "2", "--output_dir", str(tmp_path / "o")]
    torchrun(*common, "--max_steps", "4", port=29546)
    wrapper = tmp_path / "one_rank_fails.py"
    wrapper.write_text(ONE_RANK_FAILS)
    p = torchrun(str(wrapper), *common, "--max_steps", "5", "--resume", "--resume_allow_changes", "max_steps",
                 port=29547)
    assert f"resumed from {tmp_path / 'o' / 'checkpoints'}/step-2 (step 2)" in p.stdout
    rows = [json.loads(line) for line in open(tmp_path / "o" / "metrics.jsonl")]
    new = [r["step"] for r in rows if r["run_id"] != rows[0]["run_id"] and "train/loss" in r]
    assert new == [3, 4, 5] and json.loads((tmp_path / "o" / "args.json").read_text())["completed_steps"] == 5
