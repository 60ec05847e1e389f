"""The model on its own: every preset through forward/cache/batch/bf16, MoE routing and balancing, MTP, configs,
and the errors a user gets for bad checkpoints and impossible configs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import deepsail as ds
from deepsail.model import PRESETS, ModelConfig, Transformer, config_from_hf, config_to_hf
from deepsail.model.moe import MoE, Router

DEBUG_PRESETS = sorted(name for name in PRESETS if name.endswith("-debug"))
# every architecture option joins the runner, on MLA + MoE and on GQA + dense
OPTIONS = [
    ("deepseek-v3-debug", dict(attn_gate="elementwise")),
    ("llama-3-8b-debug", dict(attn_gate="headwise")),
    ("deepseek-v3-debug", dict(mod_capacity=0.5)),  # Mixture-of-Depths (depth.py); causal routing at inference
    ("deepseek-v3-debug", dict(sparse_attention="hybrid", sliding_window=2, compress_block=2, select_block=2)),
    ("llama-3-8b-debug", dict(sparse_attention="hybrid", sliding_window=3, compress_block=1, select_block=2)),
]
RUNNER = [(name, {}) for name in DEBUG_PRESETS] + OPTIONS


def _model(name: str, seed: int = 0, **changes) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(name).replace(**changes)).eval()


@pytest.mark.parametrize("name, changes", RUNNER, ids=[n + "".join(f"-{v}" for v in c.values()) for n, c in RUNNER])
def test_every_preset_forward_cache_batch_bf16(name, changes):
    """mlx-lm's generic test: forward, training loss, prefill + decode == full forward at batch 3, a right-padded
    batch prefill, bf16 runs; for every preset and every architecture option."""
    model = _model(name, **changes)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        assert full.shape == (3, 10, V) and torch.isfinite(full).all()
        cache = model.new_cache(3, 16, block_size=4)
        steps = [model(ids[:, :4], cache=cache).logits] + [
            model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 10)
        ]
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
        # a batch row gives the same logits as the row alone
        assert (model(ids[1:2]).logits - full[1:2]).abs().max() < 1e-4
        # a right-padded prefill (the engine's batches): each row's last real token sees only its own tokens
        lens = torch.tensor([10, 6, 3])
        cache = model.new_cache(3, 16, block_size=4)
        last = model(ids, cache=cache, input_lens=lens, last_logits_only=True).logits[:, 0]
        for b, n in enumerate(lens.tolist()):
            assert (last[b] - model(ids[b : b + 1, :n]).logits[0, -1]).abs().max() < 1e-4
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    bf16 = _model(name, **changes).to(torch.bfloat16)
    with torch.no_grad():
        logits = bf16(ids).logits
        cache = bf16.new_cache(3, 16)
        bf16(ids[:, :9], cache=cache)
        last = bf16(ids[:, 9:], cache=cache).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (last[:, 0].float() - logits[:, -1].float()).abs().max() < 0.1 * logits.float().abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(ids, labels=ids).loss)


@pytest.mark.parametrize("weight_major", [False, True])
def test_few_row_linear_routes_agree(monkeypatch, weight_major):
    """Decode's few-row route (weight-major, where this machine's BLAS runs it faster) computes what F.linear does,
    and a cached decode through either route matches the full forward."""
    import deepsail.model.layers as layers

    monkeypatch.setattr(layers, "weight_major_wins", lambda: weight_major)
    taken = []
    route = layers._weight_major
    monkeypatch.setattr(layers, "_weight_major", lambda *a: taken.append(1) or route(*a))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    for shape in [(1, 32), (2, 32), (1, 1, 32), (2, 2, 32), (1, 4, 32), (3, 5, 32)]:
        x = torch.randn(*shape, generator=g)
        for bias in (None, b):
            with torch.no_grad():
                got = layers.linear(x, w, bias)
            torch.testing.assert_close(got, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert len(taken) == (10 if weight_major else 0)  # rows <= SMALL_ROWS only: 5 shapes x 2 biases
    x = torch.randn(2, 32, requires_grad=True)
    assert torch.equal(layers.linear(x, w, b), F.linear(x, w, b))  # under autograd: always F.linear

    taken.clear()
    model = _model("deepseek-v3-debug")
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :4], cache=cache).logits] + [
            model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 10)
        ]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
    assert bool(taken) == weight_major


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_masked_attention_math_route_matches_sdpa(kv_heads):
    """The bf16 training route through an explicit mask (matmuls + softmax, attention.masked_attention) gives SDPA's
    output and gradients: MQA (MLA's absorbed form) and GQA, with padded keys."""
    from deepsail.model.attention import masked_attention

    torch.manual_seed(0)
    B, H, T, P, D = 3, 4, 5, 7, 16
    mask = torch.ones(B, 1, T, P + T, dtype=torch.bool).tril(P)
    mask[0, ..., :3] = False  # a left-padded row
    q = torch.randn(B, H, T, D, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, kv_heads, P + T, D, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, kv_heads, P + T, D, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(B, H, T, D, dtype=torch.bfloat16)
    outs = []
    for route in (masked_attention, None):
        if route is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=kv_heads != H)
        else:
            out = route(q, k, v, mask, 0.3)
            assert "ScaledDotProduct" not in type(out.grad_fn).__name__  # the math route ran
        outs.append((out, *torch.autograd.grad(out, (q, k, v), g)))
    for a, b in zip(*outs):
        assert torch.allclose(a.float(), b.float(), atol=0.05, rtol=0.02), (a.float() - b.float()).abs().max()


def test_moe_matches_a_per_token_reference():
    """Grouped expert dispatch == the obvious per-token loop over its chosen experts."""
    model = _model("deepseek-v3-debug")
    moe: MoE = model.layers[1].mlp
    with torch.no_grad():
        moe.gate.e_score_correction_bias.normal_(0, 0.1)
        x = torch.randn(2, 7, model.config.hidden_size)
        got = moe(x)
        flat = x.view(-1, x.shape[-1])
        _, ids, weights = moe.gate(flat)
        want = moe.shared_experts(flat)
        I = model.config.moe_intermediate_size
        for t in range(flat.shape[0]):
            for k in range(ids.shape[1]):
                e = ids[t, k]
                gu = moe.experts.gate_up_proj[e] @ flat[t]
                h = torch.nn.functional.silu(gu[:I]) * gu[I:]
                want[t] += weights[t, k] * (moe.experts.down_proj[e] @ h)
    assert (got.view(-1, x.shape[-1]) - want).abs().max() < 1e-5


def test_group_limited_routing_stays_inside_topk_groups():
    cfg = ModelConfig.preset("deepseek-v3-debug")  # 8 experts in 4 groups, top-2 groups
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=1.0)
    _, ids, weights = router(torch.randn(256, cfg.hidden_size))
    groups = ids // (cfg.n_routed_experts // cfg.n_group)
    assert max(len(set(row.tolist())) for row in groups) <= cfg.topk_group
    # sigmoid scores, normalised then scaled: each token's weights sum to routed_scaling_factor
    assert torch.allclose(weights.sum(-1), torch.full((256,), cfg.routed_scaling_factor), atol=1e-5)


