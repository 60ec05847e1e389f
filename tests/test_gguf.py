"""GGUF export (deepsail/export/gguf.py), read back with gguf-py's own reader: names, shapes and types as llama.cpp's
loader asks for them, values equal to the model's (f16 to rounding, q8_0/q4_0 bit-exact to gguf-py's quantizer and
within its error), the rope layouts llama.cpp rotates, metadata, the tokenizer, errors and crash safety.
llama.cpp itself runs the files in benchmarks/llamacpp_bench.py (CI does not build it)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from deepsail.data import Tokenizer, default_corpus  # noqa: E402
from deepsail.export.gguf import (  # noqa: E402
    TYPES,
    chat_template_for_gguf,
    export_gguf,
    gguf_command,
    pre_tokenizer_name,
)
from deepsail.model import ModelConfig, Transformer  # noqa: E402
from deepsail.model.layers import apply_rope  # noqa: E402

T = gguf.MODEL_TENSOR
Q = gguf.GGMLQuantizationType
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _model_dir(root: Path, preset: str, tokenizer_from: Path, **changes) -> Path:
    folder = root / preset
    torch.manual_seed(0)
    Transformer(ModelConfig.preset(preset).replace(**changes)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """deepseek2 (the session's deepseek-v3-debug: MLA, 8 experts in 4 groups, sigmoid + bias, a shared expert,
    one dense layer, YaRN), llama (GQA, Llama-3 rope, an embedding 8 rows larger than the tokenizer) and qwen2 (q/k/v
    bias, tied embeddings)."""
    root = tmp_path_factory.mktemp("gguf_models")
    return {
        "deepseek2": tiny_model_dir,
        "llama": _model_dir(root, "llama-3-8b-debug", tiny_model_dir, vocab_size=520),
        "qwen2": _model_dir(root, "qwen2-1.5b-debug", tiny_model_dir),
    }


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("gguf_files")
    return {(a, t): export_gguf(d, out / f"{a}-{t}.gguf", t) for a, d in models.items() for t in TYPES}


def _read(path: Path) -> tuple[dict[str, object], dict[str, object]]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return {t.name: t for t in reader.tensors}, fields


def _values(t) -> np.ndarray:
    """A tensor as fp32 in numpy layout (ggml's ne reversed)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)


def _allowed_names(arch: str, n_layers: int) -> set[str]:
    keys = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]
    return {gguf.TENSOR_NAMES[k].format(bid=i) for k in keys for i in range(n_layers)}


