"""`deepsail quantize`: a float model folder (or a run folder) in, a quantized model folder and its card out."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer

from deepsail.card import invocation, write_model_card
from deepsail.compress.quantize import QuantConfig, quantization_config_of, quantize, save_quantized
from deepsail.files import check_folder
from deepsail.flags import Options, options


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


@options(cfg=Options(QuantConfig))
def quantize_command(
    model: Annotated[str, typer.Argument(help="The float model: an HF model folder or a deepsail run folder.")],
    cfg: QuantConfig,
    out: Annotated[Path, typer.Option(help="The quantized model folder to write (deepsail generate/serve read it).")],
) -> Path:
    """Quantize a model's weights: int8 (per output channel), int4 (per group of input columns, with zero points)
    or int8-dynamic (int8 weights and per-token int8 activations). Every projection is converted, the routed
    experts included; embeddings, norms, the router and --skip layers stay float.

    \b
    Examples:
      deepsail quantize runs/default --method int4 --group-size 64 --out runs/default-int4
      deepsail generate runs/default-int4 --prompt "def quicksort(xs):"
    """
    from deepsail.model import Transformer
    from deepsail.train.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(model)
    if quantization_config_of(source) is not None:
        raise ValueError(f"{source} is already quantized; quantize the float model it was made from.")
    if not (source / "config.json").is_file():
        raise ValueError(
            f"{source} is a LoRA adapter or a fine-tuning checkpoint, not a whole model; quantize the run's merged "
            "model (RUN/model) instead."
        )
    out = check_folder(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the model being quantized; choose another folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"--out {out} holds files and is not a model folder; choose a new or empty folder.")
    t0 = time.perf_counter()
    float_model = Transformer.from_pretrained(source)
    quantize(float_model, cfg)
    save_quantized(float_model, out, copy_from=source)
    qc = float_model.quantization_config
    group = ["--group-size", str(cfg.group_size)] if cfg.method == "int4" else []
    write_model_card(
        out,
        config=float_model.config,
        title=out.name,
        summary=f"{source} with its weights quantized to {cfg.method} by deepsail "
        f"({_size_mb(source):.1f} MB -> {_size_mb(out):.1f} MB of safetensors).",
        base_model=str(source),
        data=[f"Unchanged from {source}: quantization reads no data."],
        metrics={"safetensors_mb": round(_size_mb(out), 2), "base_safetensors_mb": round(_size_mb(source), 2)},
        how_made=invocation(
            shlex.join(["deepsail", "quantize", str(model), "--method", cfg.method, *group, "--out", str(out)])
        ),
        quantization=qc,
    )
    typer.echo(
        f"{cfg.method}{f' (group {cfg.group_size})' if cfg.method == 'int4' else ''}: {_size_mb(source):.1f} MB -> "
        f"{_size_mb(out):.1f} MB in {time.perf_counter() - t0:.1f} s; kept float: "
        f"{', '.join(qc['modules_not_converted']) or 'none'} (plus embeddings, norms, routers) -> {out}"
    )
    return out