def test_balance_bias_changes_choice_not_weights():
    cfg = ModelConfig.preset("deepseek-v3-debug").replace(n_group=1, topk_group=1)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    scores, ids, w = router(x)
    router.e_score_correction_bias[ids[0, 0]] = -10.0  # ban the first token's top expert
    scores2, ids2, w2 = router(x)
    assert torch.equal(scores, scores2) and not (ids2 == ids[0, 0]).any()
    # weights still come from the unbiased scores
    assert torch.allclose(
        w2 / cfg.routed_scaling_factor * scores2.gather(1, ids2).sum(-1, keepdim=True),
        scores2.gather(1, ids2),
        atol=1e-5,
    )


def test_bias_update_moves_load_toward_balance():
    """Skewed router -> repeated sign-rule updates (γ = 1e-2) spread the load (V3's aux-loss-free balancing)."""
    cfg = ModelConfig.preset("deepseek-v3-debug").replace(
        n_group=1, topk_group=1, first_k_dense_replace=0, num_hidden_layers=1, num_nextn_predict_layers=0
    )
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    moe = model.layers[0].mlp
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[0] += 0.5  # experts 0 and 1 attract most tokens
        moe.gate.weight[1] += 0.4
    x = torch.randn(4, 64, cfg.hidden_size) + 0.3  # a shared direction every token has: a real skew

    def imbalance() -> float:
        with torch.no_grad():
            moe(x)
        load = model.expert_load()["layers.0.mlp"]
        model.update_balance_bias(0.0)
        return (load.max() / load.mean()).item()

    before = imbalance()
    for _ in range(200):
        with torch.no_grad():
            moe(x)
        model.update_balance_bias(1e-2)
    after = imbalance()
    assert before > 2.5 and after < 1.5, (before, after)