# --- names, shapes and types: what llama.cpp's loader creates ------------------------------------------------------
def _loader_shapes(c: ModelConfig, arch: str) -> dict[str, tuple[int, ...]]:
    """The ggml `ne` of every tensor the loader (src/models/{llama,qwen2,deepseek2}.cpp) creates for this config."""
    D, V, L, H = c.hidden_size, c.vocab_size, c.num_hidden_layers, c.num_attention_heads
    out = {"token_embd.weight": (D, V), "output_norm.weight": (D,)}
    if not c.tie_word_embeddings:
        out["output.weight"] = (D, V)
    for i in range(L):
        b = f"blk.{i}."
        out |= {b + "attn_norm.weight": (D,), b + "ffn_norm.weight": (D,)}
        if arch == "deepseek2":
            r, nope, rope, v, qr = c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank
            out |= {
                b + "attn_q_a.weight": (D, qr),
                b + "attn_q_a_norm.weight": (qr,),
                b + "attn_q_b.weight": (qr, H * (nope + rope)),
                b + "attn_kv_a_mqa.weight": (D, r + rope),
                b + "attn_kv_a_norm.weight": (r,),
                b + "attn_k_b.weight": (nope, r, H),
                b + "attn_v_b.weight": (r, v, H),
                b + "attn_output.weight": (H * v, D),
            }
            if i < c.first_k_dense_replace:
                I = c.intermediate_size
                out |= {b + "ffn_gate.weight": (D, I), b + "ffn_up.weight": (D, I), b + "ffn_down.weight": (I, D)}
            else:
                E, I, S = c.n_routed_experts, c.moe_intermediate_size, c.moe_intermediate_size * c.n_shared_experts
                out |= {
                    b + "ffn_gate_inp.weight": (D, E),
                    b + "exp_probs_b.bias": (E,),
                    b + "ffn_gate_exps.weight": (D, I, E),
                    b + "ffn_up_exps.weight": (D, I, E),
                    b + "ffn_down_exps.weight": (I, D, E),
                    b + "ffn_gate_shexp.weight": (D, S),
                    b + "ffn_up_shexp.weight": (D, S),
                    b + "ffn_down_shexp.weight": (S, D),
                }
        else:
            hd, kv, I = c.head_dim, c.num_key_value_heads, c.intermediate_size
            out |= {
                b + "attn_q.weight": (D, H * hd),
                b + "attn_k.weight": (D, kv * hd),
                b + "attn_v.weight": (D, kv * hd),
                b + "attn_output.weight": (H * hd, D),
                b + "ffn_gate.weight": (D, I),
                b + "ffn_up.weight": (D, I),
                b + "ffn_down.weight": (I, D),
            }
            if c.attention_bias:
                out |= {b + "attn_q.bias": (H * hd,), b + "attn_k.bias": (kv * hd,), b + "attn_v.bias": (kv * hd,)}
    if c.rope_type == "llama3":
        out["rope_freqs.weight"] = (c.head_dim // 2,)
    return out


def _expected_type(name: str, ne: tuple[int, ...], type: str, tied: bool):
    if len(ne) == 1 or "ffn_gate_inp" in name:
        return Q.F32
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    if want == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        want = Q.Q8_0  # llama-quantize's q6_K, which gguf-py cannot write
    return Q.F16 if want in (Q.Q8_0, Q.Q4_0) and ne[0] % 32 else want


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("arch", ["deepseek2", "llama", "qwen2"])
def test_names_shapes_and_types_are_what_llama_cpp_loads(models, exported, arch, type):
    from deepsail.model.hf import read_config

    config = read_config(models[arch])
    tensors, fields = _read(exported[arch, type])
    want = _loader_shapes(config, arch)
    assert sorted(tensors) == sorted(want)  # nothing missing, nothing extra (MTP's tensors are not exported)
    assert {n.rsplit(".", 1)[0] for n in tensors} <= _allowed_names(arch, config.num_hidden_layers)
    for name, t in tensors.items():
        assert tuple(int(n) for n in t.shape) == want[name], name
        assert t.tensor_type == _expected_type(name, want[name], type, config.tie_word_embeddings), name
    assert fields["general.architecture"] == arch
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}[type]
    assert fields["general.file_type"] == getattr(gguf.LlamaFileType, file_type)


