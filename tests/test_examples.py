"""The applications in examples/: code completion scored by running unit checks out of process, and text
classification from raw files to a report. Their machinery is tested here, and each runs end to end on the tiny
model (which passes ~nothing and classifies at chance: the figures are honest, the test checks the counts)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cc = _example("code_completion")
clf = _example("classify")
CLAMP = next(p for p in cc.PROBLEMS if p.name == "clamp")


# --- code completion: the harness ----------------------------------------------------------------------------------
def _program(body: str) -> str:
    return cc.code_prompt(CLAMP) + body


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended while we looked
        return b""


def test_checks_pass_a_working_body_and_fail_every_broken_one():
    assert cc.run_checks(_program("    return max(lo, min(x, hi))\n"), CLAMP.checks) == (True, "pass")
    assert cc.run_checks(_program("    return x\n"), CLAMP.checks) == (False, "AssertionError")
    ok, why = cc.run_checks(_program("    raise RuntimeError('boom')\n"), CLAMP.checks)
    assert not ok and why == "RuntimeError: boom"
    # Leaving early with a clean exit code is not passing: the checks never ran.
    for leave in ("    import sys; sys.exit(0)\n", "    import os; os._exit(0)\n"):
        assert cc.run_checks(_program(leave) + "clamp(0, 0, 0)\n", CLAMP.checks) == (
            False,
            "exited before the checks ran",
        )
    # An endless loop is killed at the timeout, and what it started in the background with it.
    marker = f"deepsail-test-{time.time_ns()}"
    forks = (
        f"    import subprocess, sys\n    subprocess.Popen([sys.executable, '-c', 'while True: pass', '{marker}'])\n"
    )
    start = time.monotonic()
    outcome = cc.run_checks(_program(forks + "    while True:\n        pass\n"), CLAMP.checks, timeout_s=1.0)
    assert outcome == (False, "timeout") and time.monotonic() - start < 4
    time.sleep(0.2)
    alive = [p for p in Path("/proc").glob("[0-9]*/cmdline") if marker.encode() in _read(p)]
    assert not alive, alive
    # The limits and the socket guard hold inside the child.
    ok, why = cc.run_checks(_program("    b = bytearray(1 << 30)\n    return x\n"), CLAMP.checks)
    assert not ok and why.startswith("MemoryError")
    ok, why = cc.run_checks(
        _program("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n"), "clamp(0, 0, 0)"
    )
    assert not ok and "network access is disabled" in why
    ok, why = cc.run_checks(_program("    print('x' * 100_000_000)\n"), "clamp(0, 0, 0)")
    assert not ok and "File too large" in why  # the output is capped at FILE_BYTES, not buffered here


def test_what_counts_as_a_function():
    assert cc.invalid_reason(_program("    return x\n"), "clamp") is None
    assert cc.invalid_reason(_program("\n"), "clamp") == "empty body"  # the docstring alone compiles, but is no body
    assert cc.invalid_reason(_program("    return (\n"), "clamp").startswith("syntax error")
    assert cc.invalid_reason("return 1\n", "clamp").startswith("syntax error")  # parses; compiling refuses it
    assert cc.invalid_reason("def other(x):\n    return x\n", "clamp") == "no function clamp"
    # A code-format completion ends where the file goes back to column 0; a chat answer's code is its fenced block.
    assert cc.body_of("    return x\n\nprint(clamp(1, 2, 3))\n") == "    return x\n"
    assert cc.function_of("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert cc.chat_request(CLAMP).startswith("Write the Python function `clamp(x, lo, hi)` this docstring describes")


def test_reference_solutions_all_pass(tmp_path):
    summary = cc.main(["--check", "--out", str(tmp_path)])
    assert summary["problems"] == len(cc.PROBLEMS) >= 20 and summary["passed"] == summary["problems"]
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows] == ["pass"] * len(cc.PROBLEMS)


def test_code_completion_runs_on_a_model(tiny_model_dir, tmp_path):
    summary = cc.main([str(tiny_model_dir), "--out", str(tmp_path), "--max-tokens", "12", "--device", "cpu"])
    n = len(cc.PROBLEMS)
    assert summary["problems"] == n and 0 <= summary["passed"] <= summary["valid"] <= n
    report = (tmp_path / "report.md").read_text()
    assert f"| {summary['passed']}/{n} = " in report and report.count("\n| `") == n
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == n and all(r["program"].startswith(cc.code_prompt(p)) for r, p in zip(rows, cc.PROBLEMS))
    assert sum(r["passed"] for r in rows) == summary["passed"]
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "run_config.json").write_text(json.dumps({"tune": {"task": "sft"}}))
    assert cc.choose_format(tmp_path / "sft", "auto") == "chat" and cc.choose_format(tiny_model_dir, "auto") == "code"


# --- classification ------------------------------------------------------------------------------------------------
def test_classify_from_raw_files_to_a_report(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [str(tiny_model_dir), "--out", str(out), "--steps", "2", "--per-label", "5", "--seq-len", "48"]
    summary = clf.main([*argv, "--batch-size", "4", "--device", "cpu"])
    labels = sorted(p.name for p in (out / "embedded").iterdir())  # the raw folder it wrote and then read
    assert summary["labels"] == labels and len(labels) == 8 and summary["held_out"] > 0
    for scores in (summary["model"], summary["baseline"]):
        assert set(scores) == {"accuracy", "macro_f1"} and all(0 <= v <= 1 for v in scores.values())
    # Scored from the saved classifier, on the records the fine-tuning verb held out: its own figure agrees.
    verb = json.loads((out / "run" / "summary.json").read_text())
    assert abs(verb["val_accuracy"] - summary["model"]["accuracy"]) < 1e-9
    report = (out / "report.md").read_text()
    assert "bag-of-words logistic regression" in report and "| true \\ predicted | asyncio |" in report
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "data.jsonl").read_text().splitlines()) == sum(
        len(list((out / "embedded" / label).glob("*.txt"))) for label in labels
    )


def test_classify_refuses_data_it_cannot_learn_from(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        clf.read_records(tmp_path / "missing")
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "a.txt").write_text("some text")
    with pytest.raises(ValueError, match=r"no label subfolders .* have no label"):
        clf.read_records(loose)
    one = tmp_path / "one"
    (one / "spam").mkdir(parents=True)
    for i in range(3):
        (one / "spam" / f"{i}.txt").write_text(f"buy now {i}")
    with pytest.raises(ValueError, match=r"3 texts but 1 label\(s\) \['spam'\]; a classifier needs at least 2"):
        clf.read_records(one)
    (one / "ham").mkdir()
    (one / "ham" / "0.txt").write_text("   \n")  # blank files are no examples
    with pytest.raises(ValueError, match="needs at least 2"):
        clf.read_records(one)
    (one / "ham" / "1.txt").write_text("see you at lunch")
    assert sorted({r["label"] for r in clf.read_records(one)}) == ["ham", "spam"]
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    with pytest.raises(ValueError, match="needs at least 2"):
        clf.read_records(jsonl)
    with pytest.raises(ValueError, match="not an empty folder"):
        clf.main(["unused-base", "--data", str(one), "--out", str(one)])