def test_sequence_aux_loss_is_reported_and_differentiable():
    cfg = ModelConfig.preset("deepseek-v3-debug").replace(aux_loss_alpha=0.01)
    model = Transformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss > 0
    # balanced routing gives Σ f_i P_i ≈ 1 per layer, so the loss is ≈ α · (#MoE layers incl. MTP)
    n_moe = len(model.moe_layers())
    assert 0.5 * 0.01 * n_moe < out.aux_loss.item() < 3 * 0.01 * n_moe
    out.aux_loss.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_mtp_loss_trains_and_saves_with_the_checkpoint(tmp_path):
    model = _model("deepseek-v3-debug").train()
    assert len(model.mtp) == 1
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = model(x, labels=y)
        first = first if first is not None else out.mtp_loss.item()
        assert torch.allclose(out.loss, out.lm_loss + model.config.mtp_loss_weight * out.mtp_loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.mtp_loss.item() < 0.5 * first
    model.save_pretrained(tmp_path / "ckpt")
    keys = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert keys["num_nextn_predict_layers"] == 1
    back = ds.from_pretrained(tmp_path / "ckpt")
    assert len(back.mtp) == 1
    with torch.no_grad():
        model.eval()
        a, b = model(x, labels=y), back(x, labels=y)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_loss, b.mtp_loss)


def test_mtp_step_matches_training_path():
    """Inference-time MTP with its own cache view gives the logits the training path computes."""
    model = _model("deepseek-v3-debug")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(ids, return_hidden=True).hidden
        want, _ = model.mtp_step(0, hidden[:, :-1], ids[:, 1:])
        cache = model.new_cache(2, 16)
        mtp_cache = ds.KVCache(cache.pool, cache.block_table, torch.zeros(2, dtype=torch.long))
        got = [model.mtp_step(0, hidden[:, :5], ids[:, 1:6], cache=mtp_cache)[0]]
        for t in range(5, 11):
            got.append(model.mtp_step(0, hidden[:, t : t + 1], ids[:, t + 1 : t + 2], cache=mtp_cache)[0])
    assert (torch.cat(got, 1) - want).abs().max() < 1e-4


def test_seed_api_builds_sensible_models():
    model = ds.Transformer(layers=2, heads=4, vocab=300)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (2, 4, 256)
    assert c.attention_type == "mla" and c.is_moe and c.num_nextn_predict_layers == 1
    assert model(torch.randint(0, 300, (1, 5))).logits.shape == (1, 5, 300)
    dense = ds.Transformer(layers=2, heads=4, vocab=300, experts=0, attention="gqa", kv_heads=2)
    assert dense.config.model_type == "llama" and not dense.config.is_moe
    with pytest.raises(ValueError, match="either a ModelConfig or seed"):
        ds.Transformer(ModelConfig.preset("llama-3-8b-debug"), layers=3)


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of F.grouped_mm (not in PyTorch's table): a [M, K] rows grouped by expert, b [E, K, N]: each row meets
    one expert's [K, N] matrix."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


@pytest.mark.parametrize(
    "name, changes",
    [
        # MLA + MoE (grouped experts, shared expert, a dense first layer); v as wide as q.k, so SDPA pads nothing
        ("deepseek-v3-debug", dict(num_nextn_predict_layers=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)),
        ("llama-3-8b-debug", {}),
    ],
)
def test_flops_per_token_matches_pytorchs_own_count(name, changes):
    """flops_per_token (6 x active params + causal attention) against torch.utils.flop_counter on a real training
    step. The math SDPA backend makes attention countable; it computes every query against every key, and a causal
    kernel skips the masked half of those products, so half of the counted batched-matmul FLOPs come off."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = Transformer(ModelConfig.preset(name).replace(**changes)).train()
    assert model.num_params(active=True) < model.num_params() or not model.config.is_moe
    B, T = 2, 64
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: _grouped_mm_flops})
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(ids, labels=ids).loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op.get("aten.bmm", 0) > 0 and (by_op.get("aten._grouped_mm", 1) > 0)
    counted = counter.get_total_flops() - by_op["aten.bmm"] / 2
    # what remains is norm gains, counted as parameters but doing no matmul: well under 1% at this size
    assert model.flops_per_token(T) * B * T == pytest.approx(counted, rel=0.01)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(n_group=3), "n_group"),  # 8 experts don't split into 3 groups
        (dict(topk_group=5), "topk_group"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(attention_type="gqa"), "attention_type"),  # deepseek needs MLA
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(rope_scaling={"rope_type": "yarn"}), "rope_scaling"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attn_gate="sigmoid"), "attn_gate"),
    ],
)
def test_impossible_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        ModelConfig.preset("deepseek-v3-debug").replace(**changes)


def test_hf_config_round_trip_and_rope_spellings():
    for name in DEBUG_PRESETS:
        cfg = ModelConfig.preset(name)
        again = config_from_hf(config_to_hf(cfg))
        assert config_to_hf(again) == config_to_hf(cfg), name
    old_style = config_to_hf(ModelConfig.preset("llama-3-8b-debug"))
    old_style.pop("rope_parameters")  # transformers 4.x spelling: rope_theta + rope_scaling{"type": ...}
    old_style["rope_scaling"] = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    assert config_from_hf(old_style).rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="model_type='bert'"):
        config_from_hf({"model_type": "bert"})


@pytest.mark.parametrize("name, changes", OPTIONS)
def test_options_save_reload_and_transformers_refuses_them(tmp_path, name, changes):
    """A model using a deepsail option reloads with it (same logits); its config.json names model_type "deepsail",
    so transformers refuses it by name instead of loading it with the option's weights dropped."""
    import transformers

    model = _model(name, **changes)
    model.save_pretrained(tmp_path)
    again = Transformer.from_pretrained(tmp_path)
    assert again.config == model.config and again.config.options == changes
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="deepsail"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bad_checkpoints_get_errors_that_list_the_problem(tmp_path):
    model = _model("qwen2-1.5b-debug")
    model.save_pretrained(tmp_path / "good")
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "good" / "model.safetensors")
    # missing + unexpected + wrong shape, all reported together
    weights.pop("model.layers.0.self_attn.q_proj.weight")
    weights["model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
    weights["model.norm.weight"] = torch.zeros(3)
    (tmp_path / "bad").mkdir()
    save_file(weights, tmp_path / "bad" / "model.safetensors")
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    with pytest.raises(ValueError) as err:
        ds.from_pretrained(tmp_path / "bad")
    msg = str(err.value)
    assert "missing tensors: layers.0.self_attn.q_proj.weight" in msg
    assert "unexpected tensors: model.layers.0.self_attn.rogue.weight" in msg
    assert "norm.weight: checkpoint (3,) vs model (64,)" in msg

    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="safetensors only"):
        ds.from_pretrained(tmp_path / "pickle")
    with pytest.raises(ValueError, match="no config.json"):
        ds.from_pretrained(tmp_path)


