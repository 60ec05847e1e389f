"""The trainer: optimization pieces on a tiny model, then whole runs on a tiny tokenized corpus (CPU, seconds)."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deepsail.data.tokenizer import token_byte_lengths
from deepsail.model import ModelConfig, Transformer, from_pretrained
from deepsail.parallel import apply_activation_checkpointing
from deepsail.precision import cpu_has_native_bf16, resolve_precision
from deepsail.train import (
    TrainConfig,
    build_optimizer,
    decay_progress,
    evaluate,
    forward_backward,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    make_scaler,
    next_token_loss,
    optimizer_step,
    pretrain,
    save_checkpoint,
)
from deepsail.train.pretrain import pretrain_command

CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("deepseek-v3-debug"))


def random_batch(B: int, T: int = 32, vocab: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A real tokenized folder: a 512-token BPE and ~300 kB of the embedded corpus, as `deepsail data prepare`
    makes it."""
    from deepsail.data.corpus import default_corpus
    from deepsail.data.prepare import prepare
    from deepsail.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("data")
    tok = Tokenizer.train([d.text for d in default_corpus("train", max_bytes=300_000)], vocab_size=512)
    tok.save(root / "tokenizer")
    prepare(None, root / "tokenizer", root / "data", max_bytes=300_000, progress=False)
    return root / "data"


def run_config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data_dir),
        out=str(out),
        tokenizer=str(data_dir.parent / "tokenizer"),
        steps=12,
        batch_size=4,
        seq_len=64,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=3,
        precision="fp32",
        eval_every=6,
        eval_batches=2,
        log_every=3,
        ckpt_every=4,
        keep_last=2,
    )
    return TrainConfig(**(fields | overrides))


# --- optimization pieces -----------------------------------------------------------------------------------------


def test_loss_goes_down_on_a_repeated_batch():
    model = tiny_model()
    cfg = TrainConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0)
    optimizer, scaler = build_optimizer(model, cfg), make_scaler(CPU, "fp32")
    batch = random_batch(4)
    losses = []
    for _ in range(40):
        losses.append(forward_backward(model, [batch], next_token_loss, CPU, "fp32", scaler)["lm_loss"].item())
        optimizer_step(model, optimizer, scaler, cfg.grad_clip)
        model.update_balance_bias(cfg.bias_update_rate)
    assert losses[0] > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert losses[-1] < 0.5 * losses[0], losses  # and memorizes the batch


def test_grad_accumulation_matches_one_big_batch():
    x, y = random_batch(4)
    grads = []
    for micro in ([(x, y)], [(x[:2], y[:2]), (x[2:], y[2:])]):
        model = tiny_model()
        losses = forward_backward(model, micro, next_token_loss, CPU, "fp32", make_scaler(CPU, "fp32"))
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, losses["loss"]))
    (big, big_loss), (accum, accum_loss) = grads
    assert big.keys() == accum.keys() and len(big) > 10
    torch.testing.assert_close(accum_loss, big_loss, rtol=1e-5, atol=1e-6)
    for name in big:
        torch.testing.assert_close(accum[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_gives_the_same_grads():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        if checkpointing:
            apply_activation_checkpointing(model)
        forward_backward(model, [random_batch(2)], next_token_loss, CPU, "fp32", make_scaler(CPU, "fp32"))
        grads.append(
            {
                n.replace("_checkpoint_wrapped_module.", ""): p.grad
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        )
    assert grads[1].keys() == grads[0].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    # It is applied from outside: the blocks are wrapped, their state-dict names are not.
    assert type(model.layers[0]).__name__ == "CheckpointWrapper"
    assert model.state_dict().keys() == tiny_model().state_dict().keys()


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = tiny_model()
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed_tokens.weight) in no_decay_ids
    assert all(id(p) in no_decay_ids for n, p in model.named_parameters() if "norm" in n)
    assert all(p.ndim >= 2 for p in decay["params"]) and len(decay["params"]) > 10


def test_fp16_scaler_skips_the_step_and_halves_the_scale_on_inf_grads():
    model = tiny_model()
    optimizer, scaler = build_optimizer(model, TrainConfig()), make_scaler(CPU, "fp16")
    scale = scaler.get_scale()
    forward_backward(model, [random_batch(2)], next_token_loss, CPU, "fp16", scaler)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.layers[0].self_attn.o_proj.weight.grad[0, 0] = float("inf")
    optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "a step with inf grads must be skipped"
    # AdamW's moments and step count untouched too (the fused kernel creates zero state and reverts its step)
    assert all(
        float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        for st in optimizer.state.values()
    )

    # A clean step then goes through at the halved scale.
    forward_backward(model, [random_batch(2)], next_token_loss, CPU, "fp16", scaler)
    optimizer_step(model, optimizer, scaler, grad_clip=1.0)
    assert scaler.get_scale() == scale / 2
    assert not torch.equal(model.layers[0].self_attn.o_proj.weight, before["layers.0.self_attn.o_proj.weight"])


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=110)
    lrs = [lr_at(s, decay_progress(s, 0.0, cfg), cfg) for s in range(cfg.steps + 1)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup, step 0 already learns
    assert all(a <= b for a, b in itertools.pairwise(lrs[:10]))
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5.5e-4)  # cosine midpoint
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[110] == pytest.approx(1e-4)
    # A time budget decays over wall clock instead: half the budget spent = cosine midpoint.
    timed = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, steps=None, minutes=2.0)
    assert lr_at(500, decay_progress(500, 60.0, timed), timed) == pytest.approx(5.5e-4)


