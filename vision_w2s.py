"""Weak-to-strong generalization on images (AlexNet -> DINO on ImageNet), in one file.

Burns et al. 2023, "Weak-to-Strong Generalization: Eliciting Strong Capabilities With Weak Supervision"
(arXiv:2312.09390), the ImageNet experiment; official code: openai/weak-to-strong, folder vision/
(run_weak_strong.py, models.py, data.py). One run does:

    1. data           <- one labelled image split (ImageNet validation, 50k), published preprocessing
                         (resize 256, center crop 224, ImageNet mean/std), seeded shuffle: n_train / rest test
    2. weak labels    <- q_i = softmax(weak head(x_i)): the weak supervisor's own head (AlexNet's ImageNet
                         head); for classes that are not its head's, a linear probe trained with ground truth
                         on the weak model's embeddings of another split (--weak_head_split)
    3. embeddings     <- h_i = the frozen strong body's features (DINO ViT-B/8 CLS token, or ResNet-50 pooled),
                         once per model, preprocessing and split, cached as safetensors under --cache_dir
    4. strong ceiling <- a linear probe p_i = softmax(W h_i + b) trained with the ground truth (one-hot y_i)
    5. weak-to-strong <- the same probe (same init, same batches) trained with the weak soft labels q_i
    report: test accuracy of the weak labels, the ceiling and the student, student-teacher agreement, and
        PGR = (acc_w2s - acc_weak) / (acc_ceiling - acc_weak)             (performance gap recovered, section 3)

Probe losses (weak_to_strong/loss.py), over a probe batch B, with s = steps done / total steps:
    xent:     L = -1/|B| sum_i sum_k t_ik log p_ik,  t = q (student) or one-hot y (ceiling)
    logconf:  the same with t_i = (1 - c) q_i + c * hard(p_i), c = aux_coef * (s if s <= warmup_frac else 1);
              hard(p_i) is detached: with 2 classes p_i0 thresholded at the batch quantile of p_0 that matches
              the weak labels' class balance (official), with more classes the one-hot argmax.
Normaliser: the mean over the |B| images of the batch, which is the whole optimizer step (one process, no gradient
accumulation; the last batch of an epoch holds the remainder), as is the logconf quantile. The probe has no dropout.

Settings: YAML files of Args fields citing their sources, flags given after --config win; published:
recipes/vision/; offline: recipes/tiny/vision_w2s.yaml (--preset tiny; its commands and measured results):
    accelerate launch vision_w2s.py --config recipes/vision/vision_w2s-imagenet-alexnet-to-dino-vitb8.yaml
Other labelled image sets: weak labels from a ground-truth probe on the weak model's embeddings, e.g.
    accelerate launch vision_w2s.py --dataset uoft-cs/cifar10 --image_column img --split test \
        --n_train 8000 --weak_head_split train --probe_epochs 20
"""

