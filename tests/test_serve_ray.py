"""`deepsail serve --replicas auto` (serve/ray.py): the design's 80% / 30% scaling rule, and, where Ray Serve is
installed (`pip install 'deepsail[ray]'`; not in the test extra, so CI skips it), a live deployment on loopback that
scales 1 -> 2 replicas under load and back with no failed request. The live test takes ~60-90 s on 2 cores (Ray's
own startup is ~25 s of it); run it with `pytest tests/test_serve_ray.py`."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from typer.testing import CliRunner

from deepsail.cli import app as cli_app
from deepsail.serve.ray import Replicas, ThresholdPolicy


def test_threshold_policy_is_the_designs_80_30_rule():
    p = ThresholdPolicy(capacity=10)  # 80% = 8 ongoing per replica, 30% = 3
    assert p.desired(1, 8) == 1 and p.desired(1, 9) == 2  # scale up only above 80%
    assert p.desired(2, 40) == 5  # enough replicas that each is back under 80%
    assert p.desired(3, 9.5) == 3 and p.desired(3, 8.9) == 2  # down below 30%, one at a time
    assert p.desired(0, 0) == 0 and p.desired(0, 1) == 1
    with pytest.raises(ValueError, match="min replicas"):
        Replicas(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="scale-down load"):
        Replicas(scale_up_load=0.3, scale_down_load=0.5)
    r = CliRunner().invoke(cli_app, ["serve", "/tmp", "--replicas", "many"], env={"COLUMNS": "300"})
    assert r.exit_code != 0 and "expected 1, auto, or a number of replicas" in r.output


def test_ray_deployment_scales_up_and_down_with_no_failures(tiny_model_dir):
    ray = pytest.importorskip("ray")
    from ray import serve

    from deepsail.serve import ServerConfig, load_served
    from deepsail.serve.ray import PUSH_INTERVAL_S, PUSH_VARS, deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: str(PUSH_INTERVAL_S) for k in PUSH_VARS}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        replicas = Replicas(max_replicas=2, capacity=2, upscale_delay_s=1, downscale_delay_s=4, num_cpus=1)
        load = lambda: load_served(tiny_model_dir, max_model_len=128, max_batch_size=2)  # noqa: E731
        serve.run(deployment(load, ServerConfig(model_name="tiny"), replicas), name="deepsail", route_prefix="/")

        def running() -> int:
            app = serve.status().applications["deepsail"]
            return app.deployments["deepsail"].replica_states.get("RUNNING", 0)

        assert running() == 1
        codes: list[int] = []
        peak = 1

        async def client(c: httpx.AsyncClient, stop: float) -> None:
            while time.monotonic() < stop and peak < 2:
                body = {"prompt": "def f(x):", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
                codes.append((await c.post(f"{url}/v1/completions", json=body)).status_code)

        async def load_for(seconds: float) -> None:
            nonlocal peak
            async with httpx.AsyncClient(timeout=60) as c:
                stop = time.monotonic() + seconds
                tasks = [asyncio.create_task(client(c, stop)) for _ in range(8)]  # 8 ongoing vs 80% of 2
                while time.monotonic() < stop and peak < 2:
                    await asyncio.sleep(0.5)
                    peak = max(peak, await asyncio.to_thread(running))
                await asyncio.gather(*tasks)

        asyncio.run(load_for(45))
        assert peak == 2, "never scaled up"
        deadline = time.monotonic() + 60
        while running() > 1:  # idle: back to min_replicas after the downscale delay
            assert time.monotonic() < deadline, "never scaled back down"
            time.sleep(0.5)
        assert codes and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
    finally:
        serve.shutdown()
        ray.shutdown()
