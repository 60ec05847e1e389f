"""The `deepsail generate` and `deepsail chat` verbs."""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from deepsail.flags import Options, options
from deepsail.infer.sampling import SamplingParams
from deepsail.precision import DEVICE_HELP, PRECISION_HELP

PathArg = Annotated[
    Path,
    typer.Argument(
        help="A model dir (config.json + *.safetensors + tokenizer.json, e.g. from the HF hub) or a "
        "deepsail training run folder (its checkpoints/latest is used).",
        show_default=False,
    ),
]
# Shared with `deepsail serve`: one definition of where and in what precision a model runs.
Device = Annotated[str, typer.Option(help=DEVICE_HELP + ".")]
DType = Annotated[str, typer.Option(help=PRECISION_HELP + "; auto = bf16 on GPU, fp32 on CPU.")]
SAMPLING = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def _unescape(text: str) -> str:
    """`--prompt "a\\nb"` means a newline, as in llama.cpp: shells make real newlines awkward to type."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _load(path: Path, device: str, dtype: str) -> tuple[Any, Any]:
    from deepsail.infer.generate import load

    model, tokenizer = load(path, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(
            f"{path} has no tokenizer.json; copy the tokenizer the model was trained with into it "
            "(`deepsail tokenizer train --out DIR` writes one)"
        )
    return model, tokenizer


@options(params=Options(SamplingParams, only=(*SAMPLING, "stop", "json_schema"), defaults=dict(max_tokens=128)))
def generate_command(
    path: PathArg,
    params: SamplingParams,
    prompt: Annotated[
        list[str],
        typer.Option("--prompt", "-p", help="Prompt text (\\n = newline); repeat for a batch.", show_default=False),
    ],
    num_beams: Annotated[int, typer.Option(help="Beam search with this many beams (deterministic).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam search: >1 favours longer outputs, <1 shorter.")] = 1.0,
    speculative: Annotated[
        int, typer.Option(help="Self-speculative greedy decoding: draft this many tokens per step with the MTP head.")
    ] = 0,
    compile: Annotated[
        bool,
        typer.Option(help="Decode through one compiled graph: ~2x the tok/s on CPU after a 20-40 s first compile."),
    ] = False,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Generate text from a prompt (streamed when there is one prompt).

    \b
    Examples:
      deepsail generate runs/base -p "def fib(n):" --temperature 0
      deepsail generate runs/base -p "Once upon a time" --top-p 0.9 --seed 0
      deepsail generate hf-model-dir -p "The sky is" -p "Water is" --num-beams 4
      deepsail generate runs/v3 -p "import numpy" --temperature 0 --speculative 2
      deepsail generate runs/v3 -p "def parse(" --max-tokens 1024 --compile
    """
    from rich.console import Console

    from deepsail.infer.generate import generate, stream

    err = Console(stderr=True)
    if num_beams < 1:
        raise ValueError(f"--num-beams {num_beams}: must be at least 1")
    if speculative < 0:
        raise ValueError(f"--speculative {speculative}: the number of drafted tokens is >= 0 (0 = off)")
    if not math.isfinite(length_penalty):
        raise ValueError(f"--length-penalty {length_penalty}: must be a finite number")
    params = dataclasses.replace(params, stop=[_unescape(s) for s in params.stop])
    prompt = [_unescape(p) for p in prompt]
    model, tokenizer = _load(path, device, dtype)
    if compile:
        from deepsail.infer.graphs import enable_compiled_decode

        enable_compiled_decode(model)
    t0 = time.perf_counter()
    if len(prompt) == 1 and num_beams == 1 and speculative == 0:
        n = 0
        for event in stream(model, tokenizer, prompt[0], params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            n += 1
        sys.stdout.write("\n")
        summary = f"{n} tokens"
    else:
        results = generate(
            model,
            tokenizer,
            prompt,
            params,
            num_beams=num_beams,
            length_penalty=length_penalty,
            speculative=speculative,
        )
        for i, (p, r) in enumerate(zip(prompt, results)):
            if len(prompt) > 1:
                err.print(f"[bold]--- [{i}] {p!r}[/bold]")
            print(r.text)
        n = sum(len(r.token_ids) for r in results)
        summary = f"{n} tokens"
        if speculative:
            drafted = sum(r.draft_tokens for r in results)
            accepted = sum(r.accepted_tokens for r in results)
            summary += f", MTP draft acceptance {accepted}/{drafted} = {accepted / max(drafted, 1):.0%}"
    seconds = time.perf_counter() - t0
    err.print(f"[dim]{summary} in {seconds:.2f}s ({n / seconds:.1f} tok/s)[/dim]")


@options(params=Options(SamplingParams, only=SAMPLING, defaults=dict(max_tokens=512, temperature=0.7, top_p=0.95)))
def chat_command(
    path: PathArg,
    params: SamplingParams,
    system: Annotated[str | None, typer.Option(help="System message that opens the conversation.")] = None,
    device: Device = "auto",
    dtype: DType = "auto",
) -> None:
    """Chat with a model in the terminal, using its tokenizer's chat template.

    Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits.

    \b
    Examples:
      deepsail chat runs/sft
      deepsail chat DeepSeek-R1-Distill-Qwen-1.5B/ --system "Be brief." --top-p 0.9
    """
    from rich.console import Console

    from deepsail.infer.generate import stream

    err = Console(stderr=True)
    model, tokenizer = _load(path, device, dtype)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{path}'s tokenizer has no chat template (tokenizer_config.json `chat_template`); "
            "use `deepsail generate` for plain text"
        )
    context = model.config.max_position_embeddings
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    err.print("[dim]/reset starts over, /exit quits[/dim]")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            messages = list(opening)
            err.print("[dim](conversation reset)[/dim]")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        room = context - len(ids)
        if room < 1:
            messages.pop()
            err.print(
                f"[red]the conversation ({len(ids)} tokens) fills the model's {context}-token context; "
                "/reset to start over[/red]"
            )
            continue
        turn = dataclasses.replace(params, max_tokens=min(params.max_tokens, room))
        sys.stdout.write("assistant> ")
        reply = []
        try:
            for event in stream(model, tokenizer, ids, turn):
                sys.stdout.write(event.text)
                sys.stdout.flush()
                reply.append(event.text)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            pass
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
