"""Elastic replicas: `deepsail serve PATH --replicas auto` runs the same app as a Ray Serve deployment whose replica
count follows the load (`pip install 'deepsail[ray]'`). On a laptop it starts a local Ray; with RAY_ADDRESS set (or
inside `ray job submit`) it joins that cluster, so one command serves on either.

Each replica loads the model in its constructor (Ray routes nothing to it until that returns, so no client sees the
"loading" 503) and serves the unchanged FastAPI app (`app.create_app`): the OpenAI endpoints, API keys, the chat page
and /metrics behave exactly as under plain `deepsail serve`.

Scaling follows the design's rule, not Ray's default proportional one: a replica's load is its ongoing requests over
its capacity (`--max-batch-size`, the rows its engine decodes at once); above 80% the deployment grows to bring the
load back under 80%, below 30% it gives back one replica at a time. Ray applies min/max and the delays (upscale
after `upscale_delay_s` of sustained load, downscale after `downscale_delay_s`), so a short dip does not drop a warm
replica. benchmarks/ray_ramp.py shows the trace on loopback.

Kubernetes without Ray: run plain `deepsail serve` per pod and let an HPA scale on the per-pod Prometheus gauges
(deploy/hpa.yaml and its README).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("deepsail.serve")

SCALE_UP_LOAD = 0.8  # the design's thresholds: scale_up above 80% of capacity ...
SCALE_DOWN_LOAD = 0.3  # ... scale_down below 30%
PUSH_INTERVAL_S = 1.0
PUSH_VARS = (
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
)


@dataclass
class Replicas:
    """How many replicas, and when to change that."""

    min_replicas: int = 1
    max_replicas: int = 4
    capacity: int = 32  # concurrent requests one replica is sized for: its engine's max_batch_size
    scale_up_load: float = SCALE_UP_LOAD
    scale_down_load: float = SCALE_DOWN_LOAD
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    num_cpus: float = 1.0  # Ray CPUs per replica (its torch threads too)

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min replicas <= max replicas, got {self.min_replicas} and {self.max_replicas}")
        if not 0 < self.scale_down_load < self.scale_up_load <= 1:
            raise ValueError(
                f"need 0 < scale-down load < scale-up load <= 1, got {self.scale_down_load} and {self.scale_up_load}"
            )
        if self.capacity < 1 or self.num_cpus <= 0:
            raise ValueError(f"capacity ({self.capacity}) and CPUs per replica ({self.num_cpus}) must be positive")


class ThresholdPolicy:
    """Ray Serve autoscaling policy: scale up above `up` load, down below `down` (fractions of `capacity` per
    replica). Ray calls it every control loop with the deployment's ongoing requests, then clamps to min/max and
    applies the delays."""

    def __init__(self, capacity: int, up: float = SCALE_UP_LOAD, down: float = SCALE_DOWN_LOAD) -> None:
        self.capacity, self.up, self.down = capacity, up, down

    def desired(self, replicas: int, ongoing: float) -> int:
        if replicas == 0:
            return 1 if ongoing > 0 else 0
        load = ongoing / (replicas * self.capacity)
        if load > self.up:  # enough replicas that each is back under `up`
            return max(replicas + 1, math.ceil(ongoing / (self.capacity * self.up)))
        if load < self.down:  # one at a time: the next loop looks again
            return replicas - 1
        return replicas

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        total = ctx.total_num_requests() if callable(ctx.total_num_requests) else ctx.total_num_requests
        return self.desired(ctx.current_num_replicas, float(total)), {}


def deployment(load: Callable[[], Any], cfg: Any, replicas: Replicas, name: str = "deepsail") -> Any:
    """The Ray Serve application (bound deployment): each replica runs `load()` and serves `create_app` on it."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    from deepsail.serve.app import create_app

    threads = max(1, int(replicas.num_cpus))

    @serve.ingress()
    class Deepsail:
        def __init__(self) -> None:
            import torch

            torch.set_num_threads(threads)  # Ray sets OMP_NUM_THREADS from num_cpus; torch's pool needs it too
            self.served = load()

        def __serve_build_asgi_app__(self) -> Any:
            return create_app(lambda: self.served, cfg)

        def check_health(self) -> None:
            # Ray restarts a replica whose engine thread died (a failed step fails its requests, not the thread)
            thread = getattr(self.served.engine, "_thread", None)
            if thread is not None and not thread.is_alive():
                raise RuntimeError("the engine's step thread is not running")

    autoscaling = AutoscalingConfig(
        min_replicas=replicas.min_replicas,
        max_replicas=replicas.max_replicas,
        initial_replicas=replicas.min_replicas,
        target_ongoing_requests=replicas.capacity * replicas.scale_up_load,  # what Ray's own dashboards show
        upscale_delay_s=replicas.upscale_delay_s,
        downscale_delay_s=replicas.downscale_delay_s,
        # Replicas report every PUSH_INTERVAL_S (set in `run`); Ray wants the averaging window longer than its
        # default 10 s report interval, and this window is the lag between a load change and the decision.
        look_back_period_s=12.0,
        policy=AutoscalingPolicy(
            policy_function=ThresholdPolicy,
            policy_kwargs={
                "capacity": replicas.capacity,
                "up": replicas.scale_up_load,
                "down": replicas.scale_down_load,
            },
        ),
    )
    return serve.deployment(
        Deepsail,
        name=name,
        autoscaling_config=autoscaling,
        # Twice the batch per replica: the engine's queue absorbs bursts; beyond that Ray's proxy queues the rest
        # (the engine's own max_waiting still answers 429 if a client outruns both).
        max_ongoing_requests=2 * replicas.capacity,
        ray_actor_options={"num_cpus": replicas.num_cpus},
        logging_config={
            "enable_access_log": False,
            "log_level": "WARNING",
        },  # as `deepsail serve`: no per-request lines
        health_check_period_s=10,
    ).bind()


def run(load: Callable[[], Any], cfg: Any, replicas: Replicas, host: str, port: int) -> None:
    """Start (or join, with RAY_ADDRESS) Ray, deploy, and serve until Ctrl-C / SIGTERM."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError(
            "--replicas auto runs on Ray Serve, which is not installed; pip install 'deepsail[ray]'"
        ) from e
    # Ray's replicas report their ongoing requests every 10 s by default: a ramp would be half over before the
    # controller saw it. 1 s costs one small message per replica per second.
    push = {k: os.environ.get(k, str(PUSH_INTERVAL_S)) for k in PUSH_VARS}
    os.environ.update(push)  # a local Ray's processes inherit this environment
    ray.init(
        address=os.environ.get("RAY_ADDRESS"),
        include_dashboard=False,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": push},  # a cluster's workers get it this way
    )
    serve.start(http_options={"host": host, "port": port})
    log.info(
        "Ray Serve: %d-%d replicas, scale up above %.0f%% / down below %.0f%% of %d requests each; on http://%s:%d",
        replicas.min_replicas,
        replicas.max_replicas,
        100 * replicas.scale_up_load,
        100 * replicas.scale_down_load,
        replicas.capacity,
        host,
        port,
    )
    try:
        serve.run(deployment(load, cfg, replicas), name="deepsail", route_prefix="/", blocking=True)
    finally:
        serve.shutdown()
        ray.shutdown()
