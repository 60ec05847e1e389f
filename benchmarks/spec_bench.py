"""Self-speculative decoding with the MTP head beside plain greedy decoding, same model, measured alternately.

    deepsail run --out runs/v3                      # a model trained with MTP (random MTP weights accept ~nothing)
    python benchmarks/spec_bench.py runs/v3         # batch 1 and 4, drafting k = 1 and 2
    python benchmarks/spec_bench.py runs/v3 --quick
    python benchmarks/spec_bench.py runs/v3 --compile   # both sides through infer/graphs.py's compiled steps

Prompts are the openings of held-out files of the embedded corpus (the validation split `deepsail run` never
trained on), so acceptance is measured on text the model has not memorised. For each batch size and draft length k
the same prompts are decoded greedily with and without speculation, taking turns each round; the outputs must be
identical token for token (the benchmark fails otherwise). Printed per setting: tok/s of both, their ratio, the
draft acceptance rate, tokens emitted per main-model forward, and the cost of one speculative round in plain decode
steps. ratio = tok/fwd / round cost: acceptance sets the first, the implementation the second (the ideal is a
round that costs one plain step).

Goal (from the issue): speculation >= 1.5x plain decode where acceptance allows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from deepsail.data import default_corpus
from deepsail.infer import generate, load
from deepsail.infer.graphs import enable_compiled_decode


def prompts_from_val(tokenizer, n: int, prompt_tokens: int) -> list[list[int]]:
    docs = [d for d in default_corpus("val") if len(d.text) > 20 * prompt_tokens]
    step = max(1, len(docs) // n)
    return [tokenizer.encode(d.text)[:prompt_tokens] for d in docs[::step][:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder or HF directory of a model with MTP modules")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and rounds")
    parser.add_argument("--compile", action="store_true", help="plain and speculative decode steps compiled")
    args = parser.parse_args()
    rounds = 2 if args.quick else 3
    n_prompts = 4 if args.quick else args.prompts

    model, tokenizer = load(args.checkpoint)
    if not len(model.mtp):
        raise SystemExit(f"{args.checkpoint} has no MTP modules (num_nextn_predict_layers=0): nothing drafts")
    if args.compile:  # round 0 below (untimed) compiles the plain, verify and MTP graphs
        enable_compiled_decode(model)
    prompts = prompts_from_val(tokenizer, n_prompts, args.prompt_tokens)
    kw = dict(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print(
        f"torch={torch.__version__} threads={torch.get_num_threads()} {'compiled' if args.compile else 'eager'} "
        f"decode steps, load {os.getloadavg()[0]:.2f}, model: "
        f"{model.num_params() / 1e6:.1f}M params ({model.num_params(include_mtp=True) / 1e6:.1f}M with MTP), "
        f"{len(prompts)} held-out prompts of {args.prompt_tokens} tokens, {args.max_tokens} new tokens each\n"
    )

    def run_all(batch: int, k: int) -> list:
        out = []
        for i in range(0, len(prompts), batch):
            out += generate(model, tokenizer, prompts[i : i + batch], speculative=k, **kw)
        return out

    header = (
        f"{'batch':>5}{'k':>3}{'plain tok/s':>13}{'spec tok/s':>12}{'ratio':>8}{'accept':>8}"
        f"{'tok/fwd':>9}{'round cost':>12}"
    )
    print(header)
    for batch in args.batch:
        for k in args.draft:
            times: dict[int, list[float]] = {0: [], k: []}
            results = {}
            for r in range(rounds + 1):  # round 0 warms up
                for kk in (0, k):
                    t0 = time.perf_counter()
                    results[kk] = run_all(batch, kk)
                    if r:
                        times[kk].append(time.perf_counter() - t0)
            plain, spec = results[0], results[k]
            mismatched = sum(a.token_ids != b.token_ids for a, b in zip(plain, spec))
            if mismatched:
                raise SystemExit(
                    f"speculative greedy differs from plain greedy on {mismatched} prompts (batch "
                    f"{batch}, k={k}): a correctness bug"
                )
            tokens = sum(len(g.token_ids) for g in plain)
            t_plain, t_spec = statistics.median(times[0]), statistics.median(times[k])
            drafted = sum(g.draft_tokens for g in spec)
            accepted = sum(g.accepted_tokens for g in spec)
            # Every round drafts k per row and emits accepted + 1: tokens per main forward, per row.
            forwards = drafted / k
            per_forward = (accepted + forwards) / forwards
            # A plain step emits one token per row: cost of a round measured in plain steps.
            round_cost = (t_spec / forwards) / (t_plain / tokens)
            print(
                f"{batch:>5}{k:>3}{tokens / t_plain:>13.0f}{tokens / t_spec:>12.0f}{t_plain / t_spec:>7.2f}x"
                f"{accepted / max(drafted, 1):>8.0%}{per_forward:>9.2f}{round_cost:>12.2f}"
            )
    print(
        "\ntok/fwd: tokens emitted per main-model forward; round cost: one speculative round (draft + verify) "
        "in plain decode steps"
    )


if __name__ == "__main__":
    main()
