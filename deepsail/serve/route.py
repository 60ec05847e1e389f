"""Edge/cloud routing: `deepsail serve --route edge=DIR --route cloud=DIR` serves both models, and a request whose
`model` is "auto" (the default) goes to one of them by its estimated difficulty.

    difficulty = mean prefill entropy of the edge model (nats) + length_weight x log2(prompt tokens)

The entropy is the edge model's own uncertainty about the prompt: at each prompt position, the entropy of its
next-token distribution, averaged. It comes from one prefill on the edge engine (a `prompt_logprobs` request that
generates one token), batched with everything else the edge is doing, and its full KV blocks stay in the prefix cache,
so a request routed to the edge does not pay for that prefill twice. Long prompts count as harder too: more context
to get wrong, and the cloud's longer context window.

The threshold is calibrated, not guessed: at startup the router scores held-out prompts (the embedded corpus's
validation split, or `--route-calibration FILE`) and takes the quantile that sends `--cloud-share` of them to the
cloud; `--route-threshold` sets it outright. benchmarks/route_bench.py measures quality and latency at several.

A client may also name "edge" or "cloud" itself. Either way the choice is in the response (`route` in the JSON
body and every stream chunk, and the `X-Deepsail-Route` header) and in /metrics (`deepsail_route_requests_total`
by target and mode, `deepsail_route_difficulty`, `deepsail_route_threshold`).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsail.infer.sampling import SamplingParams

EDGE, CLOUD, AUTO = "edge", "cloud", "auto"
TARGETS = (EDGE, CLOUD)
# Each doubling of the prompt adds this many nats: on the route_bench models a 16 -> 512 token prompt moves the
# difficulty by 1.25, about the spread of mean entropies between easy and hard prompts of one length.
DEFAULT_LENGTH_WEIGHT = 0.25
DEFAULT_CLOUD_SHARE = 0.3


def parse_routes(items: Sequence[str]) -> dict[str, str]:
    """["edge=DIR", "cloud=DIR"] -> {"edge": DIR, "cloud": DIR}; ValueError naming the problem otherwise."""
    routes: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or name not in TARGETS or not folder:
            raise ValueError(f"--route {item!r}: expected edge=DIR or cloud=DIR, e.g. --route edge=runs/int4")
        if name in routes:
            raise ValueError(f"--route {name}= given twice; give one folder per target")
        if not Path(folder).exists():
            raise ValueError(f"--route {name}={folder}: {folder} does not exist")
        routes[name] = folder
    if routes and set(routes) != set(TARGETS):
        missing = next(t for t in TARGETS if t not in routes)
        raise ValueError(f"--route needs both edge=DIR and cloud=DIR; {missing}= is missing")
    return routes


def difficulty(mean_entropy: float, prompt_tokens: int, length_weight: float = DEFAULT_LENGTH_WEIGHT) -> float:
    return mean_entropy + length_weight * math.log2(max(prompt_tokens, 1))


def mean_entropy(entropy: Sequence[float | None] | None) -> float:
    """Mean of a prompt's per-position entropies (the first token has none); 0 for a one-token prompt."""
    values = [h for h in entropy or () if h is not None]
    return sum(values) / len(values) if values else 0.0


def calibrate(scores: Sequence[float], cloud_share: float) -> float:
    """The threshold that sends `cloud_share` of these prompts to the cloud (difficulty > threshold): the
    (1 - share) quantile of their difficulties, halfway between neighbours so no calibration prompt sits on it."""
    if not 0 <= cloud_share <= 1:
        raise ValueError(f"cloud share {cloud_share}: must be between 0 and 1 (the fraction sent to the cloud)")
    if not scores:
        raise ValueError("calibration needs at least one prompt")
    s = sorted(scores)
    keep = round(len(s) * (1 - cloud_share))  # prompts at or below the threshold: the edge's
    if keep <= 0:
        return s[0] - 1.0
    if keep >= len(s):
        return s[-1] + 1.0
    return (s[keep - 1] + s[keep]) / 2


