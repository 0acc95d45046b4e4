"""Share of padded positions when a batch of pairs goes through the model in --length_groups padded forwards.

The layout rule of dpo.py / wpo.py's padded layout, restated here (the benchmarks import nothing from the scripts):
the 2 x B sequences of B pairs (prompt + chosen, prompt + rejected), sorted by length, are cut into G consecutive
groups (group j = sorted[j*n//G : (j+1)*n//G]), each right-padded to its own longest sequence; G = 1 is one padded
forward, and the padding-free layout (one packed row) has no padding. Lengths are drawn as benchmarks/bench.py
draws them (uniform prompt and response lengths, chosen and rejected independent), for its CPU and GPU sizes:

    python benchmarks/padding.py             # 2000 batches per size
"""

import random
import sys

SIZES = {  # (batch pairs, prompt tokens, response tokens): bench.py's SIZES["cpu"] and SIZES["qwen2-0.5b"]
    "cpu (prompts 24..128, responses 32..383)": (8, (24, 128), (32, 383)),
    "gpu (prompts 64..512, responses 64..768)": (8, (64, 512), (64, 768)),
}


def padded_positions(lengths: list[int], groups: int) -> int:
    order = sorted(lengths) if groups > 1 else lengths
    n, g = len(order), min(groups, len(order))
    return sum(max(part) * len(part) for part in (order[j * n // g : (j + 1) * n // g] for j in range(g)))


def main(n_batches: int):
    for name, (b, prompt, response) in SIZES.items():
        rng = random.Random(0)
        positions, real = {g: 0 for g in (1, 2, 4, 8)}, 0
        for _ in range(n_batches):
            lengths = []
            for _ in range(b):
                p = rng.randint(*prompt)
                lengths += [p + rng.randint(*response), p + rng.randint(*response)]
            real += sum(lengths)
            for g in positions:
                positions[g] += padded_positions(lengths, g)
        print(f"\n{name}: {n_batches} batches of {b} pairs (= {2 * b} sequences)\n")
        print("| --length_groups | positions forwarded | real tokens | padding share |")
        print("| --- | --- | --- | --- |")
        for g, pos in positions.items():
            print(f"| {g} | {pos} | {real} | {1 - real / pos:.1%} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