def test_auto_precision_is_bf16_on_cpus_with_native_bf16(monkeypatch):
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for amx, avx512_bf16, want in [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b)
        assert resolve_precision("auto", CPU) == want, (amx, avx512_bf16)
    assert resolve_precision("fp16", CPU) == "fp16"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_per_step_page_faults():
    # A 64 MB tensor freed and allocated again, as the logits are every step: with glibc's defaults every
    # allocation is freshly mapped and faults every page in again; with the allocator kept, it reuses the heap.
    probe = """
import resource, sys, torch
from deepsail.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(3):  # the heap settles after a few rounds, as a training loop does
    torch.zeros(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.zeros(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

    def run(mode: str) -> int:
        return int(
            subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True).stdout
        )

    # The best of three for "keep": on a loaded machine one probe in three was seen faulting everything in (81,920
    # pages) while its neighbours faulted ~0; a broken keep_freed_memory faults everything every time.
    faults = {"default": run("default"), "keep": min(run("keep") for _ in range(3))}
    # Default: every round faults all 64 MB in again (5 x 16,384 pages of 4 KiB). Kept: ~0 (at most one round may
    # still land on untouched heap). The ratio holds with transparent huge pages too (fewer, bigger faults).
    assert faults["default"] > 0 and faults["keep"] * 4 < faults["default"], faults


def test_config_rejects_bad_values_with_the_field_name():
    with pytest.raises(ValueError, match="--steps.*--minutes"):
        TrainConfig(steps=None, minutes=None)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_token_byte_lengths_add_up_to_utf8_bytes(data_dir):
    from deepsail.data.tokenizer import Tokenizer

    tok = Tokenizer.load(data_dir.parent / "tokenizer")
    lengths = token_byte_lengths(tok)
    text = "déjà vu: naïve café — 東京 🚀\n\tdef f(x): return x ** 2\n"
    ids = tok.encode(text)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert int(lengths[tok.eos_id]) == 0 and int(lengths[tok.bos_id]) == 0


def test_bits_per_byte_of_a_uniform_model():
    """A model that spreads its bets evenly pays ln(V) nats on every token: bpb = n_text_tokens * log2(V) / bytes."""

    class Uniform(torch.nn.Module):
        config = ModelConfig.preset("deepseek-v3-debug")

        def forward(self, x_BT):
            return SimpleNamespace(logits=torch.zeros(*x_BT.shape, 512))

    y_BT = torch.tensor([[5, 300, 1, 7], [0, 9, 9, -100]])  # two 0-byte specials, one ignored position
    token_bytes = torch.full((512,), 2)
    token_bytes[[0, 1]] = 0
    result = evaluate(Uniform(), [(y_BT, y_BT)], token_bytes, CPU, "fp32")
    assert result["loss"] == pytest.approx(math.log(512)) and result["tokens"] == 7 and result["bytes"] == 10
    assert result["bpb"] == pytest.approx(5 * math.log2(512) / 10)


# --- checkpoints --------------------------------------------------------------------------------------------------


class CountingLoader:
    """Stands in for PackedLoader where only state_dict/load_state_dict matter."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_crash_mid_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    model = tiny_model()
    optimizer, scaler = build_optimizer(model, TrainConfig()), make_scaler(CPU, "fp32")
    forward_backward(model, [random_batch(2)], next_token_loss, CPU, "fp32", scaler)
    optimizer_step(model, optimizer, scaler, 1.0)
    root = tmp_path / "checkpoints"
    good = save_checkpoint(
        root, model=model, optimizer=optimizer, scaler=scaler, loader=CountingLoader(7), trainer_state={"step": 1}
    )
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}

    forward_backward(model, [random_batch(2, seed=1)], next_token_loss, CPU, "fp32", scaler)
    optimizer_step(model, optimizer, scaler, 1.0)
    real_save = torch.save

    def dies_after_the_first_file(obj, f, *a, **k):  # the process "dies" with the new checkpoint half-written
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(torch, "save", dies_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(
            root, model=model, optimizer=optimizer, scaler=scaler, loader=CountingLoader(9), trainer_state={"step": 2}
        )
    monkeypatch.undo()

    # The failed write cleaned up after itself (a kill -9 leaves its temporary, which resume removes: see below).
    assert not (root / "step_000002").exists() and sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]
    assert latest_checkpoint(root) == good
    restored = from_pretrained(good)
    for k, v in saved_weights.items():
        assert torch.equal(restored.state_dict()[k], v), k
    loader = CountingLoader()
    fresh = build_optimizer(restored, TrainConfig())
    state = load_checkpoint(good, optimizer=fresh, scaler=make_scaler(CPU, "fp32"), loader=loader)
    assert state["step"] == 1 and loader.position == 7 and len(fresh.state) == len(optimizer.state)


