"""Soak test: 1000 concurrent requests against `deepsail serve` on loopback, then check nothing leaked.

    python benchmarks/soak.py                  # 2 rounds of 1000 concurrent requests, deepseek-v3-small, <= 5 min
    python benchmarks/soak.py --quick          # 2 x 300 requests, the debug model

The server runs everything at once: MTP speculation (--speculative mtp, the model keeps its MTP head) and a LoRA
adapter served beside the base. The mix, one request per client, all sent at once: streaming chat (sampled: the
speculative rows' rejection sampling), non-streaming completions (seeded), /generate (greedy), structured output
(response_format json_schema, non-streaming chat: a reply that ends "stop" must parse and validate, or it counts as a
failure), completions through the adapter, and a few clients that hang up after the first chunk (cancellations by
design). The server's queue is far smaller than the burst, so most requests first get 429; a client then waits
Retry-After (plus jitter, so they do not return in lockstep) and tries again. Pass criteria:
- every request ends 200 (or is a designed hang-up); 429s are counted but are not failures; nothing else
  (a reset before any response byte, i.e. the keep-alive race, is retried like openai's client does, and counted);
- afterwards the engine holds no KV blocks and no requests;
- the server's RSS settles near its warmed-up baseline after the first burst and does not grow with later ones
  (baseline, and peak / after per round, are printed). The baseline is taken after one warm-up burst at full
  batch: the KV pool's pages are only touched (and counted in RSS) once blocks are first used.
Two rounds by default, within --max-seconds. `--routes` soaks a routed server instead (`--route edge=... --route
cloud=...`, a second random model of the preset as the edge): the adapter's share of requests names auto, edge or
cloud, the rest route auto; the same pass criteria, summed over both engines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import ServerProcess, make_model_dir

KINDS = ("chat_stream", "completion", "generate", "structured", "adapter")
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


def make_adapter(model_dir: Path, folder: Path) -> Path:
    """A LoRA adapter (r=4, random B so it changes the output) for `deepsail serve --adapter tuned=DIR`."""
    import torch

    import deepsail as ds
    from deepsail.tune.lora import LoraConfig, apply_lora

    model = ds.from_pretrained(model_dir, dtype="fp32")
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q_a_proj", "kv_b_proj", "o_proj")))  # attention only
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return model.save_adapter(folder)


def valid_structured(text: str) -> bool:
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(doc, dict)
        and set(doc) == {"name", "n"}
        and isinstance(doc["name"], str)
        and len(doc["name"]) <= 10
        and type(doc["n"]) is int
        and 0 <= doc["n"] <= 99
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def engine_gauges(c: httpx.Client) -> dict[str, float]:
    """Running/waiting requests and KV blocks in use, summed over engines (a routed server labels each by model)."""
    out: dict[str, float] = {}
    for line in c.get("/metrics").text.splitlines():
        for name in ("deepsail_num_requests_running", "deepsail_num_requests_waiting", "deepsail_kv_cache_blocks_used"):
            if line.startswith((name + " ", name + "{")):
                key = name.removeprefix("deepsail_")
                out[key] = out.get(key, 0.0) + float(line.split()[-1])
    return out


def wait_idle(c: httpx.Client) -> None:
    """Until nothing runs or waits and every KV block is back (at most 10 s), then 2 s for the allocator to settle."""
    t0 = time.monotonic()
    while (g := engine_gauges(c)) and any(g.values()) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    time.sleep(2)


ROUTED = False  # --routes: the server routes edge/cloud; "adapter" requests go to a route instead


async def one(c: httpx.AsyncClient, i: int, max_tokens: int, deadline: float, outcomes: Counter) -> None:
    kind = KINDS[i % len(KINDS)]
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
    elif kind == "adapter":
        model = ("auto", "edge", "cloud")[i % 3] if ROUTED else "tuned"
        path, body = "/v1/completions", {"prompt": f"x{i} =", "max_tokens": max_tokens, "model": model, "seed": i}
    elif kind == "structured":
        fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
        path, body = (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": f"Item {i} as JSON"}],
                "max_tokens": 4 * max_tokens,  # room for the whole object: 2 keys, a bounded string and number
                "response_format": fmt,
                "seed": i,
            },
        )
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
                    if status == 200 and kind == "structured":
                        choice = r.json()["choices"][0]
                        if choice["finish_reason"] == "stop" and not valid_structured(choice["message"]["content"]):
                            outcomes["structured output invalid"] += 1
                            return
                        outcomes[f"structured {choice['finish_reason']}"] += 1
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
    ap.add_argument(
        "--routes",
        action="store_true",
        help="serve --route edge=... --route cloud=... instead (a second random model of the preset as the edge); "
        "the adapter's share of requests goes to model auto / edge / cloud, and the rest route auto",
    )
    args = ap.parse_args()
    global ROUTED
    ROUTED = args.routes
    n = args.requests or (300 if args.quick else 1000)
    preset = args.preset or ("deepseek-v3-debug" if args.quick else "deepseek-v3-small")

    outcomes: Counter = Counter()
    walls, peaks, afters, gauges = [], [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model_dir(Path(tmp) / "model", preset, mtp=True)
        if args.routes:
            edge = make_model_dir(Path(tmp) / "edge", preset, seed=1)
            served = ["--route", f"edge={edge}", "--route", f"cloud={folder}", "--cloud-share", "0.5"]
        else:
            adapter = make_adapter(folder, Path(tmp) / "adapter")
            served = [str(folder), "--speculative", "mtp", "--adapter", f"tuned={adapter}"]
        server = ServerProcess(
            None,
            *served,
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
                    side = ("edge", "cloud")[i % 2] if args.routes else "tuned"
                    c.post("/v1/completions", json={"prompt": f"warm {i}", "max_tokens": 4, "model": side})
                    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
                    c.post(
                        "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "response_format": fmt},
                    )
                    c.post(
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": args.max_tokens,
                            "stream": True,
                        },
                    )
                # ... then one burst of twice the batch: the KV pool's pages, MoE buffers and malloc arenas reach
                # their full-batch size (the pool is allocated lazily, zero pages until a block is first written:
                # 94 MB of deepseek-v3-small's grow into RSS only under load). That working set is the baseline.
                cold = rss_mb(pid)
                warm, _, _ = asyncio.run(burst(server.url, 128, args.max_tokens, time.monotonic() + 60, pid))
                wait_idle(c)
                baseline = rss_mb(pid)
                deadline = time.monotonic() + args.max_seconds
                for _ in range(args.rounds):
                    got, wall, peak = asyncio.run(burst(server.url, n, args.max_tokens, deadline, pid))
                    outcomes += got
                    wait_idle(c)
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
    counted = ("200", "hung up (designed)", "structured stop", "structured length", *retried)  # not failures
    failures = {k: v for k, v in outcomes.items() if k not in counted}
    print(
        f"soak: {len(walls)} x {n} concurrent requests ({', '.join(KINDS)}, hang-ups), {preset}, "
        f"max_tokens={args.max_tokens}, server "
        f"{'--route edge --route cloud' if args.routes else '--speculative mtp --adapter tuned'}, "
        "max_batch_size=64 max_waiting=128, "
        f"threads={args.threads}; load {os.getloadavg()[0]:.1f}"
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
        f"server RSS MB: after the sequential warm-up {cold:.0f}, after a 128-request warm-up burst (the baseline) "
        f"{baseline:.0f} ({warm['200'] + warm['hung up (designed)']} requests done, "
        f"{sum(v for k, v in warm.items() if k.startswith(('error', 'HTTP', 'stream', 'structured output')))} "
        f"failed); per round peak / after: "
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