def test_sharded_save_and_load(tmp_path):
    model = _model("deepseek-v3-debug")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    back = ds.from_pretrained(tmp_path / "sharded")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    model = _model("llama-3-8b-debug")
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    before = (target / "model.safetensors").read_bytes()

    import deepsail.model.hf as hf

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", crash)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError):
        model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before  # the last good checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # and the failed write left nothing behind
    monkeypatch.undo()
    model.save_pretrained(target)
    assert (target / "tokenizer.json").exists() and (target / "model.safetensors").read_bytes() != before


def test_meta_build_does_not_allocate():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("deepseek-v3"))  # the full 671B configuration
    assert all(p.is_meta for p in model.parameters())
    assert 600e9 < model.num_params() < 700e9 and 30e9 < model.num_params(active=True) < 45e9


def test_cache_overflow_is_a_clear_error():
    model = _model("llama-3-8b-debug")
    cache = model.new_cache(1, 8, block_size=4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_loss_from_hidden_matches_the_logits_route(monkeypatch, precision):
    """The chunked linear + cross-entropy (model/loss.py) gives the plain route's losses and gradients, with
    ignored labels and the MTP loss, in fp32 and under bf16 autocast; and several chunks are exercised."""
    import deepsail.model.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 1)  # 256-row chunks: 3 over 2 x 300 rows
    torch.manual_seed(0)
    model = _model("deepseek-v3-debug").train()
    ids = torch.randint(0, model.config.vocab_size, (2, 301))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :40] = -100  # a masked prompt
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    results = []
    for fused in (True, False):
        monkeypatch.setattr(Transformer, "_fused_loss", lambda self, f=fused: f and torch.is_grad_enabled())
        model.zero_grad(set_to_none=True)
        with amp:
            out = model(x, labels=y)
        assert (out.logits is None) == fused
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.lm_loss.detach(), out.mtp_loss.detach(), grads))
    (l1, m1, g1), (l2, m2, g2) = results
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert torch.allclose(l1, l2, rtol=tol, atol=tol) and torch.allclose(m1, m2, rtol=tol, atol=tol)
    assert g1.keys() == g2.keys()
    for name in ("lm_head.weight", "embed_tokens.weight", "layers.0.self_attn.o_proj.weight"):
        err = (g1[name] - g2[name]).norm() / g2[name].norm()
        assert err < (1e-4 if precision == "fp32" else 3e-2), (name, float(err))


def test_training_loss_from_hidden_all_ignored_is_zero():
    from deepsail.model.loss import linear_cross_entropy

    w = torch.randn(50, 8, requires_grad=True)
    loss = linear_cross_entropy(torch.randn(4, 8), w, torch.full((4,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(w.grad.abs().max()) == 0.0