import argparse
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, fields
from difflib import get_close_matches
from functools import partial
from pathlib import Path
from typing import Literal, NoReturn

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import tyro
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from huggingface_hub import constants as hub_constants
from datasets import ClassLabel, Image as ImageFeature, load_dataset, load_from_disk
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 0
    """seed of the train/test shuffle and of the probes (rank r seeds torch with seed + r)"""
    preset: Literal["paper", "tiny"] = "paper"
    """paper: the defaults; tiny: short for --config recipes/tiny/vision_w2s.yaml (the offline setting)"""
    config: str | None = None
    """YAML file of Args fields (the papers' settings are in recipes/); flags given on the command line override it"""
    config_sha256: tyro.conf.Suppress[str | None] = None  # set after parsing; recorded in results.json
    output_dir: str = "output/vision_w2s"
    """results.json and results.png go here"""
    overwrite_output_dir: bool = False
    """replace the results.json and results.png an earlier run wrote in output_dir (other files are kept)"""
    cache_dir: str = "output/vision_w2s_cache"
    """embeddings and weak labels (safetensors), keyed by model, preprocessing and data"""
    track: bool = False
    """log to Weights and Biases"""
    wandb_project_name: str = "weak_to_strong"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""

    # data
    dataset: str = "ILSVRC/imagenet-1k"
    """hub id or local folder of a labelled image dataset (imagefolder, hub-style repo, or save_to_disk folder)"""
    split: str = "validation"
    """split the experiment runs on (published: ImageNet validation, 50k images)"""
    image_column: str = "image"
    """column holding the images"""
    label_column: str = "label"
    """column holding the integer class ids"""
    n_train: int = 40000
    """images of the shuffled split the probes train on; the rest is the test part (published 40k / 10k)"""
    n_classes: int | None = None
    """probe head size; default: the weak model's own head (1000 for AlexNet), else the dataset's class count"""
    preprocessing: Literal["published", "processor"] = "published"
    """published: resize, center crop, ImageNet mean/std for all models (data.py); processor: AutoImageProcessor"""
    resize: int = 256
    """published preprocessing: shorter side resized to this (bilinear)"""
    crop: int = 224
    """published preprocessing: center crop size"""
    embed_batch_size: int = 128
    """images per forward pass per device during extraction (official batch_size)"""
    num_workers: int = 4
    """data loader processes decoding images"""

    # models: pretrained, frozen
    trust_remote_code: bool = False
    """allow models whose code comes from outside transformers (torch.hub DINO ResNet-50 runs its repo's code)"""
    weak_model: str = "alexnet"
    """alexnet (torchvision), a transformers image classifier (hub id / folder), or a body + --weak_head_split"""
    weak_head_split: str | None = None
    """split of a ground-truth probe on the weak model's embeddings (its softmax: the weak labels); None: own head"""
    strong_model: str = "facebook/dino-vitb8"
    """frozen strong body: a transformers hub id / folder, or dino_resnet50, dino_vitb8, ... (torch.hub)"""

    # probe (vision/run_weak_strong.py train_logreg)
    probe_epochs: int = 5
    """published: 5 for DINO ViT-B/8, 20 for DINO ResNet-50"""
    probe_lr: float = 1e-3
    """Adam lr of the linear probes"""
    probe_batch_size: int = 100
    """batch of the linear probes (one optimizer step; no accumulation)"""
    probe_weight_decay: float = 0.0
    """Adam weight decay of the linear probes"""
    lr_schedule: Literal["official", "cosine"] = "official"
    """official: CosineAnnealingLR(T_max=probe_epochs) stepped per iteration (the lr cycles); cosine: one decay to 0"""

    # algorithm
    loss: Literal["xent", "logconf"] = "xent"
    """weak-to-strong loss on the weak soft labels"""
    logconf_aux_coef: float = 0.5
    """logconf: weight of the student's hardened prediction in the target, in [0, 1]"""
    logconf_warmup_frac: float = 0.1
    """logconf: fraction of training during which that weight ramps up, in [0, 1]"""

    # filled in at runtime
    run_name: tyro.conf.Suppress[str] = ""
    """name of the wandb run; also the run id in results.json"""


IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
TORCH_HUB_DINO = ("dino_resnet50", "dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8")


# --------------------------------------------------------------------------------------------
# arguments: --config or --preset, validation before anything is loaded or written, user errors
def fail(message: str) -> NoReturn:
    """A user error: one message saying what is wrong and how to fix it, exit code 2, nothing written."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_config(path: str) -> list[str]:
    """The flags a YAML file of Args fields stands for: tyro checks them as typed; flags given after them win."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        fail(f"--config {path}: cannot be read as YAML ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(config, dict):
        fail(f"--config {path} is not a mapping of Args fields: write one `field: value` per line")
    keys = [f.name for f in fields(Args) if f.name not in ("preset", "config") and "Suppress" not in str(f.type)]
    flags = ["--config", path]
    for key, value in config.items():
        if key not in keys:
            fail(f"--config {path}: unknown key {key!r} (did you mean {get_close_matches(str(key), keys, 1, 0)[0]!r}?)")
        flags += ([f"--{key}" if value else f"--no_{key}"] if isinstance(value, bool) else
                  [f"--{key}", *map(str, value if isinstance(value, list) else [value])])
    return flags


