"""The model card: a README.md in every model folder deepsail writes, in the Hugging Face hub's shape.

    write_model_card("runs/finance/model", config=model.config, title="finance", base_model="runs/default",
                     data=["finance.jsonl"], training={...}, metrics={"val_loss": 1.93}, how_made="deepsail ...")

YAML front matter the hub reads (library_name, license, pipeline_tag, base_model, tags), then what a person wants
before using a model: the architecture with its parameter counts, the data, the training config, the metrics,
intended use and limitations, how to load it (deepsail, the CLI, transformers or peft when they can), and the
command that made it. `deepsail run`, `pretrain`, `finetune`/`sft`, `quantize` and `export hf` write one into the
folder a user loads. Single-file exports (ONNX, GGUF, torch.export) get none: they carry their metadata inside.

Every value that comes from outside (titles, paths, metric names, commands) is escaped for where it lands: JSON
strings in the front matter (JSON's double-quoted strings are YAML's too), backslash escapes in prose and table
cells, fences longer than any backtick run around code, so no name can end the front matter or add a section.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deepsail.files import atomic_write_text
from deepsail.model import ModelConfig, Transformer
from deepsail.model.config import MODEL_TYPES

CARD = "README.md"
INTENDED_USE = (
    "Research and experiments with DeepSeek-style language models: text and code completion in the domain of the "
    "training data, evaluation, and as a base to fine-tune. It is not evaluated for safety, factuality or bias, has "
    "not been aligned to follow instructions unless its card says so, and should not be relied on for decisions "
    "about people or for advice."
)
# markdown's syntax characters; `_` only where it could start or end emphasis (never inside a word: val_bpb stays)
_MARKDOWN = re.compile(r"([\\`*\[\]<>#|~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9]))")


# --- escaping: outside text never changes the card's structure -----------------------------------------------------
def _yaml(value: str) -> str:
    """A YAML double-quoted scalar: json.dumps, plus \\u escapes for the characters YAML may not hold raw."""
    text = json.dumps(str(value), ensure_ascii=False)
    return "".join(
        c if c.isprintable() else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text
    )


def _text(value: Any) -> str:
    """One line of markdown that renders as the literal text: whitespace collapsed, markdown syntax escaped."""
    return _MARKDOWN.sub(r"\\\1", " ".join(str(value).split()))


def _fence(text: str, at_least: int) -> str:
    return "`" * max(at_least, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)


def _code(value: Any) -> str:
    """Inline code, whatever backticks the text holds."""
    text = " ".join(str(value).split())
    fence = _fence(text, 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _block(text: str, language: str = "") -> list[str]:
    fence = _fence(text, 3)
    return [fence + language, text, fence]


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _text(value)
    if isinstance(value, int):
        return f"{value:,}"
    return (
        f"{value:.4g}"
        if math.isfinite(value) and abs(value) < 1e6
        else f"{value:,.0f}"
        if math.isfinite(value)
        else str(value)
    )


def invocation(fallback: str) -> str:
    """The `deepsail ...` command line this process runs; `fallback` (a CLI equivalent) when called from Python."""
    if Path(sys.argv[0]).name == "deepsail":
        return shlex.join(["deepsail", *sys.argv[1:]])
    return fallback


def _count(n: int) -> str:
    return next(f"{n / scale:.2f}{unit}" for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= scale)


# --- what the card says -------------------------------------------------------------------------------------------
def architecture(config: ModelConfig) -> list[tuple[str, str]]:
    """(row, value) pairs describing the model, parameter counts included (counted on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    total, active = model.num_params(), model.num_params(active=True)
    c = config
    if c.attention_type == "mla":
        q = f"queries through a rank-{c.q_lora_rank} latent" if c.q_lora_rank else "queries projected directly"
        attention = (
            f"Multi-head Latent Attention: {c.num_attention_heads} heads, keys/values cached as a "
            f"{c.kv_lora_rank}-dim latent + {c.qk_rope_head_dim}-dim rope key per token; {q}"
        )
    else:
        kind = "multi-head" if c.num_key_value_heads == c.num_attention_heads else "grouped-query"
        attention = (
            f"{kind} attention: {c.num_attention_heads} query / {c.num_key_value_heads} key-value heads of "
            f"{c.head_dim or c.hidden_size // c.num_attention_heads} dims"
        )
    if c.is_moe:
        dense = f"; the first {c.first_k_dense_replace} layer(s) dense" if c.first_k_dense_replace else ""
        mlp = (
            f"DeepSeekMoE: {c.n_routed_experts} routed experts (top-{c.num_experts_per_tok}, {c.scoring_func} "
            f"router) + {c.n_shared_experts} shared, each {c.moe_intermediate_size} wide{dense}"
        )
    else:
        mlp = f"dense SwiGLU, {c.intermediate_size} wide"
    rows = [
        ("architecture", c.model_type),
        ("layers", str(c.num_hidden_layers)),
        ("hidden size", str(c.hidden_size)),
        ("attention", attention),
        ("MLP", mlp),
    ]
    if c.num_nextn_predict_layers:
        rows.append(("multi-token prediction", f"{c.num_nextn_predict_layers} MTP module(s) (draft heads)"))
    rows += [
        ("vocabulary", f"{c.vocab_size:,} tokens"),
        ("context", f"{c.max_position_embeddings:,} tokens"),
        (
            "parameters",
            f"{_count(total)} ({total:,})"
            + (f", {_count(active)} active per token" if c.is_moe else "")
            + (" (MTP modules not counted)" if c.num_nextn_predict_layers else ""),
        ),
    ]
    return rows


def _license_of(base_model: str | None) -> str:
    """The license in a local base model's card, so a fine-tune or export keeps it; "other" when unknown."""
    card = Path(base_model) / CARD if base_model else None
    try:
        text = card.read_text("utf-8") if card is not None and card.is_file() else ""
    except OSError:
        return "other"
    front = text.split("\n---", 1)[0] if text.startswith("---\n") else ""
    found = re.search(r"^license:\s*(.+?)\s*$", front, re.M)
    if not found:
        return "other"
    value = found.group(1)
    try:
        return str(json.loads(value)) if value.startswith('"') else value.strip("'")
    except ValueError:
        return "other"


def write_model_card(
    folder: str | Path,
    *,
    config: ModelConfig,
    title: str,
    summary: str = "",
    base_model: str | None = None,
    data: Sequence[str] = (),
    training: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    intended_use: str = INTENDED_USE,
    how_made: str = "",
    kind: str = "model",
    tags: Sequence[str] = (),
    quantization: Mapping[str, Any] | None = None,
    pipeline_tag: str = "text-generation",
    license: str | None = None,
) -> Path:
    """Write `folder/README.md`: the model card (see the module docstring). Returns its path.

    `kind` is "model" (a whole model folder) or "adapter" (a LoRA adapter: peft's library_name, as peft's own card
    says, since peft loads it too). `base_model` is what this was made from (a local folder or a hub id); its card's
    license carries over unless `license` is given. `quantization` is the folder's quantization_config.
    """
    if kind not in ("model", "adapter"):
        raise ValueError(f"kind {kind!r}: 'model' or 'adapter'.")
    folder = Path(folder)
    license = license or _license_of(base_model)
    all_tags = ["deepsail"]
    if config.model_type.startswith("deepseek"):
        all_tags.append("deepseek-style")
    all_tags.append(config.model_type)
    if config.is_moe:
        all_tags.append("moe")
    if config.attention_type == "mla":
        all_tags.append("mla")
    if kind == "adapter":
        all_tags.append("lora")
    if quantization:
        all_tags += ["quantized", str(quantization.get("method", ""))]
    all_tags += list(tags)
    all_tags = list(dict.fromkeys(t for t in all_tags if t))

    front = [
        "---",
        f"library_name: {'peft' if kind == 'adapter' else 'deepsail'}",
        f"license: {_yaml(license)}",
        f"pipeline_tag: {_yaml(pipeline_tag)}",
    ]
    if base_model:
        front.append(f"base_model: {_yaml(base_model)}")
    front += ["tags:", *[f"- {_yaml(t)}" for t in all_tags], "---", ""]

    lines = [f"# {_text(title)}", ""]
    if summary:
        lines += [_text(summary), ""]
    if base_model:
        lines += [f"Made from {_code(base_model)}.", ""]
    lines += ["## Model", "", "| | |", "|---|---|"]
    lines += [f"| {_text(k)} | {_text(v)} |" for k, v in architecture(config)]
    if quantization:
        detail = ", ".join(f"{k} {v}" for k, v in quantization.items() if not isinstance(v, list | dict))
        lines.append(f"| quantization | {_text(detail)} |")
    if kind == "adapter":
        lines.append("| weights | a LoRA adapter (peft's format) on the base model above; the base is not included |")
    lines.append("")

    lines += ["## Training data", ""]
    lines += [f"- {_text(d)}" for d in data] if data else ["Not recorded."]
    lines.append("")
    if training:
        lines += ["## Training config", "", *_block(json.dumps(dict(training), indent=2, default=str), "json"), ""]
    lines += ["## Evaluation", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {_text(k)} | {_number(v)} |" for k, v in metrics.items()]
    else:
        lines.append("No metrics recorded; `deepsail eval` measures some.")
    lines += ["", "## Intended use and limitations", "", _text(intended_use), ""]
    lines += ["## How to load", "", *_how_to_load(folder, config, kind, quantization, pipeline_tag), ""]
    if how_made:
        lines += ["## How it was made", "", *_block(how_made, "bash"), ""]
    return atomic_write_text(folder / CARD, "\n".join(front + lines))


def _how_to_load(
    folder: Path, config: ModelConfig, kind: str, quantization: Mapping[str, Any] | None, pipeline_tag: str
) -> list[str]:
    path = str(folder)
    py, sh = json.dumps(path), shlex.quote(path)
    lines = [
        "With deepsail:",
        "",
        *_block(f"import deepsail as ds\n\nmodel = ds.from_pretrained({py})", "python"),
        "",
    ]
    if pipeline_tag == "text-classification":
        lines += [
            "The classifier head (`classifier.json` + `score.safetensors`) loads onto it with "
            "`deepsail.tune.heads.load_head(model, path)`.",
            "",
        ]
    else:
        lines += [*_block(f'deepsail generate {sh} --prompt "def fibonacci(n):" --max-tokens 64', "bash"), ""]
    if kind == "adapter":
        lines += [
            "With peft, on the base model named in `adapter_config.json`:",
            "",
            *_block(
                "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                "base = AutoModelForCausalLM.from_pretrained(BASE)\n"
                f"model = PeftModel.from_pretrained(base, {py})",
                "python",
            ),
        ]
    elif quantization:
        lines.append("The weights are in deepsail's quantized format: deepsail loads them; transformers does not.")
    elif config.model_type in MODEL_TYPES:
        lines += [
            "With transformers:",
            "",
            *_block(
                "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({py})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({py})",
                "python",
            ),
        ]
    return lines
