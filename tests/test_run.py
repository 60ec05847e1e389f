"""The main job end to end at test size: `deepsail run` writes a report, a plot and a checkpoint that
`deepsail generate` samples from; and the README's commands are the ones CI runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepsail.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "quick"
    result = runner.invoke(
        app,
        [
            "run",
            "--out",
            str(out),
            "--minutes",
            "0.5",
            "--max-bytes",
            "400000",
            "--model-preset",
            "deepseek-v3-debug",
            "--vocab-size",
            "512",
            "--batch-size",
            "8",
            "--seq-len",
            "64",
            "--compare-dense",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_run_writes_report_plot_and_checkpoint(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "| moe |" in report and "| dense |" in report and "unigram baseline" in report
    assert (run_dir / "report_loss.png").stat().st_size > 10_000
    assert (run_dir / "checkpoints" / "latest").exists() and (run_dir / "dense" / "checkpoints" / "latest").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] > 5 and summary["val_bpb"] > 0
    # the model learned something in 30 seconds: training loss fell, validation beats a uniform guess
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r["lm_loss"] for r in rows if r["split"] == "train"]
    assert len(train) >= 2 and train[-1] < train[0] - 0.3, train
    assert summary["val_loss"] < math.log(512) - 0.3, summary
    assert report.count("```python") == 4
    card = (Path(summary["checkpoint"]) / "README.md").read_text()  # the model card, in the folder that loads
    assert "val_bpb" in card and "unigram_baseline_bpb" in card and "deepsail run --out" in card


def test_generate_samples_from_the_run_folder(run_dir):
    result = runner.invoke(
        app, ["generate", str(run_dir), "--prompt", "def main(", "--max-tokens", "12", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    completion, _, stats = result.output.rpartition("12 tokens in")
    assert completion.strip() and "tok/s" in stats, result.output


def test_run_refuses_to_overwrite_a_run(run_dir):
    result = runner.invoke(app, ["run", "--out", str(run_dir), "--minutes", "0.1"])
    assert result.exit_code == 1 and "already holds a run" in result.output


def test_readme_quickstart_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1).strip().splitlines()
    assert "deepsail run" in block[0]
    assert block[1].startswith("bash scripts/test.sh")
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def _verbs(group, prefix=()):
    """Every leaf command of the CLI, found from the click tree, so a new verb cannot dodge this test."""
    import typer.main

    cmd = typer.main.get_command(group) if not hasattr(group, "commands") else group
    for name, sub in cmd.commands.items():
        if hasattr(sub, "commands"):
            yield from _verbs(sub, (*prefix, name))
        else:
            yield (*prefix, name)


def test_every_verb_has_help_with_an_example_line():
    verbs = list(_verbs(app))
    assert len(verbs) >= 7, verbs
    for verb in verbs:
        result = runner.invoke(app, [*verb, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (verb, result.output)
        assert "Examples:" in result.output, f"`deepsail {' '.join(verb)} --help` has no Examples section"
        # an example is a line that runs the verb itself, with at least one argument or flag
        examples = [
            line.strip()
            for line in result.output.splitlines()
            if line.strip().startswith(f"deepsail {' '.join(verb)} ")
        ]
        assert examples, f"`deepsail {' '.join(verb)} --help` shows no example invocation"