def parse_args() -> Args:
    """`--config FILE` (or --preset tiny: recipes/tiny/vision_w2s.yaml), then the flags given, which win."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--preset", "--config"):
        pre.add_argument(flag)
    given = pre.parse_known_args()[0]
    if given.preset not in (None, "paper", "tiny"):
        fail(f"unknown --preset {given.preset!r}; choose one of paper, tiny")
    if given.config and given.preset:
        fail("pass one of --config and --preset (--preset tiny is recipes/tiny/vision_w2s.yaml)")
    path = given.config or (given.preset == "tiny" and f"{Path(__file__).parent}/recipes/tiny/vision_w2s.yaml")
    args = tyro.cli(Args, args=(read_config(path) if path else []) + sys.argv[1:], use_underscores=True)
    args.config_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else None
    validate(args)
    return args


def validate(args: Args) -> None:
    """Every check that needs no data and no model, so that a wrong argument costs seconds, not a pre-pass."""
    checks = [(name, lambda v: v > 0, "must be positive") for name in (
        "n_train", "resize", "crop", "embed_batch_size", "probe_epochs", "probe_batch_size")]
    checks += [(name, lambda v: v >= 0, "must be non-negative")  # `not v >= 0` also catches nan
               for name in ("num_workers", "probe_lr", "probe_weight_decay")]
    checks += [(name, lambda v: 0 <= v <= 1, "must be in [0, 1]")
               for name in ("logconf_aux_coef", "logconf_warmup_frac")]
    for name, ok, rule in checks:
        if not ok(getattr(args, name)):
            fail(f"--{name} {rule} (got {getattr(args, name)})")
    if args.n_classes is not None and args.n_classes < 2:
        fail(f"--n_classes must be at least 2 (got {args.n_classes}); drop it to use the weak head's or the data's")
    if args.crop > args.resize:
        fail(f"--crop {args.crop} is larger than --resize {args.resize}: the center crop must fit in the resized image")
    for side, model in (("weak", args.weak_model), ("strong", args.strong_model)):
        if model in TORCH_HUB_DINO and not args.trust_remote_code:
            fail(f"--{side}_model {model} comes from torch.hub, which runs the code of "
                 "github.com/facebookresearch/dino; pass --trust_remote_code to allow it, or use facebook/dino-vitb8 "
                 "(transformers)")
    if args.weak_head_split is None and args.weak_model in TORCH_HUB_DINO:
        fail(f"{args.weak_model} has no classification head to give weak labels: pass --weak_head_split <split>")
    if args.weak_head_split == args.split:
        fail(f"--weak_head_split must differ from --split {args.split!r}: the experiment split's labels would leak")
    needs_torchvision = sorted({args.weak_model, args.strong_model} & {"alexnet", *TORCH_HUB_DINO})
    if args.preprocessing == "processor" and needs_torchvision:
        fail("--preprocessing processor needs transformers hub models on both sides; use --preprocessing published")
    if needs_torchvision and importlib.util.find_spec("torchvision") is None:
        fail(f"torchvision is not installed, and {' and '.join(needs_torchvision)} needs it: install the torchvision "
             "build matching your torch, or name transformers models (--weak_model, --strong_model), or --preset tiny")
    out, cache = Path(args.output_dir), Path(args.cache_dir)
    if out.resolve() == cache.resolve():
        fail(f"--output_dir and --cache_dir are the same folder {out}: pass two folders")
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} is a file, not a folder: pass another --output_dir")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        held = sorted(f.name for f in out.iterdir())
        fail(f"output_dir {out} already holds files ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); pass "
             "--overwrite_output_dir to replace them, or another --output_dir")
    # with HF_HUB_OFFLINE unset and a hub id (not a local path): one 3-second connect to the hub, so that no
    # network is reported at once instead of after a minute of retries
    remote = [name for name in (args.dataset, args.weak_model, args.strong_model) if name.count("/") <= 1
              and name not in ("alexnet", *TORCH_HUB_DINO) and not os.path.exists(name)]
    if not remote or hub_constants.HF_HUB_OFFLINE:
        return
    try:
        httpx.head(hub_constants.ENDPOINT, timeout=3)
    except httpx.TransportError:
        fail(f"no network: cannot reach the Hugging Face Hub for {remote[0]!r}. Set HF_HUB_OFFLINE=1 to use the "
             "local cache, or pass a local path.")


# --------------------------------------------------------------------------------------------
# data: decoding (unreadable images are flagged, never fatal) and the published preprocessing
def decode(image: dict) -> Image.Image | None:
    """An RGB PIL image from a `datasets` Image(decode=False) cell, or None when the file is unreadable."""
    try:
        with Image.open(io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]) as im:
            return im.convert("RGB")  # convert() forces the full decode: truncated files fail here
    except (OSError, SyntaxError, ValueError):  # what PIL raises on corrupt, truncated or empty files
        return None


def published_transform(im: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """torchvision Resize(resize) + CenterCrop(crop) + ToTensor + Normalize(ImageNet) (vision/data.py),
    written with PIL and torch so that no torchvision is needed."""
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if short != resize:
        new_long = int(resize * long / short)  # torchvision's rounding
        im = im.resize((resize, new_long) if w <= h else (new_long, resize), Image.BILINEAR)
    w, h = im.size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0)
    return (x.permute(2, 0, 1) - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def collate(idx: list[int], ds, image_column: str, preprocess) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row ids, readable mask, pixel values of the readable rows only)."""
    ims = [decode(x) for x in ds[list(idx)][image_column]]
    good = [im for im in ims if im is not None]
    ok = torch.tensor([im is not None for im in ims], dtype=torch.bool)
    return torch.tensor(idx), ok, preprocess(good) if good else torch.zeros(0, 3, 1, 1)


