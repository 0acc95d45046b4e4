"""Misuse of the training scripts (sft.py, dpo.py, wpo.py, wspo.py; issue 26): each case ends in one clear line,
exit code 2, before the work starts where it is knowable, with nothing written or changed; and a run killed at any
point (mid-training, mid-checkpoint, after the final save) resumes to the uninterrupted run's weights bit for bit."""

import fcntl
import json
import math
import os
import shutil
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import load_script, run_script

SCRIPTS = ["sft", "dpo", "wpo", "wspo"]
MODULES = {name: load_script(name) for name in SCRIPTS}
PREFERENCE = ["dpo", "wpo", "wspo"]


@pytest.fixture(scope="module")
def weak_aligned(small_sft, tmp_path_factory):
    """wspo.py's weak aligned model: a copy of small_sft in another folder (a model of its own to wspo.py)."""
    return shutil.copytree(small_sft, tmp_path_factory.mktemp("wal") / "m")


def script_args(script, tiny, small_sft, wal, out, *extra):
    """A small run of each script on the tiny setting: 64 examples, batches of 8, no eval, a metrics row per step;
    sft.py trains small_sft."""
    small = ("--max_train_samples", "64", "--per_device_train_batch_size", "8", "--logging_steps", "1",
             "--eval_split", "None", "--output_dir", str(out), *extra)
    if script == "sft":
        return ["sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
                str(tiny / "tokenizer"), "--model_name_or_path", str(small_sft), *small]
    data = ("--dataset_name", str(tiny / "ultrafeedback"), "--cache_dir", str(out.parent / "cache"))
    if script == "wspo":
        return ["wspo.py", "--preset", "tiny", *data, "--strong", str(small_sft), "--weak_ref", str(small_sft),
                "--weak_aligned", str(wal), *small]
    return [f"{script}.py", "--preset", "tiny", "--model_name_or_path", str(small_sft), *data, *small]


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def one_error_line(p, returncode=2) -> str:
    assert p.returncode == returncode and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


