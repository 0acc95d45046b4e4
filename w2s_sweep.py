"""The weak-to-strong size sweep: every weak <= strong pair of a list of models (Burns et al. 2023, figure 3).

Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision"
(arXiv:2312.09390); official code: openai/weak-to-strong sweep.py, which launches train_weak_to_strong.py once per
pair. Likewise this script runs weak_to_strong_cls.py once per pair (i <= j) of --models, listed from small to
large, all with the same --output_dir: the training script caches each stage there (keyed by its settings), so
one weak model and one strong ceiling per size and seed are trained and the other pairs reuse them. A model is
named by the last part of its path or hub id (the whole name where two would share one). It collects each pair's
results.json and writes sweep.json (per seed, mean and std per pair) and sweep.png:
test accuracy against the strong model with one line per weak model, the strong ceiling in black, and PGR per pair
(a pair of a model with itself, self-training, has no PGR, nor has a pair whose strong ceiling is not above its
weak model: sweep.json lists those under pgr_undefined). Every flag it does not know (--config, --preset, --ds_name,
--losses, --n_seeds, ...) goes to weak_to_strong_cls.py unchanged; the --weak_* / --strong_* models are set here,
after those flags (over a --config file's), each fine-tuned at its default lr (weak_to_strong_cls.py DEFAULT_LR).

Offline setting (tiny/cls.py, see weak_to_strong_cls.py): the pre-trained students tiny-s (1 layer, hidden 8,
fine-tuning lr 3e-3), tiny-m (2 layers, hidden 16, 3e-4) and tiny-l (2 layers, hidden 32, 1e-4) (docs/cls_sweep.png):
    python -m tiny --out data/tiny --no_images --models cls   # the data and the pre-trained students
    OMP_NUM_THREADS=1 python w2s_sweep.py --preset tiny --n_seeds 3 \\
        --models data/tiny/models/cls/tiny-s data/tiny/models/cls/tiny-m data/tiny/models/cls/tiny-l

Published setting (the openai/weak-to-strong README's sweep.py; any weak_to_strong_cls recipe works; any GPU count):
    python w2s_sweep.py --accelerate --config recipes/weak_to_strong/weak_to_strong_cls-sciq-sweep.yaml \\
        --models gpt2 gpt2-medium gpt2-large gpt2-xl --output_dir output/sweep_sciq
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    output_dir: str = "output/w2s_sweep"
    """every pair's stages (shared as a cache), sweep.json and sweep.png go here"""
    track: bool = False
    """log the sweep (and each pair's run) to Weights and Biases"""
    wandb_project_name: str = "weak_to_strong"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""

    # models
    models: tuple[str, ...] = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
    """the models, small to large: hub ids or local paths"""
    accelerate: bool = False
    """run each pair with `accelerate launch` (the GPUs of the accelerate config) instead of one process"""


def fail(message: str) -> NoReturn:
    """A user error: one message saying what is wrong and how to fix it, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args() -> tuple[Args, list[str]]:
    """The sweep's own flags, and the others, which go to weak_to_strong_cls.py."""
    args, passthrough = tyro.cli(Args, use_underscores=True, return_unknown_args=True)
    if len(args.models) < 2 or len(set(args.models)) != len(args.models):
        fail(f"--models {' '.join(args.models)}: give at least two different models, small to large")
    for flag in passthrough:
        if flag.startswith(("--weak_", "--strong_", "--weak-", "--strong-")):
            fail(f"{flag.split('=')[0]}: the sweep sets each pair's models and learning rates from --models")
    return args, passthrough


def model_flags(side: str, name: str) -> list[str]:
    """weak_to_strong_cls.py's flags for one side of a pair: the hub id / path, fine-tuned at its default lr."""
    return [f"--{side}_model_name_or_path", name, f"--{side}_model_type", "None", f"--{side}_config_overrides", "None",
            f"--{side}_lr", "None"]


def summarize(per_seed: dict) -> dict:
    """Mean and std over the seeds; null where a seed has none (PGR of self-training, or with no gap to recover)."""
    keys = list(next(iter(per_seed.values())))
    values = {k: [r[k] for r in per_seed.values()] for k in keys}
    return {"mean": {k: None if None in v else float(np.mean(v)) for k, v in values.items()},
            "std": {k: None if None in v else float(np.std(v)) for k, v in values.items()}}