def load_split(args: Args, split: str, flag: str):
    """One split, images undecoded (a corrupt one is counted, not fatal); a bad split or column: a clear error."""
    source = args.dataset
    empty = f"split {split!r} (--{flag}) of {source} holds no images: add images, or pass another --{flag}"
    if not os.path.exists(source) and (os.path.isabs(source) or source.startswith(".") or source.count("/") != 1):
        hint = "; `python -m tiny --out data/tiny` writes the tiny image set" if "tiny" in source else ""
        fail(f"--dataset {source}: no such folder, and not a hub id (owner/name){hint}")
    try:
        if os.path.exists(os.path.join(source, "dataset_dict.json")):  # a save_to_disk folder
            saved = load_from_disk(source)
            if split not in saved:
                fail(f"--{flag} {split!r}: {source} has the splits {sorted(saved)}; pass one of them")
            ds = saved[split]
        else:
            ds = load_dataset(source, split=split)
    except Exception as e:  # datasets raises many types here (FileNotFoundError, ValueError, DatasetNotFoundError...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "corresponds to no data" in reason:  # what datasets says about an empty split
            fail(empty)
        fix = (f"pass --{flag} with one of its splits" if "split" in reason.lower() else
               "check that it is an image folder (SPLIT/CLASS/IMAGE files), a save_to_disk folder, or a cached hub id")
        fail(f"could not load split {split!r} (--{flag}) of --dataset {source}: {type(e).__name__}: {reason}; {fix}")
    for col in (args.image_column, args.label_column):
        if col not in ds.column_names:
            fail(f"{source} split {split!r} has no column {col!r} (columns: {ds.column_names}): "
                 f"set --image_column / --label_column")
    if len(ds) == 0:
        fail(empty)
    return ds.cast_column(args.image_column, ImageFeature(decode=False))


def row_name(ds, image_column: str, i: int) -> str:
    """"row i (its image file)", in the dataset's own order (before any shuffle)."""
    path = ds[i][image_column]["path"]
    return f"row {i} ({path})" if path else f"row {i}"


def pretrained(loader, name: str):
    """`loader.from_pretrained(name)`, with a model that cannot be loaded reported by its name and the fix."""
    try:
        return loader.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "a local folder" if os.path.exists(name) else "no such local folder and not a cached hub id"
        tiny = " (python -m tiny --out data/tiny --models vision writes it)" if "/models/resnet-" in name else ""
        fail(f"could not load model {name!r} ({where}): {reason}; pass a folder holding config.json and weights, or "
             f"a hub id (with network, or cached when HF_HUB_OFFLINE=1){tiny}")


def load_data(args: Args) -> tuple[dict, dict, int]:
    """Every split the run needs, their labels (int64) and the probe's class count; a missing or non-integer label,
    or one outside the head, is an error naming its row and file, here, before any model runs."""
    flags = {args.split: "split"}
    if args.weak_head_split is not None:
        flags[args.weak_head_split] = "weak_head_split"
    data, labels = {split: load_split(args, split, flag) for split, flag in flags.items()}, {}
    is_id = lambda v: isinstance(v, (int, np.integer, float)) and not isinstance(v, bool) and float(v).is_integer()
    for split, ds in data.items():
        values = ds[args.label_column]
        bad = next((i for i, v in enumerate(values) if not is_id(v)), None)
        if bad is not None:
            fail(f"label {values[bad]!r} of {row_name(ds, args.image_column, bad)} in split {split!r} of "
                 f"{args.dataset} is not an integer class id: fix that row, or set --label_column to one of class ids")
        labels[split] = np.asarray(values, dtype=np.int64)
    feature = data[args.split].features[args.label_column]
    ds_classes = (feature.num_classes if isinstance(feature, ClassLabel)
                  else int(max(y.max() for y in labels.values())) + 1)
    # every transformers model loads its config here: a wrong path is reported before any model runs or cache is written
    configs = {m: pretrained(AutoConfig, m) for m in (args.weak_model, args.strong_model)
               if m not in ("alexnet", *TORCH_HUB_DINO)}
    head = None  # size of the weak model's own head, when it gives the weak labels
    if args.weak_head_split is None and args.weak_model == "alexnet":
        head = 1000
    elif args.weak_head_split is None:
        config = configs[args.weak_model]
        if not any(a.endswith("ForImageClassification") for a in config.architectures or []):
            fail(f"{args.weak_model} is not an image classifier ({config.architectures}): its head would be random; "
                 f"pass --weak_head_split <split> to train a probe on its embeddings")
        head = config.num_labels
    n_classes = args.n_classes or head or ds_classes
    if head is not None and n_classes != head:
        fail(f"--n_classes {n_classes} differs from the {head} classes of {args.weak_model}'s own head: drop "
             f"--n_classes, or pass --weak_head_split <split> to train a weak probe with {n_classes} classes")
    for split, y in labels.items():
        outside = int(((y < 0) | (y >= n_classes)).sum())
        if outside == 0:
            continue
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        where = (f"in split {split!r} (column {args.label_column!r}) of {args.dataset} (first at "
                 f"{row_name(data[split], args.image_column, int(np.argmax(y == bad)))}; {outside} rows outside)")
        if bad < 0:
            fail(f"label id {bad} {where} is negative: an unlabelled split (ImageNet's test split has -1) cannot be "
                 f"used; pass a labelled --{flags[split]}")
        fail(f"label id {bad} {where} is beyond the head size {n_classes} (ids must be in [0, {n_classes})): the weak "
             f"model's own head or --n_classes sets it; pass --n_classes {bad + 1}, or --weak_head_split for classes "
             f"that are not the head's")
    if args.n_train >= len(labels[args.split]):
        fail(f"--n_train {args.n_train} leaves no test images in split {args.split!r} ({len(labels[args.split])} "
             f"images): pass a smaller --n_train")
    return data, labels, n_classes


