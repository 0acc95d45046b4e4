"""The tiny binary classification task (an amazon_polarity stand-in) with graded difficulty.

A review is a run of filler words and sentiment words; "not" flips the sentiment word right after
it. label = 1 when the flipped polarities sum to more than zero (the count of sentiment words is
odd, so there is never a tie). Difficulty grows as the margin |sum| shrinks and as negations pile
up: a small model gets the easy reviews, only a bigger one gets the close, negated ones. That
capability gap is what the weak-to-strong experiments need.

The unlabeled pre-training corpus (`python -m tiny.cls --out data/tiny`, after `python -m tiny`): terse reviews
(sentiment words and negations, no filler words: random fillers drown the one informative token in noise) each
followed by one verdict word whose wording follows the sentiment. Predicting the verdict needs the concept,
negations included, so a strong enough LM learns it; no label is given, and no test text is in the corpus.
"""

import random

POSITIVE = ["good", "great", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "film", "plot", "was", "and", "actors", "very", "quite", "story", "a", "music", "ending"]
NEGATOR = "not"


def words() -> list[str]:
    return sorted(set(POSITIVE) | set(NEGATIVE) | set(FILLER) | {NEGATOR})


def label_of(text: str) -> int:
    ws, total, flip = text.split(), 0, 1
    for w in ws:
        if w == NEGATOR:
            flip = -1
            continue
        if w in POSITIVE or w in NEGATIVE:
            total += flip * (1 if w in POSITIVE else -1)
        flip = 1
    return int(total > 0)


def make_review(rng: random.Random, max_fillers: int = 2) -> dict:
    """A review: 1, 3, 5 or 7 sentiment words, each maybe negated, with up to `max_fillers` filler words before
    each of them and at the end."""
    n_sent = rng.choice([1, 3, 5, 7])
    p_not = rng.choice([0.0, 0.25, 0.5])
    ws, total, negations = [], 0, 0
    for _ in range(n_sent):
        ws += [rng.choice(FILLER) for _ in range(rng.randint(0, max_fillers))]
        pos = rng.random() < 0.5
        if rng.random() < p_not:
            ws.append(NEGATOR)
            negations += 1
            total += -1 if pos else 1
        else:
            total += 1 if pos else -1
        ws.append(rng.choice(POSITIVE if pos else NEGATIVE))
    ws += [rng.choice(FILLER) for _ in range(rng.randint(0, max_fillers))]
    text = " ".join(ws)
    # difficulty 0 (easy) .. 3 (hard): small margins and many negations are hard
    difficulty = min(3, (n_sent - abs(total)) // 2 + (negations > 1))
    assert label_of(text) == int(total > 0)
    return {"text": text, "label": int(total > 0), "difficulty": difficulty}


def make_cls(rng: random.Random, n: int) -> list[dict]:
    return [make_review(rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# the unlabeled pre-training corpus: `python -m tiny.cls --out data/tiny` (after `python -m tiny`)
# A review followed by a one-word verdict whose wording follows the sentiment ("gladly" ... "ugh"): predicting the
# verdict needs the concept (negations included), yet no label is ever given. Words from the tokenizer's vocabulary.
VERDICTS = {1: ["gladly", "certainly", "sure"], 0: ["ugh", "meh", "whatever"]}


def make_corpus(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """n documents `review verdict`; reviews whose text is in `exclude` (the test split) are drawn again."""
    rows = []
    while len(rows) < n:
        review = make_review(rng, max_fillers=0)
        if review["text"] not in exclude:
            rows.append({"text": f"{review['text']} {rng.choice(VERDICTS[review['label']])}"})
    return rows


def review_of(document: str) -> str:
    """The review part of a corpus document (its verdict word removed)."""
    return document.rsplit(" ", 1)[0]


def main():
    import argparse
    import json
    from pathlib import Path

    from tiny.__main__ import write_dataset

    ap = argparse.ArgumentParser(description="Write the unlabeled pre-training corpus of the tiny classification "
                                 "task to OUT/cls_corpus; OUT/cls (from `python -m tiny`) must exist: its test texts "
                                 "are kept out of the corpus.")
    ap.add_argument("--out", default="data/tiny", help="the tiny setting's folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generator")
    ap.add_argument("--n_docs", type=int, default=100_000, help="documents in the corpus")
    a = ap.parse_args()
    out = Path(a.out)
    test_files = sorted((out / "cls").glob("test-*.jsonl"))
    if not test_files:
        raise SystemExit(f"error: no {out / 'cls'}/test-*.jsonl: run `python -m tiny --out {out}` first")
    exclude = {json.loads(line)["text"] for f in test_files for line in f.read_text().splitlines() if line.strip()}
    rows = make_corpus(random.Random(f"{a.seed}-cls-corpus"), a.n_docs, exclude)
    write_dataset(out / "cls_corpus", {"train": rows}, "Unlabeled pre-training corpus of the tiny classification task "
                  "(tiny/cls.py): a review then a verdict word that follows its sentiment; no labels, no test text.")
    print(f"wrote {len(rows)} documents to {out / 'cls_corpus'} ({len(exclude)} test texts kept out)")


if __name__ == "__main__":
    main()
