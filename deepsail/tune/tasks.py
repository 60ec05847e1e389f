"""Verifiable tasks for post-training: generated problems with exact checkers, the R1 answer format, rule rewards.

DeepSeek-R1 trains reasoning with rewards a program computes, not a learned reward model: a *format* reward (the
reply thinks inside <think>...</think>, then answers inside <answer>...</answer>) and an *accuracy* reward (the
answer is right, checked exactly). Here the problems are generated, so they exist on every machine and the checker
is exact:

- `arithmetic`: a + b or a - b with `digits`-digit operands ("What is 47 + 385?" -> 432);
- `sorting`: a short list of small integers, ascending ("Sort: 7, 3, 9, 1" -> "1, 3, 7, 9");
- `counting`: how many times a letter occurs in a short word-like string ("How many 'a' in 'banana'?" -> 3).

Splits are fixed by a hash of the question, not by the generator's seed: a problem is held out ("test") when its
hash falls in the lowest `TEST_FRACTION`, so no seed or count ever draws a test problem into training, and the test
split is the same set whoever asks. `problems(task, "test", n)` is the first n of them in a fixed order.

`demonstration(problem)` is a correct worked reply in the format (the SFT data of the recipe); `wrong_reply` is a
plausible wrong one (the rejected side of the embedded DPO pairs).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TEST_FRACTION = 0.1
SYSTEM = (
    "Solve the problem. Think step by step inside <think> </think>, then give only the final answer inside "
    "<answer> </answer>."
)
# The whole reply: one think block, then one answer block, nothing else (R1's format reward).
FORMAT_RE = re.compile(r"^\s*<think>(?:(?!</?think>).)*</think>\s*<answer>((?:(?!</?answer>).)*)</answer>\s*$", re.S)
ANSWER_RE = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.S)
THINK_RE = re.compile(r"<think>((?:(?!</?think>).)*)</think>", re.S)


@dataclass(frozen=True)
class Problem:
    task: str
    question: str
    answer: str  # the canonical answer text
    steps: str  # the reasoning a demonstration writes inside <think>


# --- generators: one problem from a random stream --------------------------------------------------------------------
def column_steps(a: int, b: int, op: str) -> str:
    """Schoolbook arithmetic, ones column first, as a small model can follow it: "7+5=12 carry 1, 4+8+1=13 carry 1,
    ..." for a sum; "5-7 borrow: 15-7=8, ..." for a difference (a smaller minus a larger is the larger minus the
    smaller, negated). A model trained on the bare "a + b = c" must guess every digit of c at once: on the embedded
    recipe's 11M-parameter model that reached 2% held-out accuracy where the column steps reach far more."""
    if op == "-" and a < b:
        return f"{a} - {b} = -({b} - {a}); {column_steps(b, a, '-')}, so {a - b}"
    xs, ys = str(a)[::-1], str(b)[::-1]
    parts, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        if op == "+":
            total = x + y + carry
            parts.append(f"{x}+{y}{f'+{carry}' if carry else ''}={total}{' carry 1' if total > 9 else ''}")
            carry = total // 10
        else:
            top = x - carry
            if top < y:
                parts.append(f"{x}{f'-{carry}' if carry else ''}-{y} borrow: {top + 10}-{y}={top + 10 - y}")
                carry = 1
            else:
                parts.append(f"{x}{f'-{carry}' if carry else ''}-{y}={top - y}")
                carry = 0
    return ", ".join(parts)


def _arithmetic(rng: random.Random, digits: int) -> Problem:
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    a, b, op = rng.randint(lo, hi), rng.randint(lo, hi), rng.choice("+-")
    value = a + b if op == "+" else a - b
    steps = column_steps(a, b, op) if op == "-" and a < b else f"{a} {op} {b}: {column_steps(a, b, op)}, so {value}"
    return Problem("arithmetic", f"What is {a} {op} {b}?", str(value), steps)


