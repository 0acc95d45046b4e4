"""Supervised fine-tuning (SFT) of a causal LM on chat conversations, loss on assistant tokens only.

Step 1 of the WSPO pipeline (Zhu et al., "Weak-to-Strong Preference Optimization", 2025; official
code: the WSPO repo, LLaMA-Factory `stage: sft`): the weak and strong base models are fine-tuned on
UltraChat before alignment. The loss is next-token cross-entropy on the tokens of every assistant
turn, its end-of-turn token included; system and user turns (and the template's glue) are masked.

    L = - (1 / #assistant tokens) * sum_{t in assistant tokens} log p(y_t | y_<t)

Paper-scale run (GPU, hub; the WSPO repo's full fine-tuning setting, see ../shared/REFERENCE.md):
    accelerate launch --config_file configs/zero3.yaml sft.py --model_name_or_path Qwen/Qwen2-7B \
        --output_dir runs/qwen2-7b-sft
    # LoRA: --use_lora --learning_rate 2e-5 --num_train_epochs 3

Offline tiny setting (CPU, no network; a model built from a config):
    python -m tiny --out data/tiny
    python sft.py --preset tiny --output_dir runs/sft-tiny
"""

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import load_dataset, load_from_disk
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_scheduler


@dataclass
class Args:
    # experiment
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (wandb run name prefix)"""
    seed: int = 1
    """seed of the experiment (model init, data order)"""
    output_dir: str = "runs/sft"
    """where the final model, checkpoints and metrics.jsonl go"""
    preset: Literal["tiny"] | None = None
    """named defaults: `tiny` = the offline tiny setting (data/tiny, a model built from a config); flags still override"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project_name: str = "w2s-alignment"
    """the wandb project name"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    push_to_hub: bool = False
    """upload the final model to the Hugging Face Hub (needs a login)"""
    hub_model_id: str | None = None
    """repo id for --push_to_hub (default: the output_dir's name)"""

    # model
    model_name_or_path: str = "Qwen/Qwen2-7B"
    """hub id or local path of the model to fine-tune (ignored with --model_type)"""
    model_type: str | None = None
    """build a fresh model of this type from a config instead of loading weights (e.g. qwen2), as in run_clm.py"""
    config_overrides: str | None = None
    """with --model_type: comma-separated config fields, e.g. "hidden_size=128,num_hidden_layers=4\""""
    tokenizer_name: str | None = None
    """tokenizer hub id or path (default: --model_name_or_path)"""
    trust_remote_code: bool = False
    """allow custom modelling code from the hub (off: only code shipped with transformers runs)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype the weights are loaded in; mixed precision itself comes from the accelerate config"""
    attn_implementation: str = "sdpa"
    """attention kernel: sdpa, eager, flash_attention_2"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""

    # LoRA
    use_lora: bool = False
    """train LoRA adapters (peft) instead of all weights; merged into the saved model"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA scaling alpha"""
    lora_dropout: float = 0.05
    """LoRA dropout"""
    lora_target_modules: str = "all-linear"
    """modules that get adapters: "all-linear" or a comma-separated list of names"""

    # data
    dataset_name: str = "HuggingFaceH4/ultrachat_200k"
    """hub id, local dataset folder, a save_to_disk folder, or a .json/.jsonl/.parquet file"""
    dataset_config: str | None = None
    """dataset config (subset) name"""
    train_split: str = "train_sft"
    """split to train on"""
    eval_split: str | None = "test_sft"
    """split for the eval loss (None: no eval)"""
    messages_column: str = "messages"
    """column with the conversation: a list of {"role", "content"} messages"""
    max_length: int = 4096
    """tokens per conversation; longer ones are cut (counted in the log)"""
    max_train_samples: int | None = None
    """use only the first N training conversations"""
    max_eval_samples: int | None = 1000
    """use only the first N eval conversations"""
    packing: bool = False
    """padding-free batches: each micro-batch is one row of concatenated conversations that cannot attend to each other"""

    # optimization
    learning_rate: float = 2e-6
    """peak learning rate (paper: 2e-6 full, 2e-5 LoRA)"""
    num_train_epochs: int = 2
    """passes over the training data (paper: 2 full, 3 LoRA)"""
    max_steps: int | None = None
    """stop after this many optimizer steps (overrides the epochs)"""
    per_device_train_batch_size: int = 1
    """conversations per micro-batch per process"""
    gradient_accumulation_steps: int = 8
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 8
    """conversations per eval batch per process"""
    lr_scheduler_type: str = "cosine"
    """transformers scheduler name"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # logging and checkpoints
    logging_steps: int = 10
    """log train metrics every N optimizer steps"""
    eval_steps: int | None = None
    """evaluate every N optimizer steps (default: only at the start and end)"""
    save_steps: int | None = None
    """write a resumable checkpoint every N optimizer steps"""
    save_total_limit: int = 2
    """keep only the newest N checkpoints"""
    resume: bool = False
    """resume from the newest checkpoint in output_dir/checkpoints"""

    # filled in at runtime
    world_size: int = 1
    """(runtime) number of processes"""
    global_batch_size: int = 0
    """(runtime) micro batch x accumulation x processes"""


PRESETS = {
    "tiny": Args(
        preset="tiny", output_dir="runs/sft-tiny", dataset_name="data/tiny/ultrachat",
        tokenizer_name="data/tiny/tokenizer", model_type="qwen2",
        config_overrides="hidden_size=128,intermediate_size=384,num_hidden_layers=4,num_attention_heads=4,"
        "num_key_value_heads=2,max_position_embeddings=512,tie_word_embeddings=True",
        max_length=128, learning_rate=3e-3, num_train_epochs=1, per_device_train_batch_size=32,
        gradient_accumulation_steps=1, per_device_eval_batch_size=64, max_eval_samples=400, weight_decay=0.0,
        logging_steps=20,
    ),
}


def parse_args() -> Args:
    """`--preset NAME` picks the defaults; every other flag overrides them."""
    import sys

    argv = sys.argv[1:]
    preset = argv[argv.index("--preset") + 1] if "--preset" in argv[:-1] else None
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; choose from {sorted(PRESETS)}")
    return tyro.cli(Args, default=PRESETS.get(preset, Args()), use_underscores=True)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def load_split(name: str, config: str | None, split: str):
    """Hub id, local dataset folder (README YAML / data files), save_to_disk folder, or one file."""
    if os.path.isfile(name):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(name)[1])
        if kind is None:
            raise SystemExit(f"cannot read dataset file {name!r}: use .json, .jsonl, .parquet or .csv")
        return load_dataset(kind, data_files={split: name}, split=split)
    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
        return load_from_disk(name)[split]
    try:
        return load_dataset(name, config, split=split)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise SystemExit(
            f"could not load split {split!r} of dataset {name!r}: {e}\nWith no network, use a local copy "
            "(python -m tiny --out data/tiny writes the offline tiny setting; then --preset tiny)."
        ) from e


def chat_ids(tokenizer, messages, add_generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def tokenize_conversation(tokenizer, messages, max_length: int) -> dict:
    """input_ids + labels (-100 outside assistant turns) for one conversation, or a skip reason.

    # ALGO LOGIC: each assistant turn's tokens are found by rendering the conversation up to that
    # turn: [ids(messages[:i] + generation prompt), ids(messages[:i+1])) is the turn, from its first
    # content token through the end-of-turn token (the template's trailing newline is not trained).
    """
    if not isinstance(messages, list) or not messages:
        return {"input_ids": [], "labels": [], "skip": "empty conversation"}
    if any(not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str) for m in messages):
        return {"input_ids": [], "labels": [], "skip": "malformed message (needs role and string content)"}
    if not any(m["role"] == "assistant" for m in messages):
        return {"input_ids": [], "labels": [], "skip": "no assistant turn"}
    ids = chat_ids(tokenizer, messages)
    labels = [-100] * len(ids)
    eot = tokenizer.eos_token_id
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(chat_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = chat_ids(tokenizer, messages[: i + 1])
        if ids[: len(upto)] != upto:
            raise SystemExit(
                f"the chat template does not render conversations incrementally (turn {i} of {messages!r}): "
                "the tokens of a conversation prefix are not a prefix of the whole; the assistant-only loss "
                "mask cannot be placed. Use a template that renders earlier turns unchanged."
            )
        end = len(upto)
        if eot in upto[start:end]:  # stop right after the turn's end-of-turn token
            end = start + (end - start) - upto[start:end][::-1].index(eot)
        labels[start:end] = ids[start:end]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels):
        return {"input_ids": [], "labels": [], "skip": "no assistant token within max_length"}
    return {"input_ids": ids, "labels": labels, "skip": "truncated" if truncated else ""}


def prepare_dataset(ds, tokenizer, args: Args, what: str, log) -> object:
    """Tokenize, mask, and drop what cannot be trained on; every drop is counted in the log."""
    if args.messages_column not in ds.column_names:
        raise SystemExit(
            f"the {what} split has no column {args.messages_column!r} (columns: {ds.column_names}); "
            "pass --messages_column with the column that holds the list of {role, content} messages"
        )
    ds = ds.map(
        lambda ex: tokenize_conversation(tokenizer, ex[args.messages_column], args.max_length),
        remove_columns=ds.column_names, desc=f"tokenizing {what}",
    )
    reasons = {r: n for r, n in zip(*np.unique(list(ds["skip"]), return_counts=True)) if r}
    kept = ds.filter(lambda ex: ex["skip"] in ("", "truncated")).remove_columns("skip")
    log(f"{what}: {len(kept)} of {len(ds)} conversations kept; " + (", ".join(f"{n} {r}" for r, n in reasons.items()) or "none skipped or cut"))
    if len(kept) == 0:
        raise SystemExit(f"no usable conversation in the {what} split ({reasons}); check --messages_column and the data")
    return kept


def collate(rows: list[dict], pad_id: int, packing: bool) -> dict:
    """Labels are shifted here (shift_labels[t] = labels[t+1]) so that a sequence's last position
    never predicts the next sequence's first token, padded or packed.

    padded: right padding + attention mask. packed: one row, position_ids restart at 0 for each
    conversation and no attention mask, from which transformers builds a block-diagonal causal mask
    (only with use_cache=False: with a KV cache it silently lets the conversations attend to each other).
    """
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    shift = [torch.tensor(r["labels"][1:] + [-100]) for r in rows]
    if packing:
        return {
            "input_ids": torch.cat(ids)[None],
            "position_ids": torch.cat([torch.arange(len(x)) for x in ids])[None],
            "shift_labels": torch.cat(shift)[None],
        }
    n = max(len(x) for x in ids)
    pad = lambda xs, v: torch.stack([F.pad(x, (0, n - len(x)), value=v) for x in xs])
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([torch.ones_like(x) for x in ids], 0),
        "shift_labels": pad(shift, -100),
    }


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def sft_loss_sum(model, batch: dict, per_sequence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over assistant tokens, and their count (per row if asked).

    # ALGO LOGIC: logits only at the positions that are trained (logits_to_keep = a boolean mask):
    # the lm_head never runs on prompt or padding tokens, so no batch x length x vocab tensor exists.
    """
    mask = batch["shift_labels"] != -100
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"), logits_to_keep=mask, use_cache=False,
    ).logits
    losses = F.cross_entropy(logits.float(), batch["shift_labels"][mask], reduction="none")
    if not per_sequence:
        return losses.sum(), mask.sum()
    rows, zeros = mask.nonzero()[:, 0], losses.new_zeros(mask.shape[0])
    return zeros.index_add(0, rows, losses), zeros.index_add(0, rows, torch.ones_like(losses))


