"""The datasets behind deepsail's lm-eval tasks (the YAML files beside this one), built from what every machine
has: no download. lm-eval calls these through each YAML's `custom_dataset: !function embedded.NAME`.

- `arithmetic`: the verifiable task GRPO trains on (`tune.tasks`: 2-digit a + b, a - b, exact answers), its fixed
  held-out split, each problem with three wrong choices near the answer for the multiple-choice form; few-shot
  examples come from its train split.
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

ARITHMETIC_TEST, ARITHMETIC_FEWSHOT = 400, 50


def _with_choices(problem: Any) -> dict[str, Any]:
    """The problem as a record, with three wrong choices near the answer (off by one, off by ten, digits
    swapped), shuffled by a stream seeded with the question so the record never changes."""
    answer = int(problem.answer)
    rng = random.Random(problem.question)
    wrong = {answer + 1, answer - 1, answer + 10, answer - 10}
    swapped = str(abs(answer))[::-1]
    if len(swapped) > 1 and swapped[0] != "0":
        wrong.add(int(swapped) * (1 if answer >= 0 else -1))
    wrong.discard(answer)
    choices = [answer, *rng.sample(sorted(wrong), 3)]
    rng.shuffle(choices)
    return {
        "question": problem.question,
        "answer": problem.answer,
        "choices": [str(c) for c in choices],
        "label": choices.index(answer),
    }


def arithmetic(**_: Any) -> datasets.DatasetDict:
    """The GRPO task's own problems (`tune.tasks`, 2-digit + and -): its held-out split, and train problems as
    few-shot examples."""
    from deepsail.tune.tasks import problems

    test = [_with_choices(p) for p in problems("arithmetic", "test", ARITHMETIC_TEST)]
    shots = [_with_choices(p) for p in problems("arithmetic", "train", ARITHMETIC_FEWSHOT)]
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