def _sorting(rng: random.Random, digits: int) -> Problem:
    xs = [rng.randint(0, 10**digits - 1) for _ in range(rng.randint(3, 5))]
    ys = sorted(xs)
    listed = ", ".join(map(str, xs))
    return Problem(
        "sorting",
        f"Sort in ascending order: {listed}",
        ", ".join(map(str, ys)),
        f"smallest first: {', '.join(map(str, ys))}",
    )


def _counting(rng: random.Random, digits: int) -> Problem:
    letters = "abcde"[: 2 + min(digits, 3)]
    word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 8)))
    letter = rng.choice(letters)
    hits = [i + 1 for i, c in enumerate(word) if c == letter]
    return Problem(
        "counting",
        f"How many times does '{letter}' occur in '{word}'?",
        str(len(hits)),
        f"'{letter}' at positions {', '.join(map(str, hits)) or 'none'}: {len(hits)}",
    )


GENERATORS: dict[str, Callable[[random.Random, int], Problem]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "counting": _counting,
}


def check_task(task: str) -> None:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; the verifiable tasks are: {', '.join(GENERATORS)}")


def split_of(question: str) -> str:
    h = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big")
    return "test" if h < TEST_FRACTION * 2**64 else "train"


def problems(task: str, split: str = "train", n: int = 100, seed: int = 0, digits: int = 2) -> list[Problem]:
    """`n` distinct problems of `task` from `split` ("train" or "test"). Train problems depend on `seed`; the test
    split ignores it (always the same problems, in the same order, for a given `digits`)."""
    check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1 or digits < 1:
        raise ValueError(f"n and digits must be >= 1, got n={n}, digits={digits}")
    rng = random.Random(f"{task}/{digits}/{'test' if split == 'test' else seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    for _ in range(200 * n + 10_000):  # small spaces (1-digit sums) run out: fail clearly instead of looping
        p = GENERATORS[task](rng, digits)
        if p.question not in seen and split_of(p.question) == split:
            seen.add(p.question)
            out.append(p)
            if len(out) == n:
                return out
    raise ValueError(f"{task} with digits={digits} has fewer than {n} distinct {split} problems; ask for fewer")


# --- prompts, demonstrations, rewards -------------------------------------------------------------------------------
def messages(problem: Problem) -> list[dict[str, str]]:
    """The chat a policy answers: the format instruction, then the question."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": problem.question}]


def demonstration(problem: Problem) -> str:
    return f"<think>{problem.steps}</think>\n<answer>{problem.answer}</answer>"


def demonstration_chats(task: str, split: str, n: int, seed: int = 0, digits: int = 2) -> list[dict]:
    """SFT records (`{"messages": [...]}`): `n` problems of `split`, each answered by its demonstration."""
    return [
        {"messages": [*messages(p), {"role": "assistant", "content": demonstration(p)}], "source": f"{task}/{split}"}
        for p in problems(task, split, n, seed=seed, digits=digits)
    ]


def parse_embedded(spec: str) -> tuple[str, int] | None:
    """`embedded:TASK` or `embedded:TASK:DIGITS` (the SFT data of the R1 recipe) -> (task, digits); None otherwise."""
    if not spec.startswith("embedded:"):
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[1] not in GENERATORS or (len(parts) == 3 and not parts[2].isdigit()):
        raise ValueError(
            f"--data {spec!r}: the embedded task data is embedded:TASK or embedded:TASK:DIGITS with TASK one of "
            f"{', '.join(GENERATORS)} (e.g. embedded:arithmetic:2)."
        )
    return parts[1], int(parts[2]) if len(parts) == 3 else 2


def wrong_reply(problem: Problem, rng: random.Random) -> str:
    """A well-formed reply with a wrong answer: numbers nudged by a small amount (the rejected side of DPO pairs)."""
    nums = re.findall(r"-?\d+", problem.answer)
    wrong = problem.answer
    while wrong == problem.answer:
        k = rng.randrange(len(nums)) if nums else 0
        delta = rng.choice([-10, -2, -1, 1, 2, 10])
        parts = [str(int(x) + (delta if i == k else 0)) for i, x in enumerate(nums)] or [problem.answer + "0"]
        wrong = ", ".join(parts) if problem.task == "sorting" else parts[0]
    head, _, tail = problem.steps.rpartition(problem.answer)  # every task's steps end by stating the answer
    return f"<think>{head}{wrong}{tail}</think>\n<answer>{wrong}</answer>"


def extract_answer(reply: str) -> str | None:
    """The text of the last <answer> block, stripped; None if there is none."""
    found = ANSWER_RE.findall(reply)
    return found[-1].strip() if found else None


def _normal(task: str, text: str) -> str | None:
    """An answer in canonical form, or None when it cannot be one (so it never matches)."""
    nums = re.findall(r"-?\d+", text)
    if task == "sorting":
        return ", ".join(str(int(x)) for x in nums) if nums and re.fullmatch(r"[\s,\-\d]+", text) else None
    return str(int(nums[0])) if len(nums) == 1 and re.fullmatch(r"\s*[-+]?\d+\s*", text) else None


def format_reward(reply: str) -> float:
    """1 when the reply is exactly one <think> block then one <answer> block, else 0."""
    return 1.0 if FORMAT_RE.match(reply) else 0.0


def accuracy_reward(reply: str, problem: Problem) -> float:
    """1 when the reply's answer equals the problem's, compared in canonical form ("+85 " == "85"), else 0."""
    given = extract_answer(reply)
    return 1.0 if given is not None and _normal(problem.task, given) == problem.answer else 0.0


def steps_reward(reply: str, problem: Problem) -> float:
    """The share of the problem's worked steps (its demonstration's reasoning, split at commas and semicolons:
    "3+2=5", "6+7=13 carry 1", "so 135") that the reply's first <think> block writes exactly and in order. Still a
    rule checked exactly, but per step: a reply with one wrong column fact keeps the share of the steps it got right,
    where the accuracy reward gives it the same 0 as a reply with every fact wrong. Nothing but the right steps
    earns it."""
    found = THINK_RE.search(reply)
    if found is None:
        return 0.0
    think, at, hits = found.group(1), 0, 0
    steps = worked_steps(problem)
    for step in steps:
        i = think.find(step, at)
        if i >= 0:
            hits, at = hits + 1, i + len(step)
    return hits / len(steps)


def step_marks(reply: str, problem: Problem) -> list[tuple[int, int, float]]:
    """The reply's worked steps, judged one by one: for each of the problem's steps, the character span (start, end)
    of the reply's step in the same place (its first <think> block split the same way) and 1.0 when it is exactly
    that step, else 0.0. A step the reply never wrote is (0, 0, 0.0): wrong, no span. What `--process-weight`
    turns into per-token advantages: a wrong column fact is blamed on its own tokens."""
    found = THINK_RE.search(reply)
    written = []
    for part in re.finditer(r"[^,;]+", found.group(1)) if found is not None else ():
        text = part.group().strip()
        if text:
            start = found.start(1) + part.start() + len(part.group()) - len(part.group().lstrip())
            written.append((start, start + len(text), text))
    return [
        (*written[j][:2], float(written[j][2] == step)) if j < len(written) else (0, 0, 0.0)
        for j, step in enumerate(worked_steps(problem))
    ]


def worked_steps(problem: Problem) -> list[str]:
    """The problem's reasoning split into steps at commas and semicolons ("3+2=5", "6+7=13 carry 1", "so 135")."""
    return [part.strip() for part in re.split(r"[,;]", problem.steps) if part.strip()]


def reward(reply: str, problem: Problem, format_weight: float = 0.1, steps_weight: float = 0.0) -> float:
    """R1's rule reward: accuracy, plus a smaller weight on the format; `steps_weight` adds the steps reward (0 = R1's
    outcome rewards only)."""
    out = accuracy_reward(reply, problem) + format_weight * format_reward(reply)
    return out + steps_weight * steps_reward(reply, problem) if steps_weight else out