# --- values ----------------------------------------------------------------------------------------------------------
def _reference(model: Transformer, arch: str) -> dict[str, np.ndarray]:
    """Every exported tensor rebuilt from the model's weights in GGUF layout, for the layouts that need no rope
    permutation (those are checked functionally below)."""
    c, sd = model.config, {k: v.float().numpy() for k, v in model.state_dict().items()}
    ref = {"token_embd.weight": sd["embed_tokens.weight"], "output_norm.weight": sd["norm.weight"]}
    if not c.tie_word_embeddings:
        ref["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        for k, v in sd.items():
            if not k.startswith(p):
                continue
            k = k.removeprefix(p)
            simple = {
                "input_layernorm.weight": "attn_norm.weight",
                "post_attention_layernorm.weight": "ffn_norm.weight",
                "self_attn.v_proj.weight": "attn_v.weight",
                "self_attn.v_proj.bias": "attn_v.bias",
                "self_attn.o_proj.weight": "attn_output.weight",
                "self_attn.q_a_proj.weight": "attn_q_a.weight",
                "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
                "self_attn.q_b_proj.weight": "attn_q_b.weight",  # DeepSeek pairs already: as is
                "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
                "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
                "mlp.gate_proj.weight": "ffn_gate.weight",
                "mlp.up_proj.weight": "ffn_up.weight",
                "mlp.down_proj.weight": "ffn_down.weight",
                "mlp.gate.weight": "ffn_gate_inp.weight",
                "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
                "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
                "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
                "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
                "mlp.experts.down_proj": "ffn_down_exps.weight",
            }
            if k in simple:
                ref[b + simple[k]] = v
            elif k == "mlp.experts.gate_up_proj":
                half = v.shape[1] // 2
                ref[b + "ffn_gate_exps.weight"], ref[b + "ffn_up_exps.weight"] = v[:, :half], v[:, half:]
            elif k == "self_attn.kv_b_proj.weight":
                heads = v.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
                ref[b + "attn_k_b.weight"] = heads[:, : c.qk_nope_head_dim].transpose(0, 2, 1)
                ref[b + "attn_v_b.weight"] = heads[:, c.qk_nope_head_dim :]
            elif arch == "qwen2" and k.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                ref[b + "attn_" + k.split(".")[1][0] + "." + k.rsplit(".", 1)[1]] = v  # NEOX: no permutation
    return ref


def _block_bound(ref: np.ndarray, qtype) -> np.ndarray:
    """The most a 32-value block's round trip may move a value: half a step for q8_0 (d = amax/127) plus up to 127
    times the rounding of d to f16 (2^-11 relative: 0.062 d), a whole step for q4_0 (its 16 levels are asymmetric,
    -8d..7d with d = -max/8, so the value opposite the max lands a step off)."""
    blocks = ref.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    step = amax / 127 * 0.57 if qtype == Q.Q8_0 else amax / 8 * 1.01
    return np.broadcast_to(step + 1e-7, blocks.shape).reshape(ref.shape)


@pytest.mark.parametrize("type", TYPES)
@pytest.mark.parametrize("arch", ["deepseek2", "llama", "qwen2"])
def test_values_equal_the_model_weights(models, exported, arch, type):
    model = Transformer.from_pretrained(models[arch])
    tensors, _ = _read(exported[arch, type])
    ref = _reference(model, arch)
    assert len(ref) >= len(tensors) - 2 * model.config.num_hidden_layers - 1  # all but the permuted q/k (+ rope)
    for name, want in ref.items():
        t = tensors[name]
        got = _values(t)
        assert got.shape == want.shape, name
        if t.tensor_type == Q.F32:
            np.testing.assert_array_equal(got, want, err_msg=name)
        elif t.tensor_type == Q.F16:
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=name)
        elif t.tensor_type == Q.BF16:
            bf16 = torch.from_numpy(want).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got, bf16, err_msg=name)
        else:  # bit-exact to gguf-py's quantizer (what the converter uses), and within the format's error
            exact = gguf.quants.dequantize(gguf.quants.quantize(want, t.tensor_type), t.tensor_type)
            np.testing.assert_array_equal(got, exact.reshape(want.shape), err_msg=name)
            assert (np.abs(got - want) <= _block_bound(want, t.tensor_type)).all(), name


