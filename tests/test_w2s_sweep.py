"""w2s_sweep.py: the size sweep end to end on two offline sizes (one weak model and one ceiling per size, PGR per
pair, sweep.json and sweep.png), a rerun served entirely from weak_to_strong_cls.py's stage cache, and bad
arguments (one message, exit code 2, nothing written)."""

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, load_script, run_script

sweep_script = load_script("w2s_sweep")

# one torch thread: tiny matrices crawl when two threads fight other jobs for two cores
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(tiny: Path, out: Path, *extra: str) -> list[str]:
    """The tiny preset on the test's data; `extra` names the models."""
    return ["w2s_sweep.py", "--preset", "tiny", "--ds_name", str(tiny / "cls"), "--output_dir", str(out), *extra]


def test_sweep_end_to_end_and_cached(tiny, cls_models, tmp_path):
    out = tmp_path / "sweep"  # the students pre-trained 20 steps (conftest.cls_models), named by their folders
    args = cli(tiny, out, "--models", str(cls_models / "tiny-s"), str(cls_models / "tiny-m"),
               "--n_docs", "512", "--n_test_docs", "100", "--gt_epochs", "2",
               "--losses", "xent", "logconf", "--no_save_models")
    first = run_script(*args, env=SINGLE_THREAD)
    sweep = json.loads((out / "sweep.json").read_text())
    pairs = ["tiny-s->tiny-s", "tiny-s->tiny-m", "tiny-m->tiny-m"]
    assert sweep["models"] == ["tiny-s", "tiny-m"] and list(sweep["per_seed"]["0"]) == pairs
    assert sweep["n_seeds"] == 1 and list(sweep["mean"]) == pairs and list(sweep["std"]) == pairs
    r = sweep["per_seed"]["0"]
    assert r["tiny-s->tiny-m"]["weak_acc"] == r["tiny-s->tiny-s"]["weak_acc"]  # one weak model per size
    assert r["tiny-s->tiny-m"]["strong_acc"] == r["tiny-m->tiny-m"]["strong_acc"]  # one ceiling per size
    for loss in ("xent", "logconf"):
        # REFERENCE.md: PGR = (w2s - weak) / (strong - weak), from the JSON's own accuracies
        pair = r["tiny-s->tiny-m"]
        assert pair[f"pgr_{loss}"] == pytest.approx((pair[f"transfer_acc_{loss}"] - pair["weak_acc"])
                                                    / (pair["strong_acc"] - pair["weak_acc"]))
        assert r["tiny-s->tiny-s"][f"pgr_{loss}"] is None and r["tiny-m->tiny-m"][f"pgr_{loss}"] is None
        assert sweep["mean"]["tiny-s->tiny-m"][f"transfer_acc_{loss}"] == r["tiny-s->tiny-m"][f"transfer_acc_{loss}"]
    assert "tiny-s->tiny-m" in first.stdout and "wrote" in first.stdout
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    second = run_script(*args, env=SINGLE_THREAD)
    # one run of weak_to_strong_cls.py per pair, each fully cached: weak + ceiling + 2 losses
    assert len(re.findall(r"cached in .*, skipped", second.stdout)) == 3 * 4
    assert "test acc" not in second.stdout and "final loss" not in second.stdout  # nothing trained again
    assert json.loads((out / "sweep.json").read_text())["per_seed"] == sweep["per_seed"]


