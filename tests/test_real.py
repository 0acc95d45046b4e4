"""The scripts on a real chat model: SmolLM2-135M-Instruct (tests/real_model.py; Llama, 135M parameters, a BPE
tokenizer, a ChatML template that adds a default system message, eos = pad = <|im_end|>), on the project's own small
English data (tests/data: prefs.jsonl, 40 preference pairs in UltraFeedback's schema; chat.jsonl, 32 conversations).

- TRL's dataset formats (standard strings, conversational, implicit prompt) and UltraFeedback's give the same token
  ids in dpo.py, wpo.py, wspo.py and hybrid_pairs.py; TRL's `messages` and prompt/completion formats in sft.py;
- the chat-template cases: default and own system message, the whole-turn prompt cut (headers kept), the response
  cut (<|im_end|> kept), one rule for a prompt that does not end with a user message;
- dpo.py's step-0 log-probs equal TRL 1.16's DPOTrainer's, TRL's "\\n" after <|im_end|> accounted for;
- sft.py, dpo.py, wpo.py (bf16 autocast) and wspo.py (weak pair: SmolLM2 and the dpo.py output) each learn in three
  steps, with step-0 rewards exactly 0; their folders reload and answer; generate.py's batched greedy answers equal
  one-at-a-time ones; hybrid_pairs.py samples from dpo.py's prompt cut and refuses a causal LM as reward model.
Cost (docs/real_model.md): short sequences (max_length 128), batches of 4, three steps per script.
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, load_script, run_script

pytestmark = [pytest.mark.real, pytest.mark.xdist_group("real")]  # one worker: the runs share session fixtures
dpo, wpo, wspo, sft, hybrid, gen = (load_script(n) for n in ("dpo", "wpo", "wspo", "sft", "hybrid_pairs", "generate"))
DATA = ROOT / "tests" / "data"
DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
N_TRAIN, N_EVAL = 12, 8  # prefs.jsonl rows [0, 12) train, [32, 40) eval
STEPS = ("--max_steps", "3", "--logging_steps", "1", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
         "--max_length", "128", "--max_prompt_length", "64", "--per_device_train_batch_size", "4",
         "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "8")
PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def formats(row: dict) -> dict:
    """One UltraFeedback row in TRL's three preference formats and UltraFeedback's own."""
    user, chosen, rejected = row["chosen"][0], row["chosen"][-1], row["rejected"][-1]
    return {"ultrafeedback": row,
            "standard": {"prompt": row["prompt"], "chosen": chosen["content"], "rejected": rejected["content"]},
            "conversational": {"prompt": [user], "chosen": [chosen], "rejected": [rejected]},
            "implicit": {"chosen": row["chosen"], "rejected": row["rejected"]}}


@pytest.fixture(scope="session")
def tok(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def prefs(tmp_path_factory) -> dict:
    """The train and eval files dpo.py / wpo.py / wspo.py read."""
    rows, out = read_jsonl(DATA / "prefs.jsonl"), tmp_path_factory.mktemp("prefs")
    return {"train": write_jsonl(out / "train.jsonl", rows[:N_TRAIN]),
            "eval": write_jsonl(out / "eval.jsonl", rows[-N_EVAL:])}


# ---------------------------------------------------------------------------------------------
# data formats and the chat template (tokenizer only)
# ---------------------------------------------------------------------------------------------
def test_data_sets_are_the_documented_size():
    prefs, chats = read_jsonl(DATA / "prefs.jsonl"), read_jsonl(DATA / "chat.jsonl")
    assert len(prefs) == 40 and len({r["prompt"] for r in prefs}) == 40 and len(chats) == 32
    assert all(r["chosen"][:-1] == r["rejected"][:-1] == [{"role": "user", "content": r["prompt"]}] for r in prefs)
    assert all(m[-1]["role"] == "assistant" for m in (r["messages"] for r in chats))


def test_preference_formats_give_the_same_ids_in_every_script(tok):
    """TRL's conversational format crashed dpo.py, wpo.py and wspo.py (the prompt list wrapped as a user message's
    content); every format now gives UltraFeedback's ids, and wspo.py / hybrid_pairs.py cut the prompt the same."""
    args = dataclasses.replace(dpo.Args(), max_length=128, max_prompt_length=64)
    wargs = dataclasses.replace(wpo.Args(), max_length=128, max_prompt_length=64)
    sargs = dataclasses.replace(wspo.Args(), max_length=128, max_prompt_length=64)
    hargs = dataclasses.replace(hybrid.Args(), max_prompt_length=64)
    for row in read_jsonl(DATA / "prefs.jsonl")[:10]:
        want = dpo.tokenize_pair(tok, row, args)
        assert want["skip"] == "" and want["chosen_ids"][-1] == tok.eos_token_id
        assert tok.decode(want["prompt_ids"]) == (f"{DEFAULT_SYSTEM}<|im_start|>user\n{row['prompt']}<|im_end|>\n"
                                                  "<|im_start|>assistant\n")
        assert tok.decode(want["chosen_ids"]) == row["chosen"][-1]["content"] + "<|im_end|>"
        for name, ex in formats(row).items():
            assert dpo.tokenize_pair(tok, ex, args) == want, name
            assert wpo.tokenize_pair(tok, ex, wargs) == want, name
            got = wspo.tokenize_example(tok, {"chosen": ex["chosen"], "rejected": ex["rejected"],
                                              **({"prompt": ex["prompt"]} if "prompt" in ex else {})}, sargs, True)
            assert {k: got[k] for k in PAIR_KEYS} == {k: want[k] for k in PAIR_KEYS} and got["skip"] == "", name
            prompt, existing = hybrid.prompt_and_existing(ex, hargs)
            assert hybrid.fit_prompt(tok, prompt, 64)[0] == want["prompt_ids"], name
            assert existing == [row["chosen"][-1]["content"], row["rejected"][-1]["content"]], name