def test_llama_q_k_rows_rotate_as_llama_cpp_rotates(models, exported):
    """llama.cpp's llama rotates adjacent pairs; deepsail (HF) rotates halves. With the converter's row permutation,
    pairs-rope on the GGUF rows gives what halves-rope gives on ours (apply_rope returns both as [real | imag])."""
    model = Transformer.from_pretrained(models["llama"])
    c = model.config
    tensors, _ = _read(exported["llama", "f16"])
    x = torch.randn(1, 5, c.hidden_size)
    angles = torch.arange(5.0)[:, None] * torch.rand(c.head_dim // 2) * 3
    cos, sin = angles.cos()[None, None], angles.sin()[None, None]
    for i in range(c.num_hidden_layers):
        attn = model.layers[i].self_attn
        for proj, heads, short in (
            (attn.q_proj, c.num_attention_heads, "q"),
            (attn.k_proj, c.num_key_value_heads, "k"),
        ):
            w = proj.weight.detach().half().float()  # what f16 holds
            ours = (x @ w.T).view(1, 5, heads, c.head_dim).transpose(1, 2)
            theirs = (x @ torch.from_numpy(_values(tensors[f"blk.{i}.attn_{short}.weight"])).T).view(
                ours.transpose(1, 2).shape
            )
            theirs = theirs.transpose(1, 2)
            torch.testing.assert_close(apply_rope(theirs, cos, sin, True), apply_rope(ours, cos, sin, False))


def test_llama3_rope_freqs_are_deepsails_frequency_divisors(models, exported):
    from deepsail.model.layers import rope_frequencies

    c = Transformer.from_pretrained(models["llama"]).config
    tensors, _ = _read(exported["llama", "f16"])
    base = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    factors = torch.from_numpy(_values(tensors["rope_freqs.weight"]))
    assert factors.min() >= 1 and factors.max() == pytest.approx(c.rope_scaling["factor"])  # some scaled, some not
    torch.testing.assert_close(base / factors, rope_frequencies(c)[0])


def test_mla_with_rotate_halves_rope_gets_llama_cpps_pairs(tiny_model_dir, tmp_path):
    """A deepsail MLA model built with rope_interleave=False: its rope rows (q and the shared rope key) are permuted
    like Llama's; the rest of q_b and kv_a stays as is."""
    folder = tmp_path / "halves"
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("deepseek-v3-debug").replace(rope_interleave=False, rope_scaling=None))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    tensors, _ = _read(export_gguf(folder, tmp_path / "h.gguf", "f16"))
    c, attn = model.config, model.layers[1].self_attn
    nope, rope, r = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    x = torch.randn(1, 4, c.q_lora_rank)
    angles = torch.arange(4.0)[:, None] * torch.rand(rope // 2)
    cos, sin = angles.cos()[None, None], angles.sin()[None, None]
    ours = (x @ attn.q_b_proj.weight.detach().half().float().T).view(1, 4, c.num_attention_heads, -1).transpose(1, 2)
    theirs = (x @ torch.from_numpy(_values(tensors["blk.1.attn_q_b.weight"])).T).view(1, 4, c.num_attention_heads, -1)
    theirs = theirs.transpose(1, 2)
    torch.testing.assert_close(theirs[..., :nope], ours[..., :nope])
    torch.testing.assert_close(
        apply_rope(theirs[..., nope:], cos, sin, True), apply_rope(ours[..., nope:], cos, sin, False)
    )
    kv_a = torch.from_numpy(_values(tensors["blk.1.attn_kv_a_mqa.weight"]))
    w = attn.kv_a_proj_with_mqa.weight.detach().half().float()
    torch.testing.assert_close(kv_a[:r], w[:r])
    y = torch.randn(1, 4, c.hidden_size)
    k_ours, k_theirs = (y @ w[r:].T)[:, None], (y @ kv_a[r:].T)[:, None]
    torch.testing.assert_close(apply_rope(k_theirs, cos, sin, True), apply_rope(k_ours, cos, sin, False))


# --- metadata --------------------------------------------------------------------------------------------------------
def test_deepseek2_metadata(models, exported):
    from deepsail.model.hf import read_config

    c = read_config(models["deepseek2"])
    _, f = _read(exported["deepseek2", "q8_0"])
    a = "deepseek2."
    want = {
        a + "block_count": c.num_hidden_layers,
        a + "context_length": c.max_position_embeddings,
        a + "embedding_length": c.hidden_size,
        a + "feed_forward_length": c.intermediate_size,
        a + "attention.head_count": c.num_attention_heads,
        a + "attention.head_count_kv": 1,  # MLA as MQA over the latent
        a + "attention.q_lora_rank": c.q_lora_rank,
        a + "attention.kv_lora_rank": c.kv_lora_rank,
        a + "attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
        a + "attention.value_length": c.kv_lora_rank,
        a + "attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
        a + "attention.value_length_mla": c.v_head_dim,
        a + "rope.dimension_count": c.qk_rope_head_dim,
        a + "leading_dense_block_count": c.first_k_dense_replace,
        a + "expert_count": c.n_routed_experts,
        a + "expert_used_count": c.num_experts_per_tok,
        a + "expert_shared_count": c.n_shared_experts,
        a + "expert_feed_forward_length": c.moe_intermediate_size,
        a + "expert_group_count": c.n_group,
        a + "expert_group_used_count": c.topk_group,
        a + "expert_gating_func": gguf.ExpertGatingFuncType.SIGMOID,
        a + "expert_weights_norm": True,
        a + "rope.scaling.type": "yarn",
        a + "rope.scaling.original_context_length": c.rope_scaling["original_max_position_embeddings"],
        a + "vocab_size": c.vocab_size,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }
    assert {k: f[k] for k in want} == want
    assert f[a + "expert_weights_scale"] == pytest.approx(c.routed_scaling_factor)
    assert f[a + "rope.scaling.factor"] == pytest.approx(c.rope_scaling["factor"])
    assert f[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * c.rope_scaling["mscale_all_dim"])
    assert f[a + "rope.freq_base"] == pytest.approx(c.rope_theta)
    assert f[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)


@pytest.mark.parametrize(
    "changes, groups",
    [
        (dict(n_routed_experts=0, n_shared_experts=0), None),  # dense: llama.cpp asserts no groups without experts
        (dict(topk_group=4), (1, 1)),  # every group kept is no grouping; llama.cpp asserts used < count
        (dict(topk_method="greedy", scoring_func="softmax", model_type="deepseek_v2"), (1, 1)),  # greedy: no groups
        (dict(q_lora_rank=0), (4, 2)),  # V2-Lite's direct q: the loader needs q_lora_rank = 0 said, below 26 layers
    ],
)
def test_deepseek2_variants_metadata(tiny_model_dir, tmp_path, changes, groups):
    folder = tmp_path / "variant"
    torch.manual_seed(0)
    config = ModelConfig.preset("deepseek-v3-debug").replace(**changes)
    if config.model_type == "deepseek_v2":
        config = config.replace(num_nextn_predict_layers=0, norm_topk_prob=False)
    Transformer(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    tensors, f = _read(export_gguf(folder, tmp_path / "v.gguf"))
    got = (f.get("deepseek2.expert_group_count"), f.get("deepseek2.expert_group_used_count"))
    assert got == (groups or (None, None))
    if not config.is_moe:
        assert f["deepseek2.leading_dense_block_count"] == config.num_hidden_layers
        assert not any("exps" in n or "gate_inp" in n for n in tensors)
    assert f["deepseek2.attention.q_lora_rank"] == config.q_lora_rank
    assert ("blk.0.attn_q.weight" in tensors) == (config.q_lora_rank == 0)
    if config.scoring_func == "softmax":
        assert f["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SOFTMAX
        assert not any("exp_probs_b" in n for n in tensors) and "deepseek2.expert_weights_norm" not in f


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gqa_metadata(models, exported, arch):
    from deepsail.model.hf import read_config

    c = read_config(models[arch])
    _, f = _read(exported[arch, "f16"])
    want = {
        f"{arch}.block_count": c.num_hidden_layers,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.key_length": c.head_dim,
        f"{arch}.attention.value_length": c.head_dim,
        f"{arch}.feed_forward_length": c.intermediate_size,
    }
    assert {k: f[k] for k in want} == want
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert (f"{arch}.rope.dimension_count" in f) == (arch == "llama")  # as the converter: qwen2 leaves it implied


# --- tokenizer -------------------------------------------------------------------------------------------------------
def test_tokenizer_travels_in_the_file(models, exported):
    tok = Tokenizer.load(models["llama"])
    _, f = _read(exported["llama", "q4_0"])
    n = 520  # the model's vocab_size: 8 more rows than the tokenizer has ids
    assert tok.vocab_size < n
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "dbrx"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert tokens[: tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[tok.vocab_size :] == [f"[PAD{i}]" for i in range(tok.vocab_size, n)]
    assert types[:7] == [gguf.TokenType.CONTROL] * 7  # deepsail's special tokens, ids 0..6
    assert set(types[7 : tok.vocab_size]) == {gguf.TokenType.NORMAL}
    assert set(types[tok.vocab_size :]) == {gguf.TokenType.UNUSED}
    merges = json.loads((models["llama"] / "tokenizer.json").read_text())["model"]["merges"]
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_id == 0
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_id == 1
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_id == 2
    assert f["tokenizer.ggml.eot_token_id"] == tok.token_to_id("<|end|>")
    assert f["tokenizer.ggml.add_bos_token"] is False  # deepsail's encode adds none
    assert "{% generation %}" not in f["tokenizer.chat_template"] and "<|assistant|>" in f["tokenizer.chat_template"]


def test_chat_template_renders_as_deepsails(models):
    """The template in the file, rendered the way llama-cpp-python renders GGUF templates (a sandboxed jinja2 with
    trim_blocks/lstrip_blocks), gives deepsail's text: dropping `{% generation %}` changes nothing rendered."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tok = Tokenizer.load(models["llama"])
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(chat_template_for_gguf(tok.chat_template))
    got = template.render(messages=chat, add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|eos|>")
    assert got == tok.apply_chat_template(chat, add_generation_prompt=True)


LLAMA_CPP_LLAMA3_REGEX = (  # the split llama.cpp runs for "dbrx" / "llama-bpe" (src/llama-vocab.cpp)
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TRICKY = [
    "I'VE been 'told he'S there, 'RE you sure? 'M not sure I'LL make it, 'D you like some tea? We'Ve a'lL",
    "line\r\n\r\n  \n\tindented\n\n\n    x = 1234567  # 3.14159...!!!???\r\n",
    "🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 3 33 333 3333 я хочу 我想在apple工作1314151天～ ------=======  \u00a0nbsp\u3000ideo",
    "   leading and trailing   \n\n   ",
]


def test_llama_cpps_split_is_deepsails(models):
    """The pre-tokenizer name "dbrx" is right only if llama.cpp's Llama-3 regex splits text as deepsail's GPT-4 regex
    does: the same tokenizer with llama.cpp's regex swapped in encodes 200 kB of held-out corpus to the same ids."""
    import tokenizers
    from tokenizers import Regex, pre_tokenizers

    ours = tokenizers.Tokenizer.from_file(str(models["llama"] / "tokenizer.json"))
    theirs = tokenizers.Tokenizer.from_file(str(models["llama"] / "tokenizer.json"))
    theirs.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA_CPP_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    texts = [d.text for d in default_corpus("val", max_bytes=200_000)] + TRICKY
    a = ours.encode_batch(texts, add_special_tokens=False)
    b = theirs.encode_batch(texts, add_special_tokens=False)
    assert sum(len(e.ids) for e in a) > 20_000
    assert [e.ids for e in a] == [e.ids for e in b]


def test_pre_tokenizer_names(models):
    ours = json.loads((models["llama"] / "tokenizer.json").read_text())
    assert pre_tokenizer_name(ours) == "dbrx"
    llama3 = json.loads(json.dumps(ours))
    llama3["model"]["ignore_merges"] = True  # Llama-3's tokenizer.json: whole-word tokens skip the merges
    assert pre_tokenizer_name(llama3) == "llama-bpe"
    other = json.loads(json.dumps(ours))
    other["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer"):
        pre_tokenizer_name(other)


# --- errors and crash safety -----------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if n in skip])
    return dst


def test_bad_input_is_one_clear_value_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown GGUF type 'q5_k'; choose one of f16, bf16, q8_0, q4_0"):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", "q5_k")
    no_tok = _copy(tiny_model_dir, tmp_path / "no_tok", skip=TOKENIZER_FILES)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        export_gguf(no_tok, tmp_path / "m.gguf")
    mistral = _copy(tiny_model_dir, tmp_path / "mistral")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(ValueError, match=r"'mistral' has no GGUF export; supported: llama .*qwen2.*deepseek_v3"):
        export_gguf(mistral, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="is a folder"):
        export_gguf(tiny_model_dir, tmp_path)
    assert not list(tmp_path.glob("*.gguf"))


YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128)


@pytest.mark.parametrize(
    "preset, changes, message",
    [
        ("deepseek-v3-debug", dict(moe_layer_freq=2), "moe_layer_freq=2"),
        ("deepseek-v3-debug", dict(n_shared_experts=0), "always runs a shared expert"),
        ("deepseek-v3-debug", dict(rope_scaling=YARN), "YaRN with mscale=None"),  # deepsail: mscale(4) on rope
        ("deepseek-v3-debug", dict(attention_bias=True), "no q_a/kv_a projection bias"),
        ("qwen2-1.5b-debug", dict(head_dim=32), "head_dim x heads == hidden_size"),
        ("llama-3-8b-debug", dict(rope_scaling=YARN | dict(mscale=1.0, mscale_all_dim=1.0)), "has no such keys"),
    ],
)
def test_what_llama_cpp_would_run_differently_is_refused(tiny_model_dir, tmp_path, preset, changes, message):
    folder = tmp_path / "odd"
    Transformer(ModelConfig.preset(preset).replace(**changes)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_model_dir / name, folder / name)
    with pytest.raises(ValueError, match=message):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_crash_leaves_no_half_file(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the previous export")
    real, calls = gguf.quants.quantize, []

    def crash_on_the_5th(data, qtype):
        calls.append(qtype)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C part way through the tensors
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "quantize", crash_on_the_5th)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_model_dir, out, "q8_0")
    assert out.read_bytes() == b"the previous export"  # the old file untouched, no temporary left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_verb(tiny_model_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from deepsail.errors import cli_verb

    app = typer.Typer()
    app.command("gguf")(cli_verb(gguf_command))
    app.command("other")(lambda: None)  # two commands, so the verb is addressed by name as in `deepsail export`
    runner = CliRunner()
    help = runner.invoke(app, ["gguf", "--help"]).output
    assert "deepsail export gguf runs/default --out m.gguf --type q8_0" in help and "--type" in help
    ok = runner.invoke(app, ["gguf", str(tiny_model_dir), "--out", str(tmp_path / "m.gguf"), "--type", "q4_0"])
    assert ok.exit_code == 0, ok.output
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0
    bad = runner.invoke(app, ["gguf", str(tiny_model_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q3"])
    assert bad.exit_code == 1 and "error: unknown GGUF type 'q3'" in bad.output


def test_mtp_modules_are_left_out(models, exported, tmp_path):
    model = Transformer.from_pretrained(models["deepseek2"])
    assert len(model.mtp) == 1  # the preset has one; llama.cpp's converter skips them (skip_mtp)
    tensors, fields = _read(exported["deepseek2", "f16"])
    assert not any("nextn" in n for n in tensors)
    assert "deepseek2.nextn_predict_layers" not in fields
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a V3 model with noaux_tc groups exports without any warning
        export_gguf(models["deepseek2"], tmp_path / "again.gguf")
