"""Write the offline tiny setting: `python -m tiny --out data/tiny`

    data/tiny/tokenizer/     word-level tokenizer (HF format) with a Qwen2-style ChatML chat template
    data/tiny/ultrachat/     SFT conversations, splits train_sft / test_sft     (HuggingFaceH4/ultrachat_200k schema)
    data/tiny/ultrafeedback/ preference pairs, splits train_prefs / test_prefs (HuggingFaceH4/ultrafeedback_binarized schema)
    data/tiny/cls/           binary classification texts, splits train / test (text, label, difficulty)
    data/tiny/cls_corpus/    unlabeled pre-training corpus of the classification students (no labels, no test text)
    data/tiny/images/        labelled procedural images, splits train / test
    data/tiny/prompts/       benchmark prompt files (AlpacaEval 2, Arena-Hard, MT-Bench schemas) for generate.py
    data/tiny/models/        model folders, as if from a hub (--models): qwen2-weak-init1, qwen2-strong-init1 (the
                             random-init Qwen2 that sft.py fine-tunes, tiny/models.py; written by default);
                             cls/tiny-s, tiny-m, tiny-l (the classification students, pre-trained, tiny/cls.py: --models
                             cls, minutes); resnet-weak, resnet-strong (pre-trained, tiny/images.py: --models vision)

Every dataset folder is a hub-style dataset repo (jsonl files + a README whose YAML names the
splits), so `datasets.load_dataset("data/tiny/ultrachat", split="train_sft")` works exactly like the
hub id; every model folder loads with `from_pretrained`. Deterministic: the same seeds write the same bytes.
"""

import argparse
import hashlib
import json
import random
from pathlib import Path

from tiny import cls, lang, models, prompts

CHAT_TEMPLATE = (  # Qwen2's template (default system turn included), in this tokenizer's words
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + lang.SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(vocab_words: list[str]):
    """A real Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer regex) whose merges are trained on
    the tiny language so that every word, with or without its leading space, is one token. Special
    tokens follow Qwen2-Instruct: eos = <|im_end|> (end of turn), pad = <|endoftext|>. Being the
    class transformers picks for a qwen2 config, it loads back identically from any model folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    corpus = [w for w in vocab_words for _ in range(2)] + [" " + w for w in vocab_words] + ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                         chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=4096)
    for w in vocab_words:  # the design promise: one token per word
        assert len(tok.tokenize(w)) == 1 and len(tok.tokenize(" " + w)) == 1, w
    return tok


def write_dataset(folder: Path, splits: dict[str, list[dict]], about: str) -> None:
    """A hub-style dataset repo: one jsonl per split, README YAML mapping split names to files.

    Each file name carries a hash of its content: `datasets` keys its cache of a local folder on the
    README's file names, not on the files' bytes, so regenerated data under the same names would be
    served stale from the cache."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.jsonl"):
        old.unlink()
    yaml = ["---", "configs:", "- config_name: default", "  data_files:"]
    for name, rows in splits.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        file = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
        (folder / file).write_text(text)
        yaml += [f"  - split: {name}", f"    path: {file}"]
    (folder / "README.md").write_text("\n".join(yaml + ["---", "", about, ""]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tiny", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="seed of every data generator")
    ap.add_argument("--n_sft", type=int, default=6000, help="SFT conversations in train_sft")
    ap.add_argument("--n_prefs", type=int, default=4000, help="preference pairs in train_prefs")
    ap.add_argument("--n_cls", type=int, default=8000, help="classification texts in train")
    ap.add_argument("--n_test", type=int, default=400, help="rows in each test split")
    ap.add_argument("--n_cls_corpus", type=int, default=100_000, help="unlabeled documents in cls_corpus (pre-training)")
    ap.add_argument("--no_images", action="store_true", help="skip the image set")
    ap.add_argument("--models", default="lm", help="model folders to write, of lm,cls,vision (cls, vision pre-train: minutes)")
    ap.add_argument("--init_seed", type=int, default=1, help="seed of the language models' init (folders qwen2-*-initN)")
    ap.add_argument("--pretrain_seed", type=int, default=0, help="seed of the cls students' and ResNets' pre-training")
    a = ap.parse_args()
    wanted = set(a.models.split(",")) - {""}
    if wanted - {"lm", "cls", "vision"}:
        ap.error(f"--models {a.models}: choose from lm, cls, vision")
    out = Path(a.out)
    rng = lambda name: random.Random(f"{a.seed}-{name}")  # one independent stream per dataset

    write_dataset(out / "ultrachat", {
        "train_sft": lang.make_sft(rng("sft-train"), a.n_sft),
        "test_sft": lang.make_sft(rng("sft-test"), a.n_test),
    }, "Tiny SFT conversations (tiny/lang.py), HuggingFaceH4/ultrachat_200k schema.")
    write_dataset(out / "ultrafeedback", {
        "train_prefs": lang.make_prefs(rng("prefs-train"), a.n_prefs),
        "test_prefs": lang.make_prefs(rng("prefs-test"), a.n_test),
    }, "Tiny preference pairs ranked by the gold reward (tiny/lang.py), ultrafeedback_binarized schema.")
    cls_test = cls.make_cls(rng("cls-test"), a.n_test)
    write_dataset(out / "cls", {"train": cls.make_cls(rng("cls-train"), a.n_cls), "test": cls_test},
                  "Tiny binary sentiment with graded difficulty (tiny/cls.py): text, label, difficulty.")
    write_dataset(out / "cls_corpus", {"train": cls.make_corpus(rng("cls-corpus"), a.n_cls_corpus,
                                                                {r["text"] for r in cls_test})},
                  "Unlabeled pre-training corpus of the tiny classification task (tiny/cls.py): a review then a "
                  "verdict word that follows its sentiment; no labels, no test text.")
    build_tokenizer(sorted(set(lang.words()) | set(cls.words()))).save_pretrained(out / "tokenizer")
    prompts.write_prompts(out, a.seed)
    if not a.no_images:
        from tiny import images

        images.write(out / "images", a.seed)
    if "lm" in wanted:
        models.write_models(out, a.init_seed)
    if "cls" in wanted:
        cls.write_models(out, a.pretrain_seed)
    if "vision" in wanted:  # pre-trained on out/images (written with --seed first if --no_images skipped them)
        from tiny import images

        images.write_models(out, a.pretrain_seed)
    print(f"wrote the tiny setting to {out}")


if __name__ == "__main__":
    main()