# --------------------------------------------------------------------------------------------
# models: every model is reduced to a frozen function pixel_values -> embeddings or class probabilities
def pooled(out, model_type: str) -> torch.Tensor:
    """Embedding of a transformers vision body: a ViT's final CLS token (DINO's embedding; the ViT pooler is an
    untrained dense layer in DINO checkpoints), else the body's pooled output (ResNet, ConvNeXt, Swin, DINOv2)."""
    if model_type in ("vit", "deit", "vit_msn") or getattr(out, "pooler_output", None) is None:
        return out.last_hidden_state[:, 0]
    return out.pooler_output.flatten(1)


def load_model(name: str, want: Literal["probs", "emb"], accelerator: Accelerator):
    """A frozen function pixel_values -> class probabilities (its own head) or embeddings."""
    if name == "alexnet":
        import torchvision  # lazily: only the published weak model needs it (validate() checked it is there)

        model = torchvision.models.alexnet(weights="IMAGENET1K_V1")  # models.py: alexnet(pretrained=True)
        # ALGO LOGIC: the embedding is the input of AlexNet's classifier (models.py: HeadAndEmbedding)
        fn = ((lambda px: model(px).softmax(-1)) if want == "probs"
              else (lambda px: model.avgpool(model.features(px)).flatten(1)))
    elif name in TORCH_HUB_DINO:
        model = torch.hub.load("facebookresearch/dino:main", name, trust_repo=True)  # its hubconf imports torchvision
        fn = model
    else:  # a transformers hub id or local folder
        model = pretrained(AutoModelForImageClassification if want == "probs" else AutoModel, name)
        fn = (lambda px: model(pixel_values=px).logits.softmax(-1)) if want == "probs" else \
            (lambda px: pooled(model(pixel_values=px), model.config.model_type))
    model.eval().requires_grad_(False).to(accelerator.device)
    return fn


@torch.no_grad()
def extract(fn, ds, preprocess, args: Args, accelerator: Accelerator, desc: str) -> dict[str, torch.Tensor]:
    """fn over every image of ds, sharded over the processes and gathered; unreadable rows: zeros, ok=False."""
    dim = fn(preprocess([Image.new("RGB", (args.crop, args.crop))]).to(accelerator.device)).shape[1]
    loader = DataLoader(list(range(len(ds))), batch_size=args.embed_batch_size, num_workers=args.num_workers,
                        collate_fn=partial(collate, ds=ds, image_column=args.image_column, preprocess=preprocess))
    loader = accelerator.prepare(loader)
    out, ok_all = torch.zeros(len(ds), dim), torch.zeros(len(ds), dtype=torch.bool)
    start = time.time()
    for idx, ok, px in tqdm(loader, desc=desc, disable=not accelerator.is_main_process):
        values = torch.zeros(len(idx), dim, device=accelerator.device)
        if len(px):
            with accelerator.autocast():
                values[ok] = fn(px).float()
        # TRY NOT TO MODIFY: gather_for_metrics drops the samples that pad the last batch of the last ranks
        idx, ok, values = accelerator.gather_for_metrics((idx, ok.to(torch.uint8), values))
        out[idx.cpu()], ok_all[idx.cpu()] = values.cpu(), ok.cpu().bool()
    accelerator.print(f"{desc}: {len(ds)} images in {time.time() - start:.1f}s, "
                      f"{int((~ok_all).sum())} unreadable skipped")
    return {"values": out, "ok": ok_all}