# --- whole runs ---------------------------------------------------------------------------------------------------


def test_pretrain_run_writes_metrics_plot_and_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    result = pretrain(run_config(data_dir, out, steps=24, eval_every=12))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train_rows] == list(range(3, 25, 3))
    assert [r["step"] for r in val_rows] == [12, 24]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert val_rows[-1]["loss"] < val_rows[0]["loss"]
    assert {"lm_loss", "mtp_loss", "grad_norm", "lr", "tok_per_s", "mfu", "moe_max_load"} <= train_rows[0].keys()
    assert 0 < val_rows[-1]["bpb"] < 8 and val_rows[-1]["ppl"] == pytest.approx(math.exp(val_rows[-1]["loss"]))

    assert result.step == 24 and result.val_loss == val_rows[-1]["loss"] and result.tok_per_s > 0 and 0 < result.mfu < 1
    assert json.loads((out / "summary.json").read_text())["step"] == 24
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["train"]["steps"] == 24 and resolved["precision"] == "fp32"
    assert (out / "loss.png").stat().st_size > 1000
    assert any((out / "tensorboard").iterdir())
    # keep_last=2: checkpoints 4..24 were written, the last two remain; each is a complete model folder.
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_000020", "step_000024"] and result.checkpoint.endswith("step_000024")
    final = Path(result.checkpoint)
    assert (final / "tokenizer.json").is_file() and (final / "model.safetensors").is_file()
    from_pretrained(final)

    with pytest.raises(ValueError, match="--resume"):  # never silently overwrite a run
        pretrain(run_config(data_dir, out, steps=24))
    # `deepsail pretrain --resume --steps 30`: the saved config is the base, only the flags given change.
    # Through the real CLI, so "given" comes from what was typed: data, batch size... stay as saved.
    from deepsail.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--out", str(out), "--resume", "--steps", "30"])
    assert result.exit_code == 0, result.output
    resolved = json.loads((out / "run_config.json").read_text())["train"]
    assert resolved["steps"] == 30 and resolved["batch_size"] == 4 and resolved["data"] == str(data_dir)
    assert json.loads((out / "summary.json").read_text())["step"] == 30
    # and from Python, the keywords passed are the ones that change
    assert pretrain_command(out=str(out), resume=True, steps=33).step == 33


