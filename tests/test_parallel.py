"""Scale-out on CPU with gloo: FSDP2, tensor, expert and data parallelism against one process, distributed
checkpoints across world sizes, and the launch through torchrun.

Each group is one `torchrun --standalone` launch of this file (its `__main__` below runs the group's checks on
every rank, rank 0 writes the figures to a JSON file), so a group pays for starting its processes once.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from deepsail.model import ModelConfig, Transformer
from deepsail.train.config import TrainConfig

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
STEPS, ROWS, T = 5, 4, 32  # 5 optimizer steps on a global batch of 4 sequences of 32 tokens


def launch(nproc: int, group: str, out: Path, *args: str) -> dict:
    """Run this file's `group` on `nproc` gloo ranks; rank 0's results."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", __file__, group, str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


# --- the checks each rank runs ----------------------------------------------------------------------------------


def _batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, vocab, (ROWS, T + 1), generator=g) for _ in range(STEPS)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _train(
    model: torch.nn.Module, cfg: TrainConfig, pm: object | None, steps: int = STEPS
) -> tuple[list[float], list[float]]:
    """The loop's own step (forward_backward + optimizer_step + balancing) over `steps` global batches; each rank
    reads its rows of every batch (of the first again and again past STEPS). Returns the global mean loss and the
    gradient norm per step (AdamW would hide a wrongly scaled gradient; the norm does not)."""
    import torch.distributed as dist

    from deepsail.parallel import parallelize
    from deepsail.parallel.ep import reduce_expert_load
    from deepsail.parallel.tp import loss_parallel_context
    from deepsail.train import build_optimizer, forward_backward, make_scaler, next_token_loss, optimizer_step

    cpu = torch.device("cpu")
    step_model = parallelize(model, pm, cfg)
    optimizer, scaler = build_optimizer(model, cfg), make_scaler(cpu, "fp32")
    dp, rank = (pm.shape.dp, pm.dp_rank) if pm else (1, 0)
    rows = ROWS // dp
    context = (lambda: loss_parallel_context(True)) if pm and pm.shape.tp > 1 else None
    losses, norms, batches = [], [], _batches(model.config.vocab_size)
    for step in range(steps):
        x, y = batches[step] if steps == STEPS else batches[0]  # a longer run learns one batch by heart
        batch = (x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows])
        kw = {"loss_context": context} if context else {}
        loss = forward_backward(step_model, [batch], next_token_loss, cpu, "fp32", scaler, **kw)["loss"]
        norms.append(optimizer_step(model, optimizer, scaler, cfg.grad_clip, sharded=pm is not None).item())
        if pm is not None:
            reduce_expert_load(model)
            dist.all_reduce(loss)
            loss = loss / pm.shape.world
        model.update_balance_bias(cfg.bias_update_rate)
        losses.append(loss.item())
    return losses, norms


def _full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _against_one_process(preset: str, pm: object, cfg: TrainConfig, steps: int = STEPS) -> dict:
    """Train a copy of one initial model sharded over `pm` and one in this process alone, on the same batches."""
    torch.manual_seed(0)
    reference = Transformer(ModelConfig.preset(preset))
    sharded = copy.deepcopy(reference)
    want, want_norms = _train(reference, cfg, None, steps)
    got, norms = _train(sharded, cfg, pm, steps)
    weights, ref = _full_weights(sharded), reference.state_dict()
    return {
        "loss": max(abs(a - b) for a, b in zip(got, want)),
        "grad_norm": max(abs(a - b) / b for a, b in zip(norms, want_norms)),
        "weights": max((weights[k] - ref[k]).abs().max().item() for k in ref),
        "losses": got,
        "reference_losses": want,
    }


def _moe_output(pm: object) -> dict:
    """One MoE layer with its experts split over ep against the same layer whole: output and input gradient."""
    from deepsail.parallel.ep import apply_ep

    torch.manual_seed(0)
    reference = Transformer(ModelConfig.preset("deepseek-v3-debug"))
    split = copy.deepcopy(reference)
    apply_ep(split, pm["ep"])
    x = torch.randn(2, 16, reference.config.hidden_size, generator=torch.Generator().manual_seed(2))
    outs = []
    for model in (reference, split):
        xi = x.clone().requires_grad_()
        y = model.layers[1].mlp(xi)
        y.square().sum().backward()
        outs.append((y.detach(), xi.grad))
    (y0, g0), (y1, g1) = outs
    return {"output": (y0 - y1).abs().max().item(), "input_grad": (g0 - g1).abs().max().item()}


