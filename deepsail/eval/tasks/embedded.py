"""The datasets behind deepsail's lm-eval tasks (the YAML files beside this one), built from what every machine
has: no download. lm-eval calls these through each YAML's `custom_dataset: !function embedded.NAME`.

- `arithmetic`: generated problems with exact answers (a + b, a - b, a x b, up to 3 digits), deterministic by seed;
  each with three wrong choices near the answer (off by one, off by ten, digits swapped) for the multiple-choice
  form. A fixed held-out split ("test") and a disjoint few-shot split ("train").
- `stdlib_package`: which stdlib package a 1 kB chunk of source comes from (`data.tasks.module_chunks`, the
  classification task `deepsail finetune --task classify` trains on; its val split is held out of that training).
- `stdlib_documents`: the embedded corpus's held-out files (`data.corpus`'s val split, never trained on by
  `deepsail run`), one document each, for rolling log-likelihood: perplexity and bits per byte.
- `stdlib_completion`: held-out "write the function this docstring describes" pairs (`data.tasks.docstring_chats`,
  val split), scored by BLEU / chrF of the generated code.
"""

from __future__ import annotations

import random
from typing import Any

import datasets

ARITHMETIC_TEST, ARITHMETIC_FEWSHOT = 500, 50


def _problem(rng: random.Random) -> dict[str, Any]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 9)
    else:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    wrong = {answer + 1, answer - 1, answer + 10, answer - 10}
    swapped = str(abs(answer))[::-1]
    if len(swapped) > 1 and swapped[0] != "0":
        wrong.add(int(swapped) * (1 if answer >= 0 else -1))
    wrong.discard(answer)
    choices = [answer, *rng.sample(sorted(wrong), 3)]
    rng.shuffle(choices)
    sign = {"+": "+", "-": "-", "*": "x"}[op]
    return {
        "question": f"What is {a} {sign} {b}?",
        "answer": str(answer),
        "choices": [str(c) for c in choices],
        "label": choices.index(answer),
    }


def arithmetic_records(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
    """`n` distinct problems from `seed`, none of whose questions is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        p = _problem(rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    return out


def arithmetic(**_: Any) -> datasets.DatasetDict:
    test = arithmetic_records(ARITHMETIC_TEST, seed=1)
    shots = arithmetic_records(ARITHMETIC_FEWSHOT, seed=2, exclude={p["question"] for p in test})
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(test), "train": datasets.Dataset.from_list(shots)})


def stdlib_package(**_: Any) -> datasets.DatasetDict:
    from deepsail.data.tasks import module_chunks

    val, labels = module_chunks("val", max_per_family=25)
    train, _ = module_chunks("train", max_per_family=5)

    def rows(records: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_list(
            [{"text": r["text"], "choices": labels, "label": labels.index(r["label"])} for r in records]
        )

    return datasets.DatasetDict({"test": rows(val), "train": rows(train)})


def stdlib_documents(**_: Any) -> datasets.DatasetDict:
    from deepsail.data.corpus import default_corpus

    docs = default_corpus("val")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d.text} for d in docs])})


def stdlib_completion(**_: Any) -> datasets.DatasetDict:
    from deepsail.data.tasks import docstring_chats

    def rows(records: list[dict]) -> datasets.Dataset:
        return datasets.Dataset.from_list(
            [{"prompt": r["messages"][0]["content"], "code": r["messages"][1]["content"]} for r in records]
        )

    return datasets.DatasetDict(
        {"test": rows(docstring_chats("val")), "train": rows(docstring_chats("train", max_records=20))}
    )
