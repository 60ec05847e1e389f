"""`deepsail serve` under concurrent streaming clients, beside HF transformers serving the same requests one at a time.

    python benchmarks/serve_bench.py                 # deepseek-v3-small (random weights), 1/8/32/128 clients
    python benchmarks/serve_bench.py --quick         # fewer requests, shorter outputs
    python benchmarks/serve_bench.py --threads 1     # on a small or shared CPU (see `deepsail serve --threads`)
    python benchmarks/serve_bench.py --model runs/mini --speculative 2   # a trained MTP model, 2 drafts per step

What runs:
1. a random `deepseek-v3-small` model (MTP off) and a small BPE tokenizer are saved to a temp dir;
2. `deepsail serve` on it, in a subprocess on 127.0.0.1; for each concurrency C, C async httpx clients stream
   /v1/completions (greedy, ignore_eos, so every request is exactly --max-tokens long) until the level's requests
   are done. Per request: TTFT (send -> first chunk) and TPOT ((last chunk - first chunk) / (tokens - 1));
   with --speculative K (default 1; 0 = off) a second server with `--speculative mtp:K` serves the same levels,
   alternating with the plain one round by round (--rounds), so a change of load hits both: the speculative
   column is the median tok/s of its rounds beside the plain median, with the MTP drafts' acceptance. On random
   weights (the default) drafts are almost never kept, so that column is speculation's overhead; on a trained
   model (--model DIR, e.g. from `deepsail run`) it is its gain;
3. the server stops, and the same requests run sequentially through `transformers` `generate` on the same weights
   (what a one-request-at-a-time server would do): the "HF sequential" output tok/s each level is compared with;
4. batch-1 decode, engine vs HF generate, in this process, beside the memory-bandwidth limit: bytes read per
   decoded token (the active weights once, plus the KV cache of the context) / copy bandwidth of a big tensor.

Goals (from the issue): >= 5x HF sequential output throughput at 32 clients; batch-1 decode >= 2x HF.
The client runs on the same machine as the server: on a small CPU it takes cycles from it (reported as is).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

PROMPTS = [
    "def fibonacci(n):\n    ",
    "The quick brown fox jumps over",
    "import numpy as np\nimport torch\n\nclass Model(",
    "In 1905, Albert Einstein published",
    "SELECT name, count(*) FROM users WHERE",
    "Once upon a time, in a small village,",
]


# --- setup shared with soak.py --------------------------------------------------------------------------------------
def make_model_dir(folder: Path, preset: str, seed: int = 0, mtp: bool = False) -> Path:
    """Random weights for `preset` (MTP off unless `mtp`: only speculative serving uses it) + a BPE tokenizer, as
    `deepsail serve` wants."""
    from deepsail.data import Tokenizer, default_corpus
    from deepsail.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = ModelConfig.preset(preset)
    if not mtp:
        config = config.replace(num_nextn_predict_layers=0)
    Transformer(config).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus may not fill the vocabulary
        texts = [d.text for d in default_corpus("train", max_bytes=300_000)]
        Tokenizer.train(texts, vocab_size=min(2048, config.vocab_size)).save(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`deepsail serve` in a subprocess on loopback; stopped with SIGTERM (its graceful path)."""

    def __init__(self, model_dir: Path | None, *args: str, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log or os.devnull, "w")  # noqa: SIM115 - the server writes to it until stop()
        cmd = [
            sys.executable,
            "-c",
            "from deepsail.cli import app; app()",
            "serve",
            *([str(model_dir)] if model_dir is not None else []),  # None: the args name what is served (--route)
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see its log")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready within {timeout}s")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def spec_counters(url: str) -> tuple[float, float]:
    """(drafted, kept) MTP tokens so far, from a speculative server's /metrics."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("draft", "accepted"):
            if line.startswith(f"deepsail_spec_decode_num_{name}_tokens_total "):
                out[name] = float(line.split()[1])
    return out.get("draft", 0.0), out.get("accepted", 0.0)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


# --- the load -----------------------------------------------------------------------------------------------------
@dataclass
class Level:
    clients: int
    wall: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    errors: int = 0


async def stream_one(c: httpx.AsyncClient, prompt: str, max_tokens: int, level: Level) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            level.errors += 1
            await r.aread()
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                continue
            first = first or now
            last = now
    level.tokens += tokens
    level.ttft.append(first - t0)
    if tokens > 1:
        level.tpot.append((last - first) / (tokens - 1))


async def run_level(url: str, clients: int, requests: int, max_tokens: int) -> Level:
    level = Level(clients)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:

        async def client() -> None:
            while not queue.empty():
                await stream_one(c, queue.get_nowait(), max_tokens, level)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        level.wall = time.perf_counter() - t0
    return level


# --- HF sequential and batch-1 decode -----------------------------------------------------------------------------
@torch.no_grad()
def hf_sequential(hf, tokenizer, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """(seconds, tokens) for the prompts one after another through HF generate."""
    tokens, t0 = 0, time.perf_counter()
    for p in prompts:
        ids = torch.tensor([tokenizer.encode(p)])
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        tokens += out.shape[1] - ids.shape[1]
    return time.perf_counter() - t0, tokens


@torch.no_grad()
def hf_decode_tps(hf, ids: torch.Tensor, new: int, rounds: int) -> float:
    """Decode-only tok/s at batch 1: (time for `new` tokens - time for 1) / (new - 1), median over rounds."""

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        return time.perf_counter() - t0

    gen(new)  # warm-up
    return statistics.median((new - 1) / (gen(new) - gen(1)) for _ in range(rounds))


def engine_decode_tps(model, tokenizer, ids: list[int], new: int, rounds: int) -> float:
    """Decode tok/s of the engine with one request: 1 / median gap between consecutive tokens."""
    from deepsail.infer.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=1, max_model_len=len(ids) + new))
    engine.start()
    try:
        gaps = []
        for r in range(rounds + 1):
            h = engine.submit(ids, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
            times = [time.perf_counter() for _ in h.events(timeout=120)]
            if r:  # the first round warms up
                gaps += [b - a for a, b in itertools.pairwise(times)]
        return 1 / statistics.median(gaps)
    finally:
        engine.shutdown(1)


def copy_bandwidth(nbytes: int = 256 << 20, rounds: int = 5) -> float:
    """Bytes/s of a big tensor copy (each byte read once and written once)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(rounds))
    return 2 * nbytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes a batch-1 decode step must read: every active weight once (one embedding row, not the table), plus
    the KV cache of `context` tokens."""
    from deepsail.model import KVPool

    p = model.embed_tokens.weight
    weights = model.num_params(active=True) - p.numel() + p.shape[1]
    if model.config.tie_word_embeddings:  # the head *is* the table, and it is read in full
        weights += p.numel()
    kv = KVPool(model.config, 1, 16, p.dtype, "meta").bytes_per_token * context
    return weights * p.element_size() + kv


# --- main -----------------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests, 32 tokens, fewer rounds")
    ap.add_argument("--preset", default="deepseek-v3-small")
    ap.add_argument("--clients", default="1,8,32,128", help="comma-separated concurrency levels")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64, quick 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for server and HF (default: torch's)")
    ap.add_argument("--model", default=None, help="serve this model folder instead of random --preset weights")
    ap.add_argument("--speculative", type=int, default=1, help="MTP drafts per step of the speculative column; 0: none")
    ap.add_argument(
        "--rounds", type=int, default=None, help="alternating plain/speculative rounds (default 3, quick 1)"
    )
    args = ap.parse_args()
    import transformers

    from deepsail.data import Tokenizer
    from deepsail.infer.generate import load

    max_tokens = args.max_tokens or (32 if args.quick else 64)
    levels = [int(c) for c in args.clients.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(
        f"torch={torch.__version__} transformers={transformers.__version__} cpu cores={os.cpu_count()} "
        f"threads={threads} model={args.model or args.preset} max_tokens={max_tokens}"
    )

    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from deepsail.train.checkpoint import resolve_checkpoint

            folder = resolve_checkpoint(args.model)  # a run folder: its latest checkpoint, as `deepsail serve` takes
        else:
            folder = make_model_dir(Path(tmp), args.preset, mtp=args.speculative > 0)
        tokenizer = Tokenizer.load(folder)
        common = ["--threads", str(threads), "--max-batch-size", str(max(levels)), "--max-waiting", "4096"]
        servers = {"plain": ServerProcess(folder, *common, log=Path(tmp) / "server.log")}
        if args.speculative:
            servers["spec"] = ServerProcess(
                folder, *common, "--speculative", f"mtp:{args.speculative}", log=Path(tmp) / "spec.log"
            )
        # results[name][i]: the rounds of level i; acceptance[i]: (drafted, kept) over the level's speculative rounds
        results: dict[str, list[list[Level]]] = {name: [] for name in servers}
        acceptance: list[tuple[float, float]] = []
        try:
            for server in servers.values():
                server.wait_ready()
                asyncio.run(run_level(server.url, 1, 2, 8))  # warm-up
            for c in levels:
                n = max(c, 8) if args.quick else max(2 * c, 16)
                for name in servers:
                    results[name].append([])
                before = spec_counters(servers["spec"].url) if "spec" in servers else (0.0, 0.0)
                for _ in range(rounds):  # alternating: plain, speculative, plain, ...
                    for name, server in servers.items():
                        results[name][-1].append(asyncio.run(run_level(server.url, c, n, max_tokens)))
                after = spec_counters(servers["spec"].url) if "spec" in servers else (0.0, 0.0)
                acceptance.append((after[0] - before[0], after[1] - before[1]))
                walls = ", ".join(f"{k} {statistics.median(lv.wall for lv in results[k][-1]):.1f}s" for k in servers)
                print(
                    f"  {c:>4} clients: {n} requests x {rounds} rounds; median wall {walls}; load "
                    f"{os.getloadavg()[0]:.1f}",
                    flush=True,
                )
        finally:
            rcs = [server.stop() for server in servers.values()]
        print(f"  servers stopped (exit {rcs})")

        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        n_hf = 6 if args.quick else 12
        hf_prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_hf)]
        hf_sequential(hf, tokenizer, hf_prompts[:1], 4)  # warm-up
        hf_time, hf_tokens = hf_sequential(hf, tokenizer, hf_prompts, max_tokens)
        hf_tps, hf_rps = hf_tokens / hf_time, n_hf / hf_time

        # Batch-1 decode: engine vs HF, and the memory-bandwidth limit at the same context.
        model, _ = load(folder, device="cpu", dtype=torch.float32)
        ids = tokenizer.encode(PROMPTS[0])
        b1_rounds = 2 if args.quick else 4
        ours_b1 = engine_decode_tps(model, tokenizer, ids, max_tokens, b1_rounds)
        hf_b1 = hf_decode_tps(hf, torch.tensor([ids]), max_tokens, b1_rounds)
        bw = copy_bandwidth()
        per_token = decode_bytes_per_token(model, len(ids) + max_tokens // 2)
        limit = bw / per_token

    print(
        f"\nserving: {args.model or args.preset} ({model.num_params() / 1e6:.1f}M params, "
        f"{model.num_params(active=True) / 1e6:.1f}M "
        f"active), greedy, {max_tokens} tokens per request, prompts {min(len(tokenizer.encode(p)) for p in PROMPTS)}-"
        f"{max(len(tokenizer.encode(p)) for p in PROMPTS)} tokens"
    )
    spec = "spec" in servers
    head = (
        f"{'clients':>7} {'req/s':>7} {'out tok/s':>10} {'HF seq tok/s':>13} {'ratio':>6} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'errors':>6}"
    )
    if spec:
        head += f" {'spec tok/s':>10} {'vs plain':>8} {'accepted':>8} {'spec TPOT p50':>13}"
    print(head)
    print("-" * len(head))
    for i, rounds_ in enumerate(results["plain"]):
        tps = statistics.median(r.tokens / r.wall for r in rounds_)
        ttft = [t for r in rounds_ for t in r.ttft]
        tpot = [t for r in rounds_ for t in r.tpot]
        row = (
            f"{rounds_[0].clients:>7} {statistics.median(len(r.ttft) / r.wall for r in rounds_):>7.2f} {tps:>10.1f} "
            f"{hf_tps:>13.1f} {tps / hf_tps:>5.2f}x {percentile(ttft, 50) * 1e3:>7.0f}ms "
            f"{percentile(ttft, 99) * 1e3:>7.0f}ms {percentile(tpot, 50) * 1e3:>7.1f}ms "
            f"{percentile(tpot, 99) * 1e3:>7.1f}ms {sum(r.errors for r in rounds_):>6}"
        )
        if spec:
            srounds = results["spec"][i]
            stps = statistics.median(r.tokens / r.wall for r in srounds)
            drafted, kept = acceptance[i]
            stpot = [t for r in srounds for t in r.tpot]
            row += (
                f" {stps:>10.1f} {stps / tps:>7.2f}x {kept / max(drafted, 1):>8.0%} "
                f"{percentile(stpot, 50) * 1e3:>11.1f}ms"
            )
            row += f" (errors {sum(r.errors for r in srounds)})" if any(r.errors for r in srounds) else ""
        print(row)
    if spec:
        print(
            f"spec: the same model under --speculative mtp:{args.speculative}, its rounds alternated with plain's; "
            "accepted = kept / drafted MTP tokens"
        )
    print(f"HF sequential: {n_hf} requests, {hf_rps:.2f} req/s, {hf_tps:.1f} tok/s")
    at32 = next((r for r in results["plain"] if r[0].clients == 32), None)
    if at32:
        r = statistics.median(lv.tokens / lv.wall for lv in at32) / hf_tps
        print(f"goal >= 5x HF sequential at 32 clients: {r:.2f}x {'MET' if r >= 5 else 'NOT MET'}")
    print(
        f"\nbatch-1 decode: engine {ours_b1:.1f} tok/s, HF generate {hf_b1:.1f} tok/s, ratio {ours_b1 / hf_b1:.2f}x "
        f"(goal >= 2x: {'MET' if ours_b1 / hf_b1 >= 2 else 'NOT MET'})"
    )
    print(
        f"bandwidth limit: {per_token / 1e6:.1f} MB read per token / {bw / 1e9:.1f} GB/s copy bandwidth = "
        f"{limit:.0f} tok/s; engine at {100 * ours_b1 / limit:.0f}% of it"
    )


if __name__ == "__main__":
    main()