def cached(key: dict, name: str, compute, args: Args, accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Load tensors stored under a hash of `key`, or compute them once and store them (safetensors)."""
    key_json = json.dumps(key, sort_keys=True, default=str)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    path = Path(args.cache_dir) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{digest}.safetensors"
    if path.exists():
        accelerator.print(f"reusing cached {name} {path}")
        return load_file(path)
    tensors = compute()
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path) + ".tmp", metadata={"key": key_json})
        os.replace(str(path) + ".tmp", path)  # atomic: a killed run never leaves a half-written cache entry
    accelerator.wait_for_everyone()
    return tensors


# --------------------------------------------------------------------------------------------
# the probe losses (openai/weak-to-strong weak_to_strong/loss.py); `labels` are class probabilities (weak soft
# labels, or one-hot ground truth); `step_frac` = steps done / total steps; both average over the batch they get
def xent_loss(logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
    """Cross-entropy against the (soft) labels (run_weak_strong.py: CrossEntropyLoss on soft targets)."""
    return F.cross_entropy(logits.float(), labels.float())  # ALGO LOGIC: -1/|B| sum_i sum_k t_ik log p_ik


def logconf_loss(logits, labels, step_frac, aux_coef: float = 0.5, warmup_frac: float = 0.1) -> torch.Tensor:
    """Auxiliary confidence loss (loss.py: logconf_loss_fn): target = (1 - c) * weak + c * the student's hardened
    prediction (two classes: at the batch quantile of p(0), official; more classes: the one-hot argmax)."""
    logits, labels = logits.float(), labels.float()
    coef = aux_coef * (1.0 if step_frac > warmup_frac else step_frac)  # ALGO LOGIC: the official ramp of c
    preds = torch.softmax(logits, dim=-1)
    if logits.shape[1] == 2:
        # ALGO LOGIC: the quantile is over this whole batch, which is the whole optimizer-step batch (no accumulation)
        threshold = torch.quantile(preds[:, 0], labels.mean(dim=0)[1])
        hard = torch.stack([preds[:, 0] >= threshold, preds[:, 0] < threshold], dim=1).float()
    else:
        hard = F.one_hot(preds.argmax(-1), logits.shape[1]).float()
    return F.cross_entropy(logits, labels * (1 - coef) + hard.detach() * coef)  # ALGO LOGIC: t = (1-c) q + c hard(p)


def train_probe(x: torch.Tensor, targets: torch.Tensor, evals: dict, loss_fn, args: Args, n_classes: int, desc: str):
    """Linear probe (run_weak_strong.py train_logreg): Linear(d, n_classes), Adam, batch 100, cosine
    schedule stepped per iteration; evaluated after every epoch. Returns (probe, {eval: [acc per epoch]})."""
    torch.manual_seed(args.seed)  # the same init and data order for the ceiling and the student
    probe = torch.nn.Linear(x.shape[1], n_classes).to(x.device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=args.probe_lr, weight_decay=args.probe_weight_decay)
    n_steps = args.probe_epochs * math.ceil(len(x) / args.probe_batch_size)
    # the official T_max is the epoch count while the scheduler steps per iteration (the lr cycles)
    t_max = args.probe_epochs if args.lr_schedule == "official" else n_steps
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    curves, step = {k: [] for k in evals}, 0
    for _ in tqdm(range(args.probe_epochs), desc=desc):  # probes run on the main process only
        for b in torch.randperm(len(x)).split(args.probe_batch_size):
            # ALGO LOGIC: the probe loss on one batch = one optimizer step (xent or logconf, header)
            loss = loss_fn(probe(x[b]), targets[b], step / n_steps)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
        with torch.no_grad():
            for k, (xe, ye) in evals.items():
                curves[k].append((probe(xe).argmax(-1) == ye).float().mean().item())
    return probe, curves


def plot(res: dict, path: Path, title: str) -> None:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["weak", f"w2s ({res['loss']})", "strong ceiling"]
    accs = [res["weak_acc"], res["w2s_acc"], res["strong_ceiling_acc"]]
    bars = ax.bar(names, accs, color=["tab:gray", "tab:orange", "tab:blue"])
    pgr = "undefined (strong <= weak)" if res["pgr"] is None else f"{res['pgr']:.2f}"
    ax.text(bars[1].get_x() + bars[1].get_width() / 2, accs[1] + 0.005, f"PGR {pgr}", ha="center", va="bottom")
    ax.set_ylim(max(0.0, min(accs) - 0.1), min(1.0, max(accs) + 0.05))
    ax.set_ylabel("test accuracy")
    epochs = range(1, len(res["curves"]["ceiling"]) + 1)
    ax2.plot(epochs, res["curves"]["ceiling"], label="strong ceiling", color="tab:blue")
    ax2.plot(epochs, res["curves"]["w2s"], label="weak-to-strong", color="tab:orange")
    ax2.plot(epochs, res["curves"]["w2s_agreement"], label="w2s agreement with weak", color="tab:orange", ls="--")
    ax2.axhline(res["weak_acc"], label="weak", color="tab:gray")
    ax2.set_xlabel("probe epoch")
    ax2.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    args = parse_args()  # --config or --preset, then every check that needs no data or model (exit 2, nothing written)
    own_head = args.weak_head_split is None  # published: AlexNet's own ImageNet head gives the weak labels

    # TRY NOT TO MODIFY: setup
    accelerator = Accelerator()
    set_seed(args.seed, device_specific=True)  # per-rank seeding: rank r uses seed + r
    args.run_name = f"{args.exp_name}__{Path(args.dataset).name}__{args.seed}__{int(time.time())}"

    # 1. data: every split needed, labels checked against the head size before any model runs
    data, labels, n_classes = load_data(args)
    accelerator.print(f"{args.dataset}: " + ", ".join(f"{s} {len(d)} images" for s, d in data.items())
                      + f"; {n_classes} classes")
    tracker = None
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, config=vars(args),
                   save_code=True)
        tracker = wandb

    def preprocess_for(name):
        if args.preprocessing == "processor":
            proc = pretrained(AutoImageProcessor, name)
            return (lambda ims: proc(images=ims, return_tensors="pt")["pixel_values"]), {"processor": proc.to_dict()}
        fn = lambda ims: torch.stack([published_transform(im, args.resize, args.crop) for im in ims])
        return fn, {"resize": args.resize, "crop": args.crop, "mean": IMAGENET_MEAN.tolist(),
                    "std": IMAGENET_STD.tolist()}

    def features(side, want, split):
        """Cached {values, ok} of one model on one split: its own head's probabilities or its embeddings."""
        name, ds = getattr(args, f"{side}_model"), data[split]
        preprocess, prep_key = preprocess_for(name)
        # a local folder's weight files are part of the key: rewritten weights are never served from the cache
        weights = sorted(Path(name).glob("*.safetensors")) if os.path.isdir(name) else []
        key = {"model": name, "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights],
               "want": want, "preprocessing": prep_key, "dataset": args.dataset, "split": split,
               "fingerprint": ds._fingerprint, "rows": len(ds), "image_column": args.image_column}
        compute = lambda: extract(load_model(name, want, accelerator), ds, preprocess, args, accelerator,
                                  f"{side} {want} on {split}")
        return cached(key, f"{name}__{Path(args.dataset).name}__{split}__{want}", compute, args, accelerator)

    # ALGO LOGIC: 2. weak labels = softmax of the weak model's own head (run_weak_strong.py get_embeddings: AlexNet's
    # ImageNet logits), or of a ground-truth probe on its embeddings when the classes are not its head's
    if own_head:
        weak = features("weak", "probs", args.split)
    else:
        head_feats, weak_emb = features("weak", "emb", args.weak_head_split), features("weak", "emb", args.split)
    # 3. strong embeddings: the frozen body's features (DINO: CLS token / pooled ResNet output)
    strong = features("strong", "emb", args.split)
    if not accelerator.is_main_process:  # extraction is distributed; probes are seconds of work on one device
        accelerator.wait_for_everyone()
        raise SystemExit(0)

    device = accelerator.device
    if not own_head:
        # ALGO LOGIC: weak labels for classes that are not the weak model's own: a probe trained with ground truth
        hk = head_feats["ok"]
        y_head = torch.as_tensor(labels[args.weak_head_split])[hk].to(device)
        weak_probe, _ = train_probe(head_feats["values"][hk].to(device), F.one_hot(y_head, n_classes).float(), {},
                                    xent_loss, args, n_classes, "weak head probe (ground truth)")
        with torch.no_grad():
            weak = {"values": weak_probe(weak_emb["values"].to(device)).softmax(-1).cpu(), "ok": weak_emb["ok"]}

    # seeded shuffle, the first n_train rows train the probes (run_weak_strong.py main); unreadable images dropped after
    keep = (weak["ok"] & strong["ok"]).numpy()  # readable images
    order = np.random.default_rng(args.seed).permutation(len(keep))
    order = order[keep[order]]
    train_idx, test_idx = torch.as_tensor(order[: args.n_train]), torch.as_tensor(order[args.n_train :])
    if len(order) == 0:
        fail(f"none of the {len(keep)} images in split {args.split!r} of {args.dataset} is readable (corrupt, "
             "truncated or empty files): replace them, or pass another --split")
    if len(test_idx) == 0:
        fail(f"--n_train {args.n_train} leaves no test images: {len(order)} of {len(keep)} images in split "
             f"{args.split!r} of {args.dataset} are readable; replace the unreadable files or pass a smaller --n_train")
    y, x = torch.as_tensor(labels[args.split]), strong["values"].to(device)
    weak_probs = weak["values"].float()
    weak_hard = weak_probs.argmax(-1)
    evals = {"test": (x[test_idx], y[test_idx].to(device)), "agreement": (x[test_idx], weak_hard[test_idx].to(device))}

    # ALGO LOGIC: 4. strong ceiling: the linear probe trained on ground truth (run_weak_strong.py: results_gt)
    _, ceiling = train_probe(x[train_idx], F.one_hot(y[train_idx], n_classes).float().to(device), evals, xent_loss,
                             args, n_classes, "strong ceiling probe (ground truth)")
    # ALGO LOGIC: 5. weak-to-strong: the same probe trained on the weak soft labels (run_weak_strong.py: results_weak)
    loss_fn = xent_loss if args.loss == "xent" else partial(logconf_loss, aux_coef=args.logconf_aux_coef,
                                                            warmup_frac=args.logconf_warmup_frac)
    _, w2s = train_probe(x[train_idx], weak_probs[train_idx].to(device), evals, loss_fn, args, n_classes,
                         f"weak-to-strong probe ({args.loss})")

    # report: the final epoch's accuracies, as run_weak_strong.py
    weak_acc = (weak_hard[test_idx] == y[test_idx]).float().mean().item()
    ceiling_acc, w2s_acc = ceiling["test"][-1], w2s["test"][-1]
    # ALGO LOGIC: performance gap recovered (Burns et al. 2023, section 3); undefined when strong ceiling <= weak
    pgr = (w2s_acc - weak_acc) / (ceiling_acc - weak_acc) if ceiling_acc > weak_acc else None
    skipped = {args.split: int((~torch.as_tensor(keep)).sum())}  # per split: unreadable images, counted and left out
    if not own_head:
        skipped[args.weak_head_split] = int((~head_feats["ok"]).sum())
    res = {
        "weak_acc": weak_acc, "strong_ceiling_acc": ceiling_acc, "w2s_acc": w2s_acc, "pgr": pgr,
        "agreement": w2s["agreement"][-1], "ceiling_agreement": ceiling["agreement"][-1],
        "weak_acc_all": (weak_hard[keep] == y[keep]).float().mean().item(),  # the official print: the whole split
        "loss": args.loss, "n_train": len(train_idx), "n_test": len(test_idx), "n_classes": n_classes,
        "skipped_images": skipped,
        "curves": {"ceiling": ceiling["test"], "w2s": w2s["test"], "w2s_agreement": w2s["agreement"]},
        "run_id": args.run_name, "args": vars(args),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "results.png", f"{Path(args.dataset).name}: weak {args.weak_model} -> strong {args.strong_model}")
    print("\n" + "=" * 60)
    for k in ("weak_acc", "strong_ceiling_acc", "w2s_acc", "pgr", "agreement"):
        print(f"{k:<22}{'undefined (strong <= weak)' if res[k] is None else f'{res[k]:.4f}'}")
    print(f"skipped unreadable images: {skipped}; wrote {out / 'results.json'} and {out / 'results.png'}")
    if tracker is not None:
        for i in range(args.probe_epochs):
            tracker.log({"probe/ceiling/test_acc": ceiling["test"][i], "probe/w2s/test_acc": w2s["test"][i],
                         "probe/w2s/agreement": w2s["agreement"][i], "probe/epoch": i})
        tracker.summary.update({f"eval/{k}": res[k] for k in ("weak_acc", "strong_ceiling_acc", "w2s_acc", "pgr",
                                                              "agreement")})
        tracker.log({"eval/results": tracker.Image(str(out / "results.png"))})
        tracker.finish()
    accelerator.wait_for_everyone()
