"""GGUF export: a deepsail model folder as one file llama.cpp runs. The one GGUF seam: every GGUF name, key and
layout decision lives here.

    export_gguf("runs/default", "m.gguf", type="q8_0")      # or: deepsail export gguf runs/default --out m.gguf

What is written follows llama.cpp's own converter (`convert_hf_to_gguf.py` with `conversion/{llama,qwen,deepseek}.py`
of the llama.cpp that llama-cpp-python 0.3.36 vendors; gguf-py 0.19): the same tensor names, layouts, types and
metadata keys, with the gguf package's `GGUFWriter`, constants and numpy quantizers. Architectures:

    deepsail model_type     llama.cpp architecture
    llama                   llama      q/k rows permuted from HF's rotate-halves to llama.cpp's adjacent pairs;
                                       Llama-3 rope scaling as the `rope_freqs` tensor
    qwen2                   qwen2      NEOX rope: halves, as HF; no permutation
    deepseek_v3/_v2         deepseek2  MLA as MQA over the latent: kv_b split into attn_k_b (transposed) and
                                       attn_v_b; experts stacked as ffn_{gate,up,down}_exps; sigmoid/softmax
                                       gating, exp_probs_b (the aux-loss-free bias), shared experts, leading
                                       dense blocks, YaRN

MTP modules are not exported: llama.cpp's converter skips them for deepseek2 (`skip_mtp`), so the file holds the
main model only and decodes one token per step.

Types (`--type`): f16 and bf16 as the converter's `--outtype`; q8_0 as `--outtype q8_0`; q4_0 as the converter's f16
followed by `llama-quantize Q4_0`. In every type norms, 1-D tensors, biases and the MoE router stay f32, and a
matrix whose rows are not a multiple of the 32-value block stays f16 (the converter's and llama-quantize's fallback).
q4_0 keeps `output.weight` (the tied embedding too) in q8_0: llama-quantize picks q6_K there, which gguf-py cannot
write; q8_0 is llama-quantize's own choice when q6_K does not fit.

The tokenizer travels in the file (`tokenizer.ggml.*`): byte-level BPE as "gpt2", every token, its type (special
tokens CONTROL, other added tokens USER_DEFINED, ids past the tokenizer's vocabulary UNUSED `[PADi]`), the merges,
bos/eos/pad/eot ids, add_bos_token as deepsail's encoder applies it, and the chat template. The pre-tokenizer name
is the one whose split llama.cpp runs is ours: deepsail splits with GPT-4's cl100k regex and applies every merge,
which is llama.cpp's "dbrx" (DBRX's tokenizer is cl100k; llama.cpp splits it with the Llama-3 regex, equivalent to
cl100k's — tests/test_gguf.py checks that on the corpus — and, unlike "llama-bpe", does not skip merges for words
already in the vocabulary). Text -> ids is then the same; ids -> text differs in one place: llama.cpp's
`llama_detokenize` (not `token_to_piece`) removes a space before ?!., for every llama3-regex pre-tokenizer, where
deepsail's decode gives the exact text back.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from deepsail.files import atomic_path

if TYPE_CHECKING:
    import numpy as np
    import torch

    from deepsail.model import ModelConfig

TYPES = ("f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2"}
_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
# The regexes llama.cpp knows by name, as the tokenizer.json spells them. deepsail's own (GPT-4's cl100k) is
# deepsail.data.tokenizer.SPLIT_PATTERN; Llama-3's differs from it only in spelling (non-possessive quantifiers,
# `\s*[\r\n]+`), which changes no split, so both map to the same names.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GENERATION_TAG = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ValueError("GGUF export needs the gguf package: pip install 'deepsail[export]' (or gguf>=0.17)") from e
    return gguf


# --- the one entry point ---------------------------------------------------------------------------------------------
def export_gguf(model_dir: str | Path, out: str | Path, type: str = "f16") -> Path:
    """Write the model in `model_dir` (config.json + model.safetensors + tokenizer.json, or a training run folder:
    its latest checkpoint) as the GGUF file `out`, weights in `type` (f16 | bf16 | q8_0 | q4_0). The file is written
    under a temporary name and renamed when complete: a crash leaves no half file. Returns `out`."""
    gguf = _gguf()
    import numpy as np

    from deepsail.data.tokenizer import Tokenizer
    from deepsail.model import Transformer
    from deepsail.model.hf import read_config
    from deepsail.train.checkpoint import resolve_checkpoint

    if type not in TYPES:
        raise ValueError(f"unknown GGUF type {type!r}; choose one of {', '.join(TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; --out takes the .gguf file to write, e.g. {out / f'model-{type}.gguf'}")
    folder = resolve_checkpoint(model_dir)
    from deepsail.compress.quantize import quantization_config_of

    quantized = quantization_config_of(folder)
    if quantized:
        raise ValueError(
            f"{folder} is a quantized model ({quantized['method']}); export the float model it came from: GGUF "
            "quantizes with its own block formats (--type q8_0 | q4_0)"
        )
    model_type = _model_type(folder)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{folder}: architecture {model_type!r} has no GGUF export; supported: "
            + ", ".join(f"{k} (llama.cpp {v})" for k, v in ARCHITECTURES.items())
        )
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"{folder} has no tokenizer.json: a GGUF file carries its tokenizer, so llama.cpp needs the one the model "
            "was trained with. Copy it into the folder (`Tokenizer.save(folder)` or `deepsail tokenizer train --out`)"
        )
    config = read_config(folder)
    arch = ARCHITECTURES[model_type]
    _check_supported(config, arch)
    tokenizer = Tokenizer.load(folder)
    model = Transformer.from_pretrained(folder)  # the checkpoint's own dtype; nothing is converted twice

    writer = gguf.GGUFWriter(None, arch)
    _write_model_metadata(writer, config, arch, type, name=Path(model_dir).resolve().name)
    _write_tokenizer(writer, folder, tokenizer, config.vocab_size)
    plan = [
        (n, load, _tensor_type(n, shape, type, config.tie_word_embeddings), shape)
        for n, shape, load in _tensors(model, arch)
    ]
    for name, _, qtype, shape in plan:
        if _is_blocked(qtype):  # quantized (and bf16): gguf-py's uint8 rows, whose byte shape the writer converts
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.uint8, math.prod(byte_shape), raw_dtype=qtype)
        else:
            dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(name, shape, dtype, math.prod(shape) * np.dtype(dtype).itemsize, raw_dtype=qtype)
    total, shared, experts, n_experts = writer.get_total_parameter_count()
    if total > 0:
        writer.add_size_label(gguf.size_label(total, shared, experts, n_experts))

    # Header, metadata and tensor table first, then one tensor at a time: each is converted and quantized just
    # before it is written, so memory holds the model plus one tensor's copies, never a second copy of the model.
    with atomic_path(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for _, load, qtype, _ in plan:
                writer.write_tensor_data(gguf.quants.quantize(load(), qtype))
        finally:
            writer.close()
    return out


def _model_type(folder: Path) -> str | None:
    from deepsail.model.hf import read_config_json

    return read_config_json(folder).get("model_type")


# --- what llama.cpp can run: refused up front rather than written into a file that decodes differently ------------
def _check_supported(config: ModelConfig, arch: str) -> None:
    def refuse(why: str) -> None:
        raise ValueError(f"{config.model_type} -> llama.cpp {arch}: {why}")

    rope = config.rope_type
    s = config.rope_scaling or {}
    if rope == "yarn" and arch != "deepseek2" and {"mscale", "mscale_all_dim", "attention_factor"} & set(s):
        # llama.cpp's llama/qwen2 take YaRN's magnitude as mscale(factor) on the rope dims, as deepsail does when
        # these keys are absent
        refuse(
            f"YaRN with {sorted({'mscale', 'mscale_all_dim', 'attention_factor'} & set(s))}: llama.cpp's {arch} "
            "has no such keys"
        )
    if arch == "qwen2":
        if config.head_dim * config.num_attention_heads != config.hidden_size:
            refuse(
                f"llama.cpp's qwen2 needs head_dim x heads == hidden_size ({config.head_dim} x "
                f"{config.num_attention_heads} != {config.hidden_size}); export it as llama"
            )
        if rope not in ("default", "yarn"):
            refuse(f"llama.cpp's qwen2 has no {rope} rope scaling (only llama does, as rope_freqs)")
    if arch != "deepseek2":
        return
    if config.attention_bias:
        refuse("llama.cpp's deepseek2 has no q_a/kv_a projection bias (attention_bias=True)")
    if rope not in ("default", "yarn"):
        refuse(f"llama.cpp's deepseek2 has no {rope} rope scaling")
    if rope == "yarn":
        # llama.cpp reads one YaRN magnitude, mscale_all_dim (as yarn_log_mul), and assumes mscale equals it;
        # deepsail, like HF, scales the rope dims by mscale/mscale_all_dim (mscale(factor) when either is missing)
        # and q.k by mscale(factor, mscale_all_dim)². They agree when mscale == mscale_all_dim, as in V2 and V3.
        m_all, m = s.get("mscale_all_dim") or 0, s.get("mscale")
        if not m_all or m != m_all or s.get("attention_factor") is not None:
            refuse(
                f"YaRN with mscale={s.get('mscale')}, mscale_all_dim={s.get('mscale_all_dim')}, attention_factor="
                f"{s.get('attention_factor')}: llama.cpp computes the attention scale only for mscale == "
                "mscale_all_dim (DeepSeek-V2/V3's settings) and no attention_factor"
            )
    if config.is_moe:
        if config.moe_layer_freq != 1:
            refuse(
                f"moe_layer_freq={config.moe_layer_freq}: llama.cpp's deepseek2 runs MoE in every layer after the "
                "first_k_dense_replace dense ones"
            )
        if not config.n_shared_experts:
            refuse("llama.cpp's deepseek2 always runs a shared expert (n_shared_experts=0)")
        if config.topk_method == "group_limited_greedy" and config.n_group > 1:
            warnings.warn(
                "llama.cpp ranks expert groups by the sum of their top-2 scores (DeepSeek-V3's noaux_tc); this "
                "model's group_limited_greedy ranks by the best one, so llama.cpp may route some tokens differently",
                stacklevel=3,
            )


# --- metadata --------------------------------------------------------------------------------------------------------
def _write_model_metadata(writer: Any, config: ModelConfig, arch: str, type: str, name: str) -> None:
    """The keys the converter's TextModel + LlamaModel / Qwen2Model / DeepseekV2Model.set_gguf_parameters write."""
    gguf = _gguf()
    c = config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    # MLA runs in llama.cpp as MQA over the latent: one K/V "head" of kv_lora_rank + rope dims shared by all heads.
    writer.add_head_count_kv(1 if arch == "deepseek2" else c.num_key_value_heads)
    if c.rope_type == "yarn":
        s = c.rope_scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(s["factor"])
        writer.add_rope_scaling_orig_ctx_len(s["original_max_position_embeddings"])
        # deepsail's defaults written out (llama.cpp's are the same 32/1), so both sides read one number
        writer.add_rope_scaling_yarn_beta_fast(float(s.get("beta_fast") or 32))
        writer.add_rope_scaling_yarn_beta_slow(float(s.get("beta_slow") or 1))
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    if c.is_moe:
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
    if arch == "deepseek2":
        if c.is_moe:
            # llama.cpp groups whenever the count is > 1 and asserts used < count (and no groups without experts);
            # deepsail's greedy top-k ignores groups and keeping every group is no grouping: both are written as 1
            grouped = c.topk_method != "greedy" and c.topk_group < c.n_group
            writer.add_expert_group_count(c.n_group if grouped else 1)
            writer.add_expert_group_used_count(c.topk_group if grouped else 1)
        writer.add_expert_gating_func(
            gguf.ExpertGatingFuncType.SIGMOID if c.scoring_func == "sigmoid" else gguf.ExpertGatingFuncType.SOFTMAX
        )
    else:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[type]))

    if arch == "llama":
        writer.add_vocab_size(c.vocab_size)
        writer.add_rope_dimension_count(c.head_dim)
    elif arch == "deepseek2":
        writer.add_leading_dense_block_count(c.first_k_dense_replace if c.is_moe else c.num_hidden_layers)
        writer.add_vocab_size(c.vocab_size)
        # The converter writes q_lora_rank only when set; llama.cpp's loader requires the key unless the model has
        # 26/27 layers (its V2-Lite test), so a q_lora_rank=0 model of other depth would not load without it.
        writer.add_q_lora_rank(c.q_lora_rank)
        writer.add_kv_lora_rank(c.kv_lora_rank)
        writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        writer.add_value_length(c.kv_lora_rank)
        writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        writer.add_value_length_mla(c.v_head_dim)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_count(c.n_shared_experts)
        writer.add_expert_weights_scale(c.routed_scaling_factor)
        if c.norm_topk_prob:
            writer.add_expert_weights_norm(True)
        writer.add_rope_dimension_count(c.qk_rope_head_dim)
        if c.rope_type == "yarn":
            # the converter's legacy 0.1 factor, which llama.cpp's loader divides out again
            writer.add_rope_scaling_yarn_log_mul(0.1 * c.rope_scaling["mscale_all_dim"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer: Any, folder: Path, tokenizer: Any, n_vocab: int) -> None:
    gguf = _gguf()
    import tokenizers

    raw = json.loads((folder / "tokenizer.json").read_text("utf-8"))
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        raise ValueError(
            f"{folder}: the tokenizer has {len(vocab)} tokens (ids up to {max(vocab.values())}) but the model's "
            f"embedding has {n_vocab} rows; this tokenizer does not belong to this model"
        )
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):  # the embedding may have more rows than the tokenizer has tokens
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(raw))
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)  # the converter's reader of merges + ids
    writer.add_token_merges(special.merges)
    for kind, token_id in special.special_token_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    end = tok.token_to_id("<|end|>")  # deepsail's end of a chat turn: a stop token beside eos (Tokenizer.stop_ids)
    if end is not None and end != tokenizer.eos_id:
        writer.add_eot_token_id(end)
    # deepsail's encoder adds BOS only when tokenizer_config says add_bos_token, never EOS (its post-processor is
    # not run); say so, or llama.cpp would pick its own default for the pre-tokenizer.
    writer.add_add_bos_token(tokenizer.config.get("add_bos_token") is True)
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(chat_template_for_gguf(tokenizer.chat_template))