def test_sft_formats_messages_and_prompt_completion(tok):
    """sft.py: TRL's `messages` rows and prompt/completion rows (strings or message lists) give the same ids and
    labels; in prompt/completion form an assistant turn inside the prompt is context, not trained."""
    for row in read_jsonl(DATA / "chat.jsonl"):
        msgs = row["messages"]
        assert sft.conversation(row, "messages") == (msgs, 0)
        want = sft.tokenize_conversation(tok, msgs, 128)
        own_system = msgs[0]["role"] == "system"
        assert want["skip"] == "" and own_system == (DEFAULT_SYSTEM not in tok.decode(want["input_ids"]))
        if len(msgs) == 2:
            for ex in ({"prompt": msgs[0]["content"], "completion": msgs[1]["content"]},
                       {"prompt": msgs[:1], "completion": msgs[1:]}):
                messages, first = sft.conversation(ex, "messages")
                assert sft.tokenize_conversation(tok, messages, 128, first) == want
        elif msgs[0]["role"] == "user":  # multi-turn: prompt = all but the last turn
            messages, first = sft.conversation({"prompt": msgs[:-1], "completion": msgs[-1:]}, "messages")
            got = sft.tokenize_conversation(tok, messages, 128, first)
            assert got["input_ids"] == want["input_ids"]
            trained = [t for t in got["labels"] if t != -100]
            assert tok.decode(trained) == msgs[-1]["content"] + "<|im_end|>"  # only the completion
            assert len([t for t in want["labels"] if t != -100]) > len(trained)


