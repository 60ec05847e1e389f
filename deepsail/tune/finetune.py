"""Fine-tuning: `deepsail finetune` (next-token or classification, full / LoRA / staged) and, through the same
function, `deepsail sft`.

    deepsail finetune runs/base --data domain.jsonl --lora-r 16 --out runs/finance
    deepsail finetune runs/base --data domain.jsonl --stages stages.json --out runs/staged
    deepsail finetune runs/base --task classify --out runs/classify        # embedded stdlib-package task

One function, top to bottom: load the base (a run folder, an HF folder, or an adapter folder whose config names
its base) and its tokenizer; build the examples and their batches; put LoRA on (from outside, `lora.py`) and a task
head if the task wants one; then for each stage (one implicit stage without --stages) choose what trains
(`stages.py`) and hand model, batches and loss to the one training loop (`train/loop.py`): checkpoints, exact
resume, metrics, progress and plots are the loop's. At the end: `RUN/model/` (an HF folder, adapter merged, with
the tokenizer and the Fisher information a later `--ewc-lambda` run needs), `RUN/adapter/` (peft's format) when
LoRA was on, each with its model card (README.md), and `RUN/report.md`.

Run folder: a single stage trains in RUN itself; stages train in RUN/stages/<k>_<name>/, each a loop run folder.
A checkpoint holds the weights that have trained so far (`tuned.safetensors`, deepsail names) and the adapter in
peft's format; a resume rebuilds the model from the base and loads them, so nothing frozen is ever rewritten.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

from deepsail.compress.qat import QAT_METHODS, apply_qat, convert_qat
from deepsail.compress.quantize import QuantConfig, quantization_config_of, save_quantized
from deepsail.files import atomic_dir, atomic_write_text, check_run_folder
from deepsail.flags import Options, knob, options
from deepsail.precision import resolve_device, resolve_precision
from deepsail.train.config import TrainConfig
from deepsail.train.loop import TrainResult, check_resumable, seed_everything, train_loop
from deepsail.tune import lora as L
from deepsail.tune.load import BASE_FILE, TUNED, from_pretrained, load_tuned
from deepsail.tune.stages import Stage, read_stages, select_trainable

TASKS = ("lm", "classify", "sft")
EMBEDDED_TASK_EXAMPLES = 6000  # `deepsail sft --data embedded:arithmetic`: worked problems from the train split


@dataclass
class TuneConfig:
    """What fine-tuning adds to TrainConfig's knobs."""

    epochs: float = knob(1.0, "Passes over the training data (unless --steps is given; --stages sets its own).")
    lora_r: int = knob(0, "LoRA rank; 0 = no LoRA: every parameter trains (or what --stages selects).")
    lora_alpha: float = knob(32.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --lora-rslora).")
    lora_dropout: float = knob(0.1, "Dropout on the LoRA branch's input.")
    lora_targets: tuple[str, ...] = knob(
        L.DEFAULT_TARGETS, "Layers to adapt, by name (peft's rule: the name or its dotted suffix); repeat the flag."
    )
    lora_rslora: bool = knob(False, "rsLoRA scaling alpha/sqrt(r).")
    lora_experts: bool = knob(False, "Also adapt the routed experts' stacked weights.")
    stages: str = knob(
        "", 'A stages.json: {"name": {"layers": [-3,-2,-1] | "all" | "lora" | ..., "lr": .., "epochs": ..}}.'
    )
    task: str = knob("lm", "lm: next-token loss on the data; classify: a sequence-classification head.")
    text_field: str = knob("text", "JSONL field holding the text.")
    labels_field: str = knob("label", "JSONL field holding the class label (--task classify).")
    labels: tuple[str, ...] = knob((), "The allowed labels (--task classify); default: those in the training data.")
    val_fraction: float = knob(0.05, "Share of the user's records held out for validation (by a hash of each record).")
    ewc_lambda: float = knob(
        0.0, "Elastic weight consolidation strength; needs BASE/fisher.safetensors (see --ewc-batches)."
    )
    ewc_batches: int = knob(
        8, "Batches for the Fisher information saved in RUN/model (for a later --ewc-lambda); 0 = none."
    )
    train_mtp: bool = knob(
        True,
        "Train the MTP modules too, on their own loss (keeps `serve --speculative mtp` drafting well, and on the R1 "
        "recipe's 11M model it helps the trunk: held-out 79.5% vs 64.0% after SFT). --no-train-mtp keeps them at "
        "the base's weights and runs the head on the reply tokens only: 2.0x the tok/s there (3,100 vs 1,530).",
    )
    qat: str = knob("", "Quantization-aware training: int8 | int4 (fake-quantized weights); also writes RUN/quantized.")
    qat_group_size: int = knob(64, "--qat int4: weights per scale/zero group (32, 64 or 128).")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r}: choose one of {list(TASKS)}.")
        if self.lora_r < 0 or not self.epochs > 0 or not 0 < self.val_fraction < 1 or self.ewc_batches < 0:
            raise ValueError("need --lora-r >= 0, --epochs > 0, 0 < --val-fraction < 1 and --ewc-batches >= 0.")
        if self.ewc_lambda < 0:
            raise ValueError(f"--ewc-lambda must be >= 0, got {self.ewc_lambda}.")
        if self.qat not in ("", *QAT_METHODS):
            raise ValueError(f"--qat {self.qat!r}: choose one of {list(QAT_METHODS)}.")
        if self.qat and (self.lora_r or self.task == "classify"):
            raise ValueError("--qat trains the whole language model: drop --lora-r (or --task classify).")
        if len(self.lora_targets) == 1 and "," in self.lora_targets[0]:
            self.lora_targets = tuple(t.strip() for t in self.lora_targets[0].split(",") if t.strip())
        if len(self.labels) == 1 and "," in self.labels[0]:
            self.labels = tuple(t.strip() for t in self.labels[0].split(",") if t.strip())

    def quant(self) -> QuantConfig | None:
        return QuantConfig(method=self.qat, group_size=self.qat_group_size) if self.qat else None

    def lora(self) -> L.LoraConfig | None:
        if not self.lora_r:
            return None
        return L.LoraConfig(
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            targets=self.lora_targets,
            rslora=self.lora_rslora,
            experts=self.lora_experts,
        )


