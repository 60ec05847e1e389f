"""Edge/cloud routing (`deepsail serve --route`): quality and latency of all-edge, all-cloud and `auto` at several
calibrated thresholds, on held-out text, through the real server on loopback.

    python benchmarks/route_bench.py --edge runs/edge --cloud runs/cloud
    python benchmarks/route_bench.py --edge runs/edge --cloud runs/cloud --prompts 32 --max-tokens 16 --threads 1

The two folders must share a tokenizer (e.g. `deepsail run --model-preset deepseek-v3-mini --out runs/cloud`, then
`deepsail pretrain --data runs/cloud/data --model-preset deepseek-v3-debug --out runs/edge`).

What runs:
1. `app.load_routed` serves both models; the calibration prompts (64, from one half of the embedded corpus's validation
   files) give each target cloud share its threshold;
2. test prompts come from the other half: a prompt (48-2400 characters, log-uniform) and the 400 characters after it;
3. quality per prompt and model: next-token accuracy and loss of the model on the continuation, teacher-forced
   (/v1/completions with echo + logprobs, one request per prompt and model);
4. latency: every prompt as one generation request (greedy, --max-tokens, ignore_eos), one at a time, for all-edge
   (`model: edge`), all-cloud (`model: cloud`) and `auto` at each threshold; end-to-end seconds per request. `auto`
   includes its estimate (an edge prefill). Its quality is that of the model it chose, per prompt;
5. beside each `auto` row, the oracle at the same cloud share: the prompts where the cloud gains most sent to it.

Goal (issue 15): auto reaches >= 95% of all-cloud accuracy at <= 50% of its mean latency.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def test_pairs(n: int, seed: int = 1, continuation: int = 400) -> list[tuple[str, str]]:
    """(prompt, continuation) from the half of the validation files calibration does not use (part 1)."""
    from deepsail.data import default_corpus

    lo, hi = 48, 2400
    docs = [d.text for i, d in enumerate(default_corpus("val")) if i % 2 == 1 and len(d.text) > hi + continuation + 1]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = rng.choice(docs)
        size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        start = rng.randrange(0, len(text) - size - continuation)
        out.append((text[start : start + size], text[start + size : start + size + continuation]))
    return out


class Server:
    """The app on loopback in a thread, so the benchmark can move the router's threshold between runs."""

    def __init__(self, app) -> None:
        import uvicorn

        from deepsail.serve.app import uvicorn_config

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready in 600 s")
            time.sleep(0.2)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def quality(http: httpx.Client, model: str, prompt_ids: list[int], cont_ids: list[int]) -> tuple[float, float]:
    """(next-token accuracy, mean loss) of `model` on the continuation, teacher-forced, through /v1/completions."""
    body = {"model": model, "prompt": prompt_ids + cont_ids, "max_tokens": 1, "echo": True, "logprobs": 1}
    r = http.post("/v1/completions", json=body)
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    n = len(prompt_ids)
    span = range(n, n + len(cont_ids))
    losses = [-lp["token_logprobs"][i] for i in span]
    # the top-1 entry's logprob equals the actual token's exactly when the model's first choice was that token
    hits = [abs(max(lp["top_logprobs"][i].values()) - lp["token_logprobs"][i]) < 1e-6 for i in span]
    return sum(hits) / len(hits), sum(losses) / len(losses)


