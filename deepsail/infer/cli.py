"""The `deepsail generate` and `deepsail chat` verbs."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

PathArg = Annotated[
    Path,
    typer.Argument(help="A model dir (config.json + *.safetensors + tokenizer.json, e.g. from the HF hub) or a "
                        "deepsail training run folder (its checkpoints/latest is used).", show_default=False),
]
MaxTokens = Annotated[int, typer.Option(help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Sample from the k most likely tokens only; 0 = off.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: the smallest set of tokens with this much mass; 1 = off.")]
MinP = Annotated[float, typer.Option(help="Drop tokens below min_p x the top token's probability; 0 = off.")]
RepetitionPenalty = Annotated[float, typer.Option(help="Penalise tokens already seen (>1); 1 = off.")]
Seed = Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same text.")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
DType = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU).")]


def _unescape(text: str) -> str:
    """`--prompt "a\\nb"` means a newline, as in llama.cpp: shells make real newlines awkward to type."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _load(path: Path, device: str | None, dtype: str | None) -> tuple[Any, Any]:
    from deepsail.infer.generate import load

    model, tokenizer = load(path, device=device, dtype=dtype)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json; copy the tokenizer the model was trained with into it "
                         "(`deepsail tokenizer train --out DIR` writes one)")
    return model, tokenizer


def generate_command(
    path: PathArg,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text (\\n = newline); repeat for a batch.",
                                              show_default=False)],
    max_tokens: MaxTokens = 128,
    temperature: Temperature = 1.0,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    stop: Annotated[list[str] | None, typer.Option(
        help="Stop string (repeatable, \\n = newline); the output ends before it.")] = None,
    num_beams: Annotated[int, typer.Option(help="Beam search with this many beams (deterministic).")] = 1,
    length_penalty: Annotated[float, typer.Option(help="Beam search: >1 favours longer outputs, <1 shorter.")] = 1.0,
    speculative: Annotated[int, typer.Option(
        help="Self-speculative greedy decoding: draft this many tokens per step with the MTP head.")] = 0,
    device: Device = None,
    dtype: DType = None,
) -> None:
    """Generate text from a prompt (streamed when there is one prompt).

    \b
    Examples:
      deepsail generate runs/base -p "def fib(n):" --temperature 0
      deepsail generate runs/base -p "Once upon a time" --top-p 0.9 --seed 0
      deepsail generate hf-model-dir -p "The sky is" -p "Water is" --num-beams 4
      deepsail generate runs/v3 -p "import numpy" --temperature 0 --speculative 2
    """
    from rich.console import Console

    from deepsail.infer.generate import generate, stream
    from deepsail.infer.sampling import SamplingParams

    err = Console(stderr=True)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                            stop=[_unescape(s) for s in stop or ()])
    prompt = [_unescape(p) for p in prompt]
    model, tokenizer = _load(path, device, dtype)
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
        results = generate(model, tokenizer, prompt, params, num_beams=num_beams, length_penalty=length_penalty,
                           speculative=speculative)
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


def chat_command(
    path: PathArg,
    system: Annotated[str | None, typer.Option(help="System message that opens the conversation.")] = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.95,
    min_p: MinP = 0.0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    device: Device = None,
    dtype: DType = None,
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
    from deepsail.infer.sampling import SamplingParams

    err = Console(stderr=True)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    model, tokenizer = _load(path, device, dtype)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{path}'s tokenizer has no chat template (tokenizer_config.json `chat_template`); "
                         "use `deepsail generate` for plain text")
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
            err.print(f"[red]the conversation ({len(ids)} tokens) fills the model's {context}-token context; "
                      "/reset to start over[/red]")
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