def held_out_prompts(n: int, seed: int = 0, part: int = 0, lengths: tuple[int, int] = (48, 2400)) -> list[str]:
    """`n` prompts cut from the embedded corpus's validation split, their lengths (characters) log-uniform in
    `lengths`. `part` 0 and 1 use disjoint halves of the files: calibration on one, benchmarks on the other."""
    from deepsail.data import default_corpus

    docs = [d.text for i, d in enumerate(default_corpus("val")) if i % 2 == part and len(d.text) > lengths[1] + 1]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(docs)
        size = int(math.exp(rng.uniform(math.log(lengths[0]), math.log(lengths[1]))))
        start = rng.randrange(0, len(text) - size)
        out.append(text[start : start + size])
    return out


def scoring_params() -> SamplingParams:
    """The edge request that measures a prompt: score every prompt token (entropy beside it), generate one token."""
    return SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, ignore_eos=True)


@dataclass
class RouteChoice:
    target: str  # "edge" | "cloud"
    mode: str  # "auto" (the router chose) | "explicit" (the client named it)
    difficulty: float | None = None
    threshold: float | None = None
    estimate_s: float = 0.0  # time spent estimating (the edge prefill)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "mode": self.mode}
        if self.difficulty is not None:
            out |= {"difficulty": round(self.difficulty, 4), "threshold": round(self.threshold, 4)}
        return out

    def header(self) -> str:
        if self.difficulty is None:
            return f"{self.target}; mode={self.mode}"
        return f"{self.target}; mode={self.mode}; difficulty={self.difficulty:.4f}; threshold={self.threshold:.4f}"


class Router:
    """Two served models and the rule between them. `threshold` may be changed at any time (benchmarks sweep it)."""

    def __init__(
        self,
        edge: Any,
        cloud: Any,
        threshold: float,
        length_weight: float = DEFAULT_LENGTH_WEIGHT,
        cloud_share: float | None = None,
    ) -> None:
        self.targets = {EDGE: edge, CLOUD: cloud}  # name -> app.Served
        self.threshold, self.length_weight, self.cloud_share = threshold, length_weight, cloud_share

    def decide(self, entropy: Sequence[float | None] | None, prompt_tokens: int, estimate_s: float) -> RouteChoice:
        d = difficulty(mean_entropy(entropy), prompt_tokens, self.length_weight)
        return RouteChoice(CLOUD if d > self.threshold else EDGE, AUTO, d, self.threshold, estimate_s)

    def estimate_blocking(self, ids: Sequence[int], timeout: float = 60.0) -> float:
        """Difficulty of one prompt, from a plain thread (calibration, benchmarks)."""
        handle = self.targets[EDGE].engine.submit(ids, scoring_params())
        handle.result(timeout)
        return difficulty(mean_entropy(handle.prompt_entropy), len(ids), self.length_weight)


class Engines:
    """The routed server's engines as one, for what the app does with "the engine": /metrics (counters and gauges
    summed, KV usage over both pools, the router's threshold) and shutdown (both, each within the bound)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def _all(self) -> list[Any]:
        return [served.engine for served in self.router.targets.values()]

    def stats(self) -> dict[str, Any]:
        per = [e.stats() for e in self._all()]
        out: dict[str, Any] = {}
        for s in per:
            for k, v in s.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("kv_usage", "block_size"):
                    out[k] = out.get(k, 0) + v
        out["kv_usage"] = out["kv_blocks_used"] / max(out["kv_blocks_total"], 1)
        out["route_threshold"] = self.router.threshold
        return out

    def shutdown(self, drain_timeout: float = 30.0) -> None:
        # the first drains while the second keeps running; then the second has what is left of the bound
        deadline = time.monotonic() + drain_timeout
        for e in self._all():
            e.shutdown(max(deadline - time.monotonic(), 0.0))
