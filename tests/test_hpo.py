"""`deepsail hpo` (Optuna over pretrain) and the trainer options it searches: --arch, --init, the dropout schedule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

import deepsail as ds
from deepsail.cli import app
from deepsail.model.upcycle import upcycle
from deepsail.train import hpo as H
from deepsail.train.config import TrainConfig
from deepsail.train.pretrain import pretrain


def _cfg(data: Path, out: Path, **changes) -> TrainConfig:
    fields = dict(
        data=str(data), out=str(out), steps=4, batch_size=2, seq_len=32, warmup_steps=1, precision="fp32",
        eval_every=2, eval_batches=1, log_every=2, ckpt_every=0, lr=3e-3,
    )  # fmt: skip
    return TrainConfig(**{**fields, **changes})


@pytest.mark.parametrize(
    "spec, want",
    [
        ("lr=log:1e-4:5e-3", H.Dimension("lr", "log", 1e-4, 5e-3)),
        ("num-hidden-layers=int:2:6:2", H.Dimension("num_hidden_layers", "int", 2, 6, 2)),
        ("attn_gate=cat:none,headwise", H.Dimension("attn_gate", "cat", choices=("none", "headwise"))),
        ("batch_size=cat:2,4", H.Dimension("batch_size", "cat", choices=(2, 4))),
        ("dropout=float:0:0.3", H.Dimension("dropout", "float", 0.0, 0.3)),
    ],
)
def test_search_specs(spec, want):
    assert H.parse_search(spec) == want


@pytest.mark.parametrize(
    "spec, match",
    [
        ("lr", "expected NAME=KIND"),
        ("lr=exp:1:2", "expected NAME=KIND"),
        ("lr=log:0:1e-3", "bad log range"),
        ("lr=float:2:1", "bad float range"),
        ("num_hidden_layers=int:4", "bad int range"),
        ("learning_rate=log:1e-4:1e-3", "neither a pretrain flag nor a ModelConfig field"),
    ],
)
def test_bad_search_specs_are_clear(spec, match):
    with pytest.raises(ValueError, match=match):
        H.parse_search(spec)


def test_grid_values():
    assert H.parse_search("lr=log:1e-4:1e-2").grid(3) == [1e-4, 1e-3, 1e-2]
    assert H.parse_search("n_routed_experts=int:4:8:2").grid(5) == [4, 6, 8]


def test_pruning_resume_and_results(tiny_data_dir, tmp_path, monkeypatch):
    """Trials report every eval; one worse than the median is pruned; a trial a kill left running is failed and
    its slot runs again; results.md and the plots are written. (pretrain is stood in for: only the search logic
    runs here.)"""
    curves = iter([[1.0, 0.9], [1.1, 1.0], [3.0, 2.9], [1.05, 0.95], [1.2, 1.1]])

    def fake_pretrain(cfg, console=None, on_eval=None):
        values = next(curves)
        for i, v in enumerate(values):
            on_eval(2 * (i + 1), {"bpb": v})
        return type("R", (), {"val": {"bpb": values[-1]}})()

    monkeypatch.setattr(sys.modules["deepsail.train.pretrain"], "pretrain", fake_pretrain)
    study_dir = tmp_path / "study"
    base = _cfg(tiny_data_dir, tmp_path / "unused")
    space = [H.parse_search("lr=log:1e-4:1e-2")]
    H.hpo(base, study_dir, space, trials=3)
    states = [
        t.state for t in optuna.load_study(study_name="deepsail", storage=f"sqlite:///{study_dir / 'study.db'}").trials
    ]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    # a kill in the middle of a trial leaves it RUNNING: the next run fails it and finishes the rest
    killed = optuna.load_study(study_name="deepsail", storage=f"sqlite:///{study_dir / 'study.db'}")
    killed.ask()
    study = H.hpo(base, study_dir, space, trials=5)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE", "PRUNED"]
    assert study.best_value == 0.9
    text = (study_dir / "results.md").read_text()
    assert "Best: trial 0, val bpb 0.9000" in text and "| pruned |" in text and "| fail |" in text
    assert (study_dir / "history.png").stat().st_size > 1000 and (study_dir / "importance.png").stat().st_size > 1000


def test_a_real_grid_study_over_model_and_trainer_settings(tiny_data_dir, tmp_path):
    out = tmp_path / "grid"
    args = ["hpo", "--data", str(tiny_data_dir), "--model-preset", "deepseek-v3-debug", "--steps", "2"]
    args += ["--batch-size", "2", "--seq-len", "32", "--precision", "fp32", "--eval-every", "1", "--out", str(out)]
    args += ["--sampler", "grid", "--search", "attn_gate=cat:none,headwise", "--no-prune", "--trials", "9"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "best: trial" in r.output
    runs = sorted((out / "trials").iterdir())
    assert len(runs) == 2  # the grid has two points: --trials is capped by it
    gates = {json.loads((run / "run_config.json").read_text())["train"]["arch"][0] for run in runs}
    assert gates == {"attn_gate=none", "attn_gate=headwise"}


def test_arch_init_and_dropout_schedule(tiny_data_dir, tmp_path):
    # --arch: a preset with one field changed, saved with the run
    r = pretrain(_cfg(tiny_data_dir, tmp_path / "gated", arch=("attn_gate=elementwise", "num_hidden_layers=2")))
    gated = ds.from_pretrained(r.checkpoint)
    assert gated.config.attn_gate == "elementwise" and gated.config.num_hidden_layers == 2
    # --init: an upcycled dense run continues at step 0 from exactly the dense model's loss
    dense_run = pretrain(_cfg(tiny_data_dir, tmp_path / "dense", arch=("n_routed_experts=0", "intermediate_size=96")))
    dense = ds.from_pretrained(dense_run.checkpoint)
    upcycle(dense, experts=4, top_k=2, shared=1).save_pretrained(tmp_path / "up")
    moe_run = pretrain(_cfg(tiny_data_dir, tmp_path / "moe", init=str(tmp_path / "up"), steps=2, eval_every=0))
    assert moe_run.step == 2 and ds.from_pretrained(moe_run.checkpoint).config.n_routed_experts == 4
    # dropout: scheduled 0.3 -> 0.1 over the run, logged, and gone from the model afterwards
    d = pretrain(_cfg(tiny_data_dir, tmp_path / "drop", dropout=0.3, dropout_end=0.1, log_every=1))
    rows = [json.loads(line) for line in open(tmp_path / "drop" / "metrics.jsonl") if '"train"' in line]
    assert [round(row["dropout"], 3) for row in rows] == [0.3, 0.25, 0.2, 0.15]
    model = ds.from_pretrained(d.checkpoint).train()
    ids = torch.randint(0, 512, (1, 8))
    assert torch.equal(model(ids).logits, model(ids).logits)  # no hooks saved with the weights
    with pytest.raises(ValueError, match="dropout must be in"):
        _cfg(tiny_data_dir, tmp_path / "x", dropout=1.0)
    with pytest.raises(ValueError, match="Use one of them"):
        _cfg(tiny_data_dir, tmp_path / "x", arch=("attn_gate=headwise",), init="somewhere")