def _group_2(out: Path) -> None:
    """2 ranks: FSDP2, TP (MLA and GQA), EP, DDP + PowerSGD."""
    import torch.distributed as dist

    from deepsail.parallel.mesh import build_mesh, mesh_shape

    cpu = torch.device("cpu")
    dist.init_process_group("gloo")
    base = dict(precision="fp32", warmup_steps=1)  # lr 3e-4: AdamW turns 1e-7 gradient noise into lr-sized steps

    def mesh(**dims: int) -> object:
        return build_mesh(mesh_shape(2, **dims), cpu)

    results = {
        "fsdp": _against_one_process("deepseek-v3-debug", mesh(dp_shard=2), TrainConfig(dp_shard=2, **base)),
        "tp_mla": _against_one_process("deepseek-v3-debug", mesh(dp_shard=1, tp=2), TrainConfig(tp=2, **base)),
        "tp_gqa": _against_one_process("llama-3-8b-debug", mesh(dp_shard=1, tp=2), TrainConfig(tp=2, **base)),
        "ep_moe": _moe_output(mesh(dp_shard=1, ep=2)),
        "ep_train": _against_one_process("deepseek-v3-debug", mesh(dp_shard=1, ep=2), TrainConfig(ep=2, **base)),
        # PowerSGD rank 4 on a batch seen again and again: it must still learn it, as exact DDP does.
        "powersgd": _against_one_process(
            "llama-3-8b-debug",
            mesh(dp_replicate=2, dp_shard=1),
            TrainConfig(dp_replicate=2, powersgd_rank=4, **base | {"lr": 3e-3}),
            30,
        ),
    }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


def _group_4(out: Path) -> None:
    """4 ranks: 2-D meshes, FSDP2 x TP and FSDP2 x EP."""
    import torch.distributed as dist

    from deepsail.parallel.mesh import build_mesh, mesh_shape

    cpu = torch.device("cpu")
    dist.init_process_group("gloo")
    base = dict(precision="fp32", warmup_steps=1)
    results = {
        "fsdp_tp": _against_one_process(
            "deepseek-v3-debug", build_mesh(mesh_shape(4, dp_shard=2, tp=2), cpu), TrainConfig(dp_shard=2, tp=2, **base)
        ),
        "fsdp_ep": _against_one_process(
            "deepseek-v3-debug", build_mesh(mesh_shape(4, dp_shard=2, ep=2), cpu), TrainConfig(dp_shard=2, ep=2, **base)
        ),
    }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":  # a torchrun worker: python -m torch.distributed.run ... tests/test_parallel.py GROUP OUT
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    {"group2": _group_2, "group4": _group_4}[sys.argv[1]](Path(sys.argv[2]))
    sys.exit(0)


# --- the tests ----------------------------------------------------------------------------------------------------


def test_two_ranks_match_one_process(tmp_path):
    """FSDP2 within 1e-5 of one process over 5 steps of the same global batches (loss and final weights), tensor
    parallel (MLA and GQA) within 1e-4, expert parallel: the MoE output equal to the single-device MoE's; DDP with
    PowerSGD compression learns a repeated batch steadily."""
    r = launch(2, "group2", tmp_path / "results.json")
    for name, tol in (("fsdp", 1e-5), ("tp_mla", 1e-4), ("tp_gqa", 1e-4), ("ep_train", 1e-5)):
        assert r[name]["loss"] < tol and r[name]["weights"] < tol and r[name]["grad_norm"] < tol, (name, r[name])
    assert r["ep_moe"]["output"] < 1e-6 and r["ep_moe"]["input_grad"] < 1e-6, r["ep_moe"]
    # Measured: 6.25 -> 2.83 in 30 steps with PowerSGD rank 4, 6.25 -> 0.72 exact (rank 1: 3.75). Compression
    # slows memorising one batch of random tokens, and it must never stall or diverge.
    compressed = r["powersgd"]["losses"]
    assert all(b < a for a, b in zip(compressed, compressed[1:])), compressed
    assert compressed[-1] < 0.5 * compressed[0], compressed


def test_four_ranks_2d_meshes_match_one_process(tmp_path):
    """dp_shard 2 x tp 2 and dp_shard 2 x ep 2 on 4 ranks: the same 5 steps as one process."""
    r = launch(4, "group4", tmp_path / "results.json")
    for name, tol in (("fsdp_tp", 1e-4), ("fsdp_ep", 1e-5)):
        assert r[name]["loss"] < tol and r[name]["weights"] < tol and r[name]["grad_norm"] < tol, (name, r[name])


def test_mesh_flags_must_multiply_to_the_world_size():
    from deepsail.parallel.mesh import mesh_shape

    assert mesh_shape(8, dp_shard=2, tp=2, ep=2).world == 8
    assert mesh_shape(8, tp=2).dp_shard == 4  # -1: what the others leave
    with pytest.raises(ValueError, match="= 8 ranks, but this launch has 4 processes"):
        mesh_shape(4, dp_shard=2, tp=2, ep=2)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 4"):
        mesh_shape(1, dp_shard=1, tp=4)