class TickingClock:
    """Stands in for the trainer's `time` module: every reading advances one second, so a time budget
    ends after the same steps however busy the machine is."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_time_budget_run(data_dir, tmp_path, monkeypatch):
    """--minutes alone: the run stops on the clock, and the cosine decays over it."""
    monkeypatch.setattr("deepsail.train.loop.time", TickingClock())
    budget_s = 60.0
    result = pretrain(
        run_config(
            data_dir, tmp_path / "run", steps=None, minutes=budget_s / 60, eval_every=0, ckpt_every=0, log_every=1
        )
    )
    assert result.step >= 3 and math.isfinite(result.val_loss)
    # The last step ends within the budget (it stops before a step that would overrun); the final
    # eval and checkpoint come after it.
    at_last_step = json.loads((Path(result.checkpoint) / "trainer_state.json").read_text())["elapsed_s"]
    assert budget_s - 15 < at_last_step <= budget_s
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["split"] == "train"]
    assert lrs[-1] < 0.5 * max(lrs)  # the cosine decayed over the clock, not over steps


# Every segment runs in a fresh interpreter, so no state left by other tests (thread counts, backend
# flags) can make the runs differ; only the kill and the resume can.
RUN = """
import json, sys
from deepsail.train import TrainConfig, pretrain
pretrain(TrainConfig(**json.loads(sys.argv[1])), resume=sys.argv[2] == "resume")
"""


def start_run(cfg: TrainConfig, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, json.dumps(cfg.to_dict()), "resume" if resume else "fresh"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish(child: subprocess.Popen) -> None:
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr.decode()[-3000:]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out / "checkpoints") / "model.safetensors")


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bitwise_identical(data_dir, tmp_path):
    settings = dict(steps=16, ckpt_every=1, eval_every=5)
    finish(start_run(run_config(data_dir, tmp_path / "reference", **settings)))

    # The same run, killed with SIGKILL once it has a few checkpoints, preferably while writing one.
    out = tmp_path / "killed"
    cfg = run_config(data_dir, out, **settings)
    child = start_run(cfg)
    root, deadline, mid_write = out / "checkpoints", time.time() + 300, False
    while time.time() < deadline and child.poll() is None:
        latest = root / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_000004":
            mid_write = any(".tmp-" in p.name for p in root.iterdir())
            if mid_write or latest.read_text().strip() >= "step_000008":
                break
        time.sleep(0.0005)
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr.decode()[-2000:]}"
    assert not (out / "summary.json").exists()
    killed_at = int(latest_checkpoint(root).name.split("_")[1])
    assert 4 <= killed_at < 16

    finish(start_run(cfg, resume=True))
    reference = json.loads((tmp_path / "reference" / "summary.json").read_text())
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["step"] == reference["step"] == 16
    a, b = final_weights(tmp_path / "reference"), final_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (
            f"{name} differs after resume (killed at step {killed_at}, mid-write: {mid_write})"
        )
    assert resumed["val_loss"] == reference["val_loss"]
    # The metrics file holds each step once: rows the killed run wrote after its checkpoint were dropped.
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 16


def test_pretrain_help_lists_the_flags():
    from deepsail.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in (
        "--data",
        "--out",
        "--model-preset",
        "--resume",
        "--steps",
        "--minutes",
        "--batch-size",
        "--grad-accum",
        "--precision",
        "--ckpt-every",
        "--eval-every",
        "--bias-update-rate",
    ):
        assert flag in result.output


def test_pretrain_cli_explains_missing_data(tmp_path):
    from deepsail.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "manifest.json" in result.output


# --- damaged checkpoints and full disks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    """12 steps, checkpoints at 4, 8 and 12: the reference the damaged copies are resumed against."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain(run_config(data_dir, out, steps=12, ckpt_every=4, keep_last=3, eval_every=0))
    return out


