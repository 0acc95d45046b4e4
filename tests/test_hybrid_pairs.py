"""hybrid_pairs.py: the v1/v2 pair rules (every tie case), a dataset built from the tiny SFT model whose pairs
follow the reward model and that wpo.py and dpo.py train on, and the user errors (exit code 2, nothing written)."""

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch
import tyro
from datasets import load_dataset, load_from_disk
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from conftest import ROOT, load_script, run_script

hybrid = load_script("hybrid_pairs")
# the Args of --preset tiny, without parse_args' checks of the output folder
TINY = tyro.cli(hybrid.Args, use_underscores=True,
                args=hybrid.read_config(str(ROOT / "recipes/tiny/hybrid_pairs.yaml")) + ["--preset", "tiny"])


# ---------------------------------------------------------------------------------------------
# the pair rules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scores, lengths, want", [
    ([0.5, 0.9, 0.1], [5, 5, 5], (1, 2)),                        # no tie: highest / lowest
    ([0.9, 0.2], [3, 8], (0, 1)),                                # two candidates
    ([0.9, 0.1, 0.9, 0.5], [10, 4, 6, 2], (2, 1)),               # chosen tie: the shortest of the best
    ([0.9, 0.1, 0.9, 0.5], [6, 4, 6, 2], (0, 1)),                # chosen tie, same length: the earliest
    ([0.9, 0.1, 0.5, 0.1, 0.1], [10, 3, 1, 9, 14], (0, 3)),      # rejected tie: closest length to the chosen
    ([0.9, 0.1, 0.1, 0.5], [10, 12, 8, 1], (0, 1)),              # rejected tie, equal distance (longer first)
    ([0.9, 0.1, 0.1, 0.5], [10, 8, 12, 1], (0, 1)),              # rejected tie, equal distance (shorter first)
    ([0.1, 0.9, 0.1, 0.9], [5, 12, 11, 4], (3, 0)),              # both tie: rejected measured against the shortest best
    ([0.2, 0.2, 0.9, 0.2], [7, 7, 1, 7], (2, 0)),                # rejected tie, every length equal: earliest
])
def test_v2_pair_rules_on_ties(scores, lengths, want):
    assert hybrid.pick_pair(scores, lengths, "v2") == want


@pytest.mark.parametrize("rule", ["v2", "v1"])
def test_no_pair_when_every_score_ties(rule):
    assert hybrid.pick_pair([0.4, 0.4, 0.4], [1, 5, 9], rule, random.Random(0)) is None
    assert hybrid.pick_pair([0.4], [3], rule, random.Random(0)) is None


def test_v1_rejects_a_random_lower_scored_response():
    scores, lengths = [0.3, 0.9, 0.9, 0.1, 0.9, 0.5], [4, 9, 2, 5, 6, 1]
    picks = [hybrid.pick_pair(scores, lengths, "v1", random.Random(k)) for k in range(200)]
    assert {c for c, _ in picks} == {1}  # the highest score, ties -> the earliest (no length rule in v1)
    assert {r for _, r in picks} == {0, 3, 5}  # every lower-scored response, never a tied best
    assert picks == [hybrid.pick_pair(scores, lengths, "v1", random.Random(k)) for k in range(200)]  # seeded


# ---------------------------------------------------------------------------------------------
# end to end on the tiny setting
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model(small_sft, tmp_path_factory):
    """A randomly initialised 1-layer Qwen2 sequence classifier with the tiny tokenizer: its scores are arbitrary
    but fixed, which is all the pair rules need."""
    tok = AutoTokenizer.from_pretrained(small_sft)
    path = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, num_labels=1,
                      pad_token_id=tok.pad_token_id)
    Qwen2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_args(tiny, small_sft, reward_model, out, *extra):
    return ["hybrid_pairs.py", "--preset", "tiny", "--model_name_or_path", str(small_sft), "--dataset_name",
            str(tiny / "ultrafeedback"), "--reward_model_name_or_path", str(reward_model), "--output_dir", str(out),
            *extra]