@dataclass
class FinetuneResult:
    out_dir: str
    model_dir: str
    adapter_dir: str | None
    stages: list[dict[str, Any]]
    val: dict[str, float]
    baseline: dict[str, float] | None
    report: str


# --- the base ----------------------------------------------------------------------------------------------------
def resolve_base(base: str | Path) -> tuple[Path, Any]:
    """(model folder, its tokenizer). A run folder means its finished model (or latest checkpoint)."""
    from deepsail.data.tokenizer import Tokenizer
    from deepsail.train.checkpoint import resolve_checkpoint

    folder = resolve_checkpoint(base)
    candidates = [folder]
    if L.is_adapter_dir(folder):
        _, raw = L.read_adapter_config(folder)
        if raw.get("base_model_name_or_path"):
            candidates.append(Path(raw["base_model_name_or_path"]))
    for where in candidates:
        if (where / "tokenizer.json").is_file():
            return folder, Tokenizer.load(where)
    raise ValueError(f"{folder} has no tokenizer.json; fine-tuning needs the tokenizer the base was trained with.")


def load_base(folder: Path, device: torch.device) -> nn.Module:
    """The base model in fp32 master weights (autocast gives bf16 compute), any adapter it carries merged in."""
    if quantization_config_of(folder) is not None:
        raise ValueError(f"{folder} is quantized; fine-tune the float model (add --qat to train for quantization).")
    model = from_pretrained(folder, dtype="fp32", device=device)
    if L.lora_layers(model):
        L.remove_lora(model, merge=True)
    return model