def chat_template_for_gguf(template: str) -> str:
    """The chat template without `{% generation %}` markers: they only tell HF's training-mask code which tokens are
    the assistant's, render nothing, and are unknown to the Jinja of llama-cpp-python and llama.cpp (a parse error
    there). The rendered text is unchanged."""
    return _GENERATION_TAG.sub("", template)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json whose split it reproduces exactly."""
    from deepsail.data.tokenizer import SPLIT_PATTERN

    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers; this tokenizer.json is {model.get('type')}")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[1].get("add_prefix_space"):
            if pattern in (SPLIT_PATTERN, _LLAMA3_PATTERN):
                # the same split; llama.cpp's "llama-bpe" also takes a word that is a token whole (ignore_merges),
                # "dbrx" applies the merges as HF does when ignore_merges is off (deepsail's trainer default)
                return "llama-bpe" if model.get("ignore_merges") else "dbrx"
            if pattern == _QWEN2_PATTERN and not model.get("ignore_merges"):
                return "qwen2"
    raise ValueError(
        f"no llama.cpp pre-tokenizer is known to split like this tokenizer.json ({json.dumps(pre)[:200]}); GGUF "
        "export knows deepsail's (GPT-4 regex), Llama-3's, Qwen2's and GPT-2's"
    )


# --- tensors ---------------------------------------------------------------------------------------------------------
def _tensors(model: Any, arch: str) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(GGUF name, numpy shape, a thunk giving fp32 values) for every tensor llama.cpp loads, in checkpoint order.
    numpy shapes are ggml's `ne` reversed: a torch [out, in] weight is ggml {in, out}, as the loader expects."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    config = model.config

    def gname(key: Any, bid: int | None = None, suffix: str = ".weight") -> str:
        return gguf.TENSOR_NAMES[key].format(bid=bid) + suffix

    def item(name: str, t: torch.Tensor, fix: Callable[[torch.Tensor], torch.Tensor] | None = None):
        return name, tuple(t.shape), lambda: (fix(t) if fix else t).detach().float().contiguous().numpy()

    if arch == "llama" and config.rope_type == "llama3":
        factors = _llama3_rope_factors(config)
        yield gname(T.ROPE_FREQS), tuple(factors.shape), lambda: factors

    layer_names = {
        "input_layernorm": T.ATTN_NORM,
        "post_attention_layernorm": T.FFN_NORM,
        "self_attn.q_proj": T.ATTN_Q,
        "self_attn.k_proj": T.ATTN_K,
        "self_attn.v_proj": T.ATTN_V,
        "self_attn.o_proj": T.ATTN_OUT,
        "self_attn.q_a_proj": T.ATTN_Q_A,
        "self_attn.q_a_layernorm": T.ATTN_Q_A_NORM,
        "self_attn.q_b_proj": T.ATTN_Q_B,
        "self_attn.kv_a_proj_with_mqa": T.ATTN_KV_A_MQA,
        "self_attn.kv_a_layernorm": T.ATTN_KV_A_NORM,
        "mlp.gate_proj": T.FFN_GATE,
        "mlp.up_proj": T.FFN_UP,
        "mlp.down_proj": T.FFN_DOWN,
        "mlp.gate": T.FFN_GATE_INP,
        "mlp.shared_experts.gate_proj": T.FFN_GATE_SHEXP,
        "mlp.shared_experts.up_proj": T.FFN_UP_SHEXP,
        "mlp.shared_experts.down_proj": T.FFN_DOWN_SHEXP,
    }
    for name, t in model.state_dict().items():
        if name.startswith("mtp."):
            continue  # not exported (see the module docstring)
        if name == "embed_tokens.weight":
            yield item(gname(T.TOKEN_EMBD), t)
        elif name == "norm.weight":
            yield item(gname(T.OUTPUT_NORM), t)
        elif name == "lm_head.weight":
            if not config.tie_word_embeddings:  # tied: llama.cpp reads token_embd for both
                yield item(gname(T.OUTPUT), t)
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(.+)\.([a-z_]+)", name)
            assert m, f"no GGUF name for {name}"
            bid, module, param = int(m.group(1)), m.group(2), m.group(3)
            if param == "e_score_correction_bias":
                if config.topk_method == "noaux_tc":  # V2 routers have none (it stays zero in deepsail)
                    yield item(gname(T.FFN_EXP_PROBS_B, bid, ".bias"), t)
            elif module == "mlp.experts":
                if param == "gate_up_proj":  # [E, 2I, D] -> gate [E, I, D], up [E, I, D]: ggml {D, I, E}
                    i = t.shape[1] // 2
                    yield item(gname(T.FFN_GATE_EXP, bid), t[:, :i])
                    yield item(gname(T.FFN_UP_EXP, bid), t[:, i:])
                else:  # down [E, D, I]: ggml {I, D, E}
                    yield item(gname(T.FFN_DOWN_EXP, bid), t)
            elif module == "self_attn.kv_b_proj":
                yield from _split_kv_b(gname(T.ATTN_K_B, bid), gname(T.ATTN_V_B, bid), t, config, item)
            else:
                assert module in layer_names and param in ("weight", "bias"), f"no GGUF name for {name}"
                fix = _rope_fix(module, config, arch)
                yield item(gname(layer_names[module], bid, "." + param), t, fix)


def _split_kv_b(k_name: str, v_name: str, t: torch.Tensor, config: ModelConfig, item: Callable) -> Iterator:
    """kv_b [H·(nope+v), r] -> attn_k_b [H, r, nope] (transposed: it absorbs q_nope into the latent) and attn_v_b
    [H, v, r], as the converter splits it for llama.cpp's absorbed MLA."""
    H, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    per_head = t.view(H, nope + v, t.shape[-1])
    k_b, v_b = per_head[:, :nope].transpose(1, 2), per_head[:, nope:]
    yield item(k_name, k_b)
    yield item(v_name, v_b)