def test_hybrid_pairs_follow_the_reward_model_and_train(tiny, small_sft, reward_model, tmp_path):
    built = tmp_path / "hybrid"
    p = run_script(*build_args(tiny, small_sft, reward_model, built, "--num_samples", "3", "--temperature", "1.0",
                               "--top_p", "0.9", "--batch_size", "16", "--max_train_samples", "48",
                               "--max_eval_samples", "16"))
    assert "train_prefs: 48 pairs from 48 prompts (3 samples each + the existing responses)" in p.stdout
    assert "test_prefs: 16 pairs from 16 prompts" in p.stdout
    assert sorted(os.listdir(built)) == ["args.json", "dataset_dict.json", "test_prefs", "train_prefs"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # the temporary folder was renamed into place
    saved = json.load(open(built / "args.json"))
    assert saved["num_samples"] == 3 and saved["pair_rule"] == "v2" and saved["model_name_or_path"] == str(small_sft)
    ds = load_from_disk(str(built))
    assert sorted(ds) == ["test_prefs", "train_prefs"] and len(ds["test_prefs"]) == 16
    for col in ("prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected", "candidates",
                "candidate_scores"):
        assert col in ds["train_prefs"].column_names, col

    tok = AutoTokenizer.from_pretrained(small_sft)
    src = load_dataset(str(tiny / "ultrafeedback"), split="train_prefs")
    rm = Qwen2ForSequenceClassification.from_pretrained(reward_model).eval()
    sampled_new = 0
    for k, row in enumerate(ds["train_prefs"]):
        prompt = [{"role": "user", "content": src[k]["prompt"]}]
        assert row["prompt"] == src[k]["prompt"] and row["prompt_id"] == src[k]["prompt_id"]
        assert row["chosen"][:-1] == prompt == row["rejected"][:-1] and row["messages"] == row["chosen"]
        cands = row["candidates"]
        # the existing responses come first, then up to 3 non-empty samples from the policy
        assert cands[:2] == [src[k]["chosen"][-1]["content"], src[k]["rejected"][-1]["content"]]
        assert 3 <= len(cands) <= 5
        sampled_new += sum(c not in cands[:2] for c in cands[2:])
        # every score is the reward model's, scoring the conversation alone (no padding)
        with torch.no_grad():
            for text, s in zip(cands, row["candidate_scores"]):
                ids = hybrid.chat_ids(tok, prompt + [{"role": "assistant", "content": text}])
                assert abs(rm(input_ids=torch.tensor([ids])).logits[0, 0].item() - s) < 1e-4
        # v2: chosen = highest score (ties: shortest), rejected = lowest score (ties: closest length)
        scores = row["candidate_scores"]
        c, r = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert row["score_chosen"] == max(scores) and row["score_rejected"] == min(scores) < max(scores)
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in cands]
        assert c == cands[hybrid.pick_pair(scores, lengths)[0]] and r == cands[hybrid.pick_pair(scores, lengths)[1]]
    assert sampled_new > 48  # the policy's own samples are there, not only the existing pairs

    # the output is a normal preference dataset: wpo.py and dpo.py train on it from their command lines
    for script in ("wpo.py", "dpo.py"):
        out = tmp_path / script[:-3]
        run_script(script, "--preset", "tiny", "--model_name_or_path", str(small_sft), "--dataset_name", str(built),
                   "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2",
                   "--per_device_train_batch_size", "16", "--logging_steps", "1")
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert (out / "model.safetensors").exists() and [r["step"] for r in rows if "train/loss" in r] == [1, 2]
        assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2]  # evaluated on the built test_prefs split

    # v1 on the same prompts: same chosen rule, rejected any lower-scored candidate; --overwrite_output_dir replaces
    p = run_script(*build_args(tiny, small_sft, reward_model, built, "--num_samples", "3", "--temperature", "1.0",
                               "--batch_size", "16", "--max_train_samples", "24", "--eval_split", "None", "--pair_rule",
                               "v1", "--overwrite_output_dir"))
    ds = load_from_disk(str(built))
    assert sorted(ds) == ["train_prefs"] and len(ds["train_prefs"]) == 24 and "24 pairs from 24 prompts" in p.stdout
    for row in ds["train_prefs"]:
        scores = row["candidate_scores"]
        assert row["score_chosen"] == max(scores) and row["score_rejected"] < max(scores)
        assert row["chosen"][-1]["content"] == row["candidates"][scores.index(max(scores))]


# ---------------------------------------------------------------------------------------------
# user errors: exit code 2, one message, nothing written
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    (dict(temperature=0.0), "--temperature must be above 0"),
    (dict(top_p=1.5), "--top_p must be in (0, 1]"),
    (dict(max_prompt_length=128), "--max_prompt_length (128) must be below --max_length (128)"),
    (dict(num_samples=1, include_existing=False), "a pair needs at least two candidates"),
    (dict(num_samples=0), "--num_samples must be at least 1 (got 0)"),
    (dict(batch_size=0), "--batch_size must be at least 1 (got 0)"),
    (dict(max_train_samples=0), "--max_train_samples must be at least 1 (got 0)"),
    (dict(eval_split="train_prefs"), "--train_split and --eval_split are both 'train_prefs'"),
])
def test_argument_errors_exit_2(change, message, capsys, tmp_path):
    args = dataclasses.replace(TINY, output_dir=str(tmp_path / "out"), **change)
    with pytest.raises(SystemExit) as e:
        hybrid.validate(args)
    assert e.value.code == 2 and f"error: {message}" in capsys.readouterr().err


