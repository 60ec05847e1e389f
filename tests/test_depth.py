"""Dynamic depth: Mixture-of-Depths routing (training top-k, causal at inference), LayerSkip exit loss, early exit
with the skipped layers' keys/values propagated, and threshold calibration."""

from __future__ import annotations

import torch

import deepsail as ds
from deepsail.model import depth as D


def _model(**changes) -> ds.Transformer:
    torch.manual_seed(0)
    cfg = ds.ModelConfig.preset("deepseek-v3-debug").replace(num_hidden_layers=4, num_nextn_predict_layers=0)
    return ds.Transformer(cfg.replace(**changes))


def test_mixture_of_depths_routes_capacity_tokens_in_training_and_by_sign_at_inference():
    model = _model(mod_capacity=0.25, mod_every=2).train()
    routed = [i for i, b in enumerate(model.layers) if b.router is not None]
    assert routed == [1, 3]
    block = model.layers[1]
    x = torch.randn(2, 16, 64)
    ctx = model.attention_context(2, 16, x.device, None, None)
    out = block(x, ctx)
    changed = (out - x).abs().amax(-1) > 0
    assert changed.sum(-1).tolist() == [4, 4]  # a quarter of each row's tokens get the block's update
    assert block.router.aux_loss is not None
    ids = torch.randint(0, 512, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert block.router.proj.weight.grad.abs().sum() > 0  # the router learns through sigmoid(logit) x update
    model.eval()
    with torch.no_grad():
        logit = block.router.proj(x).squeeze(-1)
        changed = (block(x, ctx) - x).abs().amax(-1) > 0
    assert torch.equal(changed, logit > 0)  # causal: the token's own logit decides


def test_exit_loss_is_the_shared_heads_loss_at_the_upper_layers():
    plain, exits = _model(), _model(exit_loss_weight=0.5)
    exits.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    base = plain.train()(ids, labels=ids).loss
    states = []
    hooks = [
        exits.layers[i].register_forward_hook(lambda m, a, o: states.append(o)) for i in D.exit_layers(exits.config)
    ]
    total = exits.train()(ids, labels=ids).loss
    for h in hooks:
        h.remove()
    manual = torch.stack(
        [torch.nn.functional.cross_entropy(exits.logits_of(s).flatten(0, 1), ids.flatten()) for s in states]
    ).mean()
    assert D.exit_layers(exits.config) == [2] and torch.allclose(total, base + 0.5 * manual, atol=1e-5)


def test_early_exit_keeps_the_cache_complete():
    model = _model(exit_loss_weight=0.5).eval()
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(2))
    # threshold 1.0 never exits: the same logits as the model's own cached decode
    cache, ref = model.new_cache(1, 16, block_size=4), model.new_cache(1, 16, block_size=4)
    with torch.no_grad():
        for t in range(10):
            got, ran = D.early_exit_logits(model, ids[:, t : t + 1], cache, 1.0)
            want = model(ids[:, t : t + 1], cache=ref).logits[:, -1]
            assert ran == 4 and (got - want).abs().max() < 1e-5
    # threshold 0 always exits after block 2; blocks 3 and 4 still hold the token's keys from the exited state
    cache = model.new_cache(1, 16, block_size=4)
    D.early_exit_logits(model, ids[:, :5], cache, 1.0)
    states = []
    hook = model.layers[2].register_forward_hook(lambda m, a, o: states.append(o))
    _, ran = D.early_exit_logits(model, ids[:, 5:6], cache, 0.0)
    hook.remove()
    assert ran == 3 and int(cache.lens[0]) == 6
    slot = cache.slots(torch.tensor([[5]]))[0, 0]
    for layer in (3,):
        attn = model.layers[layer].self_attn
        ctx = model.attention_context(1, 1, ids.device, None, None)
        ctx.cos, ctx.sin = model.rotary(torch.tensor([[5]]))
        want = attn.write_kv(model.layers[layer].input_layernorm(states[0]), ctx)[0, 0]
        assert torch.allclose(cache.pool.k[layer][slot], want, atol=1e-5)


def test_calibration_picks_the_lowest_threshold_within_tolerance():
    model = _model(exit_loss_weight=0.5).eval()
    val = [torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    th, table = D.calibrate_exit(model, val, tolerance=10.0, thresholds=(0.9, 0.0))
    assert th == 0.0 and table[0]["threshold"] == 1.0 and table[0]["blocks"] == 4 and table[-1]["blocks"] == 3
    th, _ = D.calibrate_exit(model, val, tolerance=-1.0, thresholds=(0.5,))
    assert th == 1.0  # nothing qualifies: no early exit
