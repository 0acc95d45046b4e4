"""The other side of benchmarks/bench.py: TRL's trainers and the official WSPO step, run on the same .jsonl files
and model folders as our scripts, logging the same quantities to OUTPUT_DIR/metrics.jsonl.

    python benchmarks/theirs.py trl_dpo --model_name_or_path M --dataset_name pairs.jsonl --output_dir D \
        --max_steps 20 --per_device_train_batch_size 8 --max_length 1536 [--no_gradient_checkpointing] [--use_weighting] [--bf16]
    python benchmarks/theirs.py trl_sft ... --dataset_name chat.jsonl [--packing]
    python benchmarks/theirs.py official_wspo ... --weak_ref W --weak_aligned WA

trl_dpo   TRL DPOTrainer with its defaults (loss sigmoid, live reference model, gradient checkpointing on, fused AdamW);
          the UltraFeedback rows lose their string `prompt` column, so TRL extracts the conversational prompt from
          `chosen` / `rejected` (TRL reads a string prompt next to conversational responses as plain text).
trl_sft   TRL SFTTrainer with its defaults on the `messages` column (padded, or `--packing`: best-fit-decreasing bins).
official_wspo  The official WSPO step (WSPO repository, LLaMA-Factory's CustomWSPOTrainer: concatenated_forward,
          get_batch_loss_metrics, get_wspo_batch_logps) re-created here: the LLaMA-Factory pairwise batch (chosen
          rows then rejected rows, right-padded, labels -100 outside the responses, passed to the model, which also
          computes its own unused LM loss); the policy, the strong reference and both weak models all forward the
          whole batch with full fp32 logits; the token-level loss on the chosen half. Gradient checkpointing on the
          policy (LLaMA-Factory's default). The frozen models are loaded in the compute dtype (bf16 with --bf16, as
          LLaMA-Factory loads them), the policy in fp32 under autocast.

Both sides: fp32 master weights (model loaded in float32), bf16 autocast through accelerate with --bf16, fused AdamW,
gradient clipping 1.0, a sequential sampler (so the callback knows each step's tokens), logging every
--logging_steps steps. Throughput as the scripts log it: per logging window, perf/tokens_per_s and
perf/examples_per_s (the device synchronised at each window's end), perf/peak_memory_gb in the last row;
benchmarks/bench.py takes the steady state from these rows.
"""

import argparse
import json
import math
import os
import resource
import time

import torch
from datasets import load_dataset
from transformers import TrainerCallback


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Windows:
    """Per logging window, tokens and examples per second (tokens / examples per step given), as the scripts log them;
    the peak memory in the last row."""

    def __init__(self, total_steps: int, step_work: list[tuple[int, int]], logging_steps: int, out):
        self.total, self.work, self.every, self.out = total_steps, step_work, logging_steps, out
        self.start, self.start_step = None, 0

    def before_step(self, step: int):  # step = optimizer steps done so far
        if self.start is None:
            sync()
            self.start, self.start_step = time.perf_counter(), step

    def after_step(self, step: int):
        if step % self.every and step != self.total:
            return
        sync()
        now = time.perf_counter()
        steps, secs = self.work[self.start_step : step], now - self.start
        row = {"step": step, "perf/tokens_per_s": sum(t for _, t in steps) / secs,
               "perf/examples_per_s": sum(e for e, _ in steps) / secs}
        self.out.write({**row, "perf/peak_memory_gb": peak_memory_gb()} if step == self.total else row)
        self.start, self.start_step = now, step


class MetricsFile:
    def __init__(self, output_dir: str):
        os.makedirs(output_dir, exist_ok=True)
        self.f = open(os.path.join(output_dir, "metrics.jsonl"), "w")

    def write(self, row: dict):
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()


class PerfCallback(TrainerCallback):
    """Logs the losses and, per logging window, the throughput (and at the end the peak memory), as the scripts do."""

    def __init__(self, windows: Windows, out: MetricsFile):
        self.windows, self.out = windows, out

    def on_step_begin(self, args, state, control, **kwargs):
        self.windows.before_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.windows.after_step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.out.write({"step": state.global_step, "train/loss": float(logs["loss"])})