@pytest.mark.parametrize("extra, message", [
    (["--models", "tiny-s"], "--models tiny-s: give at least two different models, small to large"),
    (["--models", "tiny-s", "tiny-m", "--weak_lr", "0.1"],
     "--weak_lr: the sweep sets each pair's models and learning rates from --models"),
])
def test_bad_arguments_exit_2_before_anything(tiny, tmp_path, extra, message, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr("sys.argv", cli(tiny, out, *extra))
    with pytest.raises(SystemExit) as exit_info:
        sweep_script.parse_args()
    assert exit_info.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_training_script_error_stops_the_sweep(tiny, tmp_path):
    out = tmp_path / "out"  # an argument error of weak_to_strong_cls.py: its message, its exit code, nothing written
    p = run_script(*cli(tiny, out, "--models", "tiny-s", "tiny-m", "--batch_size", "0"), check=False,
                   env=SINGLE_THREAD)
    assert p.returncode == 2 and "error: --batch_size 0: must be a positive integer" in p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


# a stand-in for weak_to_strong_cls.py next to a copy of the sweep: fixed accuracies per model, PGR as the real script
# computes it (null when the strong ceiling is not above the weak model), one seed
FAKE_TRAINING_SCRIPT = '''import json, sys
from pathlib import Path
argv = sys.argv[1:]
flag = lambda name: argv[len(argv) - 1 - argv[::-1].index(name) + 1]
acc = {"big": 0.9, "small": 0.7}
weak, strong = (acc[flag(f"--{side}_model_name_or_path").split("/")[-1]] for side in ("weak", "strong"))
res = {"weak_acc": weak, "strong_acc": strong, "weak_label_acc": weak, "transfer_acc_xent": 0.8,
       "pgr_xent": (0.8 - weak) / (strong - weak) if strong > weak else None, "agreement_xent": 0.9}
Path(flag("--output_dir")).mkdir(parents=True, exist_ok=True)
(Path(flag("--output_dir")) / "results.json").write_text(json.dumps({"per_seed": {"0": res}, "args": {
    "n_seeds": 1, "losses": ["xent"], "ds_name": "fake", "seed": 0}}))
'''


def test_pgr_is_undefined_for_a_pair_whose_strong_model_is_not_better(tmp_path, monkeypatch):
    """issue 26 case 4: weak `big` (0.9) -> strong `small` (0.7): no gap to recover; sweep.json, the table and the
    plot say PGR is undefined for that pair, the sweep completes."""
    (tmp_path / "w2s_sweep.py").write_text((ROOT / "w2s_sweep.py").read_text())
    (tmp_path / "weak_to_strong_cls.py").write_text(FAKE_TRAINING_SCRIPT)
    out = tmp_path / "out"
    p = run_script(str(tmp_path / "w2s_sweep.py"), "--models", "big", "small", "--output_dir", str(out))
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["pgr_undefined"] == ["big->small"]
    assert sweep["per_seed"]["0"]["big->small"]["pgr_xent"] is None and sweep["mean"]["big->small"]["pgr_xent"] is None
    assert sweep["mean"]["big->small"]["transfer_acc_xent"] == 0.8  # the accuracies are reported as usual
    rows = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines() if re.match(r"\w+->\w+ ", line)}
    assert rows == {"big->big": ["0.900", "0.900", "0.800", "-"], "big->small": ["0.900", "0.700", "0.800", "undef"],
                    "small->small": ["0.700", "0.700", "0.800", "-"]}
    assert "PGR undefined (undef) for big->small: the strong ceiling is not above the weak model" in p.stdout
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = []  # the note on the PGR panel
    monkeypatch.setattr(sweep_script.plt.Axes, "text", lambda ax, x, y, s, **kw: texts.append(s))
    sweep_script.sweep_plot(sweep, ["big", "small"], ["xent"], tmp_path / "again.png", "title")
    assert texts == ["PGR undefined (strong <= weak): big->small"]


def test_models_are_named_by_their_folder_unless_two_share_a_name(tmp_path):
    """Pairs, sweep.json, the table and the plot name a model by the last part of its path or hub id, or by the whole
    name when two models share that part."""
    (tmp_path / "w2s_sweep.py").write_text((ROOT / "w2s_sweep.py").read_text())
    (tmp_path / "weak_to_strong_cls.py").write_text(FAKE_TRAINING_SCRIPT)
    for models, names in [(["runs/big", "hub-org/small"], ["big", "small"]), (["a/big", "b/big"], ["a/big", "b/big"])]:
        out = tmp_path / names[1].replace("/", "_")
        run_script(str(tmp_path / "w2s_sweep.py"), "--models", *models, "--output_dir", str(out))
        sweep = json.loads((out / "sweep.json").read_text())
        assert sweep["models"] == names and sweep["args"]["models"] == models
        assert list(sweep["mean"]) == [f"{names[0]}->{names[0]}", f"{names[0]}->{names[1]}", f"{names[1]}->{names[1]}"]


def test_config_goes_to_the_training_script_before_the_pairs_models(tmp_path):
    """--config (a weak_to_strong_cls recipe, issue 29) reaches every run of weak_to_strong_cls.py unchanged, and the
    pair's model flags come after it, so that they win over the file's models and learning rates."""
    (tmp_path / "w2s_sweep.py").write_text((ROOT / "w2s_sweep.py").read_text())
    (tmp_path / "weak_to_strong_cls.py").write_text(FAKE_TRAINING_SCRIPT + "with open(Path(flag('--output_dir')).parent"
                                                     " / 'argv.jsonl', 'a') as f:\n    f.write(json.dumps(argv) + '\\n')\n")
    config, out = ROOT / "recipes" / "weak_to_strong" / "weak_to_strong_cls-sciq.yaml", tmp_path / "out"
    run_script(str(tmp_path / "w2s_sweep.py"), "--config", str(config), "--models", "small", "big", "--output_dir",
               str(out))
    runs = [json.loads(line) for line in (tmp_path / "argv.jsonl").read_text().splitlines()]
    assert len(runs) == 3  # small->small, small->big, big->big
    for argv, (weak, strong) in zip(runs, [("small", "small"), ("small", "big"), ("big", "big")]):
        assert argv[:2] == ["--config", str(config)]
        assert argv[argv.index("--weak_model_name_or_path") + 1] == weak and "--weak_lr" in argv[2:]
        assert argv[argv.index("--strong_model_name_or_path") + 1] == strong
    assert json.loads((out / "sweep.json").read_text())["args"]["passthrough"] == ["--config", str(config)]
