"""Share of padded positions in dpo.py's / wpo.py's forwards, by --length_groups, on bench.py's data.

Counts what dpo.collate actually builds (positions in the parts' input_ids vs real tokens) over many batches
of the benchmark's length distribution (8 pairs; prompts 16..128, responses 32..384 tokens, uniform):

    python benchmarks/padding.py             # 2000 batches
"""

import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (also puts the repository root on the path)
import dpo  # noqa: E402

N_BATCHES = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
size = bench.FULL
pairs = bench.make_pairs(N_BATCHES * size.batch_size, size, random.Random(0)).to_list()
print(f"{N_BATCHES} batches of {size.batch_size} pairs (= {2 * size.batch_size} sequences)\n")
print("| --length_groups | positions forwarded | real tokens | padding share |")
print("| --- | --- | --- | --- |")
for groups in (1, 2, 4, 8):
    positions = real = 0
    for i in range(0, len(pairs), size.batch_size):
        batch = dpo.collate(pairs[i : i + size.batch_size], bench.PAD, False, groups)
        positions += sum(p["input_ids"].numel() for p in batch["parts"])
        real += sum(int(p["attention_mask"].sum()) for p in batch["parts"])
    print(f"| {groups} | {positions} | {real} | {1 - real / positions:.1%} |")