def training_args(cls, a, **extra):
    """TRL config: its defaults except fp32 weights, precision, the sequential sampler, steps and logging."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    kw = dict(output_dir=a.output_dir, per_device_train_batch_size=a.per_device_train_batch_size, gradient_accumulation_steps=1,
              max_steps=a.max_steps, learning_rate=a.learning_rate, max_length=a.max_length, bf16=a.bf16, fp16=False,
              gradient_checkpointing=a.gradient_checkpointing, logging_steps=a.logging_steps, report_to="none",
              save_strategy="no", disable_tqdm=True, seed=a.seed, model_init_kwargs={"dtype": "float32"},
              use_cpu=not torch.cuda.is_available(), **extra)
    if "train_sampling_strategy" in names:
        kw["train_sampling_strategy"] = "sequential"
    return cls(**kw)


def sequential(trainer_cls):
    """The trainer with a sequential sampler also where TrainingArguments has no train_sampling_strategy."""

    class Sequential(trainer_cls):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return Sequential


def run_trl_dpo(a):
    from trl import DPOConfig, DPOTrainer

    ds = load_dataset("json", data_files={"train": a.dataset_name}, split="train")
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("chosen", "rejected")])
    cfg = training_args(DPOConfig, a, loss_type=["sigmoid"], beta=0.1, use_weighting=a.use_weighting)
    out = MetricsFile(a.output_dir)
    trainer = sequential(DPOTrainer)(model=a.model_name_or_path, args=cfg, train_dataset=ds)
    rows, b, L = trainer.train_dataset, a.per_device_train_batch_size, a.max_length
    per_pair = [min(len(p) + len(c), L) + min(len(p) + len(r), L)
                for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"])]
    work = [(b, sum(per_pair[i * b : (i + 1) * b])) for i in range(a.max_steps)]
    trainer.add_callback(PerfCallback(Windows(a.max_steps, work, a.logging_steps, out), out))
    trainer.train()


def run_trl_sft(a):
    from trl import SFTConfig, SFTTrainer

    ds = load_dataset("json", data_files={"train": a.dataset_name}, split="train").select_columns(["messages"])
    cfg = training_args(SFTConfig, a, packing=a.packing)
    out = MetricsFile(a.output_dir)
    trainer = sequential(SFTTrainer)(model=a.model_name_or_path, args=cfg, train_dataset=ds)
    rows, b = trainer.train_dataset, a.per_device_train_batch_size
    tokens = [min(len(x), a.max_length) for x in rows["input_ids"]]
    convs = [len(s) for s in rows["seq_lengths"]] if "seq_lengths" in rows.column_names else [1] * len(tokens)
    work = [(sum(convs[i * b : (i + 1) * b]), sum(tokens[i * b : (i + 1) * b])) for i in range(a.max_steps)]
    trainer.add_callback(PerfCallback(Windows(a.max_steps, work, a.logging_steps, out), out))
    trainer.train()


def get_wspo_batch_logps(logits, labels, label_pad_token_id=-100):
    """Official (WSPO repo, src/llamafactory/train/trainer_utils.py), verbatim but for type hints."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError("Logits (batchsize x seqlen) and labels must have the same shape.")
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels[labels == label_pad_token_id] = 0  # dummy token
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * loss_mask), loss_mask.sum(-1)