@torch.no_grad()
def evaluate(model, loader, accelerator) -> float:
    """Token-weighted mean eval loss over the whole split. Per-conversation sums go through
    gather_for_metrics, which drops the duplicates accelerate adds to even out the last batch."""
    model.eval()
    sums, counts = [], []
    for batch in loader:
        s, n = accelerator.gather_for_metrics(sft_loss_sum(model, batch, per_sequence=True))
        sums.append(s)
        counts.append(n)
    model.train()
    return (torch.cat(sums).sum() / torch.cat(counts).sum()).item()


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def load_tokenizer(args: Args):
    name = args.tokenizer_name or args.model_name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"could not load the tokenizer {name!r} from the hub or a local path: {e}\nWith no network, build "
            "the offline tiny setting (python -m tiny --out data/tiny) and pass --preset tiny."
        ) from e
    if tok.chat_template is None:
        raise SystemExit(f"tokenizer {name!r} has no chat template; use an instruct tokenizer or set one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def parse_overrides(text: str | None) -> dict:
    """ "hidden_size=128,tie_word_embeddings=True" -> {"hidden_size": 128, "tie_word_embeddings": True}.
    Passed to the config's constructor, so derived fields (e.g. Qwen2's layer_types) follow."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        if "=" not in item:
            raise SystemExit(f"--config_overrides: {item!r} is not key=value")
        k, v = (x.strip() for x in item.split("=", 1))
        out[k] = {"true": True, "false": False, "none": None}.get(v.lower(), v)
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                pass
    return out


def load_model(args: Args, tokenizer):
    dtype = getattr(torch, args.dtype)
    if args.model_type is not None:  # a fresh model from a config, as transformers' run_clm.py does
        config = AutoConfig.for_model(
            args.model_type, **parse_overrides(args.config_overrides), vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=args.attn_implementation)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                args.model_name_or_path, dtype=dtype, attn_implementation=args.attn_implementation,
                trust_remote_code=args.trust_remote_code,
            )
        except OSError as e:
            raise SystemExit(
                f"could not load the model {args.model_name_or_path!r} from the hub or a local path: {e}\n"
                "With no network, build the offline tiny setting (python -m tiny --out data/tiny) and pass "
                "--preset tiny (a model built from a config)."
            ) from e
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    return model


def newest_checkpoint(output_dir: str) -> str | None:
    """Only fully written checkpoints count: they are renamed into place after saving."""
    root = os.path.join(output_dir, "checkpoints")
    steps = [int(d.split("-")[1]) for d in os.listdir(root) if d.startswith("step-")] if os.path.isdir(root) else []
    return os.path.join(root, f"step-{max(steps)}") if steps else None


if __name__ == "__main__":
    args = parse_args()
    # TRY NOT TO MODIFY: accelerator, batch-size chain, seeding, logging
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    args.world_size = accelerator.num_processes
    args.global_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    log = lambda msg: accelerator.print(f"[{args.exp_name}] {msg}")
    os.makedirs(args.output_dir, exist_ok=True)
    run_name = f"{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name, config=vars(args),
                   dir=args.output_dir)
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a") if accelerator.is_main_process else None

    def log_metrics(metrics: dict, step: int):
        if not accelerator.is_main_process:
            return
        metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        metrics_file.flush()
        if args.track:
            wandb.log(metrics, step=step)

    set_seed(args.seed)  # same model init on every process
    tokenizer = load_tokenizer(args)
    model = load_model(args, tokenizer)
    set_seed(args.seed, device_specific=True)  # per-rank streams from here on
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters; global batch {args.per_device_train_batch_size} x "
        f"{args.gradient_accumulation_steps} accumulation x {args.world_size} processes = {args.global_batch_size}")

    # data: tokenized once (main process first, the others reuse the datasets cache)
    with accelerator.main_process_first():
        train_ds = load_split(args.dataset_name, args.dataset_config, args.train_split)
        if args.max_train_samples is not None:
            train_ds = train_ds.select(range(min(args.max_train_samples, len(train_ds))))
        train_ds = prepare_dataset(train_ds, tokenizer, args, "train", log)
        eval_ds = None
        if args.eval_split:
            eval_ds = load_split(args.dataset_name, args.dataset_config, args.eval_split)
            if args.max_eval_samples is not None:
                eval_ds = eval_ds.select(range(min(args.max_eval_samples, len(eval_ds))))
            eval_ds = prepare_dataset(eval_ds, tokenizer, args, "eval", log)
    collate_fn = lambda rows: collate(rows, tokenizer.pad_token_id, args.packing)
    # whole optimizer steps only: every step sees exactly global_batch_size conversations
    rows_per_epoch = len(train_ds) // args.global_batch_size * args.global_batch_size
    steps_per_epoch = rows_per_epoch // args.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_ds)} training conversations are fewer than one global batch ({args.global_batch_size})")
    total_steps = args.max_steps or steps_per_epoch * args.num_train_epochs
    num_epochs = math.ceil(total_steps / steps_per_epoch)

    def epoch_loader(epoch: int):
        # ALGO LOGIC: the data order depends on (seed, epoch) only, so a resumed run sees the same batches
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(args.seed + epoch))
        subset = train_ds.select(order[:rows_per_epoch].tolist())
        return accelerator.prepare(DataLoader(subset, batch_size=args.per_device_train_batch_size, collate_fn=collate_fn))

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay, fused=True)  # one kernel for all tensors (TRL's default)
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = None
    if eval_ds is not None:
        eval_loader = accelerator.prepare(DataLoader(eval_ds, batch_size=args.per_device_eval_batch_size,  # padded: rows = conversations
                                                     collate_fn=lambda rows: collate(rows, tokenizer.pad_token_id, False)))

    global_step = 0
    if args.resume:
        ckpt = newest_checkpoint(args.output_dir)
        if ckpt is None:
            log("--resume: no checkpoint found, starting from scratch")
        else:
            accelerator.load_state(ckpt)
            global_step = int(ckpt.rsplit("-", 1)[1])
            for _ in range(global_step):  # the schedule is a function of the step: replayed, never unpickled
                scheduler.step()
            log(f"resumed from {ckpt} (step {global_step})")

    def save_checkpoint(step: int):
        # written to a temporary folder, then renamed: a crash mid-save never leaves a checkpoint resume would pick
        root = os.path.join(args.output_dir, "checkpoints")
        tmp, final = os.path.join(root, f"tmp-step-{step}"), os.path.join(root, f"step-{step}")
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, final)
            for old in sorted((d for d in os.listdir(root) if d.startswith("step-")), key=lambda d: int(d[5:]))[: -args.save_total_limit]:
                shutil.rmtree(os.path.join(root, old))
        accelerator.wait_for_everyone()

    if eval_loader is not None and global_step == 0:
        eval_loss = evaluate(model, eval_loader, accelerator)
        log(f"step 0: eval/loss {eval_loss:.4f}")
        log_metrics({"eval/loss": eval_loss}, 0)

    # TRY NOT TO MODIFY: the training loop
    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="sft")
    running = torch.zeros(3, device=accelerator.device, dtype=torch.float64)  # loss sum, loss tokens, all tokens
    t0 = time.time()
    for epoch in range(global_step // steps_per_epoch, num_epochs):
        loader = epoch_loader(epoch)
        skip = (global_step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        if skip > 0:
            loader = accelerator.skip_first_batches(loader, skip)
        for batch in loader:
            with accelerator.accumulate(model):
                # ALGO LOGIC: token-level mean cross-entropy over the micro-batch's assistant tokens
                loss_sum, n_tokens = sft_loss_sum(model, batch)
                loss = loss_sum / n_tokens
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    if not (torch.isfinite(loss.detach()) and torch.isfinite(grad_norm)):  # checked before the update
                        raise SystemExit(f"non-finite loss or gradient at step {global_step + 1} (epoch {epoch}); no update "
                                         f"was applied; the last good checkpoint is in {args.output_dir}/checkpoints")
                optimizer.step()
                optimizer.zero_grad()
            running += torch.stack([loss.detach().double(), torch.ones((), device=running.device, dtype=torch.float64),
                                    torch.tensor(batch["input_ids"].numel(), device=running.device, dtype=torch.float64)])
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            global_step += 1
            bar.update(1)
            if global_step % args.logging_steps == 0 or global_step == total_steps:
                r = accelerator.reduce(running, reduction="sum")
                m = {"train/loss": (r[0] / r[1]).item(), "train/lr": scheduler.get_last_lr()[0],
                     "train/epoch": global_step / steps_per_epoch, "perf/tokens_per_s": r[2].item() / (time.time() - t0)}
                bar.set_postfix(loss=f"{m['train/loss']:.4f}")
                log_metrics(m, global_step)
                running.zero_()
                t0 = time.time()
            if eval_loader is not None and args.eval_steps and global_step % args.eval_steps == 0 and global_step != total_steps:
                log_metrics({"eval/loss": evaluate(model, eval_loader, accelerator)}, global_step)
            if args.save_steps and global_step % args.save_steps == 0:
                save_checkpoint(global_step)
            if global_step >= total_steps:
                break
        if global_step >= total_steps:
            break
    bar.close()

    if eval_loader is not None:
        eval_loss = evaluate(model, eval_loader, accelerator)
        log(f"step {global_step}: eval/loss {eval_loss:.4f}")
        log_metrics({"eval/loss": eval_loss}, global_step)

    # TRY NOT TO MODIFY: save a plain transformers model (LoRA merged) + tokenizer, safetensors
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if args.use_lora:
            unwrapped, state_dict = unwrapped.merge_and_unload(), None
        unwrapped.save_pretrained(args.output_dir, state_dict=state_dict)
        tokenizer.save_pretrained(args.output_dir)
        with open(os.path.join(args.output_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        log(f"saved the model to {args.output_dir}")
        if args.push_to_hub:
            unwrapped.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
            tokenizer.push_to_hub(args.hub_model_id or os.path.basename(args.output_dir.rstrip("/")))
    accelerator.wait_for_everyone()
    if args.track and accelerator.is_main_process:
        wandb.finish()
    accelerator.end_training()
