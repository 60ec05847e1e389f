"""The three multimodal models as one saved format: build, save, load.

    task "clip"     ContrastiveModel (align.py): image + text towers into one space; retrieval
    task "vqa"      VQAModel (fusion.py): single-stream cross-modal fusion + an answer head over `answers`
    task "caption"  Captioner (connector.py): image prefix + a deepsail decoder; captions and chat about an image

A model folder, written atomically (`files.atomic_dir`):
    mm_config.json     {"format": "deepsail-multimodal", "task", "vision", "text" | "decoder", ...}
    mm.safetensors     every tensor outside the decoder (safetensors only: loading never unpickles)
    config.json + model.safetensors   the captioner's decoder, an ordinary deepsail/HF model folder (caption only):
                       `deepsail generate/serve` load it as any model, and serve adds the image prefix beside it
    tokenizer.json     the tokenizer every text part reads (with <|image|> for a captioner)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from deepsail.files import atomic_dir
from deepsail.model.config import ModelConfig
from deepsail.model.transformer import Transformer
from deepsail.multimodal.align import ContrastiveModel
from deepsail.multimodal.connector import IMAGE_TOKEN, Captioner, ImagePrefix
from deepsail.multimodal.fusion import VQAModel
from deepsail.multimodal.vision import VisionConfig

FORMAT = "deepsail-multimodal"
CONFIG_FILE, WEIGHTS_FILE = "mm_config.json", "mm.safetensors"
TASKS = ("clip", "vqa", "caption")


@dataclass
class MMConfig:
    task: str
    vision: VisionConfig
    text: ModelConfig | None = None  # the text encoder (clip, vqa)
    decoder: ModelConfig | None = None  # the captioner's decoder
    embed_dim: int = 128  # clip: the shared space
    answers: list[str] = field(default_factory=list)  # vqa: the answer head's classes, in order
    image_token_id: int = -1  # caption: the placeholder id in the decoder's vocabulary
    pool: int = 1  # caption: p x p average pool of the patch grid before the connector
    max_text_len: int = 64  # clip, vqa: longest text the encoder reads (longer is an error, not a truncation)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown multimodal task {self.task!r}; choose one of {list(TASKS)}")
        if self.task in ("clip", "vqa") and self.text is None:
            raise ValueError(f"a {self.task} model needs a text encoder config")
        if self.task == "vqa" and len(self.answers) < 2:
            raise ValueError("a vqa model needs at least two answers")
        if self.task == "caption" and (self.decoder is None or not 0 <= self.image_token_id < self.decoder.vocab_size):
            raise ValueError("a caption model needs a decoder config and an image token id inside its vocabulary")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "task": self.task, "vision": self.vision.to_dict()}
        if self.text is not None:
            d["text"] = self.text.to_dict()
        d |= {"embed_dim": self.embed_dim, "max_text_len": self.max_text_len}
        if self.task == "vqa":
            d |= {"answers": list(self.answers)}
        if self.task == "caption":
            d |= {"image_token": IMAGE_TOKEN, "image_token_id": self.image_token_id, "pool": self.pool}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], decoder: ModelConfig | None = None) -> MMConfig:
        if d.get("format") != FORMAT:
            raise ValueError(f"not a deepsail multimodal config (format {d.get('format')!r}, expected {FORMAT!r})")
        cfg = cls(
            task=d["task"],
            vision=VisionConfig.from_dict(d["vision"]),
            text=ModelConfig.from_dict(d["text"]) if "text" in d else None,
            decoder=decoder,
            embed_dim=d.get("embed_dim", 128),
            answers=list(d.get("answers", [])),
            image_token_id=d.get("image_token_id", -1),
            pool=d.get("pool", 1),
            max_text_len=d.get("max_text_len", 64),
        )
        cfg.validate()
        return cfg


def build(cfg: MMConfig) -> nn.Module:
    """A freshly initialised model for `cfg.task`."""
    cfg.validate()
    if cfg.task == "clip":
        return ContrastiveModel(cfg.vision, cfg.text, cfg.embed_dim)
    if cfg.task == "vqa":
        return VQAModel(cfg.vision, cfg.text, len(cfg.answers))
    return Captioner(cfg.vision, cfg.decoder, cfg.image_token_id, cfg.pool)


def write_model(model: nn.Module, cfg: MMConfig, folder: Path) -> None:
    """Write the model's files into `folder` (a folder being built: a checkpoint's, or `save`'s temporary one)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if isinstance(model, Captioner):
        model.decoder.save_pretrained(folder)
        state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    (folder / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def save(model: nn.Module, cfg: MMConfig, folder: str | Path, tokenizer: Any = None) -> Path:
    """The model (and its tokenizer) as a folder that replaces `folder` only once complete."""
    with atomic_dir(folder) as tmp:
        write_model(model, cfg, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def read_config(folder: str | Path) -> MMConfig:
    folder = Path(folder)
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ValueError(
            f"{folder} is not a deepsail multimodal model (no {CONFIG_FILE}); train one with `deepsail mm train`"
        )
    try:
        d = json.loads(file.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from e
    decoder = None
    if d.get("task") == "caption":
        from deepsail.model.hf import read_config as read_decoder_config

        decoder = read_decoder_config(folder)
    return MMConfig.from_dict(d, decoder)


def _load_state(module: nn.Module, file: Path, prefix_drop: str = "") -> None:
    if not file.is_file():
        raise ValueError(f"{file.parent} has no {file.name}: the model folder is incomplete")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{file} is not a readable safetensors file ({e})") from e
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(prefix_drop)] if prefix_drop else missing
    if missing or unexpected:
        raise ValueError(
            f"{file} does not match its config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, MMConfig]:
    """A saved multimodal model, in eval mode, and its config."""
    folder = Path(folder)
    cfg = read_config(folder)
    model = build(cfg)
    if isinstance(model, Captioner):
        model.decoder = Transformer.from_pretrained(folder)
    _load_state(model, folder / WEIGHTS_FILE, prefix_drop="decoder." if cfg.task == "caption" else "")
    return model.to(device).eval(), cfg


def load_image_prefix(folder: str | Path, device: str | torch.device = "cpu") -> tuple[ImagePrefix, int] | None:
    """For a captioner's folder, its image prefix (vision encoder + connector) and the placeholder id; None for a
    folder without one (a text-only model). `deepsail serve` calls this beside loading the decoder."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        return None
    cfg = read_config(folder)
    if cfg.task != "caption":
        raise ValueError(f"{folder} is a multimodal {cfg.task} model; only a caption model generates text")
    holder = nn.Module()
    holder.prefix = ImagePrefix(cfg.vision, cfg.decoder.hidden_size, cfg.pool)
    _load_state(holder, folder / WEIGHTS_FILE)
    return holder.prefix.to(device).eval(), cfg.image_token_id
