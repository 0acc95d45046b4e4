"""The tiny binary classification task (an amazon_polarity stand-in) with graded difficulty.

A review is a run of filler words and sentiment words; "not" flips the sentiment word right after
it. label = 1 when the flipped polarities sum to more than zero (the count of sentiment words is
odd, so there is never a tie). Difficulty grows as the margin |sum| shrinks and as negations pile
up: a small model gets the easy reviews, only a bigger one gets the close, negated ones. That
capability gap is what the weak-to-strong experiments need.
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


def make_review(rng: random.Random) -> dict:
    n_sent = rng.choice([1, 3, 5, 7])
    p_not = rng.choice([0.0, 0.25, 0.5])
    ws, total, negations = [], 0, 0
    for _ in range(n_sent):
        ws += [rng.choice(FILLER) for _ in range(rng.randint(0, 2))]
        pos = rng.random() < 0.5
        if rng.random() < p_not:
            ws.append(NEGATOR)
            negations += 1
            total += -1 if pos else 1
        else:
            total += 1 if pos else -1
        ws.append(rng.choice(POSITIVE if pos else NEGATIVE))
    ws += [rng.choice(FILLER) for _ in range(rng.randint(0, 2))]
    text = " ".join(ws)
    # difficulty 0 (easy) .. 3 (hard): small margins and many negations are hard
    difficulty = min(3, (n_sent - abs(total)) // 2 + (negations > 1))
    assert label_of(text) == int(total > 0)
    return {"text": text, "label": int(total > 0), "difficulty": difficulty}


def make_cls(rng: random.Random, n: int) -> list[dict]:
    return [make_review(rng) for _ in range(n)]
