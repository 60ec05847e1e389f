"""`deepsail hpo`: hyperparameter search over `deepsail pretrain`, with Optuna.

Every trial is one `pretrain` run (STUDY/trials/NNNN, a complete run folder) whose TrainConfig is the command's
flags plus the trial's sampled values; a searched name that is a ModelConfig field (num_hidden_layers, attn_gate,
...) becomes an `--arch` change of the preset. The objective is the run's final validation bits per byte (lower is
better), so trials of different tokenizers or lengths stay comparable.

- Sampler: TPE (Bayesian, Optuna's default; the design documents' "Bayesian search over learning rates") or a
  grid over every combination (`--sampler grid`: continuous ranges take `--grid-points` values, log-spaced for
  `log:`).
- Pruning: each validation pass reports its bpb; Optuna's median pruner stops a trial that is worse than the
  median of earlier trials at the same step (after `--prune-warmup` evals), which is where search time goes.
- The study lives in STUDY/study.db (SQLite): a killed search resumes with the same command, counting the trials
  already finished; a trial the kill interrupted is marked failed and run again under a new number.
- STUDY/results.md: every trial's values, bpb, state and minutes, best first; history.png (bpb per trial with the
  running best) and importance.png (fANOVA parameter importances) beside it.

Search spaces: `--search NAME=log:LO:HI`, `float:LO:HI`, `int:LO:HI[:STEP]`, `cat:A,B,C`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from deepsail.files import atomic_path, atomic_write_text, check_folder
from deepsail.flags import Options, options
from deepsail.model import ModelConfig
from deepsail.train.config import TrainConfig

KINDS = ("log", "float", "int", "cat")


@dataclass(frozen=True)
class Dimension:
    """One searched setting: `name=kind:...` parsed."""

    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    step: int = 1
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "cat":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step)
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")

    def grid(self, points: int) -> list[Any]:
        if self.kind == "cat":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step))
        if points == 1:
            return [self.low]
        if self.kind == "log":
            ratio = (self.high / self.low) ** (1 / (points - 1))
            return [float(f"{self.low * ratio**i:.6g}") for i in range(points)]
        return [float(f"{self.low + (self.high - self.low) * i / (points - 1):.6g}") for i in range(points)]


def _coerce(name: str, raw: str) -> Any:
    """A categorical choice as its field's type (so `cat:4,8` are ints for an int field)."""
    default = _field_default(name)
    if isinstance(default, bool):
        return raw.lower() in ("true", "1")
    if isinstance(default, (int, float)) and default is not None:
        return type(default)(raw)
    return raw


def _field_default(name: str) -> Any:
    for cls in (TrainConfig, ModelConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name in fields:
            f = fields[name]
            return f.default if f.default is not dataclasses.MISSING else None
    return None


def parse_search(spec: str) -> Dimension:
    """`lr=log:1e-4:5e-3` -> Dimension; a wrong spelling, an unknown setting or an empty range is a clear error."""
    name, eq, rest = spec.partition("=")
    name = name.strip().replace("-", "_")
    kind, _, args = rest.partition(":")
    if not eq or kind not in KINDS or not args:
        raise ValueError(
            f"--search {spec!r}: expected NAME=KIND:..., KIND one of {', '.join(KINDS)} "
            "(e.g. lr=log:1e-4:5e-3, num_hidden_layers=int:4:8, attn_gate=cat:none,headwise)"
        )
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "out", "arch", "init", "tokenizer"}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}
    if name not in train_fields | model_fields:
        raise ValueError(f"--search {spec!r}: {name!r} is neither a pretrain flag nor a ModelConfig field")
    try:
        if kind == "cat":
            choices = tuple(_coerce(name, c.strip()) for c in args.split(","))
            if len(choices) < 1 or "" in choices:
                raise ValueError
            return Dimension(name, kind, choices=choices)
        parts = args.split(":")
        if kind == "int":
            low, high, step = int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1
            if len(parts) > 3 or step < 1 or low > high:
                raise ValueError
            return Dimension(name, kind, low, high, step)
        if len(parts) != 2:
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high) or (kind == "log" and low <= 0):
            raise ValueError
        return Dimension(name, kind, low, high)
    except (ValueError, IndexError) as e:
        raise ValueError(
            f"--search {spec!r}: bad {kind} range; e.g. log:1e-4:5e-3 (0 < LO < HI), float:0:0.3, int:4:8[:2], "
            "cat:none,headwise"
        ) from e