def _damage(checkpoint: Path, how: str) -> str:
    if how == "truncated-weights":
        f = checkpoint / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return "model.safetensors"
    if how == "truncated-optimizer":
        f = checkpoint / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:1000])
        return "optimizer.pt"
    if how == "garbage-state":
        f = checkpoint / "state.pt"
        f.write_bytes(b"\x00" * f.stat().st_size)  # same size: only the hash can tell
        return "state.pt"
    if how == "garbage-trainer-state":
        (checkpoint / "trainer_state.json").write_text("{not json")
        return "trainer_state.json"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated-weights", "truncated-optimizer", "garbage-state", "garbage-trainer-state"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(finished_run, tmp_path, how):
    import io

    from rich.console import Console

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    bad_file = _damage(run / "checkpoints" / "step_000012", how)
    log = io.StringIO()
    saved = TrainConfig.from_dict(json.loads((run / "run_config.json").read_text())["train"])
    result = pretrain(saved.replace(out=str(run)), resume=True, console=Console(file=log, width=300))
    said = log.getvalue()
    assert "step_000012" in said and bad_file in said and "resuming from step_000008" in said, said
    # steps 9..12 again, from the good checkpoint: the same weights as the run that was never damaged
    assert result.step == 12
    a = load_file(finished_run / "checkpoints" / "step_000012" / "model.safetensors")
    b = load_file(run / "checkpoints" / "step_000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_every_checkpoint_damaged_says_why(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for step, how in (("000004", "garbage-state"), ("000008", "truncated-weights"), ("000012", "truncated-optimizer")):
        _damage(run / "checkpoints" / f"step_{step}", how)
    from deepsail.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--out", str(run), "--resume"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: --resume: no checkpoint") and "\n" not in line
    for name in ("state.pt", "model.safetensors", "optimizer.pt"):
        assert name in line, line