def parse_error(monkeypatch, capsys, script, *argv) -> str:
    """The script's argument parsing and validation on argv: exit code 2, one line on stderr; returns it."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as e:
        args = MODULES[script].parse_args()
        if script == "wspo":  # wspo.py validates in a step of its own
            MODULES[script].validate(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


# ---- cases found before anything is loaded ---------------------------------------------------------------------------
CASES = [  # (scripts, flags, message)
    # case 11: non-finite numbers
    (SCRIPTS, ("--learning_rate", "inf"), "--learning_rate must be a finite number (got inf)"),
    (SCRIPTS, ("--max_grad_norm", "nan"), "--max_grad_norm must be a finite number (got nan)"),
    (PREFERENCE, ("--beta", "nan"), "--beta must be a finite number (got nan)"),
    (SCRIPTS, ("--warmup_ratio", "nan"), "--warmup_ratio must be a finite number (got nan)"),
    # case 12: an unknown (or not per-step) schedule
    (SCRIPTS, ("--lr_scheduler_type", "cosinee"), "--lr_scheduler_type 'cosinee' is not a schedule of warm-up and "
     "steps alone: use one of linear, cosine,"),
    (SCRIPTS, ("--lr_scheduler_type", "reduce_lr_on_plateau"), "is not a schedule of warm-up and steps alone"),
    # case 5: float16 weights without a loss scaler
    (SCRIPTS, ("--dtype", "float16"), "--dtype float16 trains float16 weights without a loss scaler"),
]


@pytest.mark.parametrize("script, flags, message", [(s, f, m) for scripts, f, m in CASES for s in scripts])
def test_bad_arguments_exit_2_in_one_line_writing_nothing(monkeypatch, capsys, tmp_path, script, flags, message):
    err = parse_error(monkeypatch, capsys, script, "--preset", "tiny", "--output_dir", str(tmp_path / "o"), *flags)
    assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script, train_split", [("sft", "train_sft"), ("dpo", "train_prefs"), ("wpo", "train_prefs"),
                                                 ("wspo", "train_prefs")])
def test_eval_split_equal_to_the_train_split_is_refused(monkeypatch, capsys, tmp_path, script, train_split):
    # case 3: a dataset folder's training split as eval data
    err = parse_error(monkeypatch, capsys, script, "--preset", "tiny", "--output_dir", str(tmp_path / "o"),
                      "--eval_split", train_split)
    assert f"--eval_split {train_split!r} is the training split" in err and "--eval_fraction 0.05" in err


@pytest.mark.parametrize("script, model_flag", [("sft", "--model_name_or_path"), ("dpo", "--model_name_or_path"),
                                                ("dpo", "--ref_model_name_or_path"), ("wpo", "--model_name_or_path"),
                                                ("wspo", "--strong"), ("wspo", "--weak_ref")])
def test_output_dir_that_is_an_input_model_is_refused(monkeypatch, capsys, tmp_path, script, model_flag):
    # case 2: --overwrite_output_dir into the model being trained (or another input model) would write over it
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    err = parse_error(monkeypatch, capsys, script, "--preset", "tiny", "--output_dir", str(model) + "/",
                      model_flag, str(model), "--overwrite_output_dir")
    assert f"--output_dir {model}/ is an input of this run" in err
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_wspo_weak_aligned_equal_to_weak_ref_is_refused(monkeypatch, capsys, tmp_path):
    # case 6: the weak log-ratio would be 0
    err = parse_error(monkeypatch, capsys, "wspo", "--preset", "tiny", "--output_dir", str(tmp_path / "o"),
                      "--weak_ref", "runs/w", "--weak_aligned", "runs/w/")
    assert "--weak_aligned and --weak_ref are the same model (runs/w)" in err and "nothing is learned" in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_dir_that_is_a_file_or_not_writable_is_refused(monkeypatch, capsys, tmp_path, script, tiny, small_sft,
                                                              weak_aligned):
    # case 10: checked at start-up, before the data and models load
    file = tmp_path / "file"
    file.write_text("keep")
    err = parse_error(monkeypatch, capsys, script, "--preset", "tiny", "--output_dir", str(file))
    assert f"--output_dir {file} is a file: pass a folder" in err and file.read_text() == "keep"
    p = run_script(*script_args(script, tiny, small_sft, weak_aligned, tmp_path / "o", "--output_dir",
                                "/sys/w2s-not-writable"), check=False)
    assert "cannot write to --output_dir /sys/w2s-not-writable" in one_error_line(p)
    assert "tokenizing" not in p.stdout + p.stderr  # before any data were read


# ---- cases found at start-up or once the model is loaded -------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_lora_target_modules_is_a_clear_error(tmp_path, script, tiny, small_sft, weak_aligned):
    # case 12: peft's traceback becomes one line naming the flag; nothing written
    out = tmp_path / "o"
    p = run_script(*script_args(script, tiny, small_sft, weak_aligned, out, "--use_lora", "--lora_target_modules",
                                "foo"), check=False)
    err = one_error_line(p)
    assert "--lora_target_modules 'foo'" in err and "q_proj,v_proj" in err
    assert not out.exists() and "pre-pass" not in p.stdout + p.stderr  # dpo.py's, wpo.py's and wspo.py's come later


@pytest.mark.parametrize("script", SCRIPTS)
def test_lock_warm_up_and_extending_a_run_without_checkpoints(tmp_path, script, tiny, small_sft, weak_aligned):
    out, data = tmp_path / "o", tmp_path / "data"
    shutil.copytree(tiny / ("ultrachat" if script == "sft" else "ultrafeedback"), data)
    run = lambda *extra: run_script(*script_args(script, tiny, small_sft, weak_aligned, out, "--dataset_name",
                                                 str(data), *extra), check=False)
    # case 9: a folder locked by a live run (this test's process holds the flock) is refused, the lock left as it was
    out.mkdir()
    fd = os.open(out / ".lock", os.O_CREAT | os.O_RDWR)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
    fcntl.flock(fd, fcntl.LOCK_EX)
    p = run("--max_steps", "1")
    err = one_error_line(p)
    assert f"--output_dir {out} is in use by another run" in err and f"{socket.gethostname()} {os.getpid()}" in err
    assert os.listdir(out) == [".lock"] and (out / ".lock").read_text().endswith(str(os.getpid()))
    # a run that is gone (killed: the kernel released its lock) leaves the file: the next run proceeds, removes it
    os.close(fd)
    # case 7: one step inside the warm-up: a warning, and the rate logged is the one the step used, 0
    p = run("--max_steps", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "warning: the learning rate is 0 at each of the 1 steps" in p.stdout + p.stderr
    assert [r["train/lr"] for r in metrics(out) if "train/lr" in r] == [0.0]
    assert not (out / ".lock").exists()
    saved, initial = load_file(out / "model.safetensors"), load_file(small_sft / "model.safetensors")
    assert all(torch.equal(saved[k], initial[k]) for k in initial)  # no update: still the initial model
    files = {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()}
    # case 1: a finished run without checkpoints cannot be extended (it would retrain from scratch over its model)
    p = run("--max_steps", "2", "--resume", "--resume_allow_changes", "max_steps")
    err = one_error_line(p)
    assert f"the run in {out} finished and saved no checkpoint (--save_steps)" in err
    assert "into another --output_dir" in err
    # case 8: the training data changed under the same path: --resume names the change
    os.utime(next(p for p in sorted(data.rglob("*")) if p.is_file()), (1, 1))
    p = run("--max_steps", "1", "--resume")
    assert "data_fingerprint: " in one_error_line(p) and "--resume_allow_changes" in p.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file()} == files  # nothing changed
    assert json.loads((out / "args.json").read_text())["data_fingerprint"] not in ("", str(data))


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_on_a_save_to_disk_dataset(tmp_path, script, tiny, small_sft, weak_aligned):
    # map/filter write cache-*.arrow files into a save_to_disk folder (hybrid_pairs.py's output): not a data change
    from datasets import load_dataset

    out, data = tmp_path / "o", tmp_path / "data"
    load_dataset(str(tiny / ("ultrachat" if script == "sft" else "ultrafeedback"))).save_to_disk(data)
    run = lambda *extra: run_script(*script_args(script, tiny, small_sft, weak_aligned, out, "--dataset_name",
                                                 str(data), "--save_steps", "1", *extra), check=False)
    assert run("--max_steps", "1").returncode == 0
    assert any(f.name.startswith("cache-") for f in data.rglob("*"))  # written by the first run
    p = run("--max_steps", "2", "--resume", "--resume_allow_changes", "max_steps")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(step 1)" in p.stdout + p.stderr and [r["step"] for r in metrics(out) if "train/loss" in r] == [1, 2]


@pytest.fixture(scope="module")
def nan_model(small_sft, tmp_path_factory):
    """small_sft with one nan weight: every loss it gives is nan."""
    out = shutil.copytree(small_sft, tmp_path_factory.mktemp("nan") / "m")
    weights = load_file(out / "model.safetensors")
    name = next(k for k in weights if "norm" in k)
    weights[name][0] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_eval_loss_fails_the_run_without_saving_a_model(tmp_path, script, tiny, nan_model, weak_aligned):
    # case 5: a nan eval loss stops the run (exit 1) before the model is saved
    out, split = tmp_path / "o", {"sft": "test_sft"}.get(script, "test_prefs")
    p = run_script(*script_args(script, tiny, nan_model, weak_aligned, out, "--eval_split", split,
                                "--max_eval_samples", "16", "--max_steps", "2"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "eval/loss is nan at step 0: the model is not saved" in p.stderr
    assert not (out / "model.safetensors").exists() and not (out / ".lock").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_step_names_no_checkpoint_that_does_not_exist(tmp_path, script, tiny, small_sft, nan_model):
    # case 11: a run that diverges before its first checkpoint says there is none (not a folder that does not exist);
    # wspo.py's weak aligned model is the nan one (with both weak models equal its loss is 0 at any rate)
    out = tmp_path / "o"
    p = run_script(*script_args(script, tiny, small_sft, nan_model, out, "--learning_rate", "1e30",
                                "--warmup_ratio", "0", "--max_steps", "6", "--logging_steps", "3"), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    line = next(line for line in p.stderr.splitlines() if "non-finite loss or gradient at step" in line)
    assert line.endswith("no update was applied from that step on; newest checkpoint: none")
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


# ---- killed runs resume bit for bit ----------------------------------------------------------------------------------
KILLER = """
import os, runpy, signal, sys
point, at = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "step":  # during the at-th optimizer step, before its update
    import torch
    step, calls = torch.optim.AdamW.step, []
    def killing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            die()
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = killing_step
elif point == "checkpoint":  # mid-checkpoint: the model written into tmp-step-AT, the optimizer state not yet
    import torch
    save = torch.save
    def killing_save(obj, f, *args, **kwargs):
        if f"tmp-step-{at}" in str(f):
            die()
        return save(obj, f, *args, **kwargs)
    torch.save = killing_save
