"""Hybrid sparse attention (model/sparse_attention.py): the vectorised branches against a per-query reference,
causality of the whole model, cached and stateless decode, training, saving, and the config errors.
(The generic runner in test_model.py covers forward/cache/batch/bf16 for it too.)"""

from __future__ import annotations

import json

import pytest
import torch

import deepsail as ds
from deepsail.infer import Engine, EngineConfig, SamplingParams, generate
from deepsail.infer.graphs import enable_compiled_decode
from deepsail.model import ModelConfig, Transformer
from deepsail.model.attention import AttentionContext
from deepsail.model.cache import KVPool
from deepsail.model.sparse_attention import HybridSparseAttention

# small numbers so ~20 tokens exercise every branch: several compressed blocks, candidates outside the window
HYBRID = dict(sparse_attention="hybrid", sliding_window=3, compress_block=2, select_block=4, select_top_k=2)


def _reference(mod: HybridSparseAttention, x, q, k, v, scale):
    """The definition, one query at a time: window (p-W, p], complete pooled blocks + a zero sink, and the top-k
    complete blocks starting at or before p-W by summed compressed weight, + a zero sink; mixed by the gates."""
    B, H, T, D = q.shape
    G = k.shape[1]
    Hg, W, c, S = H // G, mod.window, mod.compress, mod.select
    w_k, w_v = mod.pool_logits.softmax(-1)
    gates = torch.sigmoid(mod.gate_proj(x)).view(B, T, H, 3)
    out = torch.zeros(B, H, T, v.shape[-1])

    def attend(qv, keys, vals, sink=True):  # softmax over keys (plus a zero-logit, zero-value sink)
        logits = torch.cat((keys @ qv * scale, torch.zeros(int(sink))))
        return logits.softmax(0)[: len(keys)] @ vals

    for b in range(B):
        for g in range(G):
            for p in range(T):
                n_c = (p + 1) // c
                kc = torch.stack([w_k @ k[b, g, i * c : (i + 1) * c] for i in range(n_c)]) if n_c else k[b, g, :0]
                vc = torch.stack([w_v @ v[b, g, i * c : (i + 1) * c] for i in range(n_c)]) if n_c else v[b, g, :0]
                heads = range(g * Hg, (g + 1) * Hg)
                probs = [torch.cat((kc @ q[b, h, p] * scale, torch.zeros(1))).softmax(0)[:-1] for h in heads]
                score = sum(probs)
                cands = [i for i in range(T // S) if i * S <= p - W and (i + 1) * S <= p + 1]
                ranked = sorted(cands, key=lambda i: -float(score[i * S // c : (i + 1) * S // c].detach().sum()))
                sel = sorted(ranked[: mod.top_k])
                keys = torch.tensor([j for i in sel for j in range(i * S, (i + 1) * S)], dtype=torch.long)
                lo = max(0, p - W + 1)
                for h, pr in zip(heads, probs):
                    win = attend(q[b, h, p], k[b, g, lo : p + 1], v[b, g, lo : p + 1], sink=False)
                    cmp = pr @ vc if n_c else torch.zeros(v.shape[-1])
                    slc = attend(q[b, h, p], k[b, g, keys], v[b, g, keys])
                    out[b, h, p] = gates[b, p, h] @ torch.stack((win, cmp, slc))
    return out


@pytest.mark.parametrize("G", [1, 2])
def test_branches_match_a_per_query_reference(G):
    """The blocked window, chunked compressed attention and tiled selection equal the definition (fresh path, also
    for text no longer than the window), and gradients reach the queries, keys, values, gates and pooling weights."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-3-8b-debug").replace(**HYBRID)
    mod = HybridSparseAttention(cfg, n_heads=4)
    torch.nn.init.normal_(mod.pool_logits, std=0.5)
    B, T, D = 2, 21, 8
    x = torch.randn(B, T, cfg.hidden_size)
    q = torch.randn(B, 4, T, D, requires_grad=True)
    k = torch.randn(B, G, T, D, requires_grad=True)
    v = torch.randn(B, G, T, D, requires_grad=True)
    cos = torch.ones(1, 1, T, D // 2)
    got = mod(x, q, k, v, AttentionContext(cos, cos), scale=0.7)
    want = _reference(mod, x, q, k, v, 0.7)
    assert (got - want).abs().max() < 1e-5
    with torch.no_grad():  # without gradients the selected tiles take torch's fused CPU kernel instead
        assert (mod(x, q, k, v, AttentionContext(cos, cos), scale=0.7) - want).abs().max() < 1e-5
        # MLA's form: the values are the keys' first columns (v_dim), so the fused kernel gets the keys as values
        mla = mod(x, q, k, None, AttentionContext(cos, cos), scale=0.7, v_dim=5)
        want_mla = _reference(mod, x, q, k, k[..., :5], 0.7)
        assert (mla - want_mla).abs().max() < 1e-5
        # text no longer than the window (3): one causal call for the window, and no query can select a block yet
        n = 3
        short = AttentionContext(cos[:, :, :n], cos[:, :, :n])
        got_short = mod(x[:, :n], q[:, :, :n], k[:, :, :n], v[:, :, :n], short, scale=0.7)
        assert (got_short - want[:, :, :n]).abs().max() < 1e-5
        mla_short = mod(x[:, :n], q[:, :, :n], k[:, :, :n], None, short, scale=0.7, v_dim=5)
        assert (mla_short - want_mla[:, :, :n]).abs().max() < 1e-5
    # the gradients too: the selected branch's in-place softmax and fp32 scatter-sum must back-propagate exactly
    inputs = (q, k, v, mod.gate_proj.weight, mod.pool_logits)
    want_grads = torch.autograd.grad(want.square().sum(), inputs)
    got.square().sum().backward()
    for t, w in zip(inputs, want_grads):
        assert t.grad is not None and t.grad.abs().sum() > 0
        assert (t.grad - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())


@pytest.mark.parametrize("name", ["deepseek-v3-debug", "llama-3-8b-debug"])
def test_hybrid_model_is_causal_and_decodes_like_the_full_forward(name, monkeypatch):
    """Changing tokens after position t changes no logit at or before t (selection included), and prefill +
    continued prefill + 1-token decode through the paged cache, and the stateless past, equal the full forward.
    The paged cache decodes through the pooled-block stores where page and block sizes divide (pages of 4 and of 1
    token, blocks of 2) and re-pools the history where they do not (pages of 3)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(name).replace(**HYBRID)).eval()
    V = model.config.vocab_size
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    paged = []
    real_paged = HybridSparseAttention.paged
    monkeypatch.setattr(HybridSparseAttention, "paged", lambda *a, **k: paged.append(1) or real_paged(*a, **k))
    with torch.no_grad():
        full = model(ids).logits
        for t in (5, 13):
            other = ids.clone()
            other[:, t + 1 :] = torch.randint(0, V, (2, 23 - t))
            assert (model(other).logits[:, : t + 1] - full[:, : t + 1]).abs().max() < 1e-6
        for block_size, stores in ((4, True), (1, True), (3, False)):
            paged.clear()
            cache = model.new_cache(2, 32, block_size=block_size)
            assert (cache.pool.kc is not None) == stores
            steps = [model(ids[:, :9], cache=cache).logits, model(ids[:, 9:17], cache=cache).logits]
            steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(17, 24)]
            assert (torch.cat(steps, 1) - full).abs().max() < 1e-4
            assert len(paged) == (8 * model.config.num_hidden_layers if stores else 0)
        out = model(ids[:, :10], past=model.new_past(2))
        last = model(ids[:, 10:], past=out.present).logits
        assert (torch.cat((out.logits, last), 1) - full).abs().max() < 1e-4
        with pytest.raises(ValueError, match="right-padded"):
            mask = torch.ones(2, 24, dtype=torch.long)
            mask[1, :3] = 0
            model(ids, past=model.new_past(2), attention_mask=mask)


def test_engine_serves_hybrid_with_shared_prefixes_and_preemption():
    """The engine's shared prefix pages carry their pooled blocks; a preempted request recomputes them; greedy output
    equals one request at a time — with the decode steps compiled (one graph per batch-size range as the
    contexts grow: the paged path's sizes follow from the key length alone)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("deepseek-v3-debug").replace(num_nextn_predict_layers=0, **HYBRID)).eval()
    shared = list(range(60, 76))  # 4 full pages of 4: shared by the later requests
    prompts = [shared + [1, 2], shared + [3], list(range(5, 19)), shared + [4, 5, 6]]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [generate(model, None, p, greedy)[0].token_ids for p in prompts]
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=14, max_batch_size=4, compile_decode=True))
    assert engine.pool.kc is not None and model.compiled_decode.ok
    first = engine.submit(prompts[0], greedy)
    engine.run_until_idle()
    rest = [engine.submit(p, greedy) for p in prompts[1:]]
    engine.run_until_idle()
    assert [h.result(timeout=0)[1] for h in [first, *rest]] == want
    stats = engine.stats()
    assert stats["prefix_hits"] >= 16 and stats["preemptions"] > 0 and model.compiled_decode.runs["step"] > 20


def test_speculative_decoding_with_hybrid_equals_greedy():
    """Verify forwards write pooled blocks that rejected drafts completed; after the rollback the block completes
    again with the accepted tokens and is rewritten, so self-speculative output stays the greedy output — eager, and
    with the verify forward and the MTP steps compiled (their candidate blocks are a fixed number per row)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("deepseek-v3-debug").replace(**HYBRID)).eval()
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [list(range(5, 25)), list(range(30, 37))]
    want = [generate(model, None, prompt, greedy)[0] for prompt in prompts]
    for compiled in (False, True):
        if compiled:
            step = enable_compiled_decode(model)
        for prompt, w in zip(prompts, want):
            got = generate(model, None, prompt, greedy, speculative=2)[0]
            assert got.token_ids == w.token_ids and got.draft_tokens > 0
    assert step.runs["hidden"] > 0 and step.runs["mtp"] > 0


def test_pool_counts_the_pooled_block_stores():
    """A hybrid pool's bytes per token (what the engine's KV budget divides) include the pooled keys and values: one
    of each per block, at its last token's slot // min(page, block), plus one scratch row."""
    cfg = ModelConfig.preset("deepseek-v3-debug").replace(**HYBRID)
    plain = KVPool(cfg.replace(sparse_attention="none"), num_blocks=8, block_size=4)
    pool = KVPool(cfg, num_blocks=8, block_size=4)
    assert pool.compress_stride == 2 and pool.kc[0].shape == (17, *plain.k[0].shape[1:])
    assert pool.bytes_per_token == plain.bytes_per_token * 2
    assert KVPool(cfg, num_blocks=8, block_size=3).kc is None


def test_hybrid_trains_saves_and_reloads(tmp_path):
    """A few AdamW steps lower the loss; the checkpoint says model_type "deepsail" (transformers refuses it) and
    carries the option's numbers, and reloads to the same logits."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("deepseek-v3-debug").replace(num_hidden_layers=2, num_nextn_predict_layers=0, **HYBRID)
    model = Transformer(cfg).train()
    ids = torch.randint(0, 64, (2, 25), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["model_type"] == "deepsail" and saved["deepsail"]["select_block"] == 4
    back = ds.from_pretrained(tmp_path / "ckpt").eval()
    assert back.config.sparse_attention == "hybrid" and back.config.sliding_window == 3
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, back(ids).logits)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(sparse_attention="nsa"), "sparse_attention"),
        (dict(sparse_attention="hybrid", compress_block=16, select_block=24), "select_block"),
        (dict(sparse_attention="hybrid", sliding_window=0), "sliding_window"),
        (dict(sparse_attention="hybrid", select_top_k=0), "select_top_k"),
    ],
)
def test_impossible_hybrid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
        ModelConfig.preset("deepseek-v3-debug").replace(**changes)