def test_chat_template_cases_and_the_prompt_cut(tok):
    """Own system message (no default one), the whole-turn cut with the system message and headers kept, the cut
    of the oldest user text after its header, a response cut that keeps <|im_end|>; wspo.py and hybrid_pairs.py
    cut as dpo.py does where whole turns suffice."""
    args = dataclasses.replace(dpo.Args(), max_length=128, max_prompt_length=64)
    sargs = dataclasses.replace(wspo.Args(), max_length=128, max_prompt_length=64)
    u = lambda t: {"role": "user", "content": t}
    a = lambda t: {"role": "assistant", "content": t}
    system = {"role": "system", "content": "You are a pirate."}
    pair = lambda prompt, c="The capital of France is Paris.", r="Berlin.": {"prompt": prompt, "chosen": c,
                                                                              "rejected": r}
    own = dpo.tokenize_pair(tok, pair([system, u("Where is Paris?")]), args)
    assert tok.decode(own["prompt_ids"]) == ("<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n"
                                             "Where is Paris?<|im_end|>\n<|im_start|>assistant\n")
    long_turn = "Tell me everything about the history of the city of Paris, " * 8
    for sys_msg, header in (([], DEFAULT_SYSTEM), ([system], "<|im_start|>system\nYou are a pirate.<|im_end|>\n")):
        # whole turns: the first exchange goes, the last question stays whole
        prompt = sys_msg + [u(long_turn), a("It is a long story."), u("What is the capital of France?")]
        got = dpo.tokenize_pair(tok, pair(prompt), args)
        assert got["prompt_cut"] and got["prompt_ids"] == dpo.chat_ids(tok, sys_msg + prompt[-1:], True)
        assert tok.decode(got["prompt_ids"]).startswith(header + "<|im_start|>user\nWhat is the capital")
        w = wspo.tokenize_example(tok, pair(prompt), sargs, True)
        assert w["prompt_ids"] == got["prompt_ids"] and w["prompt_cut"]
        assert hybrid.fit_prompt(tok, prompt, 64) == (got["prompt_ids"], True)
        # one long user turn: its start goes, the headers stay
        got = dpo.tokenize_pair(tok, pair(sys_msg + [u(long_turn)]), args)
        text = tok.decode(got["prompt_ids"])
        assert got["prompt_cut"] and 58 <= len(got["prompt_ids"]) <= 64
        start, end = header + "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
        assert text.startswith(start) and text.endswith(end)
        kept = text[len(start) : -len(end)]
        assert long_turn.endswith(kept) and 0 < len(kept) < len(long_turn) / 2
        w = wspo.tokenize_example(tok, pair(sys_msg + [u(long_turn)]), sargs, True)
        assert len(w["prompt_ids"]) <= 64 and tok.decode(w["prompt_ids"]).startswith(header + "<|im_start|>user\n")
        assert hybrid.fit_prompt(tok, sys_msg + [u(long_turn)], 64) == (got["prompt_ids"], True)
    # a long response is cut to max_length, its end-of-turn token kept
    got = dpo.tokenize_pair(tok, pair("Describe Paris.", c="Paris is a lovely city with many museums. " * 20), args)
    assert got["responses_cut"] == 1 and len(got["prompt_ids"]) + len(got["chosen_ids"]) == 128
    assert got["chosen_ids"][-1] == tok.eos_token_id and tok.decode(got["rejected_ids"]) == "Berlin.<|im_end|>"


def test_a_prompt_not_ending_in_a_user_message_is_skipped_and_counted(tok):
    """One rule in dpo.py, wpo.py, wspo.py (and hybrid_pairs.py, test_hybrid_samples_from_dpo_s_prompt_cut): a prompt
    such as [user, assistant] is skipped, and the log counts it (dpo.py used to cut the assistant text and train
    with no user turn; wspo.py skipped it under another name)."""
    rows = read_jsonl(DATA / "prefs.jsonl")[:4]
    bad = {"prompt": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}],
           "chosen": "How can I help?", "rejected": "Go away."}
    good = [{**formats(r)["standard"], "prompt": r["chosen"][:1]} for r in rows]  # prompt lists, string responses
    ds = Dataset.from_list(good + [bad, bad | {"chosen": "What do you need?"}])
    for script in (dpo, wpo):
        logged = []
        args = dataclasses.replace(script.Args(), max_length=128, max_prompt_length=64)
        kept, stats = script.prepare_dataset(ds, tok, args, "train", "rows", logged.append)
        assert len(kept) == 4 and stats["data/train_dropped"] == 2
        assert "4 of 6 pairs kept" in logged[0]
        assert "2 malformed pair (the prompt does not end with a user message)" in logged[0]
    logged = []
    args = dataclasses.replace(wspo.Args(), max_length=128, max_prompt_length=64)
    kept, _, counts = wspo.prepare_split(ds, None, tok, args, "train", "rows", logged.append)
    assert len(kept) == 4 and counts["data/train_dropped"] == 2
    assert "4 of 6 examples kept" in logged[0] and "2 the prompt does not end with a user message" in logged[0]


