"""Sampling, batched generation, beam search, context-aware and speculative decoding, and `deepsail generate`."""

import math

import pytest
import torch
from typer.testing import CliRunner

from deepsail.cli import app
from deepsail.infer import SamplingParams, generate
from deepsail.infer.sampling import (
    DecodeState,
    TextTracker,
    apply_repetition_penalty,
    mask_logits,
    sample,
)
from deepsail.model import ModelConfig, Transformer

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30] * 20, [100, 200]]
GREEDY = dict(temperature=0, ignore_eos=True)


def tiny(preset: str = "deepseek-v3-debug", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset)).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny()


class CharTokenizer:
    """id i <-> one letter; enough to test text handling without training a tokenizer."""

    eos_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


class ByteTokenizer:
    """id = one UTF-8 byte: multi-byte characters arrive in pieces, as with byte-level BPE."""

    eos_id = None

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def seq_logprob(model: Transformer, prompt: list[int], gen: list[int]) -> float:
    """log p(gen | prompt) under the model, from one uncached forward."""
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)
    return sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(gen))


# --- the sampler ------------------------------------------------------------------------------------------------------
def test_top_k_top_p_min_p_masks_per_row():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4, 4)
    kept = mask_logits(
        logits, torch.tensor([2, 0, 0, 0]), torch.tensor([1.0, 0.7, 0.81, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.2])
    ).isfinite()
    assert kept.tolist() == [
        [True, True, False, False],  # top-k 2
        [True, True, False, False],  # top-p 0.7: 0.5 + 0.3 reaches it
        [True, True, True, False],  # top-p 0.81: needs the third token
        [True, True, True, False],  # min-p 0.2: below 0.2 * 0.5 = 0.1 goes
    ]
    # all off: nothing masked, even with rounding in the cumulative sum
    flat = torch.randn(3, 1000)
    assert mask_logits(flat, torch.zeros(3, dtype=torch.long), torch.ones(3), torch.zeros(3)).isfinite().all()
    # the top token always survives top-p, however small p is
    assert mask_logits(logits[:1], torch.tensor([0]), torch.tensor([0.01]), torch.tensor([0.0])).isfinite().sum() == 1


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 2.0, -2.0]]


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    return sample(logits.expand(n, -1), [params] * n, gens).token_ids


def test_sampled_frequencies_follow_the_transformed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (0.5, 2.0):
        counts = _draws(logits, SamplingParams(temperature=temperature)).bincount(minlength=4).float() / 4000
        expected = (logits[0] / temperature).softmax(-1)
        assert (counts - expected).abs().max() < 0.03, (temperature, counts, expected)
    counts = _draws(logits, SamplingParams(top_k=2)).bincount(minlength=4).float() / 4000
    assert counts[2:].sum() == 0 and abs(counts[0] - logits[0, :2].softmax(-1)[0]) < 0.03
    counts = _draws(logits, SamplingParams(min_p=0.3)).bincount(minlength=4)
    assert counts[2:].sum() == 0  # p = [.64, .24, .09, .03]: 0.09 < 0.3 * 0.64


def test_greedy_logprobs_and_penalty_in_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1e6, logprobs=0),
    ]
    top = logits[2].argmax().item()
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[2, top] = True
    out = sample(logits, params, [None] * 3, seen)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[1] == logits[1].argmax()
    assert out.token_ids[2] != top  # the penalty moved greedy off the seen token
    raw = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert torch.allclose(out.top_logprobs[0], raw[0].topk(3).values)


def test_seeded_sampling_ignores_batch_neighbours():
    logits = torch.randn(1, 100)
    p = SamplingParams(seed=42)
    alone = [sample(logits, [p], [g]).token_ids.item() for g in [p.make_generator()] for _ in range(20)]
    gen, other = p.make_generator(), torch.Generator().manual_seed(7)
    batched = [
        sample(torch.cat([torch.randn(1, 100), logits]), [SamplingParams(seed=7), p], [other, gen]).token_ids[1].item()
        for _ in range(20)
    ]
    assert alone == batched


def test_sampling_params_validate():
    for bad in (
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-1),
        dict(min_p=2),
        dict(max_tokens=0),
        dict(repetition_penalty=0),
        dict(logprobs=21),
        dict(stop=[""]),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --- text -------------------------------------------------------------------------------------------------------------
