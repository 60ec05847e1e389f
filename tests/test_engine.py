"""The continuous-batching engine: same outputs as plain generation under preemption, prefix reuse, chunked prefill
and concurrency; admission control, cancellation, streaming and shutdown."""

import asyncio
import time

import pytest
import torch

from deepsail.infer import Engine, EngineClosed, EngineConfig, QueueFull, SamplingParams, generate
from deepsail.infer.blocks import BlockAllocator
from deepsail.model import ModelConfig, Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30] * 20, [100, 200], list(range(40, 53))]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


class CharTokenizer:
    eos_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("deepseek-v3-debug")).eval()


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    """Greedy outputs, one prompt at a time, from the static-batch path."""
    return [generate(model, None, p, GREEDY)[0].token_ids for p in PROMPTS]


def run(engine: Engine, prompts, params=GREEDY) -> list[list[int]]:
    handles = [engine.submit(p, params) for p in prompts]
    engine.run_until_idle()
    return [h.result(timeout=0)[1] for h in handles]


def test_batched_greedy_equals_one_at_a_time(model, reference):
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    assert run(engine, PROMPTS) == reference
    s = engine.stats()
    assert s["requests_finished"] == len(PROMPTS) and s["kv_blocks_used"] == 0 and s["preemptions"] == 0
    assert s["generation_tokens"] == 10 * len(PROMPTS) and s["prompt_tokens"] == sum(map(len, PROMPTS))


def test_requests_joining_mid_flight_match(model, reference):
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    first = engine.submit(PROMPTS[0], GREEDY)
    for _ in range(4):
        engine.step()
    rest = [engine.submit(p, GREEDY) for p in PROMPTS[1:]]
    engine.run_until_idle()
    assert [h.result()[1] for h in [first] + rest] == reference


def test_preemption_under_a_tiny_block_budget_keeps_outputs(model, reference):
    # 5 requests need up to 8 blocks of 4 each, the pool has 10: the newest get preempted and recomputed.
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=10, enable_prefix_caching=False))
    assert run(engine, PROMPTS) == reference
    assert engine.stats()["preemptions"] > 0 and engine.allocator.num_used == 0


def test_chunked_prefill_keeps_outputs(model, reference):
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, max_batch_size=2, max_num_batched_tokens=5))
    assert run(engine, PROMPTS) == reference


def test_prefix_reuse_hits_and_matches(model):
    shared = list(range(60, 84))  # 6 full blocks of 4
    a, b = shared + [1, 2], shared + [3]
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    run(engine, [a])
    assert engine.stats()["prefix_hits"] == 0
    handle = engine.submit(b, GREEDY)
    engine.run_until_idle()
    assert engine.stats()["prefix_hits"] == 24 and handle.usage["cached_tokens"] == 24
    assert handle.result()[1] == generate(model, None, b, GREEDY)[0].token_ids
    # an identical prompt hits everything but its last token (whose logits start the sampling)
    run(engine, [b])
    assert engine.stats()["prefix_hits"] == 48


def test_block_allocator_refcounts_and_lru():
    alloc = BlockAllocator(3)
    x, y = alloc.allocate(), alloc.allocate()
    alloc.register(x, (0, (1, 2)))
    assert alloc.lookup((0, (1, 2))) == x and alloc.refs[x] == 2
    alloc.release(x), alloc.release(x), alloc.release(y)
    assert alloc.num_free == 3 and list(alloc.evictable) == [x]  # x keeps its contents, findable
    assert alloc.lookup((0, (1, 2))) == x and alloc.num_free == 2
    alloc.release(x)
    blocks = [alloc.allocate() for _ in range(3)]  # the free ones first, then x is evicted
    assert blocks[-1] == x and alloc.lookup((0, (1, 2))) is None


def test_same_seed_alone_or_in_a_batch(model):
    p = SamplingParams(max_tokens=8, seed=5, top_k=50, ignore_eos=True)
    alone = run(Engine(model, None, EngineConfig(block_size=4, num_blocks=64)), [PROMPTS[1]], p)[0]
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    others = [engine.submit(q, SamplingParams(max_tokens=8, seed=i)) for i, q in enumerate(PROMPTS[2:])]
    mine = engine.submit(PROMPTS[1], p)
    engine.run_until_idle()
    assert mine.result()[1] == alone and all(h.done for h in others)


