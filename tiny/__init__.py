"""The project's offline tiny setting: a synthetic language, datasets in the Hugging Face Hub schemas,
a word-level tokenizer with a ChatML chat template, and the programmatic ground truth (gold reward,
labels) that lets every script prove it learns. Not an algorithm: the scripts only see the files
`python -m tiny` writes, loaded through `transformers` / `datasets` exactly like hub ones."""
