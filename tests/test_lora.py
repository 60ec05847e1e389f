"""LoRA: the adapted layers' math, merge/unmerge, and peft's adapter format both ways against peft + transformers.

Parity cases build a tiny random HF model, save it, load it in deepsail and in transformers, put an adapter with
non-zero B on it (so a wrong name, scaling or layout shows up in the logits) and compare fp32 logits (<= 1e-4).
"""

from __future__ import annotations

import json

import pytest
import torch

import deepsail as ds
from deepsail.tune.lora import (
    AdapterSet,
    LoraConfig,
    apply_lora,
    lora_layers,
    merge_lora,
    remove_lora,
    unmerge_lora,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_model_parity import MLA  # noqa: E402  (after the importorskips, like the module it comes from)

TOL = 1e-4

V3 = dict(  # the parity suite's MLA shape, two layers, the second one MoE with a shared expert
    MLA,
    num_hidden_layers=2,
    q_lora_rank=24,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
)
LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=211,
    max_position_embeddings=256,
)
# On MoE bases peft (0.18+, transformers 5) re-maps every gate_proj/up_proj/down_proj target to the routed experts'
# fused weights and drops the dense and shared MLPs, so the peft parity cases there adapt attention (+ the experts);
# the Llama case covers MLP targets.
MLA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
GQA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """name -> (HF folder, HF model class name)."""
    out = {}
    for name, cls, kw in (("v3", "DeepseekV3Config", V3), ("llama", "LlamaConfig", LLAMA)):
        torch.manual_seed(0)
        config = getattr(transformers, cls)(**kw)
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path
    return out


def _randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or n.endswith(("_A", "_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ids() -> torch.Tensor:
    return torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "base,targets,rslora,experts",
    [("v3", MLA_TARGETS, False, False), ("v3", MLA_TARGETS, True, True), ("llama", GQA_TARGETS, False, False)],
)
def test_deepsail_adapter_loads_in_peft(bases, tmp_path, base, targets, rslora, experts):
    model = ds.from_pretrained(bases[base], dtype="fp32")
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=tuple(targets), rslora=rslora, experts=experts))
    _randomize_lora(model)
    model.save_adapter(tmp_path / "adapter")
    ours = model(_ids()).logits

    hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base], dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(_ids()).logits
        plain = hf.get_base_model()(_ids()).logits if hasattr(hf, "get_base_model") else None
    assert (ours - theirs).abs().max().item() <= TOL
    with peft_model.disable_adapter(), torch.no_grad():
        base_logits = peft_model(_ids()).logits
    assert (ours - base_logits).abs().max().item() > 1e-3, "the adapter changed nothing: the test could not fail"
    del plain