def run_latency(
    http: httpx.Client, model: str, prompts: list[list[int]], max_tokens: int
) -> tuple[list[float], list[str]]:
    """End-to-end seconds per request, one at a time, and where each ran."""
    secs, targets = [], []
    for ids in prompts:
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json=body)
        secs.append(time.perf_counter() - t0)
        r.raise_for_status()
        targets.append(r.json()["route"]["target"])
    return secs, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edge", required=True, type=Path)
    ap.add_argument("--cloud", required=True, type=Path)
    ap.add_argument("--prompts", type=int, default=48, help="test prompts")
    ap.add_argument("--calibration", type=int, default=64, help="held-out calibration prompts")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per latency request")
    ap.add_argument("--shares", default="0.2,0.3,0.5,0.7,0.9", help="target cloud shares to calibrate auto for")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from deepsail.serve import ServerConfig, create_app
    from deepsail.serve.app import load_routed
    from deepsail.serve.route import calibrate, held_out_prompts

    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (1 min), "
        f"torch {torch.__version__} {torch.get_num_threads()} threads"
    )
    served = load_routed({"edge": args.edge, "cloud": args.cloud}, threshold=0.0, max_batch_size=4)
    router = served.router
    tok = served.tokenizer
    limit = served.max_model_len - args.max_tokens - 1
    t0 = time.perf_counter()
    # calibration prompts are cut exactly as the test prompts are below (their last limit // 2 tokens): the length
    # term must see the same distribution, or the realised share drifts (measured: 3% to the cloud for a 30% target)
    calib = [router.estimate_blocking(tok.encode(p)[-(limit // 2) :]) for p in held_out_prompts(args.calibration)]
    print(f"calibration: {len(calib)} prompts scored by the edge in {time.perf_counter() - t0:.1f} s")
    shares = [float(s) for s in args.shares.split(",")]
    thresholds = {s: calibrate(calib, s) for s in shares}

    cfg = ServerConfig()
    server = Server(create_app(lambda: served, cfg))
    try:
        pairs = test_pairs(args.prompts)
        encoded = []
        for prompt, cont in pairs:
            p_ids = tok.encode(prompt)[-(limit // 2) :]
            c_ids = tok.encode(cont)[: max(8, limit - len(p_ids))][:64]
            encoded.append((p_ids, c_ids))
        with httpx.Client(base_url=server.url, timeout=300) as http:
            q = {m: [quality(http, m, p, c) for p, c in encoded] for m in ("edge", "cloud")}
            prompts = [p for p, _ in encoded]
            run_latency(http, "edge", prompts[:2], args.max_tokens)  # warm both paths once
            run_latency(http, "cloud", prompts[:2], args.max_tokens)
            rows = []
            for name, model, threshold in [("all-edge", "edge", None), ("all-cloud", "cloud", None)] + [
                (f"auto share {s:.0%}", "auto", thresholds[s]) for s in shares
            ]:
                if threshold is not None:
                    router.threshold = threshold
                load = os.getloadavg()[0]
                secs, targets = run_latency(http, model, prompts, args.max_tokens)
                acc = statistics.mean(q[t][i][0] for i, t in enumerate(targets))
                loss = statistics.mean(q[t][i][1] for i, t in enumerate(targets))
                rows.append(
                    dict(name=name, threshold=threshold, targets=targets, secs=secs, acc=acc, loss=loss, load=load)
                )
    finally:
        server.close()
        served.engine.shutdown(5)

    cloud = next(r for r in rows if r["name"] == "all-cloud")
    gain = sorted(range(len(encoded)), key=lambda i: q["cloud"][i][0] - q["edge"][i][0], reverse=True)
    print(
        f"\n{len(encoded)} held-out prompts ({statistics.median(len(p) for p, _ in encoded)} tokens median), "
        f"{args.max_tokens} generated tokens each, one request at a time; quality on the next "
        f"{statistics.median(len(c) for _, c in encoded)} tokens (median), teacher-forced\n"
    )
    head = (
        f"{'route':<17}{'threshold':>10}{'cloud':>7}{'accuracy':>10}{'vs cloud':>9}{'loss':>7}"
        f"{'mean s':>8}{'vs cloud':>9}{'p50 s':>7}{'p99 s':>7}{'oracle acc':>11}{'goal':>6}{'load':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        share = sum(t == "cloud" for t in r["targets"]) / len(r["targets"])
        k = round(share * len(encoded))
        oracle = statistics.mean(q["cloud" if i in set(gain[:k]) else "edge"][i][0] for i in range(len(encoded)))
        mean = statistics.mean(r["secs"])
        acc_ratio = r["acc"] / cloud["acc"] if cloud["acc"] else float("nan")
        lat_ratio = mean / statistics.mean(cloud["secs"])
        goal = "yes" if acc_ratio >= 0.95 and lat_ratio <= 0.5 else "no"
        r |= dict(share=share, oracle=oracle, acc_ratio=acc_ratio, lat_ratio=lat_ratio, goal=goal)
        thr = "" if r["threshold"] is None else f"{r['threshold']:.3f}"
        print(
            f"{r['name']:<17}{thr:>10}{share:>7.0%}{r['acc']:>10.3f}{acc_ratio:>9.1%}{r['loss']:>7.3f}"
            f"{mean:>8.3f}{lat_ratio:>9.1%}{percentile(r['secs'], 50):>7.3f}{percentile(r['secs'], 99):>7.3f}"
            f"{oracle:>11.3f}{goal:>6}{r['load']:>6.2f}"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.out:
        from deepsail.files import atomic_write_json

        atomic_write_json(args.out, {"rows": rows, "quality": q, "calibration": calib})


if __name__ == "__main__":
    main()
