"""vision_w2s.py on the tiny image set: end to end, cache reuse, distributed extraction, torchvision
absent, unreadable images and bad labels, and the math (preprocessing, probe losses)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_script, run_script
from PIL import Image

# every run: one torch thread (tiny convolutions crawl when two threads fight other jobs for two cores),
# and `import torchvision` blocked, as if it were not installed: the script must never need it
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
WRITE_IMAGES = "import pathlib, sys; from tiny import images; images.write(pathlib.Path(sys.argv[1]), int(sys.argv[2]))"


@pytest.fixture(scope="module")
def no_torchvision(tmp_path_factory) -> dict:
    """Environment whose Python cannot import torchvision (a sitecustomize puts None in sys.modules)."""
    folder = tmp_path_factory.mktemp("no_torchvision")
    (folder / "sitecustomize.py").write_text("import sys\nsys.modules['torchvision'] = None\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)
    return {**SINGLE_THREAD, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def image_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "images"
    run_script("-c", WRITE_IMAGES, str(out), "0")
    return out


def tiny_run(image_set: Path, out: Path, *flags: str, env: dict, script: tuple = ("vision_w2s.py",), check: bool = True):
    return run_script(*script, "--preset", "tiny", "--dataset", str(image_set), "--output_dir", str(out / "out"),
                      "--cache_dir", str(out / "cache"), *flags, env=env, check=check)


@pytest.fixture(scope="module")
def offline_run(image_set, no_torchvision, tmp_path_factory):
    """The offline command, once, with torchvision blocked."""
    out = tmp_path_factory.mktemp("run")
    p = tiny_run(image_set, out, env=no_torchvision)
    return out, p, json.loads((out / "out" / "results.json").read_text())


def test_end_to_end(offline_run):
    out, p, res = offline_run
    assert "pretrain weak (resnet)" in p.stdout and "pretrain strong (resnet)" in p.stdout
    for k in ("weak_acc", "strong_ceiling_acc", "w2s_acc", "agreement", "ceiling_agreement", "weak_acc_all"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["weak_acc"] > 0.3  # well above chance (1/8): the weak supervisor learned something
    assert res["strong_ceiling_acc"] > res["weak_acc"] + 0.08  # the capability gap the experiment needs
    assert res["pgr"] == pytest.approx((res["w2s_acc"] - res["weak_acc"]) / (res["strong_ceiling_acc"] - res["weak_acc"]), abs=1e-9)
    assert res["pgr"] > 0  # the student recovers part of the gap
    assert res["n_train"] == 1400 and res["n_test"] == 600 and res["n_classes"] == 8
    assert res["skipped_images"] == {"test": 0}
    assert len(res["curves"]["w2s"]) == len(res["curves"]["ceiling"]) == 60
    assert res["curves"]["ceiling"][-1] == res["strong_ceiling_acc"]
    for side in ("weak", "strong"):
        assert res["pretrain"][side]["skipped_images"] == 0 and res["pretrain"][side]["train_acc"] > 0.3
    with Image.open(out / "out" / "results.png") as im:
        assert im.size[0] > 500
    assert len(list((out / "cache").glob("*.safetensors"))) == 2  # weak probabilities, strong embeddings
    assert len(list((out / "cache" / "models").glob("*/model.safetensors"))) == 2  # the two pretrained networks


def test_cache_reused_on_rerun(offline_run, image_set, no_torchvision):
    out, _, first = offline_run
    before = {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*") if f.is_file()}
    p = run_script("vision_w2s.py", "--preset", "tiny", "--dataset", str(image_set), "--output_dir", str(out / "logconf"),
                   "--cache_dir", str(out / "cache"), "--loss", "logconf", env=no_torchvision)
    assert p.stdout.count("reusing cached") == 2 and "pretrain" not in p.stdout
    assert {f: f.stat().st_mtime_ns for f in (out / "cache").rglob("*") if f.is_file()} == before  # nothing recomputed
    res = json.loads((out / "logconf" / "results.json").read_text())
    assert res["weak_acc"] == first["weak_acc"] and res["strong_ceiling_acc"] == first["strong_ceiling_acc"]
    assert res["loss"] == "logconf" and 0.0 <= res["agreement"] <= 1.0
    assert res["pgr"] == pytest.approx((res["w2s_acc"] - res["weak_acc"]) / (res["strong_ceiling_acc"] - res["weak_acc"]), abs=1e-9)


def test_distributed_extraction_matches(offline_run, image_set, no_torchvision, tmp_path):
    """Two CPU processes extract the same embeddings (sharded, gathered) as one: same results."""
    out, _, first = offline_run
    shutil.copytree(out / "cache" / "models", tmp_path / "cache" / "models")  # pretrained networks, no embeddings
    p = tiny_run(image_set, tmp_path, env=no_torchvision,
                 script=("-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1", "--cpu",
                         "--mixed_precision", "no", "--dynamo_backend", "no", "vision_w2s.py"))
    assert p.stdout.count("reusing pretrained") == 2 and "reusing cached" not in p.stdout
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    for k in ("weak_acc", "strong_ceiling_acc", "w2s_acc", "agreement"):
        assert res[k] == pytest.approx(first[k], abs=0.005), k


def test_runs_without_torchvision(no_torchvision):
    p = run_script("-c", "import torchvision", env=no_torchvision, check=False)
    assert p.returncode != 0 and "torchvision" in p.stderr  # the block works (the end-to-end runs used it too)
    p = run_script("vision_w2s.py", "--help", env=no_torchvision)
    assert "--weak_head_split" in p.stdout and "--weak-head-split" not in p.stdout  # one flag spelling: snake_case


def test_unreadable_images_counted_and_skipped(image_set, tmp_path):
    data = tmp_path / "images"
    shutil.copytree(image_set, data)
    tests = sorted((data / "test").rglob("*.png"))
    tests[0].write_bytes(b"not an image at all")
    tests[1].write_bytes(tests[1].read_bytes()[:200])  # truncated PNG
    tests[2].write_bytes(b"")
    next((data / "train").rglob("*.png")).write_bytes(b"\x89PNG garbage")
    p = tiny_run(data, tmp_path, "--pretrain_epochs", "1", "--probe_epochs", "3", env=SINGLE_THREAD)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["skipped_images"] == {"test": 3}
    assert res["n_train"] + res["n_test"] == 2000 - 3
    assert res["pretrain"]["weak"]["skipped_images"] == res["pretrain"]["strong"]["skipped_images"] == 1
    assert "3 unreadable skipped" in p.stdout


def test_label_beyond_head_size_is_a_clear_error(image_set, tmp_path):
    p = tiny_run(image_set, tmp_path, "--n_classes", "4", env=SINGLE_THREAD, check=False)
    assert p.returncode != 0
    assert "label id 7 in split 'test'" in p.stderr and "beyond the head size 4" in p.stderr and "--n_classes 8" in p.stderr
    assert not (tmp_path / "cache").exists()  # caught before any model ran


def test_images_deterministic(image_set, tmp_path):
    run_script("-c", WRITE_IMAGES, str(tmp_path / "again"), "0")
    digest = lambda root: {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in root.rglob("*") if f.is_file()}
    first, again = digest(image_set), digest(tmp_path / "again")
    assert first == again and len(first) == 1500 + 2000 + 1  # images + README
    assert sum(f.stat().st_size for f in image_set.rglob("*")) < 6_000_000


# ----------------------------------------------------------------------------------------------
# the math, in process
@pytest.fixture(scope="module")
def vw():
    return load_script("vision_w2s")


def test_published_transform(vw):
    im = Image.new("RGB", (64, 48), (51, 102, 204))  # resize 40 -> 53x40, center crop 32
    x = vw.published_transform(im, resize=40, crop=32)
    expected = (torch.tensor([51, 102, 204]) / 255.0 - vw.IMAGENET_MEAN) / vw.IMAGENET_STD
    assert x.shape == (3, 32, 32) and torch.allclose(x, expected[:, None, None].expand(3, 32, 32), atol=1e-5)
    ramp = Image.fromarray((torch.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).to(torch.uint8).numpy())
    x = vw.published_transform(ramp, resize=32, crop=32)  # the tiny setting: only the normalisation
    raw = torch.from_numpy(np.array(ramp)).permute(2, 0, 1) / 255.0
    assert torch.allclose(x * vw.IMAGENET_STD[:, None, None] + vw.IMAGENET_MEAN[:, None, None], raw, atol=1e-6)


def test_decode_flags_unreadable(vw, image_set):
    assert vw.decode({"bytes": b"junk", "path": None}) is None
    assert vw.decode({"bytes": None, "path": "/nonexistent.png"}) is None
    im = vw.decode({"bytes": None, "path": str(next(image_set.rglob("*.png")))})
    assert im.mode == "RGB" and im.size == (32, 32)


def test_probe_losses(vw):
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    weak = torch.softmax(torch.randn(6, 5), -1)
    assert torch.allclose(vw.xent_loss(logits, F.one_hot(y, 5).float(), 0.3), F.cross_entropy(logits, y))
    assert torch.allclose(vw.xent_loss(logits, weak, 0.3), -(weak * logits.log_softmax(-1)).sum(-1).mean())
    # logconf: c = aux_coef * step_frac during warm-up (official ramp), aux_coef after
    assert torch.allclose(vw.logconf_loss(logits, weak, 0.0), vw.xent_loss(logits, weak, 0.0))
    for step_frac, coef in ((0.05, 0.5 * 0.05), (0.5, 0.5)):
        target = (1 - coef) * weak + coef * F.one_hot(logits.argmax(-1), 5).float()
        assert torch.allclose(vw.logconf_loss(logits, weak, step_frac), F.cross_entropy(logits, target))
    # two classes: hardened at the batch quantile that matches the weak labels' balance, not at argmax
    p0 = torch.tensor([0.9, 0.8, 0.7, 0.6])
    logits2 = torch.stack([p0.log(), (1 - p0).log()], dim=1)
    weak2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # mean of class 1: 0.5
    hard = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(vw.logconf_loss(logits2, weak2, 1.0), F.cross_entropy(logits2, 0.5 * weak2 + 0.5 * hard))
