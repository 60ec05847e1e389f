"""Distillation on tiny models: a DeepSeek-V3-style MoE teacher (MLA, routed + shared experts, MTP) into a dense
Llama-style student of another depth and width. The chunked KD equals the textbook KL with its gradients, feature
matching is zero on equal states, the progressive schedule picks the right layers per phase, the saved student is a
plain model, resume is bitwise exact, and bad input is one clear error."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

import deepsail as ds
import deepsail.tune.distill as D
from deepsail.data import Tokenizer, default_corpus
from deepsail.data.prepare import prepare
from deepsail.errors import cli_verb
from deepsail.model import IGNORE_INDEX, ModelConfig, Transformer
from deepsail.train import TrainConfig
from deepsail.tune.distill import (
    DistillConfig,
    Distiller,
    DistillLoss,
    active_pairs,
    distill,
    distill_command,
    distill_head_loss,
    feature_loss,
    parse_layer_map,
    phases,
    uniform_layer_map,
)

FAST = dict(batch_size=2, seq_len=32, log_every=1, eval_every=0, eval_batches=2, ckpt_every=2, warmup_steps=1)
STUDENT = dict(student_preset="llama-3-8b-debug", student_layers=2, student_width=32)  # teacher: 3 layers, 64 wide


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """200 kB of the embedded corpus in the teacher's tokenizer."""
    out = tmp_path_factory.mktemp("distill") / "data"
    prepare(None, tiny_model_dir, out, max_bytes=200_000, progress=False)
    return out


def _run(teacher: Path, data: Path, out: Path, resume: bool = False, **kw) -> D.DistillResult:
    cfg = TrainConfig(out=str(out), steps=4, **FAST)
    return distill(cfg, DistillConfig(teacher=str(teacher), **{**STUDENT, **kw}), data=str(data), resume=resume)


