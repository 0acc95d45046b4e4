"""Aggregate the main job over training seeds: `SEEDS="1 2 3 4 5" bash run_tiny.sh` runs the pipeline once per seed
into OUT/seed-N and then calls

    python -m tiny.seeds --runs OUT/seed-1 OUT/seed-2 ... --out OUT/results.json --table OUT/results.md --plot OUT/results.png

Each run folder holds the results.json that tiny/evaluate.py wrote for that seed. The table gives, per model, the mean
+- std over seeds and the minimum; a per-seed table; WSPO's share of the gap per seed; and each ordering the project
claims (CLAIMS) with its value in every seed and whether it holds in all of them. One seed is one draw of the training
noise: a claim counts only if it holds in every seed, with margin.
"""

import argparse
import json
import statistics
from pathlib import Path

from tiny import evaluate
from tiny.evaluate import gap_recovered

MODELS = ["weak SFT", "weak DPO", "strong SFT", "strong WSPO", "strong DPO", "strong WPO"]
# (the ordering the docs claim, its value from one seed's gold rewards g and preference accuracies a, the bound it must
# clear in every seed)
CLAIMS = [
    ("weak DPO - weak SFT, gold reward", lambda g, a: g["weak DPO"] - g["weak SFT"], 0.05),
    ("strong DPO - strong SFT, gold reward", lambda g, a: g["strong DPO"] - g["strong SFT"], 0.10),
    ("strong WSPO - strong SFT, gold reward", lambda g, a: g["strong WSPO"] - g["strong SFT"], 0.10),
    ("strong WSPO held-out preference accuracy", lambda g, a: a["strong WSPO"], 0.55),
]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.pstdev(xs)


def aggregate(runs: dict[int, list[dict]]) -> dict:
    """runs: seed -> that seed's evaluate.py results (one dict per model). Returns the summary written as JSON."""
    seeds = sorted(runs)
    by = {s: {r["name"]: r for r in runs[s]} for s in seeds}
    missing = [(s, m) for s in seeds for m in MODELS if m not in by[s]]
    if missing:
        raise SystemExit(f"error: seed {missing[0][0]} has no '{missing[0][1]}' row: rerun that seed's pipeline")
    models = {}
    for m in MODELS:
        stats = {}
        for key in ("gold_reward_mean", "correctness_mean", "tone_mean", "pref_accuracy"):
            xs = [by[s][m][key] for s in seeds]
            mu, sd = mean_std(xs)
            stats[key] = {"mean": mu, "std": sd, "min": min(xs), "per_seed": dict(zip(map(str, seeds), xs))}
        models[m] = stats
    share = {str(s): gap_recovered(runs[s]) for s in seeds}  # None where strong DPO is not above strong SFT
    defined = [v for v in share.values() if v is not None]
    claims = []
    for text, value, bound in CLAIMS:
        vals = {str(s): value({m: by[s][m]["gold_reward_mean"] for m in MODELS},
                              {m: by[s][m]["pref_accuracy"] for m in MODELS}) for s in seeds}
        claims.append({"claim": text, "bound": bound, "per_seed": vals, "min": min(vals.values()),
                       "holds_in": sum(v >= bound for v in vals.values()), "n_seeds": len(seeds)})
    mean, std = mean_std(defined) if defined else (None, None)
    return {"seeds": seeds, "models": models, "claims": claims,
            "wspo_share": {"per_seed": share, "mean": mean, "std": std, "n_defined": len(defined)}}


def fmt(share: float | None) -> str:
    return "undefined" if share is None else f"{share:.2f}"


def table(summary: dict) -> str:
    seeds, models = summary["seeds"], summary["models"]
    n = len(seeds)
    out = [f"Over {n} training seeds ({', '.join(map(str, seeds))}); mean +- std over seeds, and the minimum.", "",
           "| model | gold reward | min | correctness | tone | held-out pref. accuracy (min) |",
           "| --- | --- | --- | --- | --- | --- |"]
    for m, st in models.items():
        g, c, t, a = (st[k] for k in ("gold_reward_mean", "correctness_mean", "tone_mean", "pref_accuracy"))
        out.append(f"| {m} | {g['mean']:.3f} +- {g['std']:.3f} | {g['min']:.3f} | {c['mean']:.3f} +- {c['std']:.3f} "
                   f"| {t['mean']:+.3f} +- {t['std']:.3f} | {a['mean']:.3f} ({a['min']:.3f}) |")
    share = summary["wspo_share"]
    out += ["", "Gold reward per seed, and WSPO's share of the strong gap, (WSPO - strong SFT) / (strong DPO - strong SFT):",
            "", "| seed | " + " | ".join(models) + " | WSPO share |", "| --- |" + " --- |" * (len(models) + 1)]
    for s in map(str, seeds):
        out.append(f"| {s} | " + " | ".join(f"{st['gold_reward_mean']['per_seed'][s]:.3f}" for st in models.values())
                   + f" | {fmt(share['per_seed'][s])} |")
    out += ["", f"WSPO recovers {fmt(share['mean'])} +- {fmt(share['std'])} of the strong alignment gap on gold reward "
            f"(mean +- std over the {share['n_defined']} of {n} seeds where strong DPO is above strong SFT).", "",
            "| claim | must be at least | per seed | min | holds |",
            "| --- | --- | --- | --- | --- |"]
    for c in summary["claims"]:
        per = " ".join(f"{v:+.3f}" for v in c["per_seed"].values())
        out.append(f"| {c['claim']} | {c['bound']:.2f} | {per} | {c['min']:+.3f} | "
                   f"{'yes' if c['holds_in'] == c['n_seeds'] else 'NO'}: {c['holds_in']} of {c['n_seeds']} seeds |")
    return "\n".join(out)


def plot(summary: dict, path: str) -> None:
    gold = {m: st["gold_reward_mean"] for m, st in summary["models"].items()}
    evaluate.plot([{"name": m, "gold_reward_mean": g["mean"], "gold_reward_std": g["std"]} for m, g in gold.items()],
                  path, f"held-out gold reward, mean +- std over {len(summary['seeds'])} seeds (dots: seeds)",
                  dots=[list(g["per_seed"].values()) for g in gold.values()])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", required=True, help="one run folder per seed, each with its results.json")
    ap.add_argument("--out", required=True, help="write the summary as JSON here")
    ap.add_argument("--table", default=None, help="write the markdown tables here")
    ap.add_argument("--plot", default=None, help="write a PNG bar plot with error bars here")
    a = ap.parse_args()
    runs = {}
    for folder in a.runs:
        results = json.loads((Path(folder) / "results.json").read_text())
        seed = results[0]["seed"]
        if seed in runs:
            raise SystemExit(f"error: {folder} and another run both used seed {seed}: pass each seed once")
        runs[seed] = results
    summary = aggregate(runs)
    text = table(summary)
    print(text)
    Path(a.out).write_text(json.dumps(summary, indent=2))
    if a.table:
        Path(a.table).write_text(text + "\n")
    if a.plot:
        plot(summary, a.plot)


if __name__ == "__main__":
    main()