def test_stop_string_across_tokens_is_never_streamed():
    # "abcxyzdef" with stop "yzd": the stop spans three tokens; no delta may show any of it.
    tracker = TextTracker(CharTokenizer(), [0], stop=["yzd"])
    deltas, hit = [], False
    for ch in "abcxyzdef":
        delta, hit = tracker.add(ord(ch) - ord("a"))
        deltas.append(delta)
        if hit:
            break
    assert hit and tracker.text == "abcx" and "".join(deltas) == "abcx"
    assert all("y" not in d for d in deltas)


def test_incremental_decode_waits_for_whole_characters():
    tracker = TextTracker(ByteTokenizer(), list(b"hi "))
    out = [tracker.add(b)[0] for b in "né😀!".encode()]
    assert "".join(out) == "né😀!" and "\ufffd" not in "".join(out)
    assert out[1] == "" and out[2] == "é"  # the first byte of é shows nothing until its second arrives


def test_decode_state_stop_rules():
    s = DecodeState([1], SamplingParams(max_tokens=5, stop_token_ids=[9]), CharTokenizer())
    events = [s.append(t) for t in (2, 3, 9)]
    assert [e.finish_reason for e in events] == [None, None, "stop"]
    assert s.output_ids == [2, 3, 9] and s.text == "cd"  # the stop token is kept in ids, not in text
    s = DecodeState([1], SamplingParams(max_tokens=2), CharTokenizer())
    assert [s.append(t).finish_reason for t in (2, 3)] == [None, "length"]


# --- generate ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["deepseek-v3-debug", "llama-3-8b-debug", "qwen2-1.5b-debug"])
def test_batched_greedy_equals_one_at_a_time(preset):
    m = tiny(preset)
    one = [generate(m, None, p, max_tokens=8, **GREEDY)[0].token_ids for p in PROMPTS]
    batch = [g.token_ids for g in generate(m, None, PROMPTS, max_tokens=8, **GREEDY)]
    assert batch == one and all(len(t) == 8 for t in one)


def test_seed_gives_same_text_alone_and_in_a_batch(model):
    p = SamplingParams(max_tokens=10, seed=123, top_p=0.9, ignore_eos=True)
    alone = generate(model, None, PROMPTS[1], p)[0].token_ids
    others = [SamplingParams(max_tokens=6, seed=1), p, SamplingParams(max_tokens=12)]
    batch = generate(model, None, [PROMPTS[0], PROMPTS[1], PROMPTS[2]], others)
    assert batch[1].token_ids == alone
    assert generate(model, None, PROMPTS[1], max_tokens=10, seed=124, top_p=0.9, ignore_eos=True)[0].token_ids != alone


def test_stop_string_and_logprobs_through_generate(model):
    tok = CharTokenizer()
    plain = generate(model, tok, PROMPTS[0], max_tokens=12, logprobs=2, **GREEDY)[0]
    assert len(plain.logprobs) == 12 and all(len(t) == 2 for t in plain.top_logprobs)
    assert all(lp <= 0 for lp in plain.logprobs)
    stop = plain.text[5:7]
    cut = generate(model, tok, PROMPTS[0], max_tokens=12, stop=[stop], **GREEDY)[0]
    assert cut.finish_reason == "stop" and cut.text == plain.text[: plain.text.index(stop)]


def test_over_long_prompt_is_a_value_error(model):
    with pytest.raises(ValueError, match="510.*max_tokens=10.*512"):
        generate(model, None, [3] * 510, max_tokens=10)


def test_beam_search(model):
    greedy = generate(model, None, PROMPTS, max_tokens=6, **GREEDY)
    one_beam = generate(model, None, PROMPTS, max_tokens=6, num_beams=1, **GREEDY)
    assert [g.token_ids for g in one_beam] == [g.token_ids for g in greedy]
    beams = generate(model, None, PROMPTS, max_tokens=6, num_beams=4, length_penalty=0.0, **GREEDY)
    gains = []
    for p, g, b in zip(PROMPTS, greedy, beams):
        lg, lb = seq_logprob(model, p, g.token_ids), seq_logprob(model, p, b.token_ids)
        assert math.isclose(lb, b.score, abs_tol=1e-3)  # the reported score is the sequence's log-likelihood
        gains.append(lb - lg)
    assert min(gains) >= -1e-4 and max(gains) > 1e-3  # never worse than greedy, better somewhere


