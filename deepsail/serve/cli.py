"""The `deepsail serve` verb: an OpenAI-compatible HTTP server (uvicorn) over the continuous-batching engine."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from deepsail.infer.cli import Device, DType

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "tb": 1 << 40,
    "tib": 1 << 40,
}


def parse_bytes(text: str) -> int:
    """ "4GiB", "512MB", "1.5g", "1073741824" -> bytes. Binary units throughout: a KV budget is a memory size."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise typer.BadParameter(f"{text!r} is not a size; write e.g. 4GiB, 512MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def serve_command(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="A model dir (config.json + *.safetensors + tokenizer.json) or a deepsail training run folder "
            "(its checkpoints/latest is served). Not with --route.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Interface to bind. The default is loopback only; pass 0.0.0.0 to "
            "accept other machines (and set --api-key)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DEEPSAIL_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health. Prefer the env var: a flag shows "
            "up in `ps`.",
        ),
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Requests decoded together in one step.")] = 32,
    kv_budget: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="KV cache size, e.g. 4GiB. Default: room for max-batch-size full-length requests, "
            "capped at 1/4 of free GPU memory (2 GiB on CPU).",
        ),
    ] = None,
    max_waiting: Annotated[int, typer.Option(help="Queued requests beyond which new ones get 429.")] = 256,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            show_default=False, help="Prompt + max_tokens limit. Default: the model's max_position_embeddings."
        ),
    ] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="On SIGTERM/Ctrl-C: seconds in-flight requests get to finish before they are cut off.")
    ] = 30.0,
    served_model_name: Annotated[
        str | None,
        typer.Option(show_default=False, help="Model id in /v1/models and responses. Default: the folder's name."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            show_default=False,
            help="A LoRA adapter (peft format) served beside the base, NAME=DIR; repeat for more. A request whose "
            "`model` is NAME runs with it, in the same batches as the base.",
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            help="Run decode steps through one compiled graph (torch.compile): ~2x the decode tok/s on CPU, after a "
            "first compile of 20-40 s while the server warms up."
        ),
    ] = False,
    speculative: Annotated[
        str,
        typer.Option(
            help="mtp: MTP self-speculative decoding inside the batches (models with an MTP head, e.g. DeepSeek-V3 "
            "style): each decoding request drafts tokens with the head and the step's forward verifies them, greedy "
            "output unchanged, sampled output in the same distribution (rejection sampling). mtp:K drafts K per "
            "step (mtp = mtp:1). Acceptance per request is in /metrics. Steps run eager (not with --compile's graph).",
        ),
    ] = "off",
    route: Annotated[
        list[str] | None,
        typer.Option(
            show_default=False,
            help="Edge/cloud routing instead of PATH: --route edge=DIR --route cloud=DIR serves both (same "
            'tokenizer); a request\'s `model` "auto" (the default) goes to one by estimated difficulty, "edge" or '
            '"cloud" to that one.',
        ),
    ] = None,
    cloud_share: Annotated[
        float,
        typer.Option(
            help="With --route: the share of held-out prompts the calibrated threshold sends to the cloud.",
        ),
    ] = 0.3,
    route_threshold: Annotated[
        float | None,
        typer.Option(
            show_default=False,
            help="With --route: the difficulty above which `auto` goes to the cloud, instead of calibrating one.",
        ),
    ] = None,
    route_calibration: Annotated[
        Path | None,
        typer.Option(
            show_default=False,
            help='With --route: held-out prompts to calibrate on, JSONL with "prompt" (text) per line. Default: '
            "64 cut from the embedded corpus's validation split.",
        ),
    ] = None,
    replicas: Annotated[
        str,
        typer.Option(
            help="1: this process serves. auto: a Ray Serve deployment autoscaled between --min-replicas and "
            "--max-replicas (scale up above 80% of --max-batch-size ongoing requests per replica, down below 30%); "
            "N: N Ray replicas. Needs pip install 'deepsail[ray]'; joins the cluster in RAY_ADDRESS if set.",
        ),
    ] = "1",
    min_replicas: Annotated[int, typer.Option(help="With --replicas auto: the fewest replicas.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="With --replicas auto: the most replicas.")] = 4,
    replica_cpus: Annotated[
        float, typer.Option(help="With --replicas: Ray CPUs (and torch threads) per replica.")
    ] = 1.0,
    device: Device = "auto",
    dtype: DType = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            show_default=False,
            help="CPU threads for the model's math (llama.cpp's --threads). Default: the cores that are "
            "idle at start (deepsail/threads.py). On a busy or shared CPU, fewer threads than cores is much faster.",
        ),
    ] = None,
) -> None:
    """Serve a model over HTTP with OpenAI's API.

    Endpoints: /v1/chat/completions and /v1/completions (SSE with "stream": true), /v1/models, /generate (plain
    JSON), /health (503 while loading), /metrics (Prometheus). Any OpenAI client works:
    base_url="http://127.0.0.1:8000/v1".

    \b
    Examples:
      deepsail serve runs/base --port 8000
      deepsail serve runs/base --compile              # compiled decode steps
      deepsail serve runs/base --speculative mtp      # MTP self-speculative decoding in the batches
      deepsail serve runs/base --adapter finance=runs/finance/adapter --adapter law=runs/law/adapter
      deepsail serve --route edge=runs/int4 --route cloud=runs/base --cloud-share 0.3   # model "auto" routes
      deepsail serve runs/base --replicas auto --max-replicas 8 --max-batch-size 16   # Ray Serve, autoscaled
      DEEPSAIL_API_KEY=sk-... deepsail serve runs/base --host 0.0.0.0 --max-batch-size 64
      curl localhost:8000/generate -H 'Content-Type: application/json' -d '{"prompt": "Hi", "max_tokens": 32}'
    """
    import uvicorn

    from deepsail.precision import parse_precision, resolve_device
    from deepsail.serve.app import ServerConfig, create_app, load_served, uvicorn_config

    if threads is not None:
        import torch

        # Intra-op threads wait for each other at every op: one descheduled thread stalls the step, so on an
        # oversubscribed CPU decode can get 10x slower with more threads, not faster.
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    from deepsail.serve.app import load_routed
    from deepsail.serve.route import parse_routes

    try:
        routes = parse_routes(route or [])
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--route") from None
    if routes and (path is not None or adapter):
        raise typer.BadParameter("--route serves its two folders: give no PATH and no --adapter", param_hint="--route")
    if not routes and path is None:
        raise typer.BadParameter("give a model folder, or --route edge=DIR --route cloud=DIR", param_hint="PATH")
    if path is not None and not Path(path).exists():
        raise typer.BadParameter(f"{path} does not exist", param_hint="PATH")
    if not 0 <= cloud_share <= 1:
        raise typer.BadParameter(f"{cloud_share}: a share, between 0 and 1", param_hint="--cloud-share")
    ray_replicas = _parse_replicas(replicas, min_replicas, max_replicas, max_batch_size, replica_cpus)
    num_draft = _parse_speculative(speculative)
    calibration = None
    if route_calibration is not None:
        calibration = _calibration_prompts(route_calibration)
    # Everything that can be checked before the port opens is: a bad flag fails in one line, not from the loader.
    kv_budget_bytes = parse_bytes(kv_budget) if kv_budget else None
    adapters: dict[str, str] = {}
    for item in adapter or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(
                f"{item!r}: expected NAME=DIR, e.g. finance=runs/finance/adapter", param_hint="--adapter"
            )
        if not Path(folder, "adapter_config.json").is_file():
            raise typer.BadParameter(
                f"{folder} has no adapter_config.json (a peft-format adapter folder)", param_hint="--adapter"
            )
        adapters[name] = folder
    resolve_device(device)
    parse_precision(dtype)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.getLogger("deepsail.serve").warning(
            "serving on %s without an API key: anyone who can reach this port can use the model (set DEEPSAIL_API_KEY)",
            host,
        )
    failed: list[BaseException] = []

    # what every engine gets, a routed server's two as well as a plain one
    engine = dict(
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        kv_budget_bytes=kv_budget_bytes,
        max_waiting=max_waiting,
        max_model_len=max_model_len,
        compile_decode=compile,
        speculative=num_draft,
        max_num_batched_tokens=max(512, max_batch_size * (1 + num_draft)),
    )

    def load():
        if routes:
            return load_routed(
                routes, cloud_share=cloud_share, threshold=route_threshold, calibration=calibration, **engine
            )
        return load_served(path, adapters=adapters, **engine)

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True  # a server that can never be ready should not sit there answering 503

    cfg = ServerConfig(api_key=api_key, model_name=served_model_name)
    if ray_replicas is not None:
        from deepsail.serve import ray as ray_serve

        return ray_serve.run(load, cfg, ray_replicas, host, port)
    app = create_app(load, cfg, on_load_error)
    # uvicorn drains on SIGTERM: stops listening, lets in-flight requests run for `timeout_graceful_shutdown`
    # seconds, cancels what is left (which cancels it in the engine), then runs the app's shutdown.
    server = uvicorn.Server(
        uvicorn_config(
            app, cfg, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info", access_log=False
        )
    )
    server.run()
    if failed:
        raise failed[0]  # the CLI's one error path reports it (one line for an expected failure)