# --- data ----------------------------------------------------------------------------------------------------------
def split_records(records: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    from deepsail.data.corpus import split_of

    def key(r: dict) -> str:  # the record's content alone: not where in which file it sits
        return json.dumps({k: v for k, v in r.items() if k != "source"}, sort_keys=True)

    val = [r for r in records if split_of(key(r), fraction) == "val"]
    train = [r for r in records if split_of(key(r), fraction) == "train"]
    if not val:  # a tiny file: hold out one record so validation means something
        train, val = records[1:], records[:1]
    if not train:
        raise ValueError(f"{len(records)} record(s) are too few to hold out a validation split.")
    return train, val


def _records(task: str, data: str, tune: TuneConfig, console: Console) -> tuple[list[dict], list[dict], str]:
    from deepsail.data.tasks import docstring_chats, module_chunks
    from deepsail.tune.data import read_jsonl
    from deepsail.tune.tasks import demonstration_chats, parse_embedded

    embedded = parse_embedded(data) if task == "sft" else None
    if embedded:  # the verifiable tasks' worked demonstrations (the SFT stage of the R1 recipe)
        name, digits = embedded
        train = demonstration_chats(name, "train", EMBEDDED_TASK_EXAMPLES, digits=digits)
        return train, demonstration_chats(name, "test", 200, digits=digits), data
    if data:
        train, val = split_records(read_jsonl(data), tune.val_fraction)
        return train, val, data
    if task == "sft":
        console.print("no --data: the embedded stdlib task (write the function a docstring describes)")
        return docstring_chats("train"), docstring_chats("val"), "embedded:stdlib-docstring-chats"
    console.print("no --data: the embedded stdlib task (which package a chunk of source comes from)")
    train, _ = module_chunks("train", max_per_family=200)
    val, _ = module_chunks("val", max_per_family=60)
    return train, val, "embedded:stdlib-module-families"


# --- the objective -------------------------------------------------------------------------------------------------
def tuned_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Next-token loss. The MTP modules' loss joins only when they train: a frozen draft head would otherwise pull
    the trunk toward what it predicts (and cost a block's forward per step)."""
    from deepsail.model import IGNORE_INDEX
    from deepsail.train.pretrain import next_token_loss

    if any(p.requires_grad for p in model.mtp.parameters()):
        return next_token_loss(model, batch)
    x_BT, y_BT = batch
    # The head runs on target positions only: an SFT prompt's tokens never reach it (nor its fp32 logits memory).
    hidden = model(x_BT, last_logits_only=True, return_hidden=True).hidden
    keep = y_BT != IGNORE_INDEX
    return {"loss": F.cross_entropy(model.logits_of(hidden[keep]).float(), y_BT[keep])}


# --- checkpoints: only what trains ---------------------------------------------------------------------------------
def tuned_saver(touched: set[str], base_dir: Path) -> Callable[[nn.Module, Path], None]:
    def save(model: nn.Module, folder: Path) -> None:
        state = model.state_dict()
        save_file({k: state[k].detach().contiguous() for k in sorted(touched)}, str(folder / TUNED))
        (folder / BASE_FILE).write_text(json.dumps({"base": str(base_dir.resolve())}) + "\n")
        trunk = getattr(model, "trunk", model)
        if L.lora_layers(trunk):
            L.write_adapter(trunk, folder, base_model_name_or_path=str(base_dir.resolve()))

    return save


def save_policy(model: nn.Module, tokenizer: Any, out: Path, base_dir: Path) -> tuple[Path, Path | None]:
    """A post-training run's outputs (DPO, GRPO): RUN/model (an HF folder, any LoRA merged in: the model itself
    stays unmerged) and, when LoRA is on, RUN/adapter in peft's format on `base_dir`. Returns both paths."""
    model_dir, adapter_dir = out / "model", None
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
    if L.lora_layers(model):
        adapter_dir = out / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            L.write_adapter(model, tmp, base_model_name_or_path=str(base_dir.resolve()))
            tokenizer.save(tmp)
    return model_dir, adapter_dir


def check_same_tuning(checkpoint: Path, tune: TuneConfig) -> None:
    """A resume must rebuild the same trainable structure: refuse other LoRA settings, task, stages or labels."""
    try:
        saved = json.loads((checkpoint.parent.parent / "run_config.json").read_text()).get("tune") or {}
    except (OSError, ValueError):
        return  # nothing recorded to compare with; load_tuned still checks every shape
    now = dataclasses.asdict(tune)
    keys = ("lora_r", "lora_alpha", "lora_targets", "lora_rslora", "lora_experts", "task", "stages", "labels", "qat")
    changed = {k: (saved[k], now[k]) for k in keys if k in saved and _norm(saved[k]) != _norm(now[k])}
    if changed:
        raise ValueError(
            f"--resume: {checkpoint} was trained with other settings (saved -> now): {changed}; resume with the "
            "same ones, or start a new --out."
        )


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, list | tuple) else v


def restore_data_and_rng(checkpoint: Path, batches: Any) -> None:
    from deepsail.train.checkpoint import load_pt, set_rng_state

    state = load_pt(checkpoint / "state.pt", "cpu")
    batches.load_state_dict(state["loader"])
    set_rng_state(state["rng"])


# --- the run -------------------------------------------------------------------------------------------------------
def finetune(
    base: str | Path,
    cfg: TrainConfig,
    tune: TuneConfig,
    *,
    data: str = "",
    resume: bool = False,
    steps_given: bool = False,
    console: Console | None = None,
) -> FinetuneResult:
    """Fine-tune `base` on `data` as `tune` says (see the module docstring); `cfg.out` is the run folder."""
    from deepsail.data.tokenizer import token_byte_lengths
    from deepsail.eval.metrics import evaluate_lm as lm_evaluate
    from deepsail.tune import heads
    from deepsail.tune.data import ExampleBatches, chat_examples, class_examples

    console = console or Console()
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out = check_run_folder(cfg.out, resume)
    base_dir, tokenizer = resolve_base(base)
    stages = (
        read_stages(tune.stages)
        if tune.stages
        else [
            Stage(
                "finetune", ("all",), cfg.lr, None if steps_given else tune.epochs, cfg.steps if steps_given else None
            )
        ]
    )
    lora_cfg = tune.lora()
    if not tune.stages and lora_cfg is not None:
        stages = [dataclasses.replace(stages[0], layers=("lora",))]
    if any("lora" in s.layers for s in stages) and lora_cfg is None:
        raise ValueError(f'{tune.stages}: a stage trains "lora" but no adapter is set up; pass --lora-r.')

    seed_everything(cfg.seed)
    model = load_base(base_dir, device)
    if not (base_dir / "config.json").is_file() or (base_dir / "adapter_config.json").is_file():
        # An adapter or a fine-tuning checkpoint: what this run adapts is that model merged. Write it, so the
        # checkpoints, the adapter and base.json name a folder that loads as exactly that.
        merged_base = out / "base"
        if not (resume and (merged_base / "config.json").is_file()):
            with atomic_dir(merged_base) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save(tmp)
        base_dir = merged_base
    trunk = model
    max_len = min(cfg.seq_len, model.config.max_position_embeddings)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    max_tokens = cfg.batch_size * max_len

    # --- data, loss, evaluation ---
    baseline = None
    if tune.task == "lm" and not data:
        raise ValueError(
            "--task lm needs --data: a .jsonl/.txt/.parquet file or folder, or a `deepsail data prepare` folder."
        )
    if tune.task == "lm":
        from deepsail.data.loader import PackedLoader, eval_batches
        from deepsail.data.prepare import prepare

        data_dir = Path(data)
        if not (data_dir / "manifest.json").is_file():
            data_dir = out / "data"
            if not (resume and (data_dir / "manifest.json").is_file()):
                prepare(
                    [data],
                    tokenizer,
                    data_dir,
                    text_field=tune.text_field,
                    val_fraction=tune.val_fraction,
                    progress=False,
                )
        batches = PackedLoader(data_dir, "train", cfg.batch_size, max_len, seed=cfg.seed, device=device)
        token_bytes = token_byte_lengths(tokenizer)
        loss_fn = tuned_lm_loss

        def evaluate(m: nn.Module) -> dict[str, float]:
            val = eval_batches(data_dir, cfg.batch_size, max_len, "val", max_batches=cfg.eval_batches, device=device)
            r = lm_evaluate(m, val, token_bytes, device, precision)
            return {k: r[k] for k in ("loss", "ppl", "bpb")}

        source, batches_per_epoch = str(data), len(batches)
    else:
        train_records, val_records, source = _records(tune.task, data, tune, console)
        if tune.task == "sft":
            train_ex, val_ex = (
                chat_examples(train_records, tokenizer, max_len),
                chat_examples(val_records, tokenizer, max_len),
            )
            loss_fn = tuned_lm_loss
            token_bytes = token_byte_lengths(tokenizer)
        else:
            labels = list(tune.labels) or sorted(
                {str(r.get(tune.labels_field)) for r in train_records if r.get(tune.labels_field) is not None}
            )
            train_ex = class_examples(train_records, tokenizer, max_len, labels, tune.text_field, tune.labels_field)
            val_ex = class_examples(val_records, tokenizer, max_len, labels, tune.text_field, tune.labels_field)
            model = heads.SequenceClassifier(trunk, labels)
            loss_fn = heads.classify_loss
            baseline = heads.bag_of_words_baseline(
                (train_ex.inputs, train_ex.targets), (val_ex.inputs, val_ex.targets), tokenizer.vocab_size, len(labels)
            )
            console.print(
                f"bag-of-words baseline: val accuracy {baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f}"
            )
        batches = ExampleBatches(train_ex, max_tokens, pad_id, cfg.seed, device)
        val_batches = ExampleBatches(val_ex, max_tokens, pad_id, cfg.seed, device)
        batches_per_epoch = batches.batches_per_epoch
        console.print(
            f"{len(train_ex)} train / {len(val_ex)} val examples from {source} ({train_ex.truncated} cut to "
            f"{max_len} tokens, {train_ex.dropped} dropped); padding {batches.padded_fraction():.1%} of batch slots"
        )

        if tune.task == "sft":

            def evaluate(m: nn.Module) -> dict[str, float]:
                r = lm_evaluate(m, val_batches.fixed_order(), token_bytes, device, precision)
                return {k: r[k] for k in ("loss", "ppl", "bpb")}
        else:

            def evaluate(m: nn.Module) -> dict[str, float]:
                return heads.evaluate_classifier(m, val_batches.fixed_order())

    if lora_cfg is not None:
        L.apply_lora(trunk, lora_cfg, freeze=True)
    if tune.qat:
        apply_qat(trunk, tune.quant())  # parameter names unchanged: checkpoints and resume are as without
    if tune.task == "classify":
        stages = [dataclasses.replace(s, layers=tuple(dict.fromkeys((*s.layers, "head")))) for s in stages]
    ever_trained: set[str] = set()
    for stage in stages:  # every stage's layers exist before the first one trains (no half-run on a typo)
        select_trainable(model, stage.layers, f"{tune.stages or 'finetune'}: stage {stage.name!r}", tune.train_mtp)
        ever_trained |= {n for n, p in model.named_parameters() if p.requires_grad}

    # --- EWC: hold what the previous task relied on, anchored at the weights this run starts from ---
    penalty = None
    if tune.ewc_lambda:
        from deepsail.tune.ewc import EWCPenalty, load_fisher

        prefix = "trunk." if trunk is not model else ""
        trainable = {n.removeprefix(prefix) for n in ever_trained}
        penalty = EWCPenalty(trunk, load_fisher(base_dir), tune.ewc_lambda, trainable)

    def loss_with_ewc(penalty: Callable[[], torch.Tensor] | None) -> Callable:
        if penalty is None:
            return loss_fn

        def fn(m: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
            losses = loss_fn(m, batch)
            ewc = penalty()
            return {**losses, "loss": losses["loss"] + ewc, "task_loss": losses["loss"], "ewc": ewc}

        return fn

    # --- the stages ---
    touched: set[str] = set()
    results: list[dict[str, Any]] = []
    model.to(device)
    flops = trunk.flops_per_token(max_len)
    for k, stage in enumerate(stages, start=1):
        stage_out = out if len(stages) == 1 else out / "stages" / f"{k}_{stage.name}"
        where = f"{tune.stages or 'finetune'}: stage {stage.name!r}"
        n_trainable = select_trainable(model, stage.layers, where, tune.train_mtp)
        touched |= {n for n, p in model.named_parameters() if p.requires_grad}
        steps = stage.steps or max(1, math.ceil(stage.epochs * batches_per_epoch / cfg.grad_accum))
        stage_cfg = cfg.replace(
            out=str(stage_out),
            lr=stage.lr,
            min_lr=min(cfg.min_lr, stage.lr),
            steps=steps,
            minutes=None,
            warmup_steps=min(cfg.warmup_steps, steps // 10),
            eval_every=min(cfg.eval_every, steps) if cfg.eval_every else 0,
        )
        summary = stage_out / "summary.json"
        if resume and summary.is_file():  # finished before the interruption: load its final weights, move on
            from deepsail.train.checkpoint import latest_checkpoint

            done_ckpt = latest_checkpoint(stage_out / "checkpoints")
            check_same_tuning(done_ckpt, tune)
            load_tuned(model, done_ckpt)
            restore_data_and_rng(done_ckpt, batches)  # the next stage goes on from where this one ended
            results.append({"stage": stage.name, **json.loads(summary.read_text())})
            console.print(f"stage {stage.name}: already done ({summary})")
            continue
        start = check_resumable(stage_cfg, resume and (stage_out / "checkpoints").is_dir(), console)
        if start is not None:
            check_same_tuning(start, tune)
            load_tuned(model, start)
        console.print(
            f"stage {k}/{len(stages)} {stage.name}: layers {list(stage.layers)}, lr {stage.lr:g}, {steps} steps "
            f"({n_trainable / 1e6:.3f}M trainable of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M)"
        )
        result: TrainResult = train_loop(
            model,
            batches,
            loss_with_ewc(penalty),
            stage_cfg,
            evaluate=evaluate,
            tokens_per_batch=lambda b: b[0].numel(),
            flops_per_token=flops,
            tokenizer=tokenizer,
            resume_from=start,
            run_info={
                "base": str(base_dir.resolve()),
                "data": source,
                "tune": dataclasses.asdict(tune),
                "stage": dataclasses.asdict(stage),
                "lora": L.lora_config_dict(lora_cfg) if lora_cfg else None,
            },
            console=console,
            name=stage.name,
            save_model=tuned_saver(touched, base_dir),
        )
        results.append({"stage": stage.name, **result.to_dict()})

    # --- outputs: merged model (+ Fisher), adapter, report ---
    fisher = None
    if tune.ewc_batches:
        from deepsail.tune.ewc import fisher_diagonal

        prefix = "trunk." if trunk is not model else ""
        names = {n for n in touched if not L.is_lora_param(n)}
        names |= {f"{prefix}{n}.weight" for n, m in L.lora_layers(trunk).items() if isinstance(m, L.LoraLinear)}
        names |= {
            f"{prefix}{n}.{w}"
            for n, m in L.lora_layers(trunk).items()
            if isinstance(m, L.LoraExperts)
            for w in ("gate_up_proj", "down_proj")
        }
        names = {n for n in names if n in dict(model.named_parameters())}
        fisher = fisher_diagonal(model, iter(batches), loss_fn, tune.ewc_batches, names)
        fisher = {n.removeprefix("trunk."): f for n, f in fisher.items()}
    model_dir, adapter_dir = out / "model", None
    with atomic_dir(model_dir) as tmp:
        trunk.save_pretrained(tmp)  # with LoRA: the adapter merged in (the model stays unmerged)
        tokenizer.save(tmp)
        if tune.task == "classify":
            model.save_head(tmp)
        if fisher:
            from deepsail.tune.ewc import save_fisher

            save_fisher(fisher, tmp)
    if L.lora_layers(trunk):
        adapter_base = base_dir
        trunk_prefix = "trunk." if trunk is not model else ""
        if any(not L.is_lora_param(n) and n.startswith(trunk_prefix) for n in touched):
            # Base weights trained too (a staged run's top blocks): the adapter's base is that model, not BASE.
            adapter_base = out / "base"
            with atomic_dir(adapter_base) as tmp:
                from deepsail.model.hf import save_hf

                state = {k: v for k, v in trunk.state_dict().items() if not L.is_lora_param(k)}
                save_hf(trunk, tmp, state=state)
                tokenizer.save(tmp)
        adapter_dir = out / "adapter"
        with atomic_dir(adapter_dir) as tmp:
            L.write_adapter(trunk, tmp, base_model_name_or_path=str(adapter_base.resolve()))
            tokenizer.save(tmp)
            if tune.task == "classify":
                model.save_head(tmp)
    quantized_dir = None
    if tune.qat:  # RUN/model holds the trained float weights; RUN/quantized what the fake quantization computed
        quantized_dir = out / "quantized"
        save_quantized(convert_qat(trunk), quantized_dir, copy_from=model_dir)
    val = {k.removeprefix("val_"): v for k, v in results[-1].items() if k.startswith("val_")}
    write_cards(out, base, base_dir, trunk.config, cfg, tune, data, source, results, baseline, adapter_dir)
    report = write_report(out, tune, results, val, baseline, source, base_dir, adapter_dir)
    console.print(
        f"model: {model_dir}"
        + (f" | adapter: {adapter_dir}" if adapter_dir else "")
        + (f" | quantized ({tune.qat}): {quantized_dir}" if quantized_dir else "")
        + f" | report: {report}"
    )
    return FinetuneResult(
        str(out), str(model_dir), str(adapter_dir) if adapter_dir else None, results, val, baseline, str(report)
    )


def write_cards(
    out: Path,
    base: str | Path,
    base_dir: Path,
    config: Any,
    cfg: TrainConfig,
    tune: TuneConfig,
    data: str,
    source: str,
    results: list[dict[str, Any]],
    baseline: dict[str, float] | None,
    adapter_dir: Path | None,
) -> None:
    """Model cards for RUN/model, RUN/adapter (as peft writes one beside its adapters) and RUN/quantized."""
    from deepsail.card import invocation, write_model_card

    verb = "sft" if tune.task == "sft" else "finetune"
    command = ["deepsail", verb, str(base), "--out", str(out)] + (["--data", data] if data else [])
    command += ["--task", tune.task] if verb == "finetune" and tune.task != "lm" else []
    command += ["--lora-r", str(tune.lora_r), "--lora-alpha", f"{tune.lora_alpha:g}"] if tune.lora_r else []
    command += (["--stages", tune.stages] if tune.stages else []) + (["--qat", tune.qat] if tune.qat else [])
    how = "staged (" + ", ".join(r["stage"] for r in results) + ")" if tune.stages else "full"
    how = f"LoRA r={tune.lora_r}" if tune.lora_r and not tune.stages else how
    common = dict(
        config=config,
        title=out.name,
        data=[f"{source} (task: {tune.task})"],
        training={
            "train": cfg.to_dict(),
            "tune": dataclasses.asdict(tune),
            "stages": [{k: r[k] for k in ("stage", "step", "tokens") if k in r} for r in results],
        },
        metrics={k: v for k, v in results[-1].items() if k.startswith("val_")}
        | {f"bag_of_words_{k}": v for k, v in (baseline or {}).items()},
        how_made=invocation(shlex.join(command)),
        pipeline_tag="text-classification" if tune.task == "classify" else "text-generation",
        tags=["fine-tuned", *(["lora"] if tune.lora_r else []), *(["sft"] if tune.task == "sft" else [])],
    )
    write_model_card(
        out / "model",
        base_model=str(base_dir),
        summary=f"{base_dir} fine-tuned with deepsail, {how}" + (", the adapter merged in." if tune.lora_r else "."),
        **common,
    )
    if adapter_dir is not None:
        _, raw = L.read_adapter_config(adapter_dir)
        adapter_base = str(raw.get("base_model_name_or_path") or base_dir)
        write_model_card(
            adapter_dir,
            kind="adapter",
            base_model=adapter_base,
            summary=f"A LoRA adapter for {adapter_base}.",
            **common,
        )
    if tune.qat:
        quantized = out / "quantized"
        write_model_card(
            quantized,
            base_model=str(base_dir),
            summary=f"{base_dir} trained with {tune.qat} fake quantization (QAT), then converted.",
            quantization=quantization_config_of(quantized),
            **common | {"tags": [*common["tags"], "qat"]},
        )


def write_report(
    out: Path,
    tune: TuneConfig,
    results: list[dict[str, Any]],
    val: dict[str, float],
    baseline: dict[str, float] | None,
    source: str,
    base_dir: Path,
    adapter_dir: Path | None,
) -> Path:
    lines = [
        f"# Fine-tuning report: {out.name}",
        "",
        f"- base: `{base_dir}`",
        f"- data: `{source}` (task `{tune.task}`)",
        f"- LoRA: r={tune.lora_r}, alpha={tune.lora_alpha}, dropout={tune.lora_dropout}"
        if tune.lora_r
        else "- LoRA: off",
        f"- outputs: `{out / 'model'}`" + (f", adapter `{adapter_dir}`" if adapter_dir else ""),
        "",
        "| stage | steps | tok/s | val loss | " + " | ".join(k for k in val if k != "loss") + " |",
        "|---|---|---|---|" + "---|" * len([k for k in val if k != "loss"]),
    ]
    for r in results:
        vals = [f"{r.get('val_' + k, float('nan')):.4f}" for k in val if k != "loss"]
        lines.append(
            f"| {r['stage']} | {r['step']} | {r['tok_per_s']:,.0f} | {r.get('val_loss', float('nan')):.4f} | "
            + " | ".join(vals)
            + " |"
        )
    if baseline:
        lines += [
            "",
            "| classifier | val accuracy | val macro-F1 |",
            "|---|---|---|",
            f"| fine-tuned model | {val.get('accuracy', float('nan')):.3f} | {val.get('macro_f1', float('nan')):.3f} |",
            f"| bag-of-words logistic regression | {baseline['accuracy']:.3f} | {baseline['macro_f1']:.3f} |",
        ]
    plots = [Path(r["plot_path"]) for r in results if r.get("plot_path")]
    lines += [
        "",
        *[f"![{p.parent.name} loss]({p.relative_to(out) if p.is_relative_to(out) else p})" for p in plots],
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# -----------------------------------------------------------------------------
# The CLI verbs

_TRAIN = Options(
    TrainConfig,
    skip=("data", "model_preset", "tokenizer"),
    defaults={
        "out": "runs/finetune",
        "lr": 1e-4,
        "min_lr": 1e-5,
        "warmup_steps": 10,
        "weight_decay": 0.0,
        "bias_update_rate": 0.0,
        "eval_every": 100,
    },
)


@options(cfg=_TRAIN, tune=Options(TuneConfig, skip=("task",)))
def finetune_command(
    base: Annotated[str, typer.Argument(help="The model to adapt: a run folder, an HF folder, or an adapter folder.")],
    cfg: TrainConfig,
    tune: TuneConfig,
    data: Annotated[
        str,
        typer.Option(help="Training data: .jsonl/.txt/.parquet (or a `deepsail data prepare` folder for --task lm)."),
    ] = "",
    task: Annotated[str, typer.Option(help="lm: next-token loss; classify: a sequence-classification head.")] = "lm",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")] = False,
    given: frozenset[str] = frozenset(),
) -> FinetuneResult:
    """Adapt a model: full fine-tuning, LoRA (peft's adapter format), or staged (--stages), for next-token loss
    or classification. Writes RUN/model (merged HF folder), RUN/adapter (with LoRA) and RUN/report.md.

    \b
    Examples:
      deepsail finetune runs/base --data finance.jsonl --lora-r 16 --lora-alpha 32 --out runs/finance
      deepsail finetune runs/base --data finance.jsonl --stages stages.json --out runs/staged
      deepsail finetune runs/base --task classify --lora-r 8 --out runs/classify    # embedded stdlib task
      deepsail finetune runs/finance/model --data law.jsonl --ewc-lambda 100 --out runs/law
    """
    tune = dataclasses.replace(tune, task=task)
    return finetune(base, cfg, tune, data=data, resume=resume, steps_given="steps" in given)


@options(
    cfg=Options(TrainConfig, skip=_TRAIN.skip, defaults={**_TRAIN.defaults, "out": "runs/sft", "seq_len": 512}),
    tune=Options(TuneConfig, skip=("task", "labels", "labels_field", "text_field")),
)
def sft_command(
    base: Annotated[str, typer.Argument(help="The model to tune: a run folder, an HF folder, or an adapter folder.")],
    cfg: TrainConfig,
    tune: TuneConfig,
    data: Annotated[
        str,
        typer.Option(
            help='Chats: JSONL of {"messages": [{"role": ..., "content": ...}, ...]}, or embedded:TASK[:DIGITS] for a '
            "verifiable task's worked demonstrations (default: embedded stdlib instructions)."
        ),
    ] = "",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")] = False,
    given: frozenset[str] = frozenset(),
) -> FinetuneResult:
    """Supervised fine-tuning on chats: rendered with the model's chat template, loss on assistant tokens only,
    conversations padded per length bucket (never attending to each other). Without --data: instruction pairs mined
    from the standard library ("write the function this docstring describes").

    \b
    Examples:
      deepsail sft runs/base --out runs/sft                       # embedded stdlib instructions
      deepsail sft runs/base --data chats.jsonl --lora-r 16 --epochs 3 --out runs/chat
      deepsail sft runs/base --data embedded:arithmetic --out runs/r1-sft   # the R1 recipe's SFT stage
    """
    tune = dataclasses.replace(tune, task="sft")
    return finetune(base, cfg, tune, data=data, resume=resume, steps_given="steps" in given)
