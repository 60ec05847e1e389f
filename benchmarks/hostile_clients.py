"""Hostile clients against `deepsail serve` on loopback: does one client's bad request cost the others?

    python benchmarks/hostile_clients.py            # ~1 minute on 2 cores

An ordinary client sends a 16-token completion, alone and then while these run at the same time:
- four 7 MB prompts (under the 8 MB body limit, far over the context);
- slow-loris bodies: Content-Length 1000, one byte every 2 s;
- half-open connections: connected, half a request line, then silence.
Printed: the ordinary request's latency alone and under attack (median of 5, and the ratio), what each attacker
got back and after how long, the server's RSS before and after, and how long tokenizing one 7 MB prompt takes
here (the work the server must not do for a prompt that cannot fit). Pass: each of the 5 ordinary requests stays
within 3x of the median latency alone, every attacker is answered (or cut off) within the server's timeouts, and
RSS returns to within 50 MB of where it was.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import ServerProcess, make_model_dir
from soak import rss_mb

BIG = "def f(x):\n    return x\n" * (7_000_000 // 24)  # ~7 MB of code-like text


async def ordinary(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/completions", json={"prompt": "import os", "max_tokens": 16, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0


async def big_prompt(url: str) -> tuple[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/completions", json={"prompt": BIG, "max_tokens": 16})
        return f"7 MB prompt -> {r.status_code}", time.perf_counter() - t0


async def raw(url: str, payload: bytes, trickle: bytes = b"", every: float = 2.0) -> tuple[str, float]:
    """Send `payload`, then `trickle` one byte per `every` seconds; return what came back and when."""
    host, port = urlparse(url).hostname, urlparse(url).port
    reader, writer = await asyncio.open_connection(host, port)
    t0 = time.perf_counter()
    writer.write(payload)
    await writer.drain()

    async def drip() -> None:
        for b in trickle:
            await asyncio.sleep(every)
            writer.write(bytes([b]))
            await writer.drain()

    dripper = asyncio.create_task(drip())
    try:
        reply = await asyncio.wait_for(reader.read(200), timeout=120)
    except (TimeoutError, ConnectionError):
        reply = b"(nothing: still open after 120 s)"
    dripper.cancel()
    writer.close()
    status = reply.split(b"\r\n")[0].decode(errors="replace") or "connection closed"
    return status, time.perf_counter() - t0


async def attack(url: str) -> tuple[list[float], list[tuple[str, float]]]:
    slow = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    attackers = [asyncio.create_task(big_prompt(url)) for _ in range(4)]
    attackers += [asyncio.create_task(raw(url, slow, b" " * 999)) for _ in range(3)]
    attackers += [asyncio.create_task(raw(url, b"POST /v1/comp")) for _ in range(3)]
    await asyncio.sleep(0.5)  # the attack is under way
    latencies = [await ordinary(url) for _ in range(5)]
    return latencies, [await a for a in attackers]


def main() -> None:
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min)")
    from deepsail.data import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model_dir(Path(tmp) / "model", "deepseek-v3-debug")
        tok = Tokenizer.load(folder)
        t0 = time.perf_counter()
        n = len(tok.encode(BIG))
        print(f"tokenizing one 7 MB prompt here: {time.perf_counter() - t0:.2f} s ({n:,} tokens; the context is 512)")
        server = ServerProcess(folder, "--threads", "1", "--max-model-len", "512")
        try:
            server.wait_ready()
            alone = [asyncio.run(ordinary(server.url)) for _ in range(5)]
            before = rss_mb(server.proc.pid)
            under, attackers = asyncio.run(attack(server.url))
            time.sleep(1)
            after = rss_mb(server.proc.pid)
        finally:
            server.stop()
    a, u = statistics.median(alone), statistics.median(under)
    print(
        f"ordinary 16-token request: alone {a * 1000:.0f} ms, under attack {u * 1000:.0f} ms "
        f"(median of 5; {u / a:.2f}x; worst {max(under) * 1000:.0f} ms)"
    )
    for what, seconds in attackers:
        print(f"  attacker: {what!r:<40} after {seconds:6.2f} s")
    print(f"server RSS: {before:.0f} MB before the attack, {after:.0f} MB after")
    ok = max(under) / a < 3 and all("nothing" not in w for w, _ in attackers) and after - before < 50
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
