"""Evaluate models on the tiny setting's ground truth, every model the same way.

    python -m tiny.evaluate --models runs/sft-weak runs/dpo-weak --out results.json
    python -m tiny.evaluate --names "weak SFT" "weak DPO" --models ... --refs none runs/sft-weak \
        --out results.json --table results.md --plot results.png

For each model:
- gold reward of sampled responses to held-out prompts (the prompts of test_prefs): `samples`
  responses per prompt at the given temperature; mean and std over all samples, split into its
  correctness and tone parts (tiny/lang.py);
- held-out preference accuracy: the fraction of test pairs where the model gives the chosen
  response a higher summed log-probability than the rejected one; with `--ref`, the DPO implicit
  reward accuracy instead: log pi/ref(chosen) > log pi/ref(rejected).
"""

import argparse
import json
import statistics

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny.lang import gold_reward, target, tone_of


def ids_of(tok, messages, gen=False):
    out = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@torch.no_grad()
def sample(model, tok, prompts, n, temperature, top_p, seed, batch_size=64, max_new_tokens=20):
    torch.manual_seed(seed)
    texts = []
    jobs = [p for p in prompts for _ in range(n)]
    for i in range(0, len(jobs), batch_size):
        chunk = [ids_of(tok, [{"role": "user", "content": p}], gen=True) for p in jobs[i : i + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0, temperature=temperature or None,
                             top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return jobs, [t.strip() for t in texts]


@torch.no_grad()
def response_logps(model, tok, prompts, responses, batch_size=64):
    """Summed log-probability of each response given its prompt (chat template applied)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = []
        for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size]):
            prompt_ids = ids_of(tok, [{"role": "user", "content": p}], gen=True)
            full = ids_of(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])
            rows.append((full, len(prompt_ids)))
        width = max(len(f) for f, _ in rows)
        ids = torch.tensor([f + [tok.pad_token_id] * (width - len(f)) for f, _ in rows])
        att = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f, _ in rows])
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        resp = torch.zeros_like(lp)
        for k, (f, n_prompt) in enumerate(rows):
            end = n_prompt + f[n_prompt:].index(tok.eos_token_id) + 1 if tok.eos_token_id in f[n_prompt:] else len(f)
            resp[k, n_prompt - 1 : end - 1] = 1  # response tokens through <|im_end|> (the template's "\n" is not trained)
        out += (lp * resp).sum(-1).tolist()
    return out


def evaluate(path, data, split, n_prompts, samples, temperature, top_p, seed, ref=None):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ds = load_dataset(data, split=split).select(range(n_prompts))
    prompts = list(ds["prompt"])
    jobs, texts = sample(model, tok, prompts, samples, temperature, top_p, seed)
    rewards = [gold_reward(p, t) for p, t in zip(jobs, texts)]
    tones = [tone_of(t) for t in texts]
    correct = [r - tone for r, tone in zip(rewards, tones)]
    chosen = [c[-1]["content"] for c in ds["chosen"]]
    rejected = [r[-1]["content"] for r in ds["rejected"]]
    lc, lr = response_logps(model, tok, prompts, chosen), response_logps(model, tok, prompts, rejected)
    if ref is not None:
        ref_model = AutoModelForCausalLM.from_pretrained(ref).eval()
        rc, rr = response_logps(ref_model, tok, prompts, chosen), response_logps(ref_model, tok, prompts, rejected)
        lc, lr = [a - b for a, b in zip(lc, rc)], [a - b for a, b in zip(lr, rr)]
    return {
        "model": path, "ref": ref, "seed": seed,
        "gold_reward_mean": statistics.fmean(rewards), "gold_reward_std": statistics.pstdev(rewards),
        "correctness_mean": statistics.fmean(correct), "tone_mean": statistics.fmean(tones),
        "pref_accuracy": statistics.fmean(float(a > b) for a, b in zip(lc, lr)),
        "n_samples": len(rewards), "examples": [{"prompt": p, "response": t, "target": " ".join(target(p))}
                                                for p, t in list(zip(jobs, texts))[:5]],
    }


def gap_recovered(results: list[dict]) -> float | None:
    """(WSPO - strong SFT) / (strong DPO - strong SFT) on gold reward, when those three rows exist and strong DPO is
    above strong SFT (with no gap to recover the share is undefined)."""
    by = {r["name"]: r["gold_reward_mean"] for r in results}
    if not {"strong SFT", "strong DPO", "strong WSPO"} <= set(by) or by["strong DPO"] <= by["strong SFT"]:
        return None
    return (by["strong WSPO"] - by["strong SFT"]) / (by["strong DPO"] - by["strong SFT"])


def table(results: list[dict]) -> str:
    lines = ["| model | gold reward (mean +- std) | correctness | tone | held-out pref. accuracy | accuracy kind |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        kind = f"implicit reward vs {r['ref_name']}" if r["ref"] else "log-prob(chosen) > log-prob(rejected)"
        lines.append(f"| {r['name']} | {r['gold_reward_mean']:.3f} +- {r['gold_reward_std']:.3f} | {r['correctness_mean']:.3f} "
                     f"| {r['tone_mean']:+.3f} | {r['pref_accuracy']:.3f} | {kind} |")
    g = gap_recovered(results)
    if g is not None:
        lines.append(f"\nWSPO recovers {g:.2f} of the strong alignment gap on gold reward: "
                     "(WSPO - strong SFT) / (strong DPO - strong SFT).")
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str = "held-out gold reward (mean +- std over samples)",
         dots: list[list[float]] | None = None) -> None:
    """Bars of gold_reward_mean with gold_reward_std error bars; `dots`: extra values per bar (e.g. one per seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 * len(results) + 2, 4))
    names = [r["name"] for r in results]
    ax.bar(names, [r["gold_reward_mean"] for r in results], yerr=[r["gold_reward_std"] for r in results], capsize=4,
           color=["#9ecae1" if n.startswith("weak") else "#3182bd" for n in names])
    for i, values in enumerate(dots or []):
        ax.plot([i] * len(values), values, "k.", alpha=0.6)
    ax.set_ylabel("gold reward of sampled responses")
    ax.set_title(f"tiny setting: {title}")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", required=True, help="model folders (save_pretrained outputs)")
    ap.add_argument("--refs", nargs="*", default=None, help="one reference per model for implicit-reward accuracy ('none' to skip)")
    ap.add_argument("--data", default="data/tiny/ultrafeedback", help="preference dataset folder")
    ap.add_argument("--split", default="test_prefs", help="held-out split")
    ap.add_argument("--n_prompts", type=int, default=200, help="held-out prompts")
    ap.add_argument("--samples", type=int, default=4, help="sampled responses per prompt")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--names", nargs="*", default=None, help="a display name per model (default: the paths)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--table", default=None, help="write a markdown table here")
    ap.add_argument("--plot", default=None, help="write a PNG bar plot here")
    a = ap.parse_args()
    refs = a.refs or [None] * len(a.models)
    if len(refs) != len(a.models):
        raise SystemExit("--refs needs one entry per --models entry")
    names = a.names or a.models
    if len(names) != len(a.models):
        raise SystemExit("--names needs one entry per --models entry")
    results = []
    for name, path, ref in zip(names, a.models, refs):
        ref = None if ref in (None, "none") else ref
        r = evaluate(path, a.data, a.split, a.n_prompts, a.samples, a.temperature, a.top_p, a.seed, ref)
        r["name"], r["ref_name"] = name, names[a.models.index(ref)] if ref in a.models else ref
        results.append(r)
        print(f"{path}: gold reward {r['gold_reward_mean']:.3f} +- {r['gold_reward_std']:.3f} "
              f"(correct {r['correctness_mean']:.3f}, tone {r['tone_mean']:+.3f}), pref acc {r['pref_accuracy']:.3f}")
    print(table(results))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    if a.table:
        with open(a.table, "w") as f:
            f.write(table(results) + "\n")
    if a.plot:
        plot(results, a.plot)


if __name__ == "__main__":
    main()