@pytest.mark.parametrize("base,experts", [("v3", False), ("v3", True), ("llama", False)])
def test_peft_adapter_loads_in_deepsail(bases, tmp_path, base, experts):
    hf = transformers.AutoModelForCausalLM.from_pretrained(bases[base], dtype=torch.float32).eval()
    targets = MLA_TARGETS if base == "v3" else GQA_TARGETS
    extra = {"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]} if experts else {}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, **extra)
    peft_model = peft.get_peft_model(hf, cfg)
    _randomize_lora(peft_model, seed=2)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(_ids()).logits

    model = ds.from_pretrained(bases[base], adapter=tmp_path / "peft", dtype="fp32")
    with torch.no_grad():
        ours = model(_ids()).logits
    assert (ours - theirs).abs().max().item() <= TOL
    assert any(isinstance(m, torch.nn.Module) for m in lora_layers(model).values())


def test_merge_unmerge_and_remove(bases, tmp_path):
    model = ds.from_pretrained(bases["v3"], dtype="fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, experts=True))
    _randomize_lora(model)
    ids = _ids()
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
        unmerge_lora(model)
        again = model(ids).logits
    assert (merged - unmerged).abs().max() <= TOL and (again - unmerged).abs().max() <= TOL
    state = model.state_dict()
    assert max((state[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6  # the base is back
    # the absorbed MLA decode path (cached decode) sees the adapted kv_b_proj too
    cache = model.new_cache(2, 32)
    with torch.no_grad():
        model(ids[:, :11], cache=cache)
        step = model(ids[:, 11:], cache=cache).logits[:, -1]
    assert (step - unmerged[:, -1]).abs().max() <= TOL
    merged_dir = model.save_pretrained(tmp_path / "merged")  # an ordinary checkpoint with the adapter folded in
    with torch.no_grad():
        assert (ds.from_pretrained(merged_dir)(ids).logits - unmerged).abs().max() <= TOL
    remove_lora(model, merge=True)
    assert not lora_layers(model) and not hasattr(model, "save_adapter")
    with torch.no_grad():
        assert (model(ids).logits - unmerged).abs().max() <= TOL


def test_frozen_base_and_fp32_adapter_on_bf16(bases):
    model = ds.from_pretrained(bases["v3"], dtype="bf16")
    apply_lora(model, LoraConfig(r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    names = set(lora_layers(model))
    assert "layers.0.mlp.gate_proj" in names and "layers.1.mlp.shared_experts.up_proj" in names
    assert not any(n.startswith("mtp.") or "lm_head" in n for n in names)
    model.train()
    out = model(_ids(), labels=_ids())
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)


def test_adapter_for_another_base_is_refused(bases, tmp_path):
    llama = ds.from_pretrained(bases["llama"], dtype="fp32")
    apply_lora(llama, LoraConfig(r=4, targets=("q_proj",)))
    llama.save_adapter(tmp_path / "llama_adapter")
    with pytest.raises(ValueError, match="does not fit this base model"):
        ds.from_pretrained(bases["v3"], adapter=tmp_path / "llama_adapter")
    # same module names, other shapes: a llama of another width
    wide = tmp_path / "wide"
    config = transformers.LlamaConfig(**{**LLAMA, "hidden_size": 32})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(wide)
    with pytest.raises(ValueError, match=r"q_proj has in=32"):
        ds.from_pretrained(wide, adapter=tmp_path / "llama_adapter")
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True, "r": 4}))
    with pytest.raises(ValueError, match="use_dora"):
        ds.from_pretrained(bases["llama"], adapter=bad)
    hf = transformers.AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.float32)
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"])).save_pretrained(tmp_path / "h")
    with pytest.raises(ValueError, match="lm_head"):  # refused, never applied to the head
        ds.from_pretrained(bases["llama"], adapter=tmp_path / "h")
    with pytest.raises(ValueError, match="match no layer"):
        apply_lora(ds.from_pretrained(bases["llama"]), LoraConfig(targets=("nonexistent_proj",)))


def test_adapter_set_rows_match_solo(bases, tmp_path):
    """Each row of a batch mixing base and two adapters gives exactly the logits of its own model alone."""
    paths = {}
    for i, name in enumerate(("finance", "law")):
        m = ds.from_pretrained(bases["v3"], dtype="fp32")
        apply_lora(m, LoraConfig(r=4, alpha=8, targets=("q_a_proj", "kv_b_proj", "o_proj", "down_proj")))
        _randomize_lora(m, seed=10 + i)
        paths[name] = m.save_adapter(tmp_path / name)
    ids = _ids()
    solo = {None: ds.from_pretrained(bases["v3"], dtype="fp32")(ids).logits}
    for name, p in paths.items():
        solo[name] = ds.from_pretrained(bases["v3"], adapter=p, dtype="fp32")(ids).logits
    served = ds.from_pretrained(bases["v3"], dtype="fp32")
    adapters = AdapterSet(served, paths)
    rows = [None, "law", "finance", "law"]
    batch = ids[[0, 1, 0, 1]]
    with torch.no_grad(), adapters.select([adapters.index(r) for r in rows], batch.shape[1], batch.device):
        mixed = served(batch).logits
    for i, name in enumerate(rows):
        assert (mixed[i] - solo[name][i % 2]).abs().max() <= TOL, name
    # the cached decode (absorbed kv_b_proj, per-row adapted weight) agrees too
    cache = served.new_cache(4, 32)
    with torch.no_grad():
        with adapters.select([adapters.index(r) for r in rows], 11, batch.device):
            served(batch[:, :11], cache=cache)
        with adapters.select([adapters.index(r) for r in rows], 1, batch.device):
            step = served(batch[:, 11:], cache=cache).logits[:, -1]
    for i, name in enumerate(rows):
        assert (step[i] - solo[name][i % 2, -1]).abs().max() <= TOL, name
