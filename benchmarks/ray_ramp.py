"""`deepsail serve --replicas auto` under a load ramp on loopback: clients go 1 -> 256 and back to 0, and the trace
shows Ray Serve's replica count following (the design's rule: up above 80% of a replica's batch, down below 30%),
with every request's outcome counted. Needs `pip install 'deepsail[ray]'`.

    python benchmarks/ray_ramp.py                                # tiny random model, 1-4 replicas
    python benchmarks/ray_ramp.py --model runs/default --max-replicas 8 --stage-s 20

Each client loops on /v1/completions (greedy, ignore_eos, --max-tokens) through Ray's proxy. Stages: 1, 4, 16, 64,
128, 256 clients, then 16, then 0 while replicas drain back to --min-replicas. The trace prints one line a second:
clients, running replicas, requests done and failed in that second. A failure is any status but 200 (the design
allows 429s; none are expected here: Ray's proxy queues what replicas cannot take).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: a tiny random model)")
    ap.add_argument("--min-replicas", type=int, default=1)
    ap.add_argument("--max-replicas", type=int, default=4)
    ap.add_argument("--max-batch-size", type=int, default=8, help="per replica: its capacity for the 80/30 rule")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stage-s", type=float, default=15.0, help="seconds per ramp stage")
    ap.add_argument("--drain-s", type=float, default=60.0, help="seconds at 0 clients at the end")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    # 1 CPU per replica on a 2-core machine caps the deployment at 2 replicas however many the policy asks for
    # (measured: the controller asked for 4 at 256 clients, 2 ran)
    ap.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per replica")
    args = ap.parse_args()

    import ray
    from ray import serve

    from deepsail.serve import ServerConfig, load_served
    from deepsail.serve.ray import PUSH_INTERVAL_S, PUSH_VARS, Replicas, deployment

    model = args.model
    if model is None:
        from serve_bench import make_model_dir

        model = make_model_dir(Path(tempfile.mkdtemp()), "deepseek-v3-debug")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/completions"
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min); ray {ray.__version__}")
    env = {k: str(PUSH_INTERVAL_S) for k in PUSH_VARS}
    os.environ.update(env)
    ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="ERROR")
    replicas = Replicas(
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        capacity=args.max_batch_size,
        upscale_delay_s=2.0,
        downscale_delay_s=10.0,
        num_cpus=args.replica_cpus,
    )
    t0 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    load = lambda: load_served(model, max_batch_size=args.max_batch_size, max_model_len=256)  # noqa: E731
    serve.run(deployment(load, ServerConfig(), replicas), name="deepsail", route_prefix="/")
    print(f"deployed in {time.monotonic() - t0:.1f} s")

    def running() -> int:
        return serve.status().applications["deepsail"].deployments["deepsail"].replica_states.get("RUNNING", 0)

    stages = [1, 4, 16, 64, 128, 256, 16, 0]
    outcome: dict[int, int] = {}
    latencies: list[float] = []
    per_second: list[list[int]] = []  # [done, failed] in each second of the trace
    target = 0  # clients wanted now

    async def client(i: int, c: httpx.AsyncClient) -> None:
        body = {"prompt": f"def f{i}(x):", "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
        while True:
            while i >= target:
                await asyncio.sleep(0.05)
            t = time.monotonic()
            try:
                code = (await c.post(url, json=body)).status_code
            except httpx.HTTPError:
                code = -1
            outcome[code] = outcome.get(code, 0) + 1
            latencies.append(time.monotonic() - t)
            if per_second:
                per_second[-1][0 if code == 200 else 1] += 1

    async def run() -> None:
        nonlocal target
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            tasks = [asyncio.create_task(client(i, c)) for i in range(max(stages))]
            print(f"\n{'t s':>5}{'clients':>9}{'replicas':>10}{'done/s':>8}{'failed':>8}")
            start = time.monotonic()
            for stage in stages:
                target = stage
                end = time.monotonic() + (args.drain_s if stage == 0 else args.stage_s)
                while time.monotonic() < end:
                    per_second.append([0, 0])
                    await asyncio.sleep(1.0)
                    n = await asyncio.to_thread(running)
                    done, failed = per_second[-1]
                    print(f"{time.monotonic() - start:>5.0f}{stage:>9}{n:>10}{done:>8}{failed:>8}", flush=True)
                    if stage == 0 and n == args.min_replicas and not any(i < target for i in range(1)):
                        break
            for t in tasks:
                t.cancel()

    try:
        asyncio.run(run())
    finally:
        serve.shutdown()
        ray.shutdown()
    ok = outcome.get(200, 0)
    failed = sum(v for k, v in outcome.items() if k != 200)
    print(
        f"\n{ok + failed} requests: {ok} ok, {failed} failed {dict(outcome)}; latency p50 "
        f"{statistics.median(latencies):.2f} s, max {max(latencies):.2f} s; load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