def test_tp_refuses_hybrid_attention_by_name():
    from deepsail.model import ModelConfig
    from deepsail.parallel.tp import check_tp

    cfg = ModelConfig.preset("deepseek-v3-debug").replace(sparse_attention="hybrid")
    check_tp(cfg, 1)
    with pytest.raises(ValueError, match="ModelConfig.sparse_attention='hybrid'.*--dp-shard"):
        check_tp(cfg, 2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A 512-token BPE and 100 kB of the embedded corpus, tokenized as `deepsail data prepare` does."""
    from deepsail.data.corpus import default_corpus
    from deepsail.data.prepare import prepare
    from deepsail.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ran out of pairs to merge" on this little text is fine
        Tokenizer.train([d.text for d in default_corpus("train", max_bytes=100_000)], vocab_size=512).save(
            root / "tokenizer"
        )
    prepare(None, root / "tokenizer", root / "data", max_bytes=100_000, progress=False)
    return root / "data"


def _flags(data_dir: Path, out: Path, batch_size: int) -> list[str]:
    run = dict(steps=4, batch_size=batch_size, seq_len=32, precision="fp32", warmup_steps=1, eval_every=0)
    run |= dict(eval_batches=1, log_every=2, ckpt_every=2, keep_last=5, model_preset="deepseek-v3-debug")
    return ["--data", str(data_dir), "--out", str(out), *(f"--{k.replace('_', '-')}={v}" for k, v in run.items())]


def _train_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_torchrun_pretrain_resumes_at_world_1_and_exports(data_dir, tmp_path):
    """`torchrun -m deepsail pretrain --dp-shard 2` writes sharded checkpoints; cut back to step 2, the run resumes
    in one process (per-rank batch 2 -> 4: the same global batch) and lands where a one-process run of the same
    global batch lands; `deepsail export hf` gathers a sharded checkpoint into the same weights."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from deepsail.cli import app

    sharded, single = tmp_path / "sharded", tmp_path / "single"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [*TORCHRUN, "--nproc_per_node=2", "-m", "deepsail", "pretrain", "--dp-shard=2", *_flags(data_dir, sharded, 2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    step2 = sharded / "checkpoints" / "step_000002"
    assert (step2 / "dcp" / ".metadata").is_file() and (step2 / "state_rank00001.pt").is_file()
    world2 = _train_losses(sharded)

    runner = CliRunner()
    result = runner.invoke(app, ["pretrain", *_flags(data_dir, single, 4)])
    assert result.exit_code == 0, result.output
    want = _train_losses(single)
    assert abs(world2[4] - want[4]) < 1e-5, (world2, want)  # 2 ranks x 2 rows == 1 process x 4 rows

    (sharded / "checkpoints" / "latest").write_text("step_000002\n")  # as if the job died after step 2
    result = runner.invoke(app, ["pretrain", "--out", str(sharded), "--resume"])
    assert result.exit_code == 0, result.output
    assert abs(_train_losses(sharded)[4] - want[4]) < 1e-5
    got = load_file(sharded / "checkpoints" / "step_000004" / "model.safetensors")
    ref = load_file(single / "checkpoints" / "step_000004" / "model.safetensors")
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5

    result = runner.invoke(app, ["export", "hf", str(step2), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    got = load_file(tmp_path / "hf" / "model.safetensors")
    ref = load_file(single / "checkpoints" / "step_000002" / "model.safetensors")
    assert got.keys() == ref.keys() and max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def test_a_mesh_without_torchrun_is_one_error_line(data_dir, tmp_path):
    from typer.testing import CliRunner

    from deepsail.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--tp", "2", *_flags(data_dir, tmp_path / "run", 2)])
    assert result.exit_code == 1
    assert "error: the mesh --dp-replicate 1 x --ep 1 x --tp 2 needs a multiple of 2 ranks" in result.output
    assert "torchrun --nproc_per_node 2 -m deepsail pretrain" in result.output


def test_plan_counts_shards_by_hand_and_as_the_dry_run_builds_them():
    """llama-3-8b, tp 8 x dp_shard 8 on 64 GPUs: every matrix splits 64 ways, norms only 8 ways (whole on each tp
    rank, FSDP-chunked); DeepSeek-V3 on 256 GPUs, tp 8 x ep 32: 8 of 256 experts of the 59 MoE layers (58 + MTP)
    per GPU; the dry run over a fake 256-rank process group holds exactly what the plan counts, name by name."""
    from deepsail.parallel.plan import PlanConfig, dry_run, local_numel, make_plan

    llama = make_plan(PlanConfig(preset="llama-3-8b", gpus=64, tp=8, dry_run=False))
    h, kv, inter, vocab, layers = 4096, 1024, 14336, 128256, 32
    matrices = layers * (2 * h * h + 2 * kv * h + 3 * inter * h) + 2 * vocab * h
    norms = (2 * layers + 1) * h
    assert llama.local_params == matrices // 64 + norms // 8
    assert llama.state_bytes == 16 * llama.local_params

    cfg = PlanConfig(preset="deepseek-v3", gpus=256, tp=8, ep=32, gpu_memory="80GB")
    v3 = make_plan(cfg)
    experts = 59 * 8 * 3 * 2048 * 7168  # 20.79B: 16 B each is 310 GiB, so this mesh cannot train on 80 GB cards
    assert experts < v3.local_params < experts + 0.2e9
    assert v3.max_rows(ac=True) == 0
    dry = dry_run(cfg)
    model_shapes = {n: tuple(s) for n, s in _v3_shapes().items()}
    assert dry == {n: local_numel(n, shape, v3.mesh) for n, shape in model_shapes.items()}
    assert sum(dry.values()) == v3.local_params


def _v3_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {n: p.shape for n, p in Transformer(ModelConfig.preset("deepseek-v3")).named_parameters()}
