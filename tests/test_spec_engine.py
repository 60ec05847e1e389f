"""MTP self-speculative decoding inside the continuous-batching engine (EngineConfig.speculative).

Greedy: token-for-token the plain engine's greedy output, under preemption, chunked prefill, prefix reuse, requests
joining mid-flight and rows that cannot speculate (logprobs, repetition penalty) in the same batches. Sampled: the
joint distribution of the first tokens, on an 8-token vocabulary, is the model's own (a chi-square test against the
exact probabilities), and the same test catches a sampler that keeps every draft.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from test_engine import PROMPTS
from test_generate import bigram_model, tiny
from test_serve import _serve, one_torch_thread  # noqa: F401  (one intra-op thread: 2 busy cores in CI)

import deepsail.infer.engine as engine_module
from deepsail.infer import Engine, EngineConfig, SamplingParams
from deepsail.model import ModelConfig, Transformer
from deepsail.serve import ServerConfig

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def run(engine: Engine, prompts, params) -> list:
    handles = [engine.submit(p, q) for p, q in zip(prompts, params)]
    engine.run_until_idle()
    return [h.result(timeout=0) for h in handles]


@pytest.mark.parametrize("noise", [None, 0.5, 0.0])
def test_greedy_speculation_equals_plain_greedy_under_batching(noise):
    """Random MTP (acceptance ~0), a noisy one (mixed) and an exact one (all kept); 2 drafts per step."""
    m = tiny() if noise is None else bigram_model(noise)
    prompts = PROMPTS + [PROMPTS[0] + [7, 8], PROMPTS[0][:5]]  # a shared prefix for the prefix cache
    params = [GREEDY] * len(prompts)
    # rows that cannot speculate share the batches: logprobs, repetition penalty
    params[1] = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    params[3] = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, repetition_penalty=1.3)
    plain = run(Engine(m, None, EngineConfig(block_size=4, num_blocks=128)), prompts, params)
    configs = [
        EngineConfig(block_size=4, num_blocks=128, speculative=2),
        # chunked prefill beside speculating rows: 3 rows x (1 + 2) fit the 9-token budget, prefills wait their turn
        EngineConfig(block_size=4, num_blocks=128, speculative=2, max_batch_size=3, max_num_batched_tokens=9),
        # a pool too small for everyone: the newest are preempted (their drafts dropped) and recomputed
        EngineConfig(block_size=4, num_blocks=14, speculative=2, enable_prefix_caching=False),
    ]
    for cfg in configs:
        engine = Engine(m, None, cfg)
        spec = run(engine, prompts, params)
        assert [r[1] for r in spec] == [r[1] for r in plain], cfg
        assert engine.allocator.num_used == 0 and engine.stats()["running"] == 0
    assert engine.stats()["preemptions"] > 0  # the last config's small pool did preempt
    drafted = [r[3]["draft_tokens"] for r in spec]
    accepted = [r[3]["accepted_tokens"] for r in spec]
    assert drafted[1] == drafted[3] == 0 and all(d > 0 for i, d in enumerate(drafted) if i not in (1, 3))
    if noise == 0.0:
        assert accepted == drafted  # an exact MTP: every draft is kept, 3 tokens per forward


def test_joining_mid_flight_and_steps_saved():
    m = bigram_model(0.0)
    engine = Engine(m, None, EngineConfig(block_size=4, num_blocks=128, speculative=3))
    first = engine.submit(PROMPTS[0], GREEDY)
    for _ in range(2):
        engine.step()
    rest = [engine.submit(p, GREEDY) for p in PROMPTS[1:]]
    engine.run_until_idle()
    plain = run(Engine(m, None, EngineConfig(block_size=4, num_blocks=128)), PROMPTS, [GREEDY] * len(PROMPTS))
    assert [h.result()[1] for h in [first, *rest]] == [r[1] for r in plain]
    # 12 tokens: 1 from the prefill, then 3 drafts + 1 per step -> 4 steps for the last request instead of 12
    assert engine.stats()["steps"] <= 2 + 5


V, TEMP, PROMPT = 8, 0.9, [3, 5, 2]


@pytest.fixture(scope="module")
def small_vocab() -> tuple[Transformer, torch.Tensor]:
    """A random model with an 8-token vocabulary and a sharpened head (entropy ~0.8 nats: target and draft
    distributions differ enough that about a quarter of the drafts are rejected), and the exact probability of every
    4-token continuation of PROMPT at TEMP."""
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("deepseek-v3-debug").replace(vocab_size=V)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(15)
        exact = torch.ones(1)
        for depth in range(4):
            seqs = torch.tensor([list(PROMPT) for _ in range(V**depth)])
            if depth:
                tails = torch.cartesian_prod(*[torch.arange(V)] * depth).view(V**depth, depth)
                seqs = torch.cat((seqs, tails), 1)
            p = (m(seqs).logits[:, -1].float() / TEMP).softmax(-1)  # [V^depth, V]
            exact = (exact[:, None] * p).flatten()
    return m, exact.view(*[V] * 4)


def _chi2_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit; cells expecting fewer than 5 are pooled into one."""
    c, e = counts.flatten().double(), expected.flatten().double()
    big = e >= 5
    c, e = torch.cat((c[big], c[~big].sum()[None])), torch.cat((e[big], e[~big].sum()[None]))
    x = ((c - e) ** 2 / e).sum()
    return torch.special.gammaincc(torch.tensor((len(e) - 1) / 2, dtype=torch.float64), x / 2).item()