def test_a_full_disk_is_reported_however_the_writer_says_it(tmp_path, monkeypatch):
    """safetensors says "No space left" in its own exception type, torch.save "unexpected pos 576 vs 534": the
    atomic writer names a full disk either way, and leaves nothing partial behind."""
    import errno
    import shutil as sh

    from deepsail.files import DiskFull, atomic_dir, atomic_path

    def writes_half_then(error):
        def write(target: Path) -> None:
            target.write_bytes(b"x" * 1000)
            raise error

        return write

    for error, free in (
        (OSError(errno.ENOSPC, "No space left on device"), 10 << 30),
        (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), 10 << 30),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 4096),
    ):
        monkeypatch.setattr(sh, "disk_usage", lambda _, free=free: sh._ntuple_diskusage(1 << 30, 0, free))
        with pytest.raises(DiskFull, match="no space left on the device writing"):
            with atomic_path(tmp_path / "f.bin") as tmp:
                writes_half_then(error)(tmp)
        with pytest.raises(DiskFull):
            with atomic_dir(tmp_path / "folder") as tmp:
                writes_half_then(error)(tmp / "inner.bin")
        assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    # an ordinary failure with space left is not a full disk
    monkeypatch.setattr(sh, "disk_usage", lambda _: sh._ntuple_diskusage(1 << 30, 0, 1 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with atomic_path(tmp_path / "f.bin") as tmp:
            writes_half_then(RuntimeError("unexpected pos 1 vs 2"))(tmp)


FULL_DISK = r"""
import json, subprocess, sys
from pathlib import Path
mnt, cfg, size, out = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
cmd = [sys.executable, "-c", "from deepsail.cli import app; app()", "pretrain"]
flag = lambda k, v: (f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}"
flags = [flag(k.replace("_", "-"), v) for k, v in cfg.items()]
first = subprocess.run(cmd + flags, capture_output=True, text=True)
ckpts = sorted(p.name for p in (mnt / "run" / "checkpoints").iterdir())
subprocess.run(["mount", "-o", "remount,size=256m", str(mnt)], check=True)  # space freed
second = subprocess.run(cmd + ["--out", str(mnt / "run"), "--resume"], capture_output=True, text=True)
final = mnt / "run" / "checkpoints" / (mnt / "run" / "checkpoints" / "latest").read_text().strip()
(out / "model.safetensors").write_bytes((final / "model.safetensors").read_bytes())
report = {"first": [first.returncode, first.stderr], "ckpts": ckpts, "final": final.name,
          "second": [second.returncode, second.stderr[-3000:]]}
(out / "report.json").write_text(json.dumps(report))
"""


def test_a_full_disk_mid_run_ends_in_one_line_and_resumes_exactly(data_dir, tmp_path):
    """A real full disk: a tmpfs with room for a few checkpoints, in a private mount namespace (no root needed where
    user namespaces are allowed). The run ends with one line naming the last good checkpoint and leaves no partial
    files; with space again, --resume finishes with the weights of a run that never hit the wall."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("this machine allows no private mount namespace (unshare -rm)")
    settings = dict(steps=12, ckpt_every=2, keep_last=20, eval_every=0, log_every=2)
    reference = tmp_path / "reference"
    pretrain(run_config(data_dir, reference, **settings))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = run_config(data_dir, mnt / "run", **settings).to_dict()
    cfg = {k: v for k, v in cfg.items() if v is not None and v != ()}  # an empty repeatable flag is not given
    ckpt_bytes = sum(f.stat().st_size for f in (reference / "checkpoints" / "step_000002").iterdir())
    size = int(2.5 * ckpt_bytes) + (1 << 20)  # a few checkpoints fit, then the disk is full
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", FULL_DISK, str(mnt), json.dumps(cfg), str(size), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    code, stderr = report["first"]
    # threads.py's once-per-process note ("1 of 2 cores are busy ...") may precede the error on a loaded machine
    lines = [line for line in stderr.splitlines() if line.strip() and "cores are busy" not in line]
    assert code == 1 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: no space left on the device") and "last good checkpoint is" in lines[0]
    steps = [c for c in report["ckpts"] if c != "latest"]
    # nothing partial left: only complete checkpoints and the pointer, which names the newest of them
    assert "latest" in report["ckpts"] and all(c.startswith("step_") for c in steps), report["ckpts"]
    last_good = lines[0].split("last good checkpoint is ")[1].split(":")[0]
    assert last_good.endswith(steps[-1]) and 1 <= len(steps) < 6, (last_good, steps)  # and it did stop early
    assert report["second"][0] == 0, report["second"][1]
    a = load_file(reference / "checkpoints" / "step_000012" / "model.safetensors")
    b = load_file(tmp_path / "model.safetensors")
    assert report["final"] == "step_000012" and all(torch.equal(a[k], b[k]) for k in a)


def test_peak_flops_keeps_the_best_measurement(tmp_path, monkeypatch):
    """A peak measured while the machine was busy must not stick: MFU is against the best seen on this machine."""
    import deepsail.train.metrics as metrics

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for measured, want in ((2e11, 2e11), (3.5e11, 3.5e11), (1e11, 3.5e11)):  # busy, quiet, busy again
        monkeypatch.setattr(metrics, "_measure_once", lambda device, dtype, m=measured: m)
        assert metrics.peak_flops(CPU, "bf16")[0] == want
    assert max(json.loads((tmp_path / "deepsail" / "peak_flops.json").read_text()).values()) == 3.5e11


def test_compile_flag_on_cpu_warns_and_trains_eager():
    """--compile is offered where it beats eager; on CPU it measured 0.96x, so the run says so and stays eager."""
    from deepsail.parallel.parallelize import parallelize
    from deepsail.train.config import TrainConfig

    model = Transformer(ModelConfig.preset("llama-3-8b-debug"))
    with pytest.warns(UserWarning, match="slower than eager on cpu"):
        assert parallelize(model, None, TrainConfig(compile=True)) is model