def _parse_speculative(text: str) -> int:
    """--speculative: off | mtp | mtp:K -> tokens drafted per step (0 = off)."""
    method, _, k = text.partition(":")
    if text in ("off", "none", "0"):
        return 0
    if method != "mtp" or (k and not (k.isdigit() and 1 <= int(k) <= 8)):
        raise typer.BadParameter(
            f"{text!r}: expected off, mtp (one draft per step) or mtp:K with K in 1..8", param_hint="--speculative"
        )
    return int(k or 1)


def _calibration_prompts(path: Path) -> list[str]:
    """--route-calibration: {"prompt": TEXT} per line."""
    import json

    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file", param_hint="--route-calibration")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (ValueError, KeyError, TypeError):
            raise typer.BadParameter(
                f'{path}:{n}: expected a JSON object with a "prompt" string', param_hint="--route-calibration"
            ) from None
        if not isinstance(prompt, str) or not prompt:
            raise typer.BadParameter(f'{path}:{n}: "prompt" must be non-empty text', param_hint="--route-calibration")
        prompts.append(prompt)
    if not prompts:
        raise typer.BadParameter(f"{path} has no prompts", param_hint="--route-calibration")
    return prompts


def _parse_replicas(text: str, lo: int, hi: int, batch: int, cpus: float):
    """--replicas: None for "1" (this process serves), else the Ray deployment's `Replicas`."""
    from deepsail.serve.ray import Replicas

    if text == "1":
        return None
    if text != "auto" and not (text.isdigit() and int(text) > 1):
        raise typer.BadParameter(f"{text!r}: expected 1, auto, or a number of replicas", param_hint="--replicas")
    if text != "auto":
        lo = hi = int(text)
    try:
        return Replicas(min_replicas=lo, max_replicas=hi, capacity=batch, num_cpus=cpus)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--replicas") from None
