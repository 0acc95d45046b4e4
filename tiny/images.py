"""The tiny labelled image set (an ImageNet stand-in for `vision_w2s.py`): 32x32 RGB procedural images.

Eight classes of shapes and textures drawn at a random position, size, angle and colour pair, on a
shaded background with pixel noise. Colour carries no information; the shape does. Some pairs are
easy (stripes vs a disc), some close (disc vs rounded square, ring vs frame, plus vs cross at a
jittered angle, small shapes), so a small network is clearly worse than a larger one.

Written as an imagefolder dataset repo: `train/<class>/<i>.png`, `test/<class>/<i>.png` and a README,
so `datasets.load_dataset("data/tiny/images", split="test")` returns {"image": PIL image, "label":
ClassLabel}. The README's YAML has no `configs:` on purpose: with one, datasets 5.2 caches a local
imagefolder under a hash of the file patterns only, so a rewritten folder would load stale rows;
without it the splits are inferred from the folder names and the cache follows the files.
Deterministic: the same seed writes the same bytes.

`write_models` writes the tiny setting's "pretrained" networks, the offline stand-ins for AlexNet and DINO:
`models/resnet-weak` and `models/resnet-strong`, two transformers ResNets (a small and a larger one) trained
with ground truth on the `train` split, which the probes of vision_w2s.py never see. They load with
`from_pretrained` like any hub model; `--preset tiny` names them.
"""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

# the two networks of --preset tiny: transformers ResNet configs, weak = 2 stages, strong = 3 stages
MODELS = {
    "resnet-weak": dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
    "resnet-strong": dict(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic"),
}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

CLASSES = ["disc", "square", "ring", "frame", "plus", "cross", "stripes", "checker"]
SIZE = 32
N_PER_SPLIT = {"train": 1500, "test": 2000}


def _shape_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """Soft mask in [0, 1] of one class instance, anti-aliased by a 1-pixel ramp."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cx, cy = SIZE / 2 + rng.uniform(-6, 6, size=2)
    r = rng.uniform(4.0, 10.0)  # small shapes are the hard ones
    a = rng.uniform(-0.35, 0.35)  # rotation jitter (radians, about 20 degrees)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    thick = rng.uniform(1.2, 2.2)
    if name == "disc":
        d = np.hypot(u, v) - r
    elif name == "square":  # a slightly rounded square: close to a disc when small
        q = np.maximum(np.abs(np.stack([u, v])) - 0.8 * r, 0)
        d = np.hypot(q[0], q[1]) - 0.2 * r
    elif name == "ring":
        d = np.abs(np.hypot(u, v) - r) - thick / 2
    elif name == "frame":
        d = np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.85 * r) - thick / 2
    elif name in ("plus", "cross"):
        if name == "cross":
            u, v = (u + v) / np.sqrt(2), (v - u) / np.sqrt(2)
        bar = lambda p, q: np.maximum(np.abs(p) - thick / 2, np.abs(q) - r)
        d = np.minimum(bar(u, v), bar(v, u))
    elif name == "stripes":  # stripes at any angle, limited to a disc-shaped patch
        period = rng.uniform(3.5, 6.0)
        d = np.maximum(np.abs((u % period) - period / 2) - period / 4, np.hypot(u, v) - r - 2)
    elif name == "checker":
        cell = rng.uniform(2.0, 3.5)
        s = np.sign(np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell))
        d = np.maximum(-s * 0.5, np.hypot(u, v) - r - 2)
    else:
        raise ValueError(name)
    return np.clip(0.5 - d, 0.0, 1.0)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random foreground / background pair with enough contrast to see the shape."""
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if np.abs(fg - bg).mean() > 60:
            return fg, bg


def make_image(label: int, rng: np.random.Generator) -> Image.Image:
    mask = _shape_mask(CLASSES[label], rng)[..., None]
    fg, bg = _colours(rng)
    ramp = np.linspace(-1, 1, SIZE, dtype=np.float32)
    shade = rng.uniform(-25, 25) * ramp[None, :, None] + rng.uniform(-25, 25) * ramp[:, None, None]
    img = mask * fg + (1 - mask) * bg + shade + rng.normal(0, 14, size=(SIZE, SIZE, 3))
    img = np.round(np.clip(img, 0, 255) / 12) * 12  # coarse levels keep the PNGs small
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def write(out_dir: Path, seed: int) -> None:
    """Write train/ and test/ imagefolder splits (classes balanced, order shuffled) and a README."""
    out_dir = Path(out_dir)
    for split, n in N_PER_SPLIT.items():
        rng = np.random.default_rng([seed, sum(map(ord, split))])  # one stream per split
        labels = rng.permutation(np.arange(n) % len(CLASSES))
        for c in CLASSES:
            (out_dir / split / c).mkdir(parents=True, exist_ok=True)
        for i, y in enumerate(labels):
            (out_dir / split / CLASSES[y] / f"{i:05d}.png").write_bytes(_png(make_image(int(y), rng)))
    yaml = ["---", "pretty_name: tiny procedural images", "task_categories:", "- image-classification"]
    about = (f"Tiny procedural images (tiny/images.py): {SIZE}x{SIZE} RGB, classes {', '.join(CLASSES)}; "
             f"splits {', '.join(f'{s} ({n})' for s, n in N_PER_SPLIT.items())}.")
    (out_dir / "README.md").write_text("\n".join(yaml + ["---", "", about, ""]))


def write_models(out: Path, seed: int, epochs: int = 15, batch_size: int = 64, lr: float = 3e-3,
                 images: Path | None = None) -> None:
    """Write out/models/resnet-weak and resnet-strong (safetensors): each initialised from its config with `seed`,
    then trained on the `train` split of `images` (default out/images, written with `seed` if absent): AdamW, 10%
    warm-up, cosine, `epochs` epochs."""
    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForImageClassification, get_scheduler, set_seed

    out = Path(out)
    images = Path(images or out / "images")
    if not (images / "README.md").exists():
        write(images, seed)
    ds = load_dataset(str(images), split="train")
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    # the published preprocessing at 32x32 (no resize, no crop): ToTensor + Normalize, one image at a time
    pixels = [(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
              for im in ds["image"]]
    labels = torch.as_tensor(np.asarray(ds["label"], dtype=np.int64))
    n_classes = ds.features["label"].num_classes
    for name, overrides in MODELS.items():
        set_seed(seed)  # seeded init, then the shuffled order: the same seed gives the same weights
        model = AutoModelForImageClassification.from_config(AutoConfig.for_model("resnet", num_labels=n_classes,
                                                                                 **overrides))
        loader = torch.utils.data.DataLoader(list(range(len(ds))), batch_size=batch_size, shuffle=True,
                                             collate_fn=torch.tensor)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        n_steps = max(1, epochs * len(loader))
        scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(0.1 * n_steps), num_training_steps=n_steps)
        model.train()
        for _ in range(epochs):
            correct = 0
            for idx in loader:
                output = model(pixel_values=torch.stack([pixels[i] for i in idx]), labels=labels[idx])
                output.loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                correct += int((output.logits.argmax(-1) == labels[idx]).sum())
        model.save_pretrained(out / "models" / name)  # safetensors
        stats = {"split": "train", "epochs": epochs, "train_acc": correct / len(ds) if epochs else None}
        (out / "models" / name / "pretrain_stats.json").write_text(json.dumps(stats))