elif point == "final":  # right after the final model is written, before args.json records the finished run
    from transformers import PreTrainedModel
    save_pretrained = PreTrainedModel.save_pretrained
    def killing_save_pretrained(self, *args, **kwargs):
        save_pretrained(self, *args, **kwargs)
        die()
    PreTrainedModel.save_pretrained = killing_save_pretrained
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_killed_runs_resume_to_the_same_weights_bit_for_bit(tmp_path, script, tiny, small_sft, weak_aligned):
    common = ("--max_steps", "8", "--save_steps", "2", "--max_train_samples", "256", "--gradient_accumulation_steps",
              "2")
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_script(*script_args(script, tiny, small_sft, weak_aligned, full, *common))
    argv = script_args(script, tiny, small_sft, weak_aligned, cut, *common)
    killed = lambda point, at, *extra: run_script("-c", KILLER, point, str(at), *argv, *extra, check=False)
    p = killed("step", 1)  # before any checkpoint
    assert p.returncode == -9 and (cut / ".lock").exists() and not (cut / "checkpoints").exists()
    p = killed("step", 3, "--resume")  # mid-training, after the checkpoint of step 2
    assert p.returncode == -9 and "no checkpoint found, starting from scratch" in p.stdout
    p = killed("checkpoint", 4, "--resume")
    assert p.returncode == -9 and "(step 2)" in p.stdout
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-2", "tmp-step-4"]
    p = killed("final", 0, "--resume")  # the model is saved, args.json does not record the finished run yet
    assert p.returncode == -9 and (cut / "model.safetensors").exists()
    assert "completed_steps" not in json.loads((cut / "args.json").read_text())
    # case 12: a truncated newest checkpoint: the previous complete one is loaded, and the log says so
    assert sorted(os.listdir(cut / "checkpoints")) == ["step-6", "step-8"]
    newest = cut / "checkpoints" / "step-8" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    p = run_script(*argv, "--resume")
    assert "checkpoint step-8 cannot be loaded" in p.stdout and "trying the previous one" in p.stdout
    assert "(step 6)" in p.stdout
    a, b = load_file(full / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda out: {r["step"]: r["train/loss"] for r in metrics(out) if "train/loss" in r}  # the last of each
    assert losses(cut) == losses(full) and sorted(losses(full)) == list(range(1, 9))
    # case 7: the rate logged at step s is the one step s used: 0 (warm-up: 1 step), then cosine over the rest
    peak = json.loads((full / "args.json").read_text())["learning_rate"]
    expected = [0.0] + [peak * 0.5 * (1 + math.cos(math.pi * s / 7)) for s in range(7)]
    assert [r["train/lr"] for r in metrics(full) if "train/lr" in r] == pytest.approx(expected, rel=1e-12)
    assert json.loads((cut / "args.json").read_text())["completed_steps"] == 8 and not (cut / ".lock").exists()
    # no checkpoint loads: one line naming the newest one's error and what --overwrite_output_dir does
    for step in sorted(os.listdir(cut / "checkpoints")):
        (cut / "checkpoints" / step / "model.safetensors").write_bytes(b"")
    p = run_script(*argv, "--resume", "--max_steps", "9", "--resume_allow_changes", "max_steps", check=False)
    err = one_error_line(p)
    assert f"no checkpoint in {cut / 'checkpoints'} can be loaded (newest: " in err
    assert err.endswith("restore them, or start afresh with --overwrite_output_dir (discards them)")
