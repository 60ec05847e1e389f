"""`deepsail upcycle`: the verb around `model.upcycle.upcycle` (the method and why it starts exactly are there)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from deepsail.model.upcycle import upcycle


def upcycle_command(
    model: Annotated[str, typer.Argument(help="The trained dense model: a run folder or an HF model folder.")],
    out: Annotated[Path, typer.Option(help="The MoE model folder to write (config.json, safetensors, tokenizer).")],
    experts: Annotated[int, typer.Option(help="Routed experts per MoE layer (a multiple of --top-k).")] = 8,
    top_k: Annotated[int, typer.Option(help="Routed experts each token uses.")] = 2,
    shared: Annotated[int, typer.Option(help="Shared experts every token uses.")] = 1,
    first_dense: Annotated[
        int, typer.Option(help="Leading layers that keep their dense MLP (DeepSeek keeps 1-3).")
    ] = 1,
) -> Path:
    """Turn a trained dense model into a DeepSeekMoE model that starts at exactly the dense model's loss: each
    expert is a slice of the dense MLP (top-k + shared slices = the dense width, so active parameters stay the
    same), the router starts at zero and the balancing bias hands tokens over to the copies as training goes on.
    Continue with `deepsail pretrain --init OUT`.

    \b
    Examples:
      deepsail pretrain --data data --model-preset deepseek-v3-mini-dense --minutes 5 --out runs/dense
      deepsail upcycle runs/dense --experts 8 --top-k 2 --shared 1 --out runs/upcycled
      deepsail pretrain --data data --init runs/upcycled --minutes 5 --out runs/moe
    """
    from deepsail.files import atomic_dir, check_folder
    from deepsail.train.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(model)
    out = check_folder(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the model being upcycled; choose another folder.")
    from deepsail.model import Transformer

    dense = Transformer.from_pretrained(source)
    moe = upcycle(dense, experts, top_k, shared, first_dense)
    with atomic_dir(out) as tmp:
        moe.save_pretrained(tmp)
        for f in source.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, tmp / f.name)
    typer.echo(
        f"{dense.num_params() / 1e6:.2f}M dense -> {moe.num_params() / 1e6:.2f}M params "
        f"({moe.num_params(active=True) / 1e6:.2f}M active), {experts} experts x top-{top_k} + {shared} shared "
        f"of width {moe.config.moe_intermediate_size}: {out}"
    )
    return out