def sweep_plot(sweep: dict, models: list[str], losses: tuple, path: Path, title: str) -> None:
    """The paper's figure (Burns et al. 2023, fig. 3): test accuracy against strong-model size, one line per weak
    model, the strong ceiling in black; below, PGR per pair. x: the models in the order given (small to large)."""
    mean, std = sweep["mean"], sweep["std"]
    fig, axes = plt.subplots(2, len(losses), figsize=(4.5 * len(losses), 7), squeeze=False, sharex=True)
    xs = np.arange(len(models))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(models)))
    ceiling = [mean[f"{m}->{m}"]["strong_acc"] for m in models]
    ceiling_std = [std[f"{m}->{m}"]["strong_acc"] for m in models]
    for col, loss in enumerate(losses):
        ax, ax_pgr = axes[0, col], axes[1, col]
        ax.errorbar(xs, ceiling, yerr=ceiling_std, color="black", marker="o", lw=2, capsize=3, label="strong ceiling")
        for i, weak in enumerate(models):
            js = range(i, len(models))
            keys = ["weak_acc" if j == i else f"transfer_acc_{loss}" for j in js]  # a line starts at the weak model
            acc = [mean[f"{weak}->{models[j]}"][k] for j, k in zip(js, keys)]
            err = [std[f"{weak}->{models[j]}"][k] for j, k in zip(js, keys)]
            ax.errorbar(list(js), acc, yerr=err, color=colors[i], marker="s", capsize=3, label=f"weak {weak}")
            pgr_js = [j for j in js if j > i and mean[f"{weak}->{models[j]}"].get(f"pgr_{loss}") is not None]
            if pgr_js:
                ax_pgr.errorbar(pgr_js, [mean[f"{weak}->{models[j]}"][f"pgr_{loss}"] for j in pgr_js],
                                yerr=[std[f"{weak}->{models[j]}"][f"pgr_{loss}"] for j in pgr_js], color=colors[i],
                                marker="s", capsize=3, label=f"weak {weak}")
        ax.set_title(f"{title}\nloss {loss}")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=8)
        ax_pgr.axhline(0, color="gray", lw=0.8)
        if sweep["pgr_undefined"]:
            ax_pgr.text(0.01, 0.97, "PGR undefined (strong <= weak): " + ", ".join(sweep["pgr_undefined"]),
                        transform=ax_pgr.transAxes, va="top", fontsize=8)
        ax_pgr.set_ylabel("performance gap recovered")
        ax_pgr.set_xticks(xs, models)
        ax_pgr.set_xlabel("strong model")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    args, passthrough = parse_args()
    out = Path(args.output_dir)
    script = str(Path(__file__).resolve().parent / "weak_to_strong_cls.py")
    launcher = [sys.executable, "-m", "accelerate.commands.launch"] if args.accelerate else [sys.executable]
    tracking = ["--track", "--wandb_project_name", args.wandb_project_name] if args.track else []
    tracking += ["--wandb_entity", args.wandb_entity] if args.track and args.wandb_entity else []
    labels = [name.rstrip("/").split("/")[-1] for name in args.models]  # the names in sweep.json, tables and plot
    labels = labels if len(set(labels)) == len(labels) else list(args.models)

    # one run of the training script per pair (weak i, strong j >= i); stages already in output_dir are reused
    per_seed, run_args, no_gap = {}, None, []  # no_gap: pairs whose strong ceiling is not above the weak model
    for i, weak in enumerate(args.models):
        for j in range(i, len(args.models)):
            pair = f"{labels[i]}->{labels[j]}"
            print(f"=== sweep pair {pair}", flush=True)
            command = [*launcher, script, *passthrough, "--output_dir", str(out), *tracking,
                       *model_flags("weak", weak), *model_flags("strong", args.models[j])]
            returncode = subprocess.run(command).returncode
            if returncode:
                sys.exit(returncode)  # the training script said what failed
            results = json.loads((out / "results.json").read_text())
            (out / "results.json").unlink()  # one pair's summary: the sweep's is sweep.json
            (out / "results.png").unlink(missing_ok=True)
            run_args = results["args"]
            for seed, res in results["per_seed"].items():
                if i == j:  # self-training: no gap to recover
                    res.update({k: None for k in res if k.startswith("pgr_")})
                per_seed.setdefault(seed, {})[pair] = res
            if i != j and any(r["strong_acc"] <= r["weak_acc"] for r in results["per_seed"].values()):
                no_gap.append(pair)  # weak_to_strong_cls.py left its PGR null: there is no gap to recover

    by_pair = {pair: summarize({s: r[pair] for s, r in per_seed.items()}) for pair in next(iter(per_seed.values()))}
    summary = {"mean": {p: v["mean"] for p, v in by_pair.items()}, "std": {p: v["std"] for p, v in by_pair.items()},
               "models": labels, "pgr_undefined": no_gap, "n_seeds": run_args["n_seeds"],
               "per_seed": per_seed, "args": {**vars(args), "passthrough": passthrough}, "run_args": run_args}
    files = (out / "sweep.json", out / "sweep.png")
    files[0].write_text(json.dumps(summary, indent=2))
    losses = run_args["losses"]
    sweep_plot(summary, labels, losses, files[1],
               f"{Path(run_args['ds_name']).name}, {run_args['n_seeds']} seed(s)")
    header = "".join(f"{'w2s ' + loss:>13}{'PGR':>7}" for loss in losses)
    print(f"\n{'weak -> strong':<24}{'weak':>7}{'strong':>8}{header}")
    for pair, m in summary["mean"].items():
        row = f"{pair:<24}{m['weak_acc']:>7.3f}{m['strong_acc']:>8.3f}"
        for loss in losses:
            pgr = m[f"pgr_{loss}"]
            undefined = "undef" if pair in no_gap else "-"  # no gap to recover, or self-training
            row += f"{m[f'transfer_acc_{loss}']:>13.3f}" + (f"{pgr:>7.2f}" if pgr is not None else f"{undefined:>7}")
        print(row)
    if no_gap:
        print(f"PGR undefined (undef) for {', '.join(no_gap)}: the strong ceiling is not above the weak model (in at "
              "least one seed), so there is no gap to recover")
    print(f"wrote {files[0]} and {files[1]}")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=summary["args"],
                   name=f"{args.exp_name}__{Path(run_args['ds_name']).name}__{run_args['seed']}")
        wandb.summary.update({f"eval/{p}/{k}": v for p, m in summary["mean"].items() for k, v in m.items()
                              if v is not None})
        wandb.log({"eval/results": wandb.Image(str(files[1]))})
        wandb.finish()
