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

The classification students, pre-trained on that corpus and written as model folders as if from a hub
(`write_models`; weak_to_strong_cls.py --preset tiny and w2s_sweep.py load them with from_pretrained):

    data/tiny/models/cls/tiny-s/   qwen2, 1 layer, hidden 8, 300 pre-training steps (a bag of words)
    data/tiny/models/cls/tiny-m/   qwen2, 2 layers, hidden 16, 2000 steps
    data/tiny/models/cls/tiny-l/   qwen2, 2 layers, hidden 32, 4000 steps

Pre-training: next-token prediction on cls_corpus, batch 64, lr 3e-3 with linear warm-up over 5% of the steps then
cosine to 0, Adam, the summed token losses divided by the batch's token count. Each folder holds the config,
model.safetensors, the tiny tokenizer and pretraining.json (settings and final loss).
"""

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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


# --------------------------------------------------------------------------------------------
# the pre-trained students: qwen2 configs and pre-training steps
SIZES = {
    "tiny-s": (dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, max_position_embeddings=64), 300),
    "tiny-m": (dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, max_position_embeddings=64), 2000),
    "tiny-l": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=64), 4000),
}
PRETRAIN = dict(batch_size=64, lr=3e-3, max_ctx=64)  # documents of max_ctx tokens or more are left out


def pretrain(lm, tokenizer, corpus: list[str], steps: int, seed: int) -> float:
    """Next-token pre-training (warm-up over 5% of the steps, then cosine to 0); returns the last step's loss."""
    ids = [x for x in tokenizer(corpus)["input_ids"] if 1 < len(x) < PRETRAIN["max_ctx"]]
    g, per_step = torch.Generator().manual_seed(seed), PRETRAIN["batch_size"]
    order = torch.cat([torch.randperm(len(ids), generator=g) for _ in range(-(-steps * per_step // len(ids)))])
    warmup = steps // 20
    schedule = lambda s: ((s + 1) / warmup if s < warmup
                          else 0.5 * (1 + np.cos(np.pi * (s - warmup) / max(1, steps - warmup))))
    optimizer = torch.optim.Adam(lm.parameters(), lr=PRETRAIN["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lm.train()
    for step in range(steps):
        rows = [ids[i] for i in order[step * per_step: (step + 1) * per_step]]
        length = max(len(x) for x in rows)  # right padding; labels are the ids with padding set to -100
        input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (length - len(x)) for x in rows])
        mask = torch.tensor([[1] * len(x) + [0] * (length - len(x)) for x in rows])
        labels = input_ids.masked_fill(mask == 0, -100)
        logits = lm(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        # the token mean over the batch: summed token losses / the batch's count of predicted tokens
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                               reduction="sum") / sum(len(x) - 1 for x in rows)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return loss.item()


def write_models(out: Path, seed: int, sizes: tuple[str, ...] = tuple(SIZES), steps: int | None = None) -> None:
    """The pre-trained students under out/models/cls/, from out/tokenizer and out/cls_corpus (`python -m tiny`).
    `sizes` and `steps` (all sizes the same, instead of each size's own) serve quick checks and tests."""
    out = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    corpus = [json.loads(line)["text"] for f in sorted((out / "cls_corpus").glob("*.jsonl"))
              for line in f.read_text().splitlines() if line.strip()]
    for size in sizes:
        config, size_steps = SIZES[size]
        size_steps = size_steps if steps is None else steps
        set_seed(seed)  # the initial weights: those from_config draws right after set_seed(seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "qwen2", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config))
        final_loss = pretrain(lm, tokenizer, corpus, size_steps, seed)
        folder = out / "models" / "cls" / size
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        settings = {"steps": size_steps, **PRETRAIN, "seed": seed, "n_docs": len(corpus), "final_loss": final_loss}
        (folder / "pretraining.json").write_text(json.dumps(settings, indent=2))
        print(f"wrote {folder} ({size_steps} pre-training steps, final loss {final_loss:.4f})")


def main():
    import argparse

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