def test_context_aware_decoding(model):
    ctx, prompt = [40, 41, 42, 43], [7, 8]
    plain = generate(model, None, ctx + prompt, max_tokens=6, **GREEDY)[0].token_ids
    assert generate(model, None, prompt, max_tokens=6, context=ctx, cad_alpha=0.0, **GREEDY)[0].token_ids == plain
    # α > 0: the first token is the argmax of (1+α)·l(y|c,x) − α·l(y|x)
    alpha = 3.0
    with torch.no_grad():
        lc, lx = model(torch.tensor([ctx + prompt])).logits[0, -1], model(torch.tensor([prompt])).logits[0, -1]
    first = ((1 + alpha) * lc - alpha * lx).argmax().item()
    assert generate(model, None, prompt, max_tokens=1, context=ctx, cad_alpha=alpha, **GREEDY)[0].token_ids == [first]


def bigram_model(noise: float) -> Transformer:
    """A model whose next token depends only on the current one, and whose MTP head predicts the main model's next
    choice exactly (noise=0) or approximately (noise>0): a controllable acceptance rate for speculative decoding."""
    m = tiny()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "o_proj" in name or "down_proj" in name:  # attention and MLPs add nothing: h_i = Emb(t_i)
                p.zero_()
        d = m.config.hidden_size
        m.mtp[0].eh_proj.weight.copy_(torch.cat((torch.eye(d), torch.zeros(d, d)), 1))  # MTP sees Emb(t_{i+1})
        m.mtp[0].norm.weight.add_(noise * torch.randn(d, generator=torch.Generator().manual_seed(0)))
    return m


@pytest.mark.parametrize("noise,k", [(None, 1), (None, 3), (0.5, 2), (0.0, 2)])
def test_speculative_greedy_equals_plain_greedy(model, noise, k):
    m = model if noise is None else bigram_model(noise)
    plain = generate(m, None, PROMPTS, max_tokens=16, **GREEDY)
    spec = generate(m, None, PROMPTS, max_tokens=16, speculative=k, **GREEDY)
    assert [g.token_ids for g in spec] == [g.token_ids for g in plain]
    rates = [g.acceptance_rate for g in spec]
    assert all(g.draft_tokens > 0 and 0 <= r <= 1 for g, r in zip(spec, rates))
    if noise == 0.0:
        assert rates == [1.0] * len(PROMPTS)
    elif noise == 0.5:
        assert 0.1 < sum(rates) / len(rates) < 0.9  # a mix of accepted and rejected drafts


def test_speculative_rejects_what_it_cannot_verify(model):
    with pytest.raises(ValueError, match="temperature=0"):
        generate(model, None, PROMPTS[0], max_tokens=4, temperature=0.7, speculative=2)
    with pytest.raises(ValueError, match="MTP"):
        generate(tiny("llama-3-8b-debug"), None, PROMPTS[0], max_tokens=4, temperature=0, speculative=2)


# --- the CLI ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from deepsail.data.tokenizer import Tokenizer

    texts = ["hello world, the quick brown fox jumps over the lazy dog"] * 20 + ["def f(x): return x + 1"] * 20
    tok = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("deepseek-v3-debug").replace(vocab_size=tok.vocab_size))
    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoints" / "step_000010"
    m.save_pretrained(ckpt)
    tok.save(ckpt)
    (run / "checkpoints" / "latest").write_text("step_000010\n")
    return run


def test_cli_generate_prints_text(model_dir):
    from deepsail.infer import load

    model, tok = load(model_dir)  # a run folder resolves to its latest checkpoint
    expected = generate(model, tok, "hello world", max_tokens=8, temperature=0)[0].text
    assert expected.strip()
    ckpt = model_dir / "checkpoints" / "step_000010"
    for path in (model_dir, ckpt):
        result = CliRunner().invoke(
            app, ["generate", str(path), "--prompt", "hello world", "--max-tokens", "8", "--temperature", "0"]
        )
        assert result.exit_code == 0, result.output
        assert expected in result.stdout


def test_cli_generate_batch_beams_and_errors(model_dir):
    result = CliRunner().invoke(
        app, ["generate", str(model_dir), "-p", "hello", "-p", "def f", "--max-tokens", "4", "--num-beams", "2"]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["generate", str(model_dir / "nowhere"), "-p", "x"])
    assert result.exit_code == 1 and "neither a model directory" in result.output


