"""Soak test: 1000 concurrent requests against `deepsail serve` on loopback, then check nothing leaked.

    python benchmarks/soak.py                  # 2 rounds of 1000 concurrent requests, deepseek-v3-small, <= 5 min
    python benchmarks/soak.py --quick          # 2 x 300 requests, the debug model

The mix, one request per client, all sent at once: streaming chat, non-streaming completions, /generate, and a
few clients that hang up after the first chunk (cancellations by design). The server's queue is far smaller than
the burst, so most requests first get 429; a client then waits Retry-After (plus jitter, so they do not return
in lockstep) and tries again. Pass criteria:
- every request ends 200 (or is a designed hang-up); 429s are counted but are not failures; nothing else
  (a reset before any response byte, i.e. the keep-alive race, is retried like openai's client does, and counted);
- afterwards the engine holds no KV blocks and no requests;
- the server's RSS settles near its warmed-up baseline after the first burst and does not grow with later ones
  (baseline, and peak / after per round, are printed). Two rounds by default, within --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import ServerProcess, make_model_dir


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def engine_gauges(c: httpx.Client) -> dict[str, float]:
    out = {}
    for line in c.get("/metrics").text.splitlines():
        for name in ("deepsail_num_requests_running", "deepsail_num_requests_waiting", "deepsail_kv_cache_blocks_used"):
            if line.startswith(name + " "):
                out[name.removeprefix("deepsail_")] = float(line.split()[1])
    return out


async def one(c: httpx.AsyncClient, i: int, max_tokens: int, deadline: float, outcomes: Counter) -> None:
    kind = ("chat_stream", "completion", "generate", "chat_stream", "completion")[i % 5]
    hang_up = i % 20 == 7  # 5% of clients leave after the first chunk
    if hang_up:
        kind = "chat_stream"
    if kind == "chat_stream":
        path, body = (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": f"Tell me about {i}"}],
                "max_tokens": max_tokens,
                "stream": True,
                "ignore_eos": True,
            },
        )
    elif kind == "completion":
        path, body = "/v1/completions", {"prompt": f"def f{i}(x):", "max_tokens": max_tokens, "seed": i}
    else:
        path, body = "/generate", {"prompt": f"Item {i}:", "max_tokens": max_tokens, "temperature": 0}
    attempt = resets = 0
    while True:
        attempt += 1
        phase = "sending"
        try:
            async with c.stream("POST", path, json=body) as r:
                status, retry = r.status_code, r.headers.get("retry-after")
                phase = f"got {status}"
                if status == 200 and kind == "chat_stream":
                    async for line in r.aiter_lines():
                        if hang_up and line.startswith("data: "):
                            outcomes["hung up (designed)"] += 1
                            return  # leaving the block closes the connection mid-stream
                        if line == "data: [DONE]":
                            break
                    else:
                        outcomes["stream ended without [DONE]"] += 1
                        return
                else:
                    await r.aread()
        except (httpx.ReadError, httpx.RemoteProtocolError) as e:
            # Reset before any response byte: the request went out on a pooled keep-alive connection just as the
            # server's idle timer closed it (a client several seconds behind under CPU starvation hits this).
            # The server never saw the request; HTTP clients, openai's included, retry exactly this case.
            if phase == "sending" and resets < 3:
                resets += 1
                outcomes["reset before response (retried)"] += 1
                continue
            outcomes[f"error {type(e).__name__} ({phase})"] += 1
            return
        except httpx.HTTPError as e:
            outcomes[f"error {type(e).__name__} ({phase})"] += 1
            return
        if status == 429:
            outcomes["429 (retried)"] += 1
            wait = float(retry or 1) * (0.5 + random.random())
            if time.monotonic() + wait > deadline:
                outcomes["gave up at deadline"] += 1
                return
            await asyncio.sleep(wait)
            continue
        outcomes["200" if status == 200 else f"HTTP {status}"] += 1
        return


async def burst(url: str, n: int, max_tokens: int, deadline: float, pid: int) -> tuple[Counter, float, float]:
    outcomes: Counter = Counter()
    peak = rss_mb(pid)
    # Idle connections expire on the client before the server's 5 s keep-alive closes them: with equal timeouts
    # a request can go out on a connection the server is closing at that instant (a reset that no server fixes).
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120, connect=30), limits=limits) as c:
        tasks = [asyncio.create_task(one(c, i, max_tokens, deadline, outcomes)) for i in range(n)]
        t0 = time.monotonic()
        while not all(t.done() for t in tasks):
            peak = max(peak, rss_mb(pid))
            await asyncio.wait(tasks, timeout=0.25)
        wall = time.monotonic() - t0
    return outcomes, wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="300 requests on the debug model")
    ap.add_argument("--requests", type=int, default=None, help="concurrent requests (default 1000, quick 300)")
    ap.add_argument(
        "--rounds", type=int, default=2, help="bursts in a row: a leak grows every round, a warm-up plateau does not"
    )
    ap.add_argument("--preset", default=None, help="default deepseek-v3-small (quick: deepseek-v3-debug)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=300, help="time bound for all rounds together")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    args = ap.parse_args()
    n = args.requests or (300 if args.quick else 1000)
    preset = args.preset or ("deepseek-v3-debug" if args.quick else "deepseek-v3-small")

    outcomes: Counter = Counter()
    walls, peaks, afters, gauges = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model_dir(Path(tmp) / "model", preset)
        server = ServerProcess(
            folder,
            "--threads",
            str(args.threads),
            "--max-batch-size",
            "64",
            "--max-waiting",
            "128",
            "--max-model-len",
            "256",
            log=Path(tmp) / "server.log",
        )
        try:
            server.wait_ready()
            pid = server.proc.pid
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for i in range(20):  # warm up every path once before taking the baseline
                    c.post("/v1/completions", json={"prompt": f"warm {i}", "max_tokens": args.max_tokens})
                    c.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": args.max_tokens,
                            "stream": True,
                        },
                    )
                time.sleep(1)
                baseline = rss_mb(pid)
                deadline = time.monotonic() + args.max_seconds
                for _ in range(args.rounds):
                    got, wall, peak = asyncio.run(burst(server.url, n, args.max_tokens, deadline, pid))
                    outcomes += got
                    # Wait for idle (nothing running or waiting, every block back), then let the allocator settle.
                    t_idle = time.monotonic()
                    while (g := engine_gauges(c)) and any(g.values()) and time.monotonic() - t_idle < 10:
                        time.sleep(0.1)
                    time.sleep(2)
                    walls.append(wall), peaks.append(peak), afters.append(rss_mb(pid))
                    gauges = engine_gauges(c)
                    if time.monotonic() > deadline:
                        break
        finally:
            rc = server.stop()
            log = (Path(tmp) / "server.log").read_text()

    total = n * len(walls)
    done = outcomes["200"] + outcomes["hung up (designed)"]
    retried = ("429 (retried)", "reset before response (retried)")
    failures = {k: v for k, v in outcomes.items() if k not in ("200", "hung up (designed)", *retried)}
    print(
        f"soak: {len(walls)} x {n} concurrent requests, {preset}, max_tokens={args.max_tokens}, server "
        f"max_batch_size=64 max_waiting=128, threads={args.threads}"
    )
    print(
        f"wall per round: {', '.join(f'{w:.1f}s' for w in walls)} (bound {args.max_seconds:.0f}s in all); "
        f"{outcomes['200'] / sum(walls):.1f} completed req/s"
    )
    for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<34}{v:>7}")
    print(f"completed {done}/{total}; failures: {sum(failures.values())} {failures or ''}")
    print(f"engine after: {gauges}")
    print(
        f"server RSS MB: baseline {baseline:.0f}; per round peak / after: "
        f"{', '.join(f'{p:.0f} / {a:.0f}' for p, a in zip(peaks, afters))}"
    )
    growth = afters[-1] - afters[0]
    print(f"  first round settles at {afters[0] - baseline:+.0f} MB over baseline; later rounds add {growth:+.0f} MB")
    print(f"server exit on SIGTERM: {rc}; tracebacks in its log: {log.count('Traceback')}")
    # A leak grows with every round; allocator warm-up (arenas, caches sized by the first burst) does not.
    ok = (
        not failures
        and done == total
        and not any(gauges.values())
        and growth < 0.02 * baseline + 5
        and afters[0] - baseline < 0.15 * baseline
    )
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
