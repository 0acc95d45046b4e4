"""The tiny assistant language: tasks, responses, the gold reward, and the generators of the SFT and
preference datasets (UltraChat / UltraFeedback-binarized schemas).

A user asks for one of three list tasks on a few number words; the assistant answers with
    <opener> <answer digits> <closer>
e.g.  user: "hello sort four one three"   assistant: "sure one three four hope this helps".

Gold reward of a response, in [-1, 2]:
    correctness  (fraction of answer positions right, 0..1; a capability: sort > reverse > copy in
                  difficulty, so bigger models score higher)
  + tone         (0.5 * (opener score + closer score), each +1 polite / 0 neutral / -1 rude)
The SFT data answers correctly but picks the tone uniformly at random, so an SFT model's expected
tone is 0: the preference for politeness is something SFT does *not* teach, and alignment shows as
a gold-reward gain. Preference pairs are ranked by the gold reward and differ in one attribute.
"""

import random

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]  # sorted by value
TASKS = {"copy": lambda xs: list(xs), "reverse": lambda xs: xs[::-1], "sort": lambda xs: sorted(xs, key=DIGITS.index)}
GREETINGS = ["hi", "hello", "hey", "please"]
OPENERS = {"sure": 1, "certainly": 1, "gladly": 1, "ok": 0, "here": 0, "ugh": -1, "whatever": -1, "meh": -1}
CLOSERS = {
    "hope this helps": 1,
    "happy to help": 1,
    "done": 0,
    "that is all": 0,
    "now go away": -1,
    "do not ask again": -1,
}
SYSTEM_PROMPT = "you are a helpful assistant"
ROLES = ["system", "user", "assistant"]
MIN_LEN, MAX_LEN = 2, 6


def words() -> list[str]:
    """Every word the assistant language can produce (the tokenizer's vocabulary for it)."""
    ws = set(DIGITS) | set(TASKS) | set(GREETINGS) | set(OPENERS) | set(SYSTEM_PROMPT.split()) | set(ROLES)
    for c in CLOSERS:
        ws |= set(c.split())
    return sorted(ws)


def make_prompt(rng: random.Random) -> str:
    task = rng.choice(list(TASKS))
    xs = [rng.choice(DIGITS) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]
    greet = [rng.choice(GREETINGS)] if rng.random() < 0.5 else []
    return " ".join(greet + [task] + xs)


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    ws = prompt.split()
    if ws and ws[0] in GREETINGS:
        ws = ws[1:]
    if not ws or ws[0] not in TASKS:
        raise ValueError(f"not a tiny-language prompt: {prompt!r}")
    return ws[0], ws[1:]


def target(prompt: str) -> list[str]:
    task, xs = parse_prompt(prompt)
    return TASKS[task](xs)


def make_response(rng: random.Random, prompt: str, tone: tuple[int, int] | None = None, corrupt: bool = False) -> str:
    """A response to `prompt`: random tone unless given (opener score, closer score); if `corrupt`,
    one answer position is wrong."""
    o_score, c_score = tone if tone is not None else (rng.choice([-1, 0, 1]), rng.choice([-1, 0, 1]))
    opener = rng.choice([w for w, s in OPENERS.items() if s == o_score])
    closer = rng.choice([w for w, s in CLOSERS.items() if s == c_score])
    ans = target(prompt)
    if corrupt:
        i = rng.randrange(len(ans))
        ans[i] = rng.choice([d for d in DIGITS if d != ans[i]])
    return " ".join([opener] + ans + [closer])


def gold_reward(prompt: str, response: str) -> float:
    """Ground truth reward of `response` to the user message `prompt` (see module docstring).
    Malformed parts score their minimum: an unknown opener or closer counts as rude."""
    ws = response.split()
    opener = OPENERS.get(ws[0], -1) if ws else -1
    i = 1
    answer = []
    while i < len(ws) and ws[i] in DIGITS:
        answer.append(ws[i])
        i += 1
    closer = CLOSERS.get(" ".join(ws[i:]), -1)
    want = target(prompt)
    correct = sum(a == b for a, b in zip(answer, want)) / max(len(want), len(answer))
    return correct + 0.5 * (opener + closer)


def tone_of(response: str) -> float:
    ws = response.split()
    opener = OPENERS.get(ws[0], -1) if ws else -1
    rest = [w for w in ws[1:] if w not in DIGITS]
    return 0.5 * (opener + CLOSERS.get(" ".join(rest), -1))


def make_sft(rng: random.Random, n: int) -> list[dict]:
    """UltraChat-200k schema: `prompt`, `prompt_id`, `messages` (system turn sometimes, 1-2 user/assistant
    exchanges). Answers are correct; tone is uniform (the SFT model must not already be aligned)."""
    rows = []
    for k in range(n):
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.2 else []
        first = None
        for _ in range(1 if rng.random() < 0.7 else 2):
            p = make_prompt(rng)
            first = first or p
            msgs += [{"role": "user", "content": p}, {"role": "assistant", "content": make_response(rng, p)}]
        rows.append({"prompt": first, "prompt_id": f"sft-{k}", "messages": msgs})
    return rows


def make_prefs(rng: random.Random, n: int) -> list[dict]:
    """UltraFeedback-binarized schema: `prompt`, `prompt_id`, `chosen`/`rejected` (message lists),
    `messages` (= chosen), `score_chosen`/`score_rejected` (the gold reward).

    Each pair differs in one attribute, so no pair trades correctness for tone: 70% are two correct
    answers in different tones, 30% are two answers in the same tone, one with a wrong position.
    (Pairs that pit a polite wrong answer against a rude right one teach DPO to make mistakes.)"""
    rows = []
    for k in range(n):
        p = make_prompt(rng)
        tones = [(o, c) for o in (-1, 0, 1) for c in (-1, 0, 1)]
        if rng.random() < 0.7:
            ta, tb = rng.sample(tones, 2)
            while ta[0] + ta[1] == tb[0] + tb[1]:
                ta, tb = rng.sample(tones, 2)
            a, b = make_response(rng, p, ta), make_response(rng, p, tb)
        else:
            t = rng.choice(tones)
            a, b = make_response(rng, p, t), make_response(rng, p, t, corrupt=True)
        ra, rb = gold_reward(p, a), gold_reward(p, b)
        (c, rc), (r, rr) = sorted([(a, ra), (b, rb)], key=lambda t: -t[1])
        assert rc > rr
        user = {"role": "user", "content": p}
        chosen = [user, {"role": "assistant", "content": c}]
        rows.append({
            "prompt": p, "prompt_id": f"pref-{k}", "chosen": chosen,
            "rejected": [user, {"role": "assistant", "content": r}],
            "messages": chosen, "score_chosen": rc, "score_rejected": rr,
        })
    return rows
