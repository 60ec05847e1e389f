"""Numerical parity with HF transformers: load HF checkpoints, decode with the cache, and write checkpoints HF loads.

Each case builds a tiny random HF model, saves it, loads it with deepsail and compares fp32 logits (tolerance 1e-4):
full forward, prefill + 8 cached decode steps, a right-padded batch of unequal rows, and the deepsail -> HF trip.
"""

from __future__ import annotations

import pytest
import torch

import deepsail as ds

transformers = pytest.importorskip("transformers")
TOL = 1e-4

MLA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=211,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    max_position_embeddings=256,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=32,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)

CASES = {
    # DeepSeek-V3: query compression, group-limited routing (topk_group < n_group), sigmoid, YaRN, 1 dense layer
    "v3-yarn-groups": (
        "DeepseekV3Config",
        dict(
            MLA,
            q_lora_rank=24,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_parameters=YARN,
        ),
    ),
    # DeepSeek-V3 without query compression (q_lora_rank = 0), one group, no normalisation
    "v3-no-qlora": (
        "DeepseekV3Config",
        dict(
            MLA,
            q_lora_rank=None,
            n_routed_experts=4,
            n_shared_experts=2,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
        ),
    ),
    # DeepSeek-V2-Lite shape: softmax scores, greedy top-k, YaRN with mscale 0.707
    "v2-softmax-greedy": (
        "DeepseekV2Config",
        dict(
            MLA,
            q_lora_rank=None,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            moe_intermediate_size=24,
            topk_method="greedy",
            first_k_dense_replace=1,
            routed_scaling_factor=1.0,
            rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707),
        ),
    ),
    # DeepSeek-V2 with group-limited greedy routing and query compression
    "v2-group-limited": (
        "DeepseekV2Config",
        dict(
            MLA,
            q_lora_rank=24,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            first_k_dense_replace=0,
            routed_scaling_factor=16.0,
        ),
    ),
    # Qwen2 (R1-Distill-Qwen): GQA with q/k/v bias, tied embeddings
    "qwen2-gqa-tied": (
        "Qwen2Config",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=211,
            tie_word_embeddings=True,
            max_position_embeddings=256,
        ),
    ),
    # Llama-3 (R1-Distill-Llama): GQA, llama3 rope scaling, attention bias on all projections
    "llama3-gqa": (
        "LlamaConfig",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            vocab_size=211,
            attention_bias=True,
            max_position_embeddings=256,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
}


def _hf_model(kind: str, seed: int = 0):
    cls_name, kwargs = CASES[kind]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # HF initialises the router bias to zero; a real checkpoint's is not
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind = request.param
    hf = _hf_model(kind)
    path = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(path)
    ours = ds.from_pretrained(path, dtype=torch.float32)
    return kind, hf, ours, path


def _ids(vocab: int, shape: tuple[int, int], seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_forward_matches_hf(pair):
    kind, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, (2, 24))
    diff = (ours(ids).logits - hf(ids).logits).abs().max().item()
    assert diff < TOL, f"{kind}: max |Δlogit| = {diff:.2e}"


@torch.no_grad()
def test_cached_decode_matches_hf(pair):
    """Prefill 6 tokens, then 8 single-token decode steps through the paged cache (MLA: the absorbed path)."""
    kind, hf, ours, _ = pair
    ids = _ids(hf.config.vocab_size, (2, 14), seed=2)
    reference = hf(ids).logits
    cache = ours.new_cache(batch_size=2, max_seq_len=32, block_size=4)  # small blocks: rows span several blocks
    got = [ours(ids[:, :6], cache=cache).logits]
    for t in range(6, 14):
        got.append(ours(ids[:, t : t + 1], cache=cache).logits)
    diff = (torch.cat(got, dim=1) - reference).abs().max().item()
    assert diff < TOL, f"{kind}: cached decode max |Δlogit| = {diff:.2e}"
    assert cache.lens.tolist() == [14, 14]


@torch.no_grad()
def test_padded_batch_decode_matches_hf(pair):
    """Rows of different lengths, right-padded in one prefill, then decoded together step by step."""
    kind, hf, ours, _ = pair
    V = hf.config.vocab_size
    lengths = [9, 4, 6]
    seqs = [_ids(V, (1, n + 5), seed=10 + i)[0] for i, n in enumerate(lengths)]
    prompt = torch.zeros(3, max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        prompt[i, :n] = seqs[i][:n]
    cache = ours.new_cache(batch_size=3, max_seq_len=20, block_size=4)
    lens = torch.tensor(lengths)
    last = ours(prompt, cache=cache, input_lens=lens, last_logits_only=True).logits[:, 0]
    for i, n in enumerate(lengths):
        ref = hf(seqs[i][None, :n]).logits[0, -1]
        assert (last[i] - ref).abs().max().item() < TOL, f"{kind}: padded prefill row {i}"
    for step in range(5):
        nxt = torch.stack([seqs[i][n + step] for i, n in enumerate(lengths)])[:, None]
        logits = ours(nxt, cache=cache).logits[:, 0]
        for i, n in enumerate(lengths):
            ref = hf(seqs[i][None, : n + step + 1]).logits[0, -1]
            diff = (logits[i] - ref).abs().max().item()
            assert diff < TOL, f"{kind}: padded decode row {i} step {step}: {diff:.2e}"


@torch.no_grad()
def test_save_pretrained_round_trips_through_hf(pair, tmp_path):
    kind, hf, ours, _ = pair
    ours.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _ids(hf.config.vocab_size, (2, 16), seed=3)
    diff = (back(ids).logits - ours(ids).logits).abs().max().item()
    assert diff < TOL, f"{kind}: deepsail -> HF max |Δlogit| = {diff:.2e}"
    again = ds.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_bf16_load_is_close(pair):
    kind, hf, _, path = pair
    ours = ds.from_pretrained(path, dtype="bfloat16")
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    if ours.config.is_moe:  # the balancing bias stays fp32
        assert ours.layers[-1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = _ids(hf.config.vocab_size, (1, 12), seed=4)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits.float()
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item() + 0.05