def _sample(m: Transformer, n: int, speculative: int) -> tuple[torch.Tensor, float]:
    cfg = EngineConfig(
        max_batch_size=512, max_waiting=n, max_num_batched_tokens=2048, num_blocks=2048, speculative=speculative
    )
    params = [SamplingParams(max_tokens=4, temperature=TEMP, seed=s, ignore_eos=True) for s in range(n)]
    counts, drafted, kept = torch.zeros([V] * 4), 0, 0
    for _, ids, _, usage in run(Engine(m, None, cfg), [PROMPT] * n, params):
        counts[tuple(ids)] += 1
        drafted, kept = drafted + usage["draft_tokens"], kept + usage["accepted_tokens"]
    return counts, kept / max(drafted, 1)


def test_sampled_speculation_keeps_the_target_distribution(small_vocab, monkeypatch):
    """4,000 sampled requests, 2 drafts per step (tokens 2-4 of each come out of rejection sampling): their joint
    distribution against the exact one. Keeping every draft instead (the bug rejection sampling prevents) fails the
    same test by far."""
    m, exact = small_vocab
    n = 4000
    counts, acceptance = _sample(m, n, speculative=2)
    assert 0.1 < acceptance < 0.95, acceptance  # both branches of the acceptance test ran
    assert _chi2_pvalue(counts, exact * n) > 1e-3

    def keep_all(p, q, d, k, u):
        return k.clone(), p[torch.arange(len(k)), k].argmax(-1)

    monkeypatch.setattr(engine_module, "accept", keep_all)
    biased, _ = _sample(m, n, speculative=2)
    assert _chi2_pvalue(biased, exact * n) < 1e-6


def test_refused_without_an_mtp_head_or_token_budget():
    with pytest.raises(ValueError, match="MTP"):
        Engine(tiny("llama-3-8b-debug"), None, EngineConfig(speculative=1))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Engine(tiny(), None, EngineConfig(speculative=2, max_batch_size=32, max_num_batched_tokens=64))


def test_serve_speculative_reports_acceptance_in_metrics(tiny_model_dir):
    live = _serve(tiny_model_dir, ServerConfig(model_name="tiny"), max_batch_size=4, max_model_len=512, speculative=2)
    try:
        body = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{live.url}/v1/completions", json=body | {"n": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
        metrics = httpx.get(f"{live.url}/metrics").text
        assert "deepsail_spec_decode_acceptance_rate_count 2.0" in metrics, metrics
        drafted = next(x for x in metrics.splitlines() if x.startswith("deepsail_spec_decode_num_draft_tokens_total"))
        assert float(drafted.split()[1]) > 0
    finally:
        live.close()