# ---------------------------------------------------------------------------------------------
# dpo.py against TRL on the real model
# ---------------------------------------------------------------------------------------------
def test_dpo_step0_logps_equal_trl_up_to_its_newline(smollm2, tok, tmp_path):
    """TRL 1.16's DPOTrainer on 4 pairs (implicit-prompt format, its own tokenization): its response ids are dpo.py's
    plus the "\\n" the template writes after <|im_end|>, and its log-probs are dpo.py's plus that token's."""
    from trl import DPOConfig, DPOTrainer

    rows = read_jsonl(DATA / "prefs.jsonl")[:4]
    args = dataclasses.replace(dpo.Args(), max_length=128, max_prompt_length=64)
    ours = [dpo.tokenize_pair(tok, r, args) for r in rows]
    policy = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ref = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    config = DPOConfig(output_dir=str(tmp_path), report_to=[], beta=0.1, max_length=128, per_device_train_batch_size=1,
                       bf16=False, use_cpu=True, precompute_ref_log_probs=False, save_strategy="no", seed=1)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, processing_class=tok,
                         train_dataset=Dataset.from_list([formats(r)["implicit"] for r in rows]))
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    for i, o in enumerate(ours):
        theirs = {k: trainer.train_dataset[i][k] for k in PAIR_KEYS}
        assert theirs["prompt_ids"] == o["prompt_ids"]
        assert theirs["chosen_ids"] == o["chosen_ids"] + newline
        assert theirs["rejected_ids"] == o["rejected_ids"] + newline
        batch = trainer._prepare_inputs(trainer.data_collator([theirs]))
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode].clear()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
            m = {k: trainer._metrics[mode][k][-1] for k in ("logps/chosen", "logps/rejected", "rewards/margins")}
            b = dpo.collate([{**{k: o[k] for k in PAIR_KEYS}, "row": 0}], tok.pad_token_id, False)
            dpo_logps = dpo.sequence_logps(policy, b)[0]
            for j, key in enumerate(("chosen_ids", "rejected_ids")):  # log p("\n" | prompt, response, <|im_end|>)
                full = torch.tensor([o["prompt_ids"] + o[key]])
                nl = torch.log_softmax(policy(input_ids=full).logits[0, -1].float(), -1)[newline[0]].item()
                want = m[f"logps/{key[:-4]}"]
                assert abs(dpo_logps[j].item() + nl - want) <= 1e-4 * abs(want), (i, key, dpo_logps[j].item(), nl, want)
                assert nl < 0
        assert m["rewards/margins"] == 0.0  # policy = reference


