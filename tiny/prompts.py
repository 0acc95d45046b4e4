"""Write small offline prompt sets in the schemas of AlpacaEval 2, Arena-Hard and MT-Bench, in the tiny
language: `python -m tiny.prompts --out data/tiny`

    data/tiny/prompts/alpaca_eval.json   a JSON list of {instruction, output, generator, dataset}
                                         (tatsu-lab/alpaca_eval's alpaca_eval.json; output = a polite correct
                                         reference answer, generator "tiny_reference")
    data/tiny/prompts/arena_hard.jsonl   {question_id, category, cluster, turns: [{content}]} per line
                                         (Arena-Hard-Auto's data/arena-hard-v0.1/question.jsonl)
    data/tiny/prompts/mt_bench.jsonl     {question_id, category, turns: [two user turns], reference} per line
                                         (FastChat llm_judge's data/mt_bench/question.jsonl; question ids from 81)

generate.py reads them with `--prompts data/tiny/prompts` (its tiny preset). Deterministic: the same seed
writes the same bytes.
"""

import argparse
import hashlib
import json
import random
from pathlib import Path

from tiny import lang

# MT-Bench's eight categories; FastChat samples writing / roleplay at 0.7, stem / humanities at 0.1, the rest greedy
MT_BENCH_CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]


def reference_answer(prompt: str) -> str:
    """A correct answer in a polite tone: the gold reward's maximum (2.0)."""
    return " ".join(["sure"] + lang.target(prompt) + ["hope this helps"])


def make_alpaca_eval(rng: random.Random, n: int) -> list[dict]:
    prompts = []
    while len(prompts) < n:  # instructions are unique: AlpacaEval matches answers to prompts by their text
        p = lang.make_prompt(rng)
        if p not in prompts:
            prompts.append(p)
    return [{"instruction": p, "output": reference_answer(p), "generator": "tiny_reference", "dataset": "tiny"}
            for p in prompts]


def make_arena_hard(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for k in range(n):
        p = lang.make_prompt(rng)
        rows.append({"question_id": hashlib.md5(f"tiny-arena-{k}".encode()).hexdigest(), "category": "arena-hard-v0.1",
                     "cluster": lang.parse_prompt(p)[0], "turns": [{"content": p}]})
    return rows


def make_mt_bench(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for k in range(n):
        first, second = lang.make_prompt(rng), lang.make_prompt(rng)
        rows.append({"question_id": 81 + k, "category": MT_BENCH_CATEGORIES[k % len(MT_BENCH_CATEGORIES)],
                     "turns": [first, second], "reference": [reference_answer(first), reference_answer(second)]})
    return rows


def write_prompts(out_dir, seed: int = 0, n_alpaca: int = 40, n_arena: int = 24, n_mt: int = 16) -> Path:
    """The three prompt files under out_dir/prompts; returns that folder."""
    folder = Path(out_dir) / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    rng = lambda name: random.Random(f"{seed}-prompts-{name}")  # one independent stream per file
    jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
    alpaca = make_alpaca_eval(rng("alpaca_eval"), n_alpaca)
    (folder / "alpaca_eval.json").write_text(json.dumps(alpaca, indent=2) + "\n")
    (folder / "arena_hard.jsonl").write_text(jsonl(make_arena_hard(rng("arena_hard"), n_arena)))
    (folder / "mt_bench.jsonl").write_text(jsonl(make_mt_bench(rng("mt_bench"), n_mt)))
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tiny", help="output folder (the files go to OUT/prompts)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every generator")
    ap.add_argument("--n_alpaca", type=int, default=40, help="instructions in alpaca_eval.json")
    ap.add_argument("--n_arena", type=int, default=24, help="questions in arena_hard.jsonl")
    ap.add_argument("--n_mt", type=int, default=16, help="two-turn questions in mt_bench.jsonl")
    a = ap.parse_args()
    folder = write_prompts(a.out, a.seed, a.n_alpaca, a.n_arena, a.n_mt)
    print(f"wrote the tiny benchmark prompts to {folder}")


if __name__ == "__main__":
    main()
