"""The verifiable tasks: fixed disjoint splits, exact checkers, demonstrations whose every step is true."""

from __future__ import annotations

import random
import re

import pytest

from deepsail.tune import tasks as T


@pytest.mark.parametrize("task", list(T.GENERATORS))
def test_splits_are_fixed_and_disjoint(task):
    test = T.problems(task, "test", 50)
    assert [p.question for p in test] == [p.question for p in T.problems(task, "test", 50, seed=7)]  # seed-free
    train = {p.question for s in range(3) for p in T.problems(task, "train", 200, seed=s)}
    assert not train & {p.question for p in test}
    assert all(T.split_of(p.question) == "test" for p in test)


@pytest.mark.parametrize("task", list(T.GENERATORS))
def test_demonstrations_earn_full_reward_and_wrong_replies_none(task):
    rng = random.Random(0)
    for p in T.problems(task, "train", 100):
        good, bad = T.demonstration(p), T.wrong_reply(p, rng)
        assert T.format_reward(good) == 1 and T.accuracy_reward(good, p) == 1
        assert T.reward(good, p) == pytest.approx(1.1)
        assert T.format_reward(bad) == 1 and T.accuracy_reward(bad, p) == 0


def test_every_column_step_is_true():
    """Each "x+y(+c)=t" and "x(-c)-y=t" the demonstrations write holds, and the columns' digits spell the answer: a
    demonstration that taught a wrong step would cap what SFT can reach."""
    for a in range(0, 100, 3):
        for b in range(0, 100, 7):
            for op in "+-":
                big, small = (b, a) if op == "-" and a < b else (a, b)
                columns = T.column_steps(big, small, op).split(", ")
                for column in columns:
                    for lhs, rhs in re.findall(r"(\d+(?:[+-]\d+)+)=(\d+)", column):
                        assert eval(lhs) == int(rhs), (a, op, b, column)
                digits = "".join(str(int(re.findall(r"=(\d+)", c)[-1]) % 10) for c in reversed(columns))
                if op == "+" and "carry 1" in columns[-1]:
                    digits = "1" + digits
                assert int(digits) == (big + small if op == "+" else big - small), columns


def test_answers_compare_in_canonical_form():
    p = T.Problem("arithmetic", "What is 40 + 45?", "85", "")
    assert T.accuracy_reward("<think>x</think><answer> +85 </answer>", p) == 1
    assert T.accuracy_reward("<think>x</think><answer>85 or 86</answer>", p) == 0
    assert T.accuracy_reward("no tags 85", p) == 0
    assert T.format_reward("<think>a</think><answer>85</answer> trailing") == 0
    s = T.Problem("sorting", "Sort", "1, 3, 7", "")
    assert T.accuracy_reward("<think></think><answer>1,3, 7</answer>", s) == 1
    assert T.accuracy_reward("<think></think><answer>1, 7, 3</answer>", s) == 0


def test_steps_reward_counts_the_right_steps_in_order():
    p = T.Problem("arithmetic", "What is 79 + 41?", "120", "79 + 41: 9+1=10 carry 1, 7+4+1=12 carry 1, so 120")
    assert T.steps_reward(T.demonstration(p), p) == 1
    wrong_fact = "<think>79 + 41: 9+1=10 carry 1, 7+4+1=11 carry 1, so 110</think><answer>110</answer>"
    assert T.steps_reward(wrong_fact, p) == pytest.approx(1 / 3) and T.accuracy_reward(wrong_fact, p) == 0
    out_of_order = "<think>7+4+1=12 carry 1, 79 + 41: 9+1=10 carry 1</think><answer>120</answer>"
    assert T.steps_reward(out_of_order, p) == pytest.approx(1 / 3)  # the first step, then nothing after it
    assert T.steps_reward("9+1=10 carry 1 <answer>120</answer>", p) == 0  # outside <think> nothing counts
    assert T.reward(wrong_fact, p, 0.1, 0.5) == pytest.approx(0.1 + 0.5 / 3)
    assert T.reward(T.demonstration(p), p, 0.1, 0.0) == pytest.approx(1.1)  # off by default: R1's rewards


def test_step_marks_judge_each_written_step_in_place():
    p = T.Problem("arithmetic", "What is 79 + 41?", "120", "79 + 41: 9+1=10 carry 1, 7+4+1=12 carry 1, so 120")
    demo = T.demonstration(p)
    marks = T.step_marks(demo, p)
    assert [demo[a:b] for a, b, _ in marks] == ["79 + 41: 9+1=10 carry 1", "7+4+1=12 carry 1", "so 120"]
    assert [m[2] for m in marks] == [1.0, 1.0, 1.0]
    wrong_fact = "<think>79 + 41: 9+1=10 carry 1, 7+4+1=11 carry 1, so 110</think><answer>110</answer>"
    assert [m[2] for m in T.step_marks(wrong_fact, p)] == [1.0, 0.0, 0.0]
    short = "<think>79 + 41: 9+1=10 carry 1</think><answer>10</answer>"
    assert T.step_marks(short, p)[1:] == [(0, 0, 0.0), (0, 0, 0.0)]  # unwritten: wrong, and no text to blame
    assert T.step_marks("79 + 41: 9+1=10 carry 1 <answer>120</answer>", p) == [(0, 0, 0.0)] * 3


def test_bad_input():
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        T.problems("poetry")
    with pytest.raises(ValueError, match="fewer than"):
        T.problems("arithmetic", "test", 500, digits=1)
    with pytest.raises(ValueError, match="embedded:TASK"):
        T.parse_embedded("embedded:poetry")
    assert T.parse_embedded("embedded:sorting:3") == ("sorting", 3) and T.parse_embedded("chats.jsonl") is None
    chats = T.demonstration_chats("counting", "test", 3)
    assert [m["role"] for m in chats[0]["messages"]] == ["system", "user", "assistant"]