def test_user_errors_exit_2_and_write_nothing(tiny, small_sft, reward_model, tmp_path):
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text(json.dumps({"prompt": "copy one two"}) + "\n" + "{not json\n")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("an earlier dataset")
    empty = tmp_path / "empty"  # a model folder that exists but holds nothing (issue 26 case 15)
    empty.mkdir()
    cases = [
        (["--output_dir", str(taken)], f"output_dir {taken} already holds files"),
        (["--dataset_name", str(bad_jsonl)], f"--dataset_name {bad_jsonl} is a single file: it holds one split"),
        (["--dataset_name", str(bad_jsonl), "--eval_split", "None"], f"{bad_jsonl}, line 2: not valid JSON"),
        (["--prompt_column", "question", "--chosen_column", "a", "--rejected_column", "b"],
         f"the train_prefs split of {tiny / 'ultrafeedback'} has neither a 'question' column"),
        (["--model_name_or_path", str(tmp_path / "no_model")],  # the policy, not its tokenizer (issue 26 case 14)
         f"could not load the policy '{tmp_path / 'no_model'}': no such local folder"),
        (["--model_name_or_path", str(empty)], f"could not load the policy '{empty}': an empty folder; pass one "
         "holding a saved model"),
        (["--reward_model_name_or_path", str(tmp_path / "no_rm")],
         f"could not load the reward model '{tmp_path / 'no_rm'}': no such local folder"),  # not 'its tokenizer'
    ]
    flat_rm = tmp_path / "flat_rm"  # a reward model that scores every response 0: every prompt's candidates tie
    rm = Qwen2ForSequenceClassification.from_pretrained(reward_model)
    torch.nn.init.zeros_(rm.score.weight)
    rm.save_pretrained(flat_rm)
    AutoTokenizer.from_pretrained(reward_model).save_pretrained(flat_rm)
    cases.append((["--reward_model_name_or_path", str(flat_rm)], "no pair could be built for the train_prefs split: "
                  "every prompt's candidates score the same"))
    wide_rm = tmp_path / "wide_rm"  # a score head of another shape (3 labels) under a 1-label config
    rm.score = torch.nn.Linear(rm.config.hidden_size, 3, bias=False)
    rm.save_pretrained(wide_rm)
    AutoTokenizer.from_pretrained(reward_model).save_pretrained(wide_rm)
    cases.append((["--reward_model_name_or_path", str(wide_rm)], f"the reward model '{wide_rm}' has no trained "
                  "weights for ['score.weight']: it is not a reward model"))
    no_existing = tmp_path / "no_existing.jsonl"  # empty existing responses and one sample: under two candidates
    no_existing.write_text("".join(json.dumps({"prompt": f"copy one two {k}", "chosen": "", "rejected": ""}) + "\n"
                                   for k in range(4)))
    cases.append((["--dataset_name", str(no_existing), "--eval_split", "None", "--num_samples", "1"],
                  "no pair could be built for the train_prefs split ({'fewer than two non-empty candidates': 4})"))
    for extra, message in cases:
        out = [] if "--output_dir" in extra else ["--output_dir", str(tmp_path / "out")]
        p = run_script(*build_args(tiny, small_sft, reward_model, tmp_path / "out", *out, "--max_train_samples", "4",
                                   "--max_eval_samples", "4", *extra), check=False)
        assert p.returncode == 2, (extra, p.stderr[-2000:])
        assert f"error: {message}" in p.stderr and "Traceback" not in p.stderr, (extra, p.stderr[-2000:])
        assert not (tmp_path / "out").exists(), extra
    assert os.listdir(taken) == ["keep.txt"]  # the earlier folder is untouched


