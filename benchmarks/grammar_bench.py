"""Structured output's cost: the grammar engines' per-token mask on CPU, and the engine's tok/s with and without it.

    python benchmarks/grammar_bench.py                 # 32k-token BPE, every installed engine, then the engine run
    python benchmarks/grammar_bench.py --vocab 512     # the tests' tokenizer size

The peers are not deepsail dependencies; to compare without changing the venv (xgrammar pulls triton along):
    pip install --no-deps --target /tmp/peers xgrammar apache-tvm-ffi outlines-core
    PYTHONPATH=/tmp/peers python benchmarks/grammar_bench.py

1. Per engine that is installed (llguidance — deepsail's choice, infer/structured.py —, xgrammar, outlines-core):
   a byte-level BPE trained on the embedded corpus, a nested 6-field schema and "any JSON object"; five random walks
   of up to 150 tokens through each grammar (a uniformly random allowed token each step: the worst case, long
   strings and all), timing the bitmask fill and the token's consumption separately, plus the grammar's compile.
2. The continuous-batching engine on --preset (deepseek-v3-debug; random weights), --batch requests at once,
   sampled: plain vs json_schema, alternating rounds in one process, median tok/s of each and the ratio.
The load average is printed: on a shared machine compare ratios from one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "ok"],
    "additionalProperties": False,
}
OBJECT = {"type": "object"}
_BITS = torch.arange(32, dtype=torch.int32)


def unpack(bits_W: torch.Tensor, V: int) -> torch.Tensor:
    return ((bits_W[:, None] >> _BITS) & 1).bool().flatten()[:V]


def walk(fill: Callable[[], torch.Tensor], consume: Callable[[int], object], V: int, eos: int, seed: int):
    """(mean fill seconds, mean consume seconds, tokens) of one random walk through a grammar."""
    rng = random.Random(seed)
    t_fill = t_consume = 0.0
    n = 0
    for _ in range(150):
        t0 = time.perf_counter()
        bits = fill()
        t_fill += time.perf_counter() - t0
        ids = unpack(bits, V).nonzero().flatten().tolist()
        if not ids or eos in ids:  # finished (or only the end may follow)
            break
        t0 = time.perf_counter()
        consume(rng.choice(ids))
        t_consume += time.perf_counter() - t0
        n += 1
    return t_fill / max(n, 1), t_consume / max(n, 1), n


def engines(tok, token_bytes: list[bytes], eos: int) -> dict[str, Callable]:
    """name -> make(schema) -> (compile seconds, new_walker() -> (fill, consume)); only the installed ones."""
    V = len(token_bytes)
    out = {}
    try:
        import llguidance
        import llguidance.torch as lt

        lltok = llguidance.LLTokenizer(tok._tok.to_str(), n_vocab=V, eos_token=[eos])

        def make_llg(schema):
            t0 = time.perf_counter()
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
            llguidance.LLMatcher(lltok, grammar, log_level=0)
            compiled = time.perf_counter() - t0

            def new():
                m, bm = llguidance.LLMatcher(lltok, grammar, log_level=0), lt.allocate_token_bitmask(1, V)

                def fill():
                    lt.fill_next_token_bitmask(m, bm, 0)
                    return bm[0]

                return fill, m.consume_token

            return compiled, new

        out["llguidance"] = make_llg
    except ImportError:
        pass
    try:
        import xgrammar as xgr

        compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo(token_bytes, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=[eos]), max_threads=1
        )

        def make_xgr(schema):
            t0 = time.perf_counter()
            cg = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
            compiled = time.perf_counter() - t0

            def new():
                m, bm = xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, V)

                def fill():
                    m.fill_next_token_bitmask(bm, 0)
                    return bm[0]

                return fill, m.accept_token

            return compiled, new

        out["xgrammar"] = make_xgr
    except ImportError:
        pass
    try:
        import outlines_core as oc
        from outlines_core.kernels.torch import allocate_token_bitmask, fill_next_token_bitmask

        vmap: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes):
            if b and i != eos:
                vmap.setdefault(b, []).append(i)
        vocab = oc.Vocabulary(eos, vmap)

        def make_oc(schema):
            t0 = time.perf_counter()
            index = oc.Index(oc.json_schema.build_regex_from_schema(json.dumps(schema)), vocab)
            compiled = time.perf_counter() - t0

            def new():
                g, bm = oc.Guide(index), allocate_token_bitmask(V)

                def fill():
                    fill_next_token_bitmask(g, bm)
                    return bm[0]

                return fill, g.advance

            return compiled, new

        out["outlines-core"] = make_oc
    except ImportError:
        pass
    return out


def mask_costs(vocab: int) -> None:
    from deepsail.data import Tokenizer, default_corpus
    from deepsail.data.tokenizer import _byte_decoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        texts = [d.text for d in default_corpus("train", max_bytes=200_000 if vocab <= 2048 else 9_000_000)]
        tok = Tokenizer.train(texts, vocab_size=vocab)
    decoder = _byte_decoder()
    token_bytes = [
        b"" if tok.decode([i], skip_special_tokens=True) == "" else bytes(decoder[c] for c in tok.id_to_token(i))
        for i in range(tok.vocab_size)
    ]
    print(f"\nper-token mask cost: {tok.vocab_size}-token byte-level BPE, load {os.getloadavg()[0]:.1f}")
    head = f"{'engine':<14} {'grammar':<12} {'compile':>9} {'mask fill':>10} {'consume':>9} {'tokens per walk':>16}"
    print(head + "\n" + "-" * len(head))
    for name, make in engines(tok, token_bytes, tok.eos_id).items():
        for label, schema in (("schema", SCHEMA), ("json_object", OBJECT)):
            compiled, new = make(schema)
            walks = []
            for seed in range(5):
                fill, consume = new()
                walks.append(walk(fill, consume, tok.vocab_size, tok.eos_id, seed))
            fills, consumes = [w[0] for w in walks], [w[1] for w in walks]
            print(
                f"{name:<14} {label:<12} {compiled * 1e3:>7.1f}ms {statistics.median(fills) * 1e6:>8.0f}us "
                f"{statistics.median(consumes) * 1e6:>7.0f}us {str([w[2] for w in walks]):>16}"
            )


def engine_tps(preset: str, batch: int, rounds: int, max_tokens: int) -> None:
    from deepsail.data import Tokenizer, default_corpus
    from deepsail.infer import Engine, EngineConfig, SamplingParams
    from deepsail.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train([d.text for d in default_corpus("train", max_bytes=100_000)], vocab_size=512)
    schema = json.dumps(SCHEMA | {"properties": SCHEMA["properties"] | {"name": {"type": "string"}}})
    engine = Engine(model, tok, EngineConfig(max_batch_size=batch, num_blocks=batch * (max_tokens // 16 + 2)))
    prompts = [tok.encode(f"Record {i}:") for i in range(batch)]

    def run(structured: bool, r: int) -> float:
        # A structured row ends when its JSON closes; its token count is what is timed, as the plain rows'.
        hs = [
            engine.submit(
                p,
                SamplingParams(
                    max_tokens=max_tokens,
                    seed=r * batch + i,
                    json_schema=schema if structured else None,
                    ignore_eos=not structured,
                ),
            )
            for i, p in enumerate(prompts)
        ]
        t0 = time.perf_counter()
        engine.run_until_idle()
        return sum(len(h.result()[1]) for h in hs) / (time.perf_counter() - t0)

    run(True, 0), run(False, 0)  # warm-up
    plain, structured = [], []
    for r in range(rounds):  # alternating, so a load change hits both sides alike
        plain.append(run(False, r + 1))
        structured.append(run(True, r + 1))
    p, s = statistics.median(plain), statistics.median(structured)
    print(
        f"\nengine, {preset} (random weights), batch {batch}, sampled, up to {max_tokens} tokens, {rounds} alternating "
        f"rounds, load {os.getloadavg()[0]:.1f}:\n  plain {p:.0f} tok/s, json_schema {s:.0f} tok/s: {s / p:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32000, help="BPE size for the mask costs")
    ap.add_argument("--preset", default="deepseek-v3-debug", help="model for the engine run ('' skips it)")
    ap.add_argument("--skip-masks", action="store_true", help="only the engine run")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch={torch.__version__} cores={os.cpu_count()} threads={args.threads}")
    if not args.skip_masks:
        mask_costs(args.vocab)
    if args.preset:
        engine_tps(args.preset, args.batch, args.rounds, args.max_tokens)


if __name__ == "__main__":
    main()