def test_cancel_frees_blocks_within_a_step(model):
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64))
    handle = engine.submit(PROMPTS[2], SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_used > 0
    handle.cancel()
    engine.step()
    assert engine.allocator.num_used == 0 and engine.stats()["running"] == 0
    _, ids, reason, usage = handle.result(timeout=0)
    assert reason == "abort" and len(ids) == 3 and usage["completion_tokens"] == 3


def test_queue_full_and_bad_requests(model):
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, max_waiting=2))
    engine.submit([1, 2], GREEDY)
    engine.submit([1, 2], GREEDY)
    with pytest.raises(QueueFull):
        engine.submit([1, 2], GREEDY)
    with pytest.raises(ValueError, match=r"500 tokens.*max_tokens \(20\).*max_model_len \(512\)"):
        engine.submit([3] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="KV blocks"):
        Engine(model, None, EngineConfig(block_size=4, num_blocks=4)).submit([1] * 10, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit([model.config.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit([1], SamplingParams(max_tokens=5, stop=["x"]))  # stop strings need text


def test_background_thread_async_stream_and_shutdown(model, reference):
    engine = Engine(model, CharTokenizer(), EngineConfig(block_size=4, num_blocks=128)).start()
    plain_text = CharTokenizer().decode(reference[0])
    stop = plain_text[4:6]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop], logprobs=1)

    async def consume():
        handles = [engine.submit(PROMPTS[0], params)] + [engine.submit(p, GREEDY) for p in PROMPTS[1:]]
        events = [ev async for ev in handles[0].stream()]
        return handles, events

    handles, events = asyncio.run(consume())
    text, ids, reason, usage = handles[0].result(timeout=30)
    assert reason == "stop" and text == plain_text[: plain_text.index(stop)]
    assert "".join(e.text for e in events) == text and events[-1].finish_reason == "stop"
    assert all(e.logprob is not None and len(e.top_logprobs) == 1 for e in events)
    assert [h.result(timeout=30)[1] for h in handles[1:]] == reference[1:]
    assert usage == dict(prompt_tokens=7, completion_tokens=len(ids), total_tokens=7 + len(ids), cached_tokens=0)
    s = engine.stats()
    assert s["ttft_count"] == len(PROMPTS) and len(s["ttft_seconds"]) == len(PROMPTS) and s["itl_count"] > 0

    slow = engine.submit(PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True))
    t0 = time.monotonic()
    engine.shutdown(drain_timeout=0.2)  # cannot finish 400 tokens in time: aborted at the bound
    assert time.monotonic() - t0 < 10 and slow.result(timeout=0)[2] in ("abort", "length")
    with pytest.raises(EngineClosed):
        engine.submit([1], GREEDY)


def test_shutdown_drains_in_flight_requests(model, reference):
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64)).start()
    handles = [engine.submit(p, GREEDY) for p in PROMPTS]
    engine.shutdown(drain_timeout=60)
    assert [h.result(timeout=0)[1] for h in handles] == reference


def test_default_budget_fits_a_full_length_request_of_partial_blocks():
    """max_model_len not a multiple of block_size: the default pool still holds a full-length request."""
    import torch

    from deepsail.infer.engine import Engine, EngineConfig, SamplingParams
    from deepsail.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-3-8b-debug")).eval()
    engine = Engine(model, None, EngineConfig(max_batch_size=1, block_size=16, max_model_len=20))
    handle = engine.submit(list(range(1, 11)), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    assert len(handle.result(timeout=10)[1]) == 10


def test_prompt_logprobs_are_the_models_own_through_chunked_prefill_and_batching():
    """prompt_logprobs (what echo + logprobs serves) in the engine: a 40-token prompt prefilled 16 tokens a step,
    batched with another request, scores every prompt token as the full forward does."""
    from deepsail.infer.engine import Engine, EngineConfig, SamplingParams
    from deepsail.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("deepseek-v3-debug")).eval()
    engine = Engine(model, None, EngineConfig(max_batch_size=4, max_num_batched_tokens=16))
    prompt = [int(t) for t in torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(1))]
    scored = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    other = engine.submit(list(range(100, 130)), SamplingParams(max_tokens=5, temperature=0))
    engine.run_until_idle()
    first = scored._events[0]
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(prompt)
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    for i in range(1, len(prompt)):
        lp, top = first.prompt_logprobs[i]
        assert abs(lp - ref[i - 1, prompt[i]].item()) < 1e-4, i
        want = ref[i - 1].topk(3)
        assert [t for t, _ in top] == want.indices.tolist()
    assert other._events[0].prompt_logprobs is None  # only requests that ask pay for it
    assert len(scored.result(1)[1]) == 2 and len(other.result(1)[1]) == 5 and engine.allocator.num_used == 0
