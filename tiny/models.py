"""The tiny setting's language models, written as model folders as if from a hub: a weak and a strong Qwen2 with
random weights (the base models that sft.py fine-tunes in run_tiny.sh).

    data/tiny/models/qwen2-weak-init1/    0.13M parameters (hidden 64, 2 layers)
    data/tiny/models/qwen2-strong-init1/  0.85M parameters (hidden 128, 4 layers)

`init1` is the seed of the initialisation (`python -m tiny --init_seed N` writes `...-initN`). Each folder holds the
config, model.safetensors and the tiny tokenizer, and loads with AutoModelForCausalLM.from_pretrained. The weights are
those transformers' from_config draws after set_seed(seed), the vocabulary and special tokens taken from the tokenizer.
"""

from pathlib import Path

import torch
from accelerate.utils import set_seed
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

# Qwen2 configs: 4 query heads sharing 2 key-value heads, tied input and output embeddings
QWEN2 = {
    "weak": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    "strong": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
}


def lm_folder(out: Path, size: str, seed: int) -> Path:
    return Path(out) / "models" / f"qwen2-{size}-init{seed}"


def write_lm(folder: Path, tokenizer, config: dict, seed: int) -> None:
    """A Qwen2 with random weights drawn right after set_seed(seed); the tokenizer's ids win over the config's."""
    set_seed(seed)
    config = AutoConfig.for_model("qwen2", **config, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_models(out: Path, seed: int) -> None:
    """The weak and strong random-init Qwen2 of the tiny setting, with the tokenizer in out/tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(Path(out) / "tokenizer")
    for size, config in QWEN2.items():
        write_lm(lm_folder(out, size, seed), tokenizer, config, seed)