def test_no_network_fails_fast_with_the_fix(tiny, reward_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # a closed loopback port: refused at once
    cmd = [sys.executable, "hybrid_pairs.py", "--preset", "tiny", "--model_name_or_path", "some-org/some-model",
           "--dataset_name", str(tiny / "ultrafeedback"), "--reward_model_name_or_path", str(reward_model),
           "--output_dir", str(tmp_path / "out")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2 and not (tmp_path / "out").exists()
    assert ("error: no network: cannot reach the Hugging Face Hub for 'some-org/some-model'. Set HF_HUB_OFFLINE=1 "
            "to use the local cache, or pass a local path.") in p.stderr


def test_help_documents_every_flag():
    p = run_script("hybrid_pairs.py", "--help")
    for f in dataclasses.fields(hybrid.Args):
        assert (f"--{f.name}" in p.stdout) == (f.name != "config_sha256"), f.name  # set after parsing: not a flag
    assert "--no_include_existing" in p.stdout and "v1" in p.stdout and "v2" in p.stdout


@pytest.mark.parametrize("recipe, model", [
    ("hybrid_pairs-llama3-8b-instruct-v2.yaml", "meta-llama/Meta-Llama-3-8B-Instruct"),
    ("hybrid_pairs-gemma2-9b-it.yaml", "google/gemma-2-9b-it"),
])
def test_recipes_and_config_files(monkeypatch, capsys, tmp_path, recipe, model):
    parse = lambda *argv: monkeypatch.setattr(sys, "argv", ["hybrid_pairs.py", *argv]) or hybrid.parse_args()
    out = ("--output_dir", str(tmp_path / "o"))
    args = parse("--config", str(ROOT / "recipes" / "wpo" / recipe), *out)
    assert (args.model_name_or_path, args.reward_model_name_or_path, args.trust_remote_code) == (
        model, "RLHFlow/ArmoRM-Llama3-8B-v0.1", True)  # WPO README: ArmoRM scores; v2: min-score rejected
    assert (args.pair_rule, args.include_existing, args.num_samples, args.temperature, args.top_p) == (
        "v2", True, 5, 0.8, 0.95)
    assert (args.dataset_name, args.train_split, args.eval_split) == (
        "HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs")
    tiny_file = str(ROOT / "recipes" / "tiny" / "hybrid_pairs.yaml")
    assert parse("--preset", "tiny", *out) == dataclasses.replace(parse("--config", tiny_file, *out), preset="tiny")
    (tmp_path / "r.yaml").write_text("include_existing: false\nnum_samples: 3\n")
    assert parse("--config", str(tmp_path / "r.yaml"), *out).include_existing is False
    args = parse("--include_existing", "--config", str(tmp_path / "r.yaml"), "--num_samples", "4", *out)
    assert (args.include_existing, args.num_samples) == (True, 4)  # command-line flags win
    (tmp_path / "r.yaml").write_text("reward_model: x\n")
    with pytest.raises(SystemExit) as e:
        parse("--config", str(tmp_path / "r.yaml"), *out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == (f"error: --config {tmp_path / 'r.yaml'}: unknown key 'reward_model' (did you "
                                         "mean 'reward_model_name_or_path'?)\n")


def test_base_policy_tokenizer_with_chat_template(tiny, small_sft, reward_model, tmp_path):
    """A policy tokenizer without a chat template is refused with the fix; --chat_template FILE.jinja builds the
    pairs the policy's own tokenizer builds (same seed); args.json records the --preset's file and its hash."""
    tok = AutoTokenizer.from_pretrained(small_sft)
    (tmp_path / "policy.jinja").write_text(tok.chat_template)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "base_tokenizer")
    small = ("--num_samples", "2", "--max_train_samples", "8", "--eval_split", "None", "--batch_size", "8")
    base = ("--tokenizer_name", str(tmp_path / "base_tokenizer"), *small)
    p = run_script(*build_args(tiny, small_sft, reward_model, tmp_path / "out", *base), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and not (tmp_path / "out").exists()
    assert (f"error: the policy's tokenizer '{tmp_path / 'base_tokenizer'}' has no chat template; use an instruct / "
            "chat tokenizer or one with a template set, or pass --chat_template (a Jinja string or a .jinja file)"
            in p.stderr)
    run_script(*build_args(tiny, small_sft, reward_model, tmp_path / "out", *base, "--chat_template",
                           str(tmp_path / "policy.jinja")))
    run_script(*build_args(tiny, small_sft, reward_model, tmp_path / "own", *small))
    built, own = (load_from_disk(str(tmp_path / name))["train_prefs"] for name in ("out", "own"))
    assert len(built) == 8 and built.to_list() == own.to_list()
    saved = json.load(open(tmp_path / "out" / "args.json"))
    tiny_file = ROOT / "recipes" / "tiny" / "hybrid_pairs.yaml"
    assert saved["chat_template"] == str(tmp_path / "policy.jinja") and saved["config"] == str(tiny_file)
    assert saved["config_sha256"] == hashlib.sha256(tiny_file.read_bytes()).hexdigest()