def test_a_moe_teacher_into_a_dense_student_end_to_end(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    result = _run(tiny_model_dir, data_dir, out, progressive=True)
    assert result.pairs == [(0, 1), (1, 2)]  # uniform: student 0 <-> teacher 1, the last layers meet
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all({"loss", "kd", "lm_loss", "feature"} <= r.keys() for r in train)  # every part is logged
    assert [r["feature_pairs"] for r in train] == [1, 1, 2, 2]  # two phases of two steps, bottom pair first
    for r in train:  # the total is the weighted sum of its parts (defaults: alpha 0.9, T 1, gamma 1)
        assert r["loss"] == pytest.approx(0.9 * r["kd"] + 0.1 * r["lm_loss"] + r["feature"], rel=1e-4)
    # RUN/model is the plain student: it loads, it is the Llama-style student, and it holds no projections
    student = ds.from_pretrained(out / "model")
    assert student.config.model_type == "llama" and student.config.num_hidden_layers == 2
    assert student.config.hidden_size == 32 and student.config.vocab_size == 512
    assert all(k.startswith(("model.", "lm_head.")) for k in load_file(str(out / "model/model.safetensors")))
    assert not (out / "model" / D.PROJECTIONS).exists() and (out / "model/tokenizer.json").is_file()
    assert "distilled" in (out / "model/README.md").read_text()
    ckpt = out / "checkpoints/step_000004"
    assert set(load_file(str(ckpt / D.PROJECTIONS))) == {"0.weight", "1.weight"}
    assert load_file(str(ckpt / D.PROJECTIONS))["0.weight"].shape == (64, 32)  # student width -> teacher width
    report = (out / "report.md").read_text()
    assert "steps 0-1: pairs 1..1; steps 2-3: pairs 1..2" in report and "| teacher |" in report
    assert (out / "loss_parts.png").stat().st_size > 0 and result.teacher_val["bpb"] > 0
    assert result.val["loss"] != result.teacher_val["loss"]  # the report's student numbers are the student's


@pytest.mark.parametrize("kd", ["forward", "reverse", "mix"])
def test_chunked_kd_equals_the_textbook_kl_and_its_gradients(kd, monkeypatch):
    monkeypatch.setattr(D, "KD_CHUNK_ELEMENTS", 16 * 50)  # 16-row chunks: the loop over chunks is exercised
    torch.manual_seed(0)
    N, V = 37, 50
    h = torch.randn(N, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, 8, dtype=torch.float64, requires_grad=True)
    t_hidden, t_head = torch.randn(N, 12, dtype=torch.float64), torch.randn(V, 12, dtype=torch.float64)
    y = torch.randint(0, V, (N,))
    y[3] = IGNORE_INDEX
    for temperature, alpha in ((1.0, 1.0), (2.5, 0.6), (0.5, 0.0)):
        loss, kl, ce = distill_head_loss(
            h, w, t_hidden, lambda x: x @ t_head.T, y, temperature=temperature, alpha=alpha, kd=kd, kd_mix=0.3
        )
        z, z_t, keep = h @ w.T, t_hidden @ t_head.T, y != IGNORE_INDEX
        log_q, log_p = F.log_softmax(z / temperature, -1), F.log_softmax(z_t / temperature, -1)
        forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # KL(p || q)
        reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # KL(q || p)
        share = {"forward": 1.0, "reverse": 0.0, "mix": 0.3}[kd]
        want_kl = (share * forward + (1 - share) * reverse)[keep].mean()
        want = alpha * temperature**2 * want_kl + (1 - alpha) * F.cross_entropy(z, y, ignore_index=IGNORE_INDEX)
        # the logits are fp32 inside (as in training), the reference float64
        assert kl.item() == pytest.approx(want_kl.item(), rel=1e-6) and loss.item() == pytest.approx(
            want.item(), rel=1e-6
        )
        assert ce.item() == pytest.approx(F.cross_entropy(z, y, ignore_index=IGNORE_INDEX).item(), rel=1e-6)
        got, expected = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(want, (h, w))
        for g, e in zip(got, expected):
            assert (g - e).abs().max() < 1e-6


def test_feature_loss_is_zero_on_equal_states_and_self_distillation_costs_nothing():
    x = torch.randn(2, 5, 16)
    assert feature_loss(x, x, "mse").item() < 1e-10 and feature_loss(x, x, "cosine").abs().item() < 1e-6
    assert feature_loss(x, -x, "cosine").item() == pytest.approx(2.0)
    assert feature_loss(x, 3 * x + 1, "mse").item() > 0  # a layer norm takes out scale and shift of a whole row
    assert feature_loss(x, 3 * x, "mse").item() < 1e-10
    # a student that is the teacher, projections at their identity start: every distillation term is ~0
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.preset("deepseek-v3-debug")).eval()
    student = Transformer(teacher.config)
    student.load_state_dict(teacher.state_dict())
    model = Distiller(student, teacher.config.hidden_size, uniform_layer_map(3, 3))
    ids = torch.randint(0, 512, (2, 16))
    parts = DistillLoss(teacher, DistillConfig(alpha=1.0), steps=4, grad_accum=1)(model.eval(), (ids, ids))
    assert parts["feature"].item() < 1e-10 and abs(parts["kd"].item()) < 1e-5 and parts["feature_pairs"] == 3