# ---------------------------------------------------------------------------------------------
# training runs (three steps each) and their folders
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dpo_run(smollm2, prefs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "dpo"
    run_script("dpo.py", "--model_name_or_path", str(smollm2), "--dataset_name", str(prefs["train"]),
               "--eval_dataset_name", str(prefs["eval"]), "--output_dir", str(out), "--cache_dir", str(out.parent),
               "--learning_rate", "2e-5", *STEPS)
    return out


@pytest.fixture(scope="session")
def wpo_bf16_run(smollm2, prefs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "wpo"
    run_script("wpo.py", "--model_name_or_path", str(smollm2), "--dataset_name", str(prefs["train"]),
               "--eval_dataset_name", str(prefs["eval"]), "--output_dir", str(out), "--cache_dir", str(out.parent),
               "--learning_rate", "5e-5", "--beta", "0.1", *STEPS, env={"ACCELERATE_MIXED_PRECISION": "bf16"})
    return out


@pytest.fixture(scope="session")
def wspo_run(smollm2, dpo_run, prefs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "wspo"
    run_script("wspo.py", "--strong", str(smollm2), "--weak_ref", str(smollm2), "--weak_aligned", str(dpo_run),
               "--dataset_name", str(prefs["train"]), "--eval_dataset_name", str(prefs["eval"]), "--output_dir",
               str(out), "--cache_dir", str(out.parent), "--learning_rate", "5e-5", "--beta", "0.1", *STEPS)
    return out


@pytest.fixture(scope="session")
def sft_run(smollm2, tmp_path_factory) -> Path:
    """sft.py on chat.jsonl in TRL's prompt/completion format (train) and `messages` format (eval)."""
    chats, out = read_jsonl(DATA / "chat.jsonl"), tmp_path_factory.mktemp("real") / "sft"
    train = write_jsonl(out.parent / "train.jsonl", [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                                     for r in chats[:24]])
    evals = write_jsonl(out.parent / "eval.jsonl", chats[24:])
    run_script("sft.py", "--model_name_or_path", str(smollm2), "--dataset_name", str(train), "--eval_dataset_name",
               str(evals), "--output_dir", str(out), "--learning_rate", "2e-5", "--max_steps", "3", "--logging_steps",
               "1", "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--max_length", "128",
               "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
               "--per_device_eval_batch_size", "8")
    return out


def evals_of(out: Path) -> list[dict]:
    return [r for r in metrics(out) if any(k.startswith("eval/") for k in r)]


@pytest.mark.parametrize("run", ["dpo_run", "wpo_bf16_run"])
def test_dpo_and_wpo_learn_from_exactly_zero_rewards(run, request):
    """Step 0 (fp32 for dpo.py, bf16 autocast for wpo.py): rewards, margins and accuracies exactly 0, loss ln 2 (wpo.py:
    times the mean weight); after three steps of 4 pairs the held-out pairs are ranked right."""
    out = request.getfixturevalue(run)
    data = next(r for r in metrics(out) if "data/train_pairs" in r)
    assert data["data/train_pairs"] == N_TRAIN and data["data/eval_pairs"] == N_EVAL
    m = evals_of(out)
    assert [r["step"] for r in m] == [0, 3]
    first, last = m[0], m[-1]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[f"eval/{k}"] == 0.0, (k, first)
    assert first["eval/loss"] == pytest.approx(math.log(2) * first.get("eval/weight", 1.0), rel=1e-6)
    assert last["eval/rewards/accuracies"] >= 0.75 and last["eval/rewards/margins"] > 0.1, last
    assert last["eval/loss"] < first["eval/loss"] - 0.02, last


def test_wspo_learns_the_weak_models_preference(wspo_run):
    """The strong log-ratio starts at exactly 0; after three steps the strong model is closer to the weak model's
    change on held-out responses (eval loss down) and, as dpo.py did to the weak model, raises the chosen responses
    more than the rejected ones (which it never trains on). Held-out accuracy after three steps is not asserted: it
    measured 0.375-0.5 (8 pairs), the mean margin was positive."""
    m = evals_of(wspo_run)
    assert [r["step"] for r in m] == [0, 3]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[0][f"eval/{k}"] == 0.0, (k, m[0])
    assert m[-1]["eval/loss"] < 0.95 * m[0]["eval/loss"], m
    assert m[-1]["eval/rewards/chosen"] > 0 and m[-1]["eval/rewards/margins"] > 0, m[-1]


def test_sft_learns_on_prompt_completion_rows(sft_run):
    m = evals_of(sft_run)
    assert [r["step"] for r in m] == [0, 3]
    assert m[-1]["eval/loss"] < m[0]["eval/loss"] - 0.05, m
    data = next(r for r in metrics(sft_run) if "data/train_conversations" in r)
    assert data["data/train_conversations"] == 24 and data["data/eval_conversations"] == 8


@pytest.mark.parametrize("run", ["sft_run", "dpo_run", "wpo_bf16_run", "wspo_run"])
def test_saved_folder_reloads_and_answers(run, request, tok):
    """Each output folder loads with from_pretrained and answers, greedily, ending its turn."""
    out = request.getfixturevalue(run)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    args = dataclasses.replace(gen.Args(), temperature=0.0, max_new_tokens=24)
    (answer,) = gen.generate_batch(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], 0.0,
                                   args)
    assert "Paris" in answer[0] and not answer[2], answer  # right, and its turn ended before max_new_tokens


def test_generate_batched_equals_one_at_a_time(smollm2, tok):
    """Greedy answers of a left-padded batch (prompts of different lengths) equal each prompt's answer alone."""
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    args = dataclasses.replace(gen.Args(), temperature=0.0, max_new_tokens=16)
    questions = [r["prompt"] for r in read_jsonl(DATA / "prefs.jsonl")[:5]]
    questions.append("In two short sentences, please explain to a child why the sky is blue during the day.")
    convs = [[{"role": "user", "content": q}] for q in questions]
    widths = [len(gen.chat_ids(tok, c, add_generation_prompt=True)) for c in convs]
    assert max(widths) - min(widths) >= 6
    alone = [gen.generate_batch(model, tok, [c], 0.0, args) for c in convs]
    assert gen.generate_batch(model, tok, convs, 0.0, args) == [a for (a,) in alone]
    assert "Paris" in alone[0][0][0]


# ---------------------------------------------------------------------------------------------
# hybrid_pairs.py
# ---------------------------------------------------------------------------------------------
class Recorder:
    """A stand-in policy and reward model: records the prompt ids generate() gets; answers and scores are fixed."""
    device = torch.device("cpu")

    def __init__(self, answer_ids):
        self.seen, self.answer_ids = [], answer_ids
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": None})()

    def generate(self, input_ids, attention_mask, num_return_sequences, **_):
        self.seen += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        out = torch.cat([input_ids, torch.tensor([self.answer_ids] * len(input_ids))], 1)
        return out.repeat_interleave(num_return_sequences, 0)

    def __call__(self, input_ids, **_):  # reward: the conversation's length, so scores differ
        return type("Out", (), {"score": None, "logits": (input_ids != 2).sum(1, keepdim=True).float()})()


def test_hybrid_samples_from_dpo_s_prompt_cut(tok):
    """hybrid_pairs.py cut long prompts from the left (mid-sentence, no system message, no role header): the policy
    now samples from exactly the prompt ids dpo.py trains the pair under; a prompt not ending with a user message is
    dropped with its reason, as dpo.py skips it."""
    u = lambda t: {"role": "user", "content": t}
    a = lambda t: {"role": "assistant", "content": t}
    long_turn = "Tell me everything about the history of the city of Paris, " * 8
    rows = [formats(r)["conversational"] for r in read_jsonl(DATA / "prefs.jsonl")[:2]]
    rows += [{"prompt": [u(long_turn), a("It is a long story."), u("And its capital?")], "chosen": [a("Paris.")],
              "rejected": [a("Rome.")]},
             {"prompt": [u(long_turn)], "chosen": [a("Paris.")], "rejected": [a("Rome.")]},
             {"prompt": [u("Hi."), a("Hello!")], "chosen": [a("How can I help?")], "rejected": [a("Go away.")]}]
    args = dataclasses.replace(hybrid.Args(), max_prompt_length=64, max_length=256, num_samples=2)
    policy = Recorder(tok.encode("A sample answer.", add_special_tokens=False) + [tok.eos_token_id])
    out, empty = hybrid.hybrid_pairs(rows, [str(i) for i in range(5)], policy, tok, Recorder([]), tok, args)
    dargs = dataclasses.replace(dpo.Args(), max_length=256, max_prompt_length=64)
    want = [dpo.tokenize_pair(tok, r, dargs) for r in rows]
    assert [w["prompt_cut"] for w in want] == [False, False, True, True, False]
    assert want[4]["skip"] == "malformed pair (the prompt does not end with a user message)"
    assert policy.seen == [w["prompt_ids"] for w in want[:4]]
    assert all(tok.decode(ids).startswith(DEFAULT_SYSTEM + "<|im_start|>user\n") for ids in policy.seen)
    assert [isinstance(r, dict) for r in out] == [True] * 4 + [False] and empty == 0
    assert out[4] == "the prompt does not end with a user message"
    assert out[2]["chosen"][:-1] == rows[2]["prompt"]  # the written pair keeps the whole prompt; training cuts it
    assert {out[0]["chosen"][-1]["content"], out[0]["rejected"][-1]["content"]} <= {
        "A sample answer.", rows[0]["chosen"][0]["content"], rows[0]["rejected"][0]["content"]}


def test_hybrid_refuses_a_causal_lm_as_reward_model(smollm2, prefs, tmp_path):
    """A causal LM loads as AutoModelForSequenceClassification with a random score head: refused, nothing written."""
    p = run_script("hybrid_pairs.py", "--model_name_or_path", str(smollm2), "--reward_model_name_or_path",
                   str(smollm2), "--dataset_name", str(prefs["eval"]), "--eval_split", "None", "--output_dir",
                   str(tmp_path / "out"), "--max_prompt_length", "64", "--max_length", "128", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert (f"error: the reward model '{smollm2}' has no trained weights for ['score.weight']: it is not a reward "
            "model") in p.stderr
    assert not (tmp_path / "out").exists()
