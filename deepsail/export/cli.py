"""`deepsail export onnx | gguf | pt2 | hf`: a trained model as files other runtimes load.

`export hf` writes a folder, and its model card (README.md, `deepsail.card`) with it; the single-file formats carry
their metadata inside the file (GGUF's general.* keys, the ONNX and torch.export graphs' own), so they get none.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from deepsail.card import invocation, write_model_card
from deepsail.export.gguf import gguf_command
from deepsail.precision import PRECISION_HELP

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="A model folder (config.json + model.safetensors, e.g. RUN/model) or a training run folder (its "
        "latest checkpoint).",
        show_default=False,
    ),
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _load_float(path: Path, dtype: str | None = "fp32") -> tuple[Any, Path]:
    """(the model on CPU in `dtype` (None: the checkpoint's), the folder it came from); a quantized model is
    refused: these formats take float weights (export the float model; GGUF quantizes itself: q8_0/q4_0)."""
    from deepsail.compress.quantize import quantization_config_of
    from deepsail.train.checkpoint import resolve_checkpoint
    from deepsail.tune.load import from_pretrained

    folder = resolve_checkpoint(path)
    quantized = quantization_config_of(folder)
    if quantized:
        raise ValueError(
            f"{folder} is a quantized model ({quantized['method']}); export the float model it came from "
            "(GGUF quantizes itself: --type q8_0 | q4_0)"
        )
    return from_pretrained(folder, dtype=dtype, device="cpu").eval(), folder


def _done(what: Path, t0: float) -> None:
    from rich.console import Console

    size = sum(p.stat().st_size for p in ([what] if what.is_file() else what.rglob("*")) if p.is_file())
    Console(stderr=True).print(f"wrote {what} ({size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f}s")


def onnx_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The .onnx file to write.", show_default=False)],
) -> None:
    """One ONNX graph that prefills and decodes, for onnxruntime.

    Past key/values in, present out (the MLA latent cache for DeepSeek models); fp32; batch, sequence and past
    lengths dynamic; left padding through attention_mask.

    \b
    Examples:
      deepsail export onnx runs/default --out model.onnx
      python -c "from deepsail.export.onnx import OnnxGenerator as G; print(G('model.onnx').generate([[1, 2]], 8))"
    """
    from deepsail.export.onnx import export_onnx

    t0 = time.perf_counter()
    m, _ = _load_float(model)
    _done(export_onnx(m, out), t0)


def pt2_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The program file to write.", show_default=False)],
    batch: Annotated[int, typer.Option(help="Batch size to trace at (the saved batch dim stays dynamic).")] = 2,
    seq_len: Annotated[int, typer.Option(help="Sequence length to trace at (stays dynamic too).")] = 16,
) -> None:
    """A torch.export program that torch alone runs: input_ids -> logits.

    Batch and sequence dims dynamic; load with `ds.load(path)` or `torch.export.load(path).module()` — deepsail
    need not be installed.

    \b
    Examples:
      deepsail export pt2 runs/default --out optimized_model.ds
      python -c "import torch; m = torch.export.load('optimized_model.ds').module(); print(m(torch.ones(1, 4).long()))"
    """
    from deepsail.export.pt2 import save_program

    t0 = time.perf_counter()
    m, _ = _load_float(model)
    _done(save_program(m, out, (batch, seq_len)), t0)


def _load_hf_source(path: Path, word: str) -> tuple[Any, Path]:
    """The model `export hf` writes: a model folder or a run's latest checkpoint; a run trained under torchrun
    (DCP shards, no safetensors) is gathered into this one process first."""
    from deepsail.precision import DTYPES
    from deepsail.train.checkpoint import is_sharded, load_sharded_model, resolve_checkpoint

    folder = resolve_checkpoint(path)
    if not is_sharded(folder):
        return _load_float(path, dtype=None if word == "auto" else word)
    m = load_sharded_model(folder)  # fp32, as trained
    if word != "auto":
        m.to(DTYPES[word])
        for module in m.modules():  # the balancing bias stays fp32 (model/moe.py), as from_pretrained keeps it
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return m, folder


def hf_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HF model folder to write.", show_default=False)],
    max_shard_size: Annotated[
        str,
        typer.Option(help="Shard the weights above this size (2GB, 500MB, 2GiB), with the index transformers reads."),
    ] = "5GB",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP + "; auto = as the model was saved.")] = "auto",
) -> None:
    """An HF checkpoint (sharded safetensors + index) and its tokenizer, for transformers.

    `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it; so does `ds.from_pretrained(DIR)`.

    A run trained under torchrun (sharded DCP checkpoints) is gathered into one folder here, in one process.

    \b
    Examples:
      deepsail export hf runs/default --out hf/ --max-shard-size 2GB --precision bf16
      deepsail export hf runs/big --out hf/            # a torchrun run: its shards gathered into one HF folder
    """
    from deepsail.files import atomic_write_bytes, check_folder
    from deepsail.model.hf import shard_bytes
    from deepsail.precision import parse_precision

    t0 = time.perf_counter()
    shard_bytes(max_shard_size)  # bad flags fail before the model loads
    word = parse_precision(precision)
    check_folder(out)
    m, folder = _load_hf_source(model, word)
    m.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer_home = Path(getattr(m, "name_or_path", folder))
    for name in TOKENIZER_FILES:
        where = next((w for w in (folder, tokenizer_home) if (w / name).is_file()), None)
        if where is not None:
            atomic_write_bytes(out / name, (where / name).read_bytes())
    command = ["deepsail", "export", "hf", str(model), "--out", str(out), "--max-shard-size", max_shard_size]
    write_model_card(
        out,
        config=m.config,
        title=out.name,
        summary=f"{folder} exported by deepsail as an HF checkpoint (safetensors shards of at most {max_shard_size}, "
        f"{'as saved' if word == 'auto' else word}).",
        base_model=str(folder),
        data=[f"As {folder} was trained; its own card (if it has one) says how, and what it measured."],
        how_made=invocation(shlex.join([*command, "--precision", precision])),
    )
    _done(out, t0)


def register(app: typer.Typer, cli_verb: Any) -> None:
    export_app = typer.Typer(
        help="Export a model: ONNX (onnxruntime), GGUF (llama.cpp), a torch.export program, an HF checkpoint.",
        no_args_is_help=True,
    )
    export_app.command("onnx")(cli_verb(onnx_command))
    export_app.command("gguf")(cli_verb(gguf_command))
    export_app.command("pt2")(cli_verb(pt2_command))
    export_app.command("hf")(cli_verb(hf_command))
    app.add_typer(export_app, name="export")
