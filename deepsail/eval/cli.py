"""`deepsail eval`: lm-eval-harness tasks on a deepsail model, through `harness.DeepsailLM` (the batched engine).

Writes OUT/results.json (lm-eval's own results dict), OUT/report.md (its table, the command, the timing) and
OUT/eval_scores.png; with --log-samples, OUT/samples_TASK.jsonl (each document, the model's responses, its scores).
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from deepsail.files import atomic_path, atomic_write_json, atomic_write_text, ensure_folder
from deepsail.infer.cli import Device, DType, PathArg

EMBEDDED_HELP = (
    "deepsail (all below), deepsail_arithmetic, deepsail_arithmetic_gen, deepsail_stdlib_package, "
    "deepsail_stdlib_ppl, deepsail_stdlib_completion"
)


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise ValueError(
            "deepsail eval runs EleutherAI's lm-eval-harness, which is not installed: pip install 'deepsail[eval]'"
        ) from e
    return lm_eval


def check_tasks(names: list[str], manager: Any) -> None:
    """Refuse unknown task names before loading anything, with the nearest known names."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise ValueError(
                f"unknown lm-eval task {name!r}{hint} Embedded: {EMBEDDED_HELP}. For other tasks, point "
                "--include-path at a folder of task YAMLs (see the README: evaluating offline)."
            )


def eval_command(
    path: PathArg,
    tasks: Annotated[
        str, typer.Option(help=f"Comma-separated lm-eval task or group names. Embedded: {EMBEDDED_HELP}.")
    ] = "deepsail",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Folder for results (default: PATH/eval).", show_default=False)
    ] = None,
    limit: Annotated[
        float | None,
        typer.Option(help="Documents per task: a count (>= 1) or a fraction (< 1); default all.", show_default=False),
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option(help="Few-shot examples per prompt (default: each task's own).", show_default=False)
    ] = None,
    include_path: Annotated[
        list[Path] | None,
        typer.Option(help="A folder of your own task YAMLs (repeatable), e.g. local copies of standard tasks."),
    ] = None,
    apply_chat_template: Annotated[
        bool, typer.Option(help="Render prompts with the model's chat template (SFT'ed models).")
    ] = False,
    log_samples: Annotated[bool, typer.Option(help="Also write every document's responses and scores.")] = False,
    batch_size: Annotated[int, typer.Option(help="Most requests in one engine step.")] = 32,
    max_length: Annotated[
        int | None, typer.Option(help="Scoring window in tokens (default: the model's context).", show_default=False)
    ] = None,
    adapter: Annotated[Path | None, typer.Option(help="A LoRA adapter (peft format) to apply.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for few-shot sampling and sampled generation.")] = 1234,
    device: Device = "auto",
    dtype: DType = "auto",
) -> dict[str, Any]:
    """Evaluate a model on lm-eval-harness tasks, offline, on the batched engine.

    \b
    Examples:
      deepsail eval runs/default                                   # every embedded task
      deepsail eval runs/default --tasks deepsail_arithmetic --num-fewshot 5 --limit 100
      deepsail eval runs/sft/model --tasks deepsail_stdlib_completion --apply-chat-template
      deepsail eval runs/default --tasks hellaswag --include-path ~/tasks/hellaswag   # a local copy, offline
    """
    lm_eval = _lm_eval()
    from deepsail.eval.harness import DeepsailLM, task_manager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks is empty; name at least one task (e.g. deepsail_arithmetic)")
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise ValueError(f"--limit must be a fraction in (0, 1) or a whole count >= 1, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    for folder in include_path or []:
        if not folder.is_dir():
            raise ValueError(f"--include-path {folder} is not a folder of task YAMLs")
    manager = task_manager(include_path or [])
    # A name outside the deepsail_ namespace may be one of lm-eval's own tasks (its data must be there offline).
    if any(not n.startswith("deepsail") for n in set(names) - set(manager.all_tasks)):
        manager = task_manager(include_path or [], defaults=True)
    check_tasks(names, manager)
    out = ensure_folder(out or Path(path) / "eval")

    t0 = time.perf_counter()
    lm = DeepsailLM(path, adapter=adapter, device=device, dtype=dtype, batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=int(limit) if limit is not None and limit >= 1 else limit,
        task_manager=manager,
        apply_chat_template=apply_chat_template,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    seconds = time.perf_counter() - t0
    table = lm_eval.utils.make_table(results)
    if results.get("groups"):
        table += "\n" + lm_eval.utils.make_table(results, "groups")
    typer.echo(table)

    samples = results.pop("samples", None) or {}
    for task, rows in samples.items():
        lines = "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_text(out / f"samples_{task}.jsonl", lines)
    atomic_write_json(out / "results.json", json.loads(json.dumps(results, default=str)))
    png = _plot(results, out / "eval_scores.png")
    command = f"deepsail eval {path} --tasks {','.join(names)}" + (f" --limit {limit:g}" if limit else "")
    report = (
        f"# deepsail eval: {path}\n\n`{command}` — {seconds:.0f} s on {lm.engine.device.type}, "
        f"lm-eval {lm_eval.__version__}\n\n{table}\n" + (f"\n![scores]({png.name})\n" if png else "")
    )
    atomic_write_text(out / "report.md", report)
    typer.echo(f"wrote {out / 'results.json'} and {out / 'report.md'} ({seconds:.0f} s)", err=True)
    return results


def headline(results: dict[str, Any]) -> dict[str, tuple[str, float]]:
    """task -> (its first metric, value): accuracy-like first, bits per byte for perplexity tasks."""
    picked = {}
    for task, metrics in results.get("results", {}).items():
        values = {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, int | float) and "_stderr" not in k}
        for name in ("acc", "exact_match", "chrf", "bleu", "bits_per_byte"):
            if name in values:
                picked[task] = (name, float(values[name]))
                break
    return picked


def _plot(results: dict[str, Any], path: Path) -> Path | None:
    scores = headline(results)
    if not scores:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{t}\n({m})" for t, (m, _) in scores.items()]
    fig, ax = plt.subplots(figsize=(max(4, 1.8 * len(scores)), 3.5))
    bars = ax.bar(labels, [v for _, v in scores.values()], color="#4878a8")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_title("lm-eval scores (bits_per_byte: lower is better; others: higher)")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
