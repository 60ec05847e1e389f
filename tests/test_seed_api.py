"""The seed document's Python API as written: `ds.Transformer(layers=, heads=)`, `ds.Adam`, `ds.CrossEntropyLoss`,
`ds.compile(...).save(...)` and its training loop, executed verbatim (deepseek -> deepsail, a tiny model and a tiny
dataloader), and each door checked against the machinery behind it. The torch.export program itself (dynamic shapes,
running without deepsail, refusing bad files) is tested in tests/test_export.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deepsail as ds
from deepsail.model import IGNORE_INDEX, ModelConfig
from deepsail.train import TrainConfig, build_optimizer

# Seed 002 §1.1, as printed there. The test changes only the package name and the model's size.
SEED = """
import deepseek as ds

model = ds.Transformer(layers=12, heads=16)
optimizer = ds.Adam(model.parameters(), lr=1e-3)

for epoch in range(n):
    for inputs, targets in dataloader:
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = ds.CrossEntropyLoss(outputs, targets)
        loss.backward()
        optimizer.step()

compiled = ds.compile(model, input_shape=(128, 512), optimize_for="inference")
compiled.save("optimized_model.ds")
"""
V = 64


def _sequences(n: int = 16, T: int = 17, seed: int = 0) -> torch.Tensor:
    """Rows counting up mod V from a random start: next-token structure a tiny model learns in a few steps."""
    start = torch.randint(0, V, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(T)) % V


def _dataloader(ids: torch.Tensor, batch: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # What a seed-style dataloader yields: inputs and the targets aligned with them (already shifted by one).
    return [(ids[i : i + batch, :-1], ids[i : i + batch, 1:]) for i in range(0, len(ids), batch)]


def _mean_loss(model: ds.Transformer, dataloader: list) -> float:
    with torch.no_grad():
        return sum(float(ds.CrossEntropyLoss(model(x), y)) for x, y in dataloader) / len(dataloader)


def test_the_seed_snippet_runs_as_printed(tmp_path, monkeypatch):
    code = SEED
    for seed_text, ours in [("deepseek", "deepsail"), ("layers=12, heads=16", f"layers=2, heads=2, vocab={V}")]:
        assert seed_text in code
        code = code.replace(seed_text, ours)
    dataloader = _dataloader(_sequences())
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"n": 5, "dataloader": dataloader}
    exec(compile(code, "seed_002.py", "exec"), namespace)

    torch.manual_seed(0)
    untrained = ds.Transformer(layers=2, heads=2, vocab=V)  # the snippet's model before its first step
    model, before, after = (
        namespace["model"],
        _mean_loss(untrained, dataloader),
        _mean_loss(namespace["model"], dataloader),
    )
    assert before > 0.9 * torch.log(torch.tensor(float(V))) and after < 0.7 * before, (before, after)
    assert isinstance(namespace["optimizer"], torch.optim.AdamW) and namespace["loss"].requires_grad
    # The saved program computes the trained model's logits.
    program = ds.load(tmp_path / "optimized_model.ds")
    ids = _sequences(n=3, T=9, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program(ids), model(ids).logits, atol=1e-5, rtol=1e-5)


def test_transformer_from_two_numbers_is_the_documented_size():
    with torch.device("meta"):  # 329M parameters: the shapes without the memory or the init
        model = ds.Transformer(layers=12, heads=16)
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size, c.vocab_size) == (12, 16, 1024, 32000)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts, c.num_nextn_predict_layers) == (8, 2, 1, 1)
    # deepsail/__init__.py's docstring: "329M params, 190M active"
    assert model.num_params() == 329_364_480 and model.num_params(active=True) == 189_871_104


# --- ds.Adam -----------------------------------------------------------------------------------------------------
def _tiny(seed: int = 0) -> ds.Transformer:
    torch.manual_seed(seed)
    return ds.Transformer(ModelConfig.preset("deepseek-v3-debug").replace(num_hidden_layers=2))


def _train(model: ds.Transformer, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad()
        ds.CrossEntropyLoss(model(ids[:, :-1]), ids[:, 1:]).backward()
        optimizer.step()


def test_adam_is_torch_adam_and_the_trainers_optimizer():
    ours, theirs = _tiny(), _tiny()
    optimizer = ds.Adam(ours.parameters(), lr=1e-3)
    assert optimizer.defaults["fused"] or optimizer.defaults["foreach"]  # the trainer's kernel choice, not a loop
    _train(ours, optimizer)
    _train(theirs, torch.optim.Adam(theirs.parameters(), lr=1e-3))
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

    # Given the model: the trainer's groups (matrices decay; norms, biases and embeddings do not), frozen ones left out.
    model = _tiny()
    model.embed_tokens.weight.requires_grad_(False)
    decay, no_decay = ds.Adam(model, weight_decay=0.1).param_groups
    want_decay, want_no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    assert [id(p) for p in decay["params"]] == [id(p) for p in want_decay["params"]]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in want_no_decay["params"]]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.requires_grad for p in decay["params"])
    assert id(model.norm.weight) in {id(p) for p in no_decay["params"]}
    assert id(model.embed_tokens.weight) not in {id(p) for g in (decay, no_decay) for p in g["params"]}
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ds.Adam(model)


# --- ds.CrossEntropyLoss -----------------------------------------------------------------------------------------
def test_cross_entropy_takes_an_output_or_logits_and_agrees_with_the_models_loss():
    model = _tiny().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
    logits, targets = out.logits[:, :-1], ids[:, 1:]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    # The output itself: position t against ids[:, t], nothing shifted.
    unshifted = F.cross_entropy(out.logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(ds.CrossEntropyLoss(out, ids), unshifted)
    torch.testing.assert_close(ds.CrossEntropyLoss(logits, targets), want)  # [B, T, V]
    torch.testing.assert_close(ds.CrossEntropyLoss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), want)
    # The model's own labels (aligned the same way; chunked from the hidden states while training) agree.
    lm_loss = model.train()(ids[:, :-1], labels=targets).lm_loss
    torch.testing.assert_close(ds.CrossEntropyLoss(model(ids[:, :-1]), targets), lm_loss, atol=1e-5, rtol=1e-5)
    model.eval()

    masked = targets.clone()
    masked[0, :4] = IGNORE_INDEX  # ignored positions are left out of the mean, not counted as zero
    keep = masked != IGNORE_INDEX
    torch.testing.assert_close(ds.CrossEntropyLoss(logits, masked), F.cross_entropy(logits[keep], targets[keep]))
    half = ds.CrossEntropyLoss(logits.bfloat16(), targets)  # the softmax in fp32 whatever the logits are
    assert half.dtype == torch.float32 and abs(float(half) - float(want)) < 0.05


def test_cross_entropy_errors_name_the_problem():
    model = _tiny()
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(2, 10, model.config.vocab_size)
    with pytest.raises(ValueError, match=r"logits \(2, 10, 512\) and targets \(2, 9\) do not match"):
        ds.CrossEntropyLoss(logits, ids[:, 1:])
    with pytest.raises(ValueError, match=r"logits \(20, 512\) and targets \(2, 10\)"):
        ds.CrossEntropyLoss(logits.reshape(20, -1), ids)
    with pytest.raises(ValueError, match="integers"):
        ds.CrossEntropyLoss(logits, ids.float())
    with pytest.raises(ValueError, match="use its .loss"):
        ds.CrossEntropyLoss(model(ids, labels=ids), ids)  # a training forward with labels keeps no logits