def test_layer_maps_and_the_progressive_schedule():
    assert uniform_layer_map(4, 12) == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert uniform_layer_map(2, 3) == [(0, 1), (1, 2)] and uniform_layer_map(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert parse_layer_map(" 1:3, 0:1", 2, 4) == [(0, 1), (1, 3)] and parse_layer_map("", 2, 4) == [(0, 1), (1, 3)]
    assert [active_pairs(s, 3, 6, True) for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [active_pairs(s, 3, 6, False) for s in range(6)] == [3] * 6
    assert phases(3, 7, True) == [
        {"from_step": 0, "to_step": 3, "pairs": 1},
        {"from_step": 3, "to_step": 5, "pairs": 2},
        {"from_step": 5, "to_step": 7, "pairs": 3},
    ]
    # the loss counts micro-batches: with 2 per step, step s = call // 2 picks the teacher layers of its phase
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.preset("deepseek-v3-debug")).eval()
    student = Transformer(D.student_config("llama-3-8b-debug", 512, layers=3, width=32))
    loss_fn = DistillLoss(teacher, DistillConfig(progressive=True), steps=3, grad_accum=2)
    model = Distiller(student, 64, uniform_layer_map(3, 3))
    ids = torch.randint(0, 512, (1, 8))
    seen = [int(loss_fn(model, (ids, ids))["feature_pairs"]) for _ in range(6)]
    assert seen == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("0-1", "is not STUDENT:TEACHER"),
        ("0:x", "is not STUDENT:TEACHER"),
        ("2:0", "out of range; the student has layers 0..1"),
        ("0:3", "the teacher 0..2"),
        ("0:1,0:2", "mapped twice"),
        ("0:2,1:1", "must rise"),
    ],
)
def test_a_bad_layer_map_says_what_is_wrong(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_layer_map(spec, 2, 3)


def test_bad_settings_and_other_tokenizers_are_one_line_errors(tiny_model_dir, data_dir, tmp_path):
    for bad, needle in (
        (dict(alpha=1.5), "--alpha must be in"),
        (dict(temperature=0.0), "--temperature must be > 0"),
        (dict(gamma=-1.0), "--gamma must be >= 0"),
        (dict(kd="jsd"), "--kd 'jsd'"),
        (dict(kd_mix=2.0), "--kd-mix"),
        (dict(feature_loss="l1"), "--feature-loss"),
        (dict(progressive=True, gamma=0.0), "needs --gamma > 0"),
    ):
        with pytest.raises(ValueError, match=needle):
            DistillConfig(**bad)
    # a student with another tokenizer (same size, other merges): refused, naming the first id that differs
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Tokenizer.train([d.text for d in default_corpus("val", max_bytes=100_000)], vocab_size=512).save(other)
    with pytest.raises(ValueError, match=r"different tokenizers \(id \d+ is"):
        distill(
            TrainConfig(out=str(tmp_path / "x"), steps=1, **FAST),
            DistillConfig(teacher=str(tiny_model_dir), student=str(other)),
            data=str(data_dir),
        )
    with pytest.raises(ValueError, match="name the student once"):
        distill(TrainConfig(out=str(tmp_path / "y"), steps=1, **FAST), DistillConfig(teacher=str(tiny_model_dir)))

    # the CLI: one `error:` line and exit code 1
    app = typer.Typer()
    app.command("distill")(cli_verb(distill_command))
    common = ["--teacher", str(tiny_model_dir), "--student-preset", "llama-3-8b-debug", "--data", str(data_dir)]
    common += ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--out"]
    for flags, needle in (
        (["--alpha", "2"], "error: --alpha must be in [0, 1]"),
        (["--layer-map", "0:1,0:2"], "error: --layer-map '0:1,0:2': a student layer is mapped twice"),
        (["--student", str(other)], "error: name the student once"),
    ):
        result = CliRunner().invoke(app, [*common, str(tmp_path / "cli"), *flags])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith(needle) and sum(line.startswith("error:") for line in lines) == 1
    help_text = CliRunner().invoke(app, ["--help"]).output
    assert "Examples:" in help_text and "--student-preset" in help_text and "--progressive" in help_text


def test_resume_after_a_kill_is_exact(tiny_model_dir, data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(tiny_model_dir, data_dir, straight, progressive=True)
    _run(tiny_model_dir, data_dir, killed, progressive=True)
    # as if killed between step 2's checkpoint and the end: the later checkpoint and the outputs gone
    shutil.rmtree(killed / "checkpoints/step_000004")
    shutil.rmtree(killed / "model")
    (killed / "summary.json").unlink()
    (killed / "checkpoints/latest").write_text("step_000002\n")
    _run(tiny_model_dir, data_dir, killed, resume=True, progressive=True)
    for name in ("model.safetensors", D.PROJECTIONS):
        a = load_file(str(straight / "checkpoints/step_000004" / name))
        b = load_file(str(killed / "checkpoints/step_000004" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["feature_pairs"] for r in rows if r["split"] == "train"] == [1, 1, 2, 2]  # the phase came back too
    with pytest.raises(ValueError, match="distilled with other settings"):  # another student cannot continue it
        _run(tiny_model_dir, data_dir, killed, resume=True, progressive=True, student_layers=3)