def test_cli_chat_round_trip(model_dir):
    result = CliRunner().invoke(
        app,
        ["chat", str(model_dir), "--max-tokens", "4", "--temperature", "0"],
        input="hi there\n/reset\nhello\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("assistant> ") == 2


def test_cli_help_shows_examples():
    for verb in ("generate", "chat"):
        result = CliRunner().invoke(app, [verb, "--help"])
        assert result.exit_code == 0 and "Examples" in result.stdout and f"deepsail {verb} " in result.stdout


def test_compiled_decode_is_greedy_identical_in_generate_and_the_engine():
    """One compiled graph (batch >= 2, growing key length) replays every decode step; tokens equal eager's."""
    from deepsail.infer import Engine, EngineConfig
    from deepsail.infer.graphs import enable_compiled_decode
    from deepsail.model.moe import GATHER_TOKENS

    model = tiny()  # MLA + MoE: the absorbed attention and the gathered experts inside the graph
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]
    params = SamplingParams(max_tokens=12, **GREEDY)
    eager = [g.token_ids for g in generate(model, None, prompts, params)]
    many = [[3 + k, 9, 4 + 2 * k] for k in range(GATHER_TOKENS + 3)]  # past the few-row and gather routes' limits
    many_eager = [g.token_ids for g in generate(model, None, many, params)]
    step = enable_compiled_decode(model)
    assert [g.token_ids for g in generate(model, None, prompts, params)] == eager
    assert step.runs["step"] == 11  # every step after the prefill ran compiled
    longer = SamplingParams(max_tokens=20, **GREEDY)  # another cache size: the same graph (pool dims are dynamic)
    assert [g.token_ids[:12] for g in generate(model, None, prompts, longer)] == eager
    engine = Engine(model, None, EngineConfig(block_size=4, num_blocks=64, compile_decode=True))
    handles = [engine.submit(p, params) for p in prompts]
    engine.run_until_idle()
    assert [h.result(timeout=0)[1] for h in handles] == eager
    assert step.runs["step"] > 30  # the engine's decode-only steps ran compiled too
    # Batches past the few-row route's limit (layers.SMALL_ROWS) replay their own graph, also token-identical; past
    # moe.GATHER_TOKENS the experts' loop is one opaque op of that graph, not a graph break (a break had each block
    # compiled per layer, and at batch 64 the step ran into dynamo's recompile limit and fell back to eager).
    from torch._dynamo.utils import counters

    counters.clear()
    handles = [engine.submit(p, params) for p in many]
    engine.run_until_idle()
    assert [h.result(timeout=0)[1] for h in handles] == many_eager
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The graph takes the parameters as inputs: an in-place update (an optimizer step, as GRPO makes between
    # rollouts) is what the next compiled step computes with.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    runs = step.runs["step"]
    compiled_after = [g.token_ids for g in generate(model, None, prompts, params)]
    model.compiled_decode = None
    assert compiled_after == [g.token_ids for g in generate(model, None, prompts, params)] != eager
    model.compiled_decode = step
    assert step.runs["step"] == runs + 11
    # A step the graph does not cover (a row that feeds nothing, a prefill) runs eager with the same numbers.
    cache = model.new_cache(2, 32)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        model(ids, cache=cache)
        assert step(ids[:, :1], cache, torch.tensor([1, 0])) is None
        assert step(ids, cache) is None


def test_compiled_speculation_is_greedy_identical_in_generate_and_the_engine():
    """The verify forward ([t_n, d_1..d_k] per row) and the MTP's catch-up and drafts run their own graphs; a mixed
    acceptance (some drafts kept, some not) gives the plain eager greedy tokens in generate and in the engine."""
    from deepsail.infer import Engine, EngineConfig
    from deepsail.infer.graphs import enable_compiled_decode

    m = bigram_model(0.5)
    params = SamplingParams(max_tokens=16, **GREEDY)
    plain = [g.token_ids for g in generate(m, None, PROMPTS, params)]
    step = enable_compiled_decode(m)
    spec = generate(m, None, PROMPTS, params, speculative=2)
    assert [g.token_ids for g in spec] == plain
    assert 0 < sum(g.accepted_tokens for g in spec) < sum(g.draft_tokens for g in spec)
    assert step.runs["hidden"] > 0 and step.runs["mtp"] > 0
    before = dict(step.runs)
    engine = Engine(m, None, EngineConfig(block_size=4, num_blocks=128, speculative=2, compile_decode=True))
    handles = [engine.submit(p, params) for p in PROMPTS]
    engine.run_until_idle()
    assert [h.result(timeout=0)[1] for h in handles] == plain
    assert step.runs["hidden"] > before["hidden"] and step.runs["mtp"] > before["mtp"]