def trial_config(base: TrainConfig, values: dict[str, Any], out: Path) -> TrainConfig:
    """The base config with a trial's values: TrainConfig fields directly, ModelConfig fields as --arch changes."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    direct = {k: v for k, v in values.items() if k in train_fields}
    arch = tuple(base.arch) + tuple(f"{k}={v}" for k, v in values.items() if k not in train_fields)
    return base.replace(**direct, arch=arch, out=str(out))


def hpo(
    base: TrainConfig,
    study_dir: Path,
    space: list[Dimension],
    trials: int,
    sampler: str = "tpe",
    grid_points: int = 3,
    prune: bool = True,
    prune_warmup: int = 1,
    console: Console | None = None,
) -> Any:
    """Run (or resume) the study in `study_dir` until `trials` trials have finished; returns the optuna Study."""
    import optuna

    from deepsail.train.pretrain import pretrain

    console = console or Console()
    if not space:
        raise ValueError("nothing to search: give at least one --search NAME=KIND:...")
    names = [d.name for d in space]
    if len(set(names)) != len(names):
        raise ValueError(f"--search names a setting twice: {names}")
    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    study_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler not in ("tpe", "grid"):
        raise ValueError(f"--sampler {sampler!r}: choose tpe or grid")
    # A grid is every combination, queued into the study once (Optuna's GridSampler stops the study from inside,
    # which the ask/tell loop here has no place for); TPE proposes the rest.
    chosen = optuna.samplers.TPESampler(seed=base.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if prune else optuna.pruners.NopPruner()
    study = optuna.create_study(
        study_name="deepsail",
        storage=f"sqlite:///{(study_dir / 'study.db').resolve()}",
        sampler=chosen,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )
    if sampler == "grid":
        combos = [dict(zip(names, c)) for c in itertools.product(*(d.grid(grid_points) for d in space))]
        queued = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)]
        for combo in combos:
            if combo not in queued:
                study.enqueue_trial(combo)
        trials = min(trials, len(combos))
    # A search killed mid-trial left that trial RUNNING in the database: it is failed now and its budget rerun.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        console.print(f"trial {t.number} was interrupted; marked failed, its slot runs again")

    def finished() -> int:
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=done))

    while finished() < trials:
        trial = study.ask()
        values = {d.name: d.suggest(trial) for d in space}
        cfg = trial_config(base, values, study_dir / "trials" / f"{trial.number:04d}")
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        console.print(f"[bold]trial {trial.number}[/] ({finished() + 1}/{trials}): {shown}")
        evals = {"n": 0}

        def report(step: int, val: dict[str, float], trial: Any = trial, evals: dict = evals) -> None:
            trial.report(val["bpb"], step)
            evals["n"] += 1
            if prune and evals["n"] > prune_warmup and trial.should_prune():
                raise optuna.TrialPruned(f"val bpb {val['bpb']:.4f} at step {step} is worse than the median")

        t0 = time.perf_counter()
        try:
            result = pretrain(cfg, console=Console(quiet=True), on_eval=report)
        except optuna.TrialPruned as e:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            console.print(f"  pruned: {e}")
        except ValueError as e:  # an impossible combination (e.g. heads that do not divide): a failed trial
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            console.print(f"  failed: {e}")
        else:
            bpb = result.val.get("bpb", float("nan"))
            study.tell(trial, bpb if math.isfinite(bpb) else float("inf"))
            console.print(f"  val bpb {bpb:.4f} in {(time.perf_counter() - t0) / 60:.1f} min")
        trial_minutes = (time.perf_counter() - t0) / 60
        study.set_user_attr(f"minutes_{trial.number}", round(trial_minutes, 2))
        write_results(study, study_dir)
    return study


def write_results(study: Any, study_dir: Path) -> Path:
    """results.md (best first) and the two plots, rewritten after every trial."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    names = sorted({k for t in trials for k in t.params})
    minutes = study.user_attrs
    lines = [f"# Hyperparameter search: {len(done)} complete of {len(trials)} trials", ""]
    if done:
        best = study.best_trial
        lines += [f"Best: trial {best.number}, val bpb {best.value:.4f}: " + _params(best.params), ""]
    lines += ["| trial | " + " | ".join(names) + " | val bpb | state | minutes |"]
    lines += ["|---" * (len(names) + 4) + "|"]
    order = sorted(trials, key=lambda t: (t.value is None, t.value if t.value is not None else 0, t.number))
    for t in order:
        last = max(t.intermediate_values.items())[1] if t.intermediate_values else None
        value = t.value if t.value is not None else last
        cells = [_fmt(t.params.get(n, "")) for n in names]
        lines.append(
            f"| {t.number} | " + " | ".join(cells) + f" | {'' if value is None else f'{value:.4f}'} | "
            f"{t.state.name.lower()} | {minutes.get(f'minutes_{t.number}', '')} |"
        )
    plots = _plots(study, study_dir, done)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return atomic_write_text(study_dir / "results.md", "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _plots(study: Any, study_dir: Path, done: list[Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    paths = []
    if done:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [t.number for t in done]
        ys = [t.value for t in done]
        best = [min(ys[: i + 1]) for i in range(len(ys))]
        ax.scatter(xs, ys, s=18, label="trial")
        ax.step(xs, best, where="post", color="C1", label="best so far")
        ax.set(xlabel="trial", ylabel="val bits/byte", title="Optimisation history")
        ax.legend()
        fig.tight_layout()
        with atomic_path(study_dir / "history.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(study_dir / "history.png")
    varied = {k for t in done for k in t.params if len({str(u.params.get(k)) for u in done}) > 1}
    if len(done) >= 3 and varied:
        importance = optuna.importance.get_param_importances(study, params=sorted(varied))
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(importance)))
        ax.barh(list(importance)[::-1], list(importance.values())[::-1])
        ax.set(xlabel="importance (fANOVA)", title="Parameter importance")
        fig.tight_layout()
        with atomic_path(study_dir / "importance.png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        paths.append(study_dir / "importance.png")
    return paths


@options(
    cfg=Options(
        TrainConfig,
        skip=("out", "init", "dp_replicate", "dp_shard", "ep", "tp", "powersgd_rank"),
        defaults={"steps": 200, "eval_every": 50, "eval_batches": 4, "ckpt_every": 0, "log_every": 50},
    )
)
def hpo_command(
    cfg: TrainConfig,
    out: Annotated[Path, typer.Option(help="The study folder: study.db, results.md, plots, trials/NNNN runs.")],
    search: Annotated[
        list[str],
        typer.Option(help="A setting to search, NAME=log:LO:HI | float:LO:HI | int:LO:HI[:STEP] | cat:A,B (repeat)."),
    ],
    trials: Annotated[int, typer.Option(help="Trials to finish (a resumed study counts those already done).")] = 20,
    sampler: Annotated[str, typer.Option(help="tpe (Bayesian) or grid (every combination).")] = "tpe",
    grid_points: Annotated[int, typer.Option(help="Grid values per continuous range (--sampler grid).")] = 3,
    prune: Annotated[bool, typer.Option(help="Stop trials worse than the median at the same step.")] = True,
    given: frozenset[str] = frozenset(),
) -> Any:
    """Search pretraining hyperparameters with Optuna: TPE or grid, median pruning on validation bits per byte, a
    SQLite study that resumes after a kill, each trial bounded by --steps and/or --minutes.

    \b
    Examples:
      deepsail hpo --data data --model-preset deepseek-v3-mini --steps 300 --trials 20 --out runs/hpo \\
          --search lr=log:1e-4:5e-3 --search num_hidden_layers=int:4:8 --search attn_gate=cat:none,headwise
      deepsail hpo --data data --sampler grid --search lr=log:3e-4:3e-3 --search dropout=cat:0,0.1 --out runs/grid
    """
    if "minutes" in given and "steps" not in given:
        cfg = cfg.replace(steps=None)
    space = [parse_search(s) for s in search]
    out = check_folder(out)
    study = hpo(cfg, out, space, trials, sampler, grid_points, prune)
    done = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    if done:
        best = study.best_trial
        typer.echo(
            f"best: trial {best.number}, val bpb {best.value:.4f}: {_params(best.params)} | {out / 'results.md'}"
        )
    return study