def run_official_wspo(a):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    accelerator = Accelerator(mixed_precision="bf16" if a.bf16 else "no")
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.model_name_or_path)
    frozen_dtype = torch.bfloat16 if a.bf16 else torch.float32
    load = lambda name, dtype: AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(accelerator.device)
    ref_model, weak_base_model, weak_aligned_model = (load(n, frozen_dtype).eval().requires_grad_(False)
                                                      for n in (a.model_name_or_path, a.weak_ref, a.weak_aligned))
    model = load(a.model_name_or_path, torch.float32)
    if a.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False

    # LLaMA-Factory's pairwise data: prompt through the chat template, each response = what the template adds to it
    ds = load_dataset("json", data_files={"train": a.dataset_name}, split="train")
    pairs = []
    for ex in ds:
        prompt = ex["chosen"][:-1]
        prompt_ids = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        seqs = []
        for key in ("chosen", "rejected"):
            full = list(tok.apply_chat_template(prompt + ex[key][-1:], tokenize=True, return_dict=True)["input_ids"])
            seqs.append((full[: a.max_length], len(prompt_ids)))
        pairs.append(seqs)
    b = a.per_device_train_batch_size

    def collate(rows):
        seqs = [r[0] for r in rows] + [r[1] for r in rows]  # chosen rows, then rejected rows
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.full((len(seqs), width), tok.pad_token_id)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for i, (ids, n_prompt) in enumerate(seqs):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    batches = [pairs[i * b : (i + 1) * b] for i in range(a.max_steps)]
    work = [(len(r), sum(len(s[0]) for pair in r for s in pair)) for r in batches]

    def concatenated_forward(m, batch):
        batch = {k: v.detach().clone() for k, v in batch.items()}
        all_logits = m(**batch, return_dict=True, use_cache=False).logits.to(torch.float32)
        all_logps, valid_length = get_wspo_batch_logps(logits=all_logits, labels=batch["labels"])
        n = batch["input_ids"].size(0) // 2
        chosen_logps, rejected_logps = all_logps.split(n, dim=0)
        chosen_logits, rejected_logits = all_logits.split(n, dim=0)
        chosen_length, _ = valid_length.split(n, dim=0)
        return chosen_logps, rejected_logps, chosen_logits, rejected_logits, chosen_length

    def compute_loss(batch):  # CustomWSPOTrainer.get_batch_loss_metrics
        pc, pr, pcl, prl, valid_length = concatenated_forward(model, batch)
        with torch.no_grad():
            rc, *_ = concatenated_forward(ref_model, batch)
            wref_c, *_ = concatenated_forward(weak_base_model, batch)
            wal_c, *_ = concatenated_forward(weak_aligned_model, batch)
        losses = a.beta * (pc - rc) - (wal_c - wref_c)
        losses = torch.sum(losses**2, dim=-1) / valid_length
        metrics = {"rewards/chosen": (a.beta * pc.detach()).mean().cpu(), "logps/rejected": pr.detach().mean().cpu(),
                   "logps/chosen": pc.detach().mean().cpu(), "logits/rejected": prl.detach().mean().cpu(),
                   "logits/chosen": pcl.detach().mean().cpu()}
        return losses.mean(), metrics

    optimizer = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, weight_decay=0.0, fused=True)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(0.1 * a.max_steps), num_training_steps=a.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    out = MetricsFile(a.output_dir)
    windows = Windows(a.max_steps, work, a.logging_steps, out)
    for step, rows in enumerate(batches):
        windows.before_step(step)
        batch = {k: v.to(accelerator.device) for k, v in collate(rows).items()}
        with accelerator.autocast():
            loss, metrics = compute_loss(batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        if (step + 1) % a.logging_steps == 0 or step == 0:  # HF Trainer reads the loss once per logging window
            out.write({"step": step + 1, "train/loss": loss.item()})
        windows.after_step(step + 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["trl_dpo", "trl_sft", "official_wspo"])
    ap.add_argument("--model_name_or_path", required=True, help="the (strong) model folder; its tokenizer is used")
    ap.add_argument("--weak_ref", help="official_wspo: the weak reference model folder")
    ap.add_argument("--weak_aligned", help="official_wspo: the weak aligned model folder")
    ap.add_argument("--dataset_name", required=True, help=".jsonl file in the hub schema (UltraFeedback pairs / UltraChat messages)")
    ap.add_argument("--output_dir", required=True, help="metrics.jsonl goes here")
    ap.add_argument("--max_steps", type=int, required=True)
    ap.add_argument("--per_device_train_batch_size", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=1024)
    ap.add_argument("--learning_rate", type=float, default=1e-6)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--logging_steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--gradient_checkpointing", action="store_true", default=True, help="on by default, as in TRL and LLaMA-Factory")
    ap.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--use_weighting", action="store_true", help="trl_dpo: WPO's weighting (DPOConfig.use_weighting)")
    ap.add_argument("--packing", action="store_true", help="trl_sft: TRL's packing")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (accelerate mixed_precision=bf16)")
    a = ap.parse_args()
    {"trl_dpo": run_trl_dpo, "trl_sft": run_trl_sft, "official_wspo": run_official_wspo}[a.what](a)


if __name__ == "__main__":
    main()
