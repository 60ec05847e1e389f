"""Dense -> MoE upcycling: the upcycled model computes exactly what the dense one did, then its experts diverge."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import deepsail as ds
from deepsail.cli import app
from deepsail.model.moe import MoE
from deepsail.model.upcycle import upcycle


def _dense(mtp: int = 1) -> ds.Transformer:
    torch.manual_seed(0)
    cfg = ds.ModelConfig.preset("deepseek-v3-debug").replace(
        n_routed_experts=0, intermediate_size=96, num_nextn_predict_layers=mtp
    )
    return ds.Transformer(cfg).train()


def test_upcycled_model_starts_at_the_dense_models_function():
    dense = _dense()
    moe = upcycle(dense, experts=6, top_k=2, shared=1, first_dense=1)
    c = moe.config
    assert c.n_routed_experts == 6 and c.moe_intermediate_size == 32 and not isinstance(moe.layers[0].mlp, MoE)
    assert all(isinstance(block.mlp, MoE) for block in moe.layers[1:]) and isinstance(moe.mtp[0].block.mlp, MoE)
    assert moe.num_params(active=True, include_mtp=True) - dense.num_params(active=True, include_mtp=True) == sum(
        m.gate.weight.numel() for _, m in moe.moe_layers()
    )  # the same active width: only the routers are new
    ids = torch.randint(0, c.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    a, b = dense(ids, labels=ids), moe(ids, labels=ids)
    assert torch.allclose(a.loss, b.loss, atol=1e-6) and torch.allclose(a.mtp_loss, b.mtp_loss, atol=1e-6)
    with torch.no_grad():
        assert (dense.eval()(ids).logits - moe.eval()(ids).logits).abs().max() < 1e-5


def test_training_hands_tokens_over_to_the_copies():
    """The balancing bias moves load onto idle copies and the router learns; the copies then drift apart."""
    dense = _dense(mtp=0)
    moe = upcycle(dense, experts=4, top_k=2, shared=1)
    opt = torch.optim.AdamW(moe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(30):
        ids = torch.randint(0, moe.config.vocab_size, (4, 16), generator=g)
        moe(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        moe.update_balance_bias(0.05)
    layer = moe.layers[1].mlp
    with torch.no_grad():
        ids = torch.randint(0, moe.config.vocab_size, (4, 16), generator=g)
        moe.train()(ids)
    assert (layer.tokens_per_expert[2:] > 0).all(), layer.tokens_per_expert  # the second copies carry tokens
    assert layer.gate.weight.abs().sum() > 0
    assert not torch.equal(layer.experts.down_proj[0], layer.experts.down_proj[2])


@pytest.mark.parametrize(
    "preset, changes, kwargs, match",
    [
        ("deepseek-v3-debug", {}, dict(experts=6, top_k=2, shared=3), "do not split"),  # 96 units into 5 slices
        ("deepseek-v3-debug", {}, dict(experts=5, top_k=2, shared=1), "multiple of --top-k"),
        ("deepseek-v3-debug", {"n_routed_experts": 8}, dict(experts=8, top_k=2, shared=1), "already a MoE"),
        ("llama-3-8b-debug", {}, dict(experts=4, top_k=2, shared=0), "deepseek_v3"),
    ],
)
def test_impossible_upcycles_are_clear_errors(preset, changes, kwargs, match):
    base = {"n_routed_experts": 0, "intermediate_size": 96} if preset.startswith("deepseek") else {}
    model = ds.Transformer(ds.ModelConfig.preset(preset).replace(**{**base, **changes}))
    with pytest.raises(ValueError, match=match):
        upcycle(model, **kwargs)


def test_upcycle_command_writes_a_model_that_loads(tmp_path):
    dense = _dense(mtp=0).eval()
    dense.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "tokenizer.json").write_text("{}")  # carried along as is
    out = tmp_path / "moe"
    r = CliRunner().invoke(app, ["upcycle", str(tmp_path / "dense"), "--experts", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "4 experts x top-2 + 1 shared of width 32" in r.output and (out / "tokenizer.json").is_file()
    moe = ds.from_pretrained(out)
    ids = torch.randint(0, moe.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max() < 1e-5
    r = CliRunner().invoke(app, ["upcycle", str(out), "--out", str(tmp_path / "again")])
    assert r.exit_code == 1 and "already a MoE" in r.output