def _rope_fix(module: str, config: ModelConfig, arch: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Row permutations that turn deepsail's rotary layout into the one llama.cpp rotates.

    llama.cpp's llama and deepseek2 rotate adjacent pairs (x0,x1),(x2,x3)... (its "normal" rope); HF Llama rotates
    the two halves of a head, so the converter permutes q/k rows of each head from [halves] to [pairs] (its
    `LlamaModel.permute`). DeepSeek checkpoints already pair (rope_interleave=True): nothing to do, unless a deepsail
    MLA model was built with rope_interleave=False, whose rope rows get the same permutation. qwen2 is NEOX (halves).
    """
    if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
        heads = config.num_attention_heads if module == "self_attn.q_proj" else config.num_key_value_heads
        return lambda t: _halves_to_pairs(t.reshape(heads, config.head_dim, *t.shape[1:])).reshape(t.shape)
    if arch == "deepseek2" and not config.rope_interleave:
        import torch

        nope, rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        if module in ("self_attn.q_proj", "self_attn.q_b_proj"):

            def fix_q(t: torch.Tensor) -> torch.Tensor:
                heads = t.reshape(config.num_attention_heads, nope + rope, *t.shape[1:])
                return torch.cat((heads[:, :nope], _halves_to_pairs(heads[:, nope:])), dim=1).reshape(t.shape)

            return fix_q
        if module == "self_attn.kv_a_proj_with_mqa":
            r = config.kv_lora_rank
            return lambda t: torch.cat((t[:r], _halves_to_pairs(t[r:][None])[0]))
    return None


def _halves_to_pairs(x: torch.Tensor) -> torch.Tensor:
    """[n, d, ...] rows ordered (x_0..x_{d/2-1}, y_0..y_{d/2-1}) -> (x_0, y_0, x_1, y_1, ...), per leading index."""
    n, d = x.shape[:2]
    return x.reshape(n, 2, d // 2, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def _llama3_rope_factors(config: ModelConfig) -> np.ndarray:
    """Llama-3 rope scaling as llama.cpp takes it: the per-frequency divisors, one f32 vector (`rope_freqs`)."""
    import torch

    from deepsail.model.layers import rope_frequencies

    base = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
    scaled, _ = rope_frequencies(config)  # deepsail's own Llama-3 frequencies: the ratio is exactly what it applies
    return (base / scaled).numpy()


def _tensor_type(name: str, shape: tuple[int, ...], type: str, tied: bool) -> Any:
    """The converter's rules (`ModelBase.prepare_tensors`), then llama-quantize's for q4_0."""
    Q = _gguf().GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32  # norms, biases, exp_probs_b and other 1-D tensors: most of ggml takes these in f32 only
    if ".ffn_gate_inp." in name:
        return Q.F32  # the router: tiny, and routing decisions are sensitive to its rounding
    target = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[type]
    if target == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        target = Q.Q8_0
    if target in (Q.Q8_0, Q.Q4_0) and shape[-1] % 32:
        target = Q.F16  # rows must be whole 32-value blocks
    return target


def _is_blocked(qtype: Any) -> bool:
    return qtype.name not in ("F32", "F16")


# --- the CLI verb ----------------------------------------------------------------------------------------------------
def gguf_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="A deepsail model folder (config.json + model.safetensors + tokenizer.json) or a training run "
            "folder (its latest checkpoint).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write.", show_default=False)],
    type: Annotated[
        str,
        typer.Option(
            "--type",
            help="Weight type: f16 | bf16 | q8_0 (8.5 bits/weight) | q4_0 (4.5 bits/weight). Norms, biases and the "
            "MoE router stay f32.",
        ),
    ] = "f16",
) -> None:
    """Export a model as one GGUF file for llama.cpp (llama, qwen2 and DeepSeek-V2/V3 as deepseek2; MTP modules
    are not exported). The tokenizer and chat template travel inside the file.

    \b
    Examples:
      deepsail export gguf runs/default --out m.gguf --type q8_0
      llama-cli -m m.gguf -p "def fib(n):" -n 64 --temp 0
      deepsail export gguf path/to/DeepSeek-R1-Distill-Qwen-1.5B --out r1-1.5b-q4_0.gguf --type q4_0
    """
    import time

    from rich.console import Console

    t0 = time.perf_counter()
    path = export_gguf(model, out, type)
    size = path.stat().st_size
    Console(stderr=True).print(f"wrote {path} ({type}, {size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")
