"""`deepsail mm train`: one multimodal model trained through the one training loop (train/loop.py).

    data    the embedded procedural scenes (scenes.py: endless, resumable, held-out attribute combinations never
            shown), or a folder of images/ + captions.jsonl (images.py; clip and caption tasks)
    tokenizer   byte-level BPE trained on the data's text (a caption model's gets <|image|> added)
    model   models.build(task): clip | vqa | caption, its vision tower optionally initialised from another
            multimodal model (--init-vision: LLaVA's staging, a contrastively trained encoder under a captioner)
    loss    clip: symmetric InfoNCE; vqa: answer cross-entropy; caption: next-token loss on the assistant's turn
    after   RUN/model (models.save), then the full evaluation (evaluate.py) -> RUN/report.md, RUN/mm_eval.json, PNGs

Caption training is chat-shaped, so `deepsail serve` can talk about an image: the user turn is <|image|> and
"describe the image." (the canonical caption answers), or, for `caption_questions` of the examples, one of the
scene's questions (its one-word answer answers).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from deepsail.files import atomic_write_json, check_run_folder
from deepsail.flags import Options, knob, options
from deepsail.model.config import ModelConfig
from deepsail.model.loss import IGNORE_INDEX
from deepsail.multimodal import models, scenes
from deepsail.multimodal.align import encode_texts, text_config
from deepsail.multimodal.connector import CAPTION_PROMPT, IMAGE_TOKEN, Captioner, chat_example
from deepsail.multimodal.images import load_folder, load_image, to_tensor
from deepsail.multimodal.vision import VisionConfig
from deepsail.precision import resolve_device
from deepsail.train.config import TrainConfig
from deepsail.train.loop import TrainResult, check_resumable, seed_everything, train_loop


@dataclass
class MMTrainConfig:
    task: str = knob("clip", "What to train: clip (contrastive retrieval), vqa (question answering) or caption.")
    data: str = knob("scenes", "'scenes' (the embedded procedural scenes) or a folder of images/ + captions.jsonl.")
    vision_preset: str = knob("vit-tiny", "Image encoder size: vit-tiny or vit-small.")
    text_preset: str = knob("text-tiny", "Text encoder size (clip, vqa): text-tiny or text-small.")
    text_layers: int = knob(0, "Text encoder blocks, overriding the preset's (vqa fuses in them); 0 = the preset's.")
    decoder_preset: str = knob("deepseek-v3-mini", "Caption decoder: a deepsail preset, resized by --decoder-layers.")
    decoder_layers: int = knob(4, "Caption decoder blocks.")
    image_size: int = knob(64, "Image side in pixels (images are resized to it).")
    patch_size: int = knob(8, "ViT patch side in pixels.")
    positions: str = knob("rope2d", "ViT positions: rope2d (2-D rotary) or learned.")
    window_sizes: str = knob("", "Dynamic window attention: candidate tiles in patches, e.g. '2,4' ('' = off).")
    fuse_layers: str = knob("", "Hierarchical fusion: ViT blocks whose outputs are fused, e.g. '1,3' ('' = off).")
    embed_dim: int = knob(128, "clip: the shared embedding width.")
    questions: int = knob(4, "vqa: questions per image in a batch (they share one pass of the vision encoder).")
    pool: int = knob(1, "caption: average-pool the patch grid by this factor before the connector.")
    caption_questions: float = knob(0.3, "caption: fraction of examples that ask a question instead.")
    paraphrase: float = knob(0.5, "scenes: fraction of captions drawn from the paraphrase grammar (clip).")
    max_text_len: int = knob(64, "Longest text the encoder reads, in tokens (longer is cut).")
    vocab_size: int = knob(512, "BPE vocabulary trained on the data's text.")
    init_vision: str = knob("", "Initialise the vision encoder from this multimodal model folder.")
    freeze_vision: bool = knob(False, "Keep the vision encoder fixed (train the rest).")
    eval_scenes: int = knob(1000, "Held-out scenes in the final evaluation's galleries (0 = skip it).")

    def validate(self) -> None:
        if self.task not in models.TASKS:
            raise ValueError(f"--task {self.task!r}: choose one of {list(models.TASKS)}")
        if self.text_layers < 0 or self.decoder_layers < 1:
            raise ValueError("--text-layers must be >= 0 (0 = the preset's) and --decoder-layers >= 1")
        if self.task == "vqa" and self.data != "scenes":
            raise ValueError("--task vqa needs questions with answers: train it on --data scenes")
        if self.questions < 1:
            raise ValueError(f"--questions must be >= 1, got {self.questions}")
        if not 0 <= self.caption_questions <= 1 or not 0 <= self.paraphrase <= 1:
            raise ValueError("--caption-questions and --paraphrase are fractions in [0, 1]")
        if self.freeze_vision and not self.init_vision:
            raise ValueError("--freeze-vision keeps a random encoder without --init-vision; give one")

    def vision(self) -> VisionConfig:
        ints = _int_list
        cfg = VisionConfig.preset(
            self.vision_preset,
            image_size=self.image_size,
            patch_size=self.patch_size,
            positions=self.positions,
            window_sizes=ints(self.window_sizes, "--window-sizes"),
            fuse_layers=ints(self.fuse_layers, "--fuse-layers"),
        )
        cfg.validate()
        return cfg


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. '2,4'; got {text!r}") from None


# --- text -------------------------------------------------------------------------------------------------------------
def scene_texts(n: int = 4000, seed: int = 0) -> list[str]:
    """What a scenes tokenizer trains on: canonical captions, paraphrases, questions and answers of every split."""
    rng = np.random.default_rng(seed)
    out = [CAPTION_PROMPT, *scenes.ANSWERS]
    for split in scenes.SPLITS:
        for _ in range(n // len(scenes.SPLITS)):
            scene = scenes.sample_scene(rng, split)
            out += [scene.caption, scene.paraphrase(rng)] + [q.text for q in scene.questions(rng, 2)]
    return out


def train_tokenizer(texts: Sequence[str], vocab_size: int, image_token: bool) -> Any:
    from deepsail.data.tokenizer import Tokenizer

    with warnings.catch_warnings():  # a small grammar runs out of merges before the vocab size: expected, harmless
        warnings.filterwarnings("ignore", message="the text ran out of pairs")
        tok = Tokenizer.train(list(texts), vocab_size)
    if image_token:
        tok.add_special_tokens([IMAGE_TOKEN])
    return tok


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    T = max(map(len, rows))
    return torch.tensor([list(r) + [value] * (T - len(r)) for r in rows], dtype=torch.long)


# --- batches ----------------------------------------------------------------------------------------------------------
class FolderPairs:
    """A user's images/ + captions.jsonl, decoded once into memory; batch k drawn from rng(seed, k) (resumable)."""

    def __init__(self, folder: str, size: int, batch_size: int, seed: int, split: str, val_fraction: float = 0.1):
        pairs = load_folder(folder)
        order = np.random.default_rng(seed).permutation(len(pairs))
        n_val = max(1, int(len(pairs) * val_fraction)) if len(pairs) > 1 else 0
        keep = order[:n_val] if split != "train" else order[n_val:]
        if not len(keep):
            raise ValueError(f"{folder}: {len(pairs)} pair(s) leave no {split} split; add more images")
        self.pairs = [pairs[i] for i in sorted(keep)]
        self.images = np.stack([load_image(path, size) for path, _ in self.pairs])
        self.captions = [c for _, c in self.pairs]
        self.batch_size, self.seed, self.step = min(batch_size, len(self.pairs)), seed, 0

    def __iter__(self) -> FolderPairs:
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng([self.seed, 7, self.step])
        self.step += 1
        pick = rng.choice(len(self.pairs), self.batch_size, replace=False)
        caps = [self.captions[i] for i in pick]
        return {"images": self.images[pick], "captions": caps, "canonical": caps, "scenes": None}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class TensorBatches:
    """Raw batches (scenes or a folder) -> the task's tensors on the device; resumes through the source's state."""

    def __init__(self, source: Any, task: str, tokenizer: Any, cfg: MMTrainConfig, device: torch.device, **extra):
        self.source, self.task, self.tok, self.cfg, self.device = source, task, tokenizer, cfg, device
        self.extra = extra  # vqa: answer index; caption: image id and tokens per image

    def __iter__(self) -> TensorBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        raw = next(self.source)
        return tuple(t.to(self.device) for t in to_batch(raw, self.task, self.tok, self.cfg, **self.extra))

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def to_batch(raw: dict, task: str, tokenizer: Any, cfg: MMTrainConfig, **extra: Any) -> tuple[torch.Tensor, ...]:
    """clip: (images, ids, mask, same); vqa: (images, ids, mask, image_index, answer);
    caption: (images, ids, labels)."""
    images = to_tensor(raw["images"])
    if task == "clip":
        ids, mask = encode_texts(tokenizer, raw["captions"], cfg.max_text_len)
        canon = raw["canonical"]
        same = torch.tensor([[a == b for b in canon] for a in canon])
        return images, ids, mask, same
    if task == "vqa":
        index = extra["answer_index"]
        qs = [(i, q) for i, per in enumerate(raw["questions"]) for q in per]
        ids, mask = encode_texts(tokenizer, [q.text for _, q in qs], cfg.max_text_len)
        return (
            images,
            ids,
            mask,
            torch.tensor([i for i, _ in qs]),
            torch.tensor([index[q.answer] for _, q in qs]),
        )
    image_id, n = extra["image_id"], extra["image_tokens"]
    rows, targets = [], []
    for i, caption in enumerate(raw["canonical"]):
        prompt, answer = CAPTION_PROMPT, caption
        # which examples ask a question: a fixed function of the scene, so a resumed run makes the same batches
        if "questions" in raw and zlib.crc32(caption.encode()) % 1000 < 1000 * cfg.caption_questions:
            q = raw["questions"][i][0]
            prompt, answer = q.text, q.answer
        x, y = chat_example(tokenizer, image_id, n, prompt, answer)
        rows.append(x)
        targets.append(y)
    return images, pad_rows(rows, tokenizer.pad_id), pad_rows(targets, IGNORE_INDEX)


# --- losses -----------------------------------------------------------------------------------------------------------
def clip_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    images, ids, mask, same = batch
    loss = model(images, ids, mask, same)
    return {"loss": loss, "temperature": 1 / model.logit_scale.detach().exp()}


def vqa_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    images, ids, mask, index, answers = batch
    logits, weights = model(images, ids, mask, index)
    return {
        "loss": F.cross_entropy(logits.float(), answers),
        "acc": (logits.argmax(-1) == answers).float().mean(),
        "w_image": weights[:, 1].mean().detach(),
    }


def caption_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    images, ids, labels = batch
    return {"loss": model(images, ids, labels).loss}


LOSSES = {"clip": clip_loss, "vqa": vqa_loss, "caption": caption_loss}


def tokens_in(batch: tuple[torch.Tensor, ...], patches: int) -> int:
    """What the progress bar counts as tokens: image patches plus text tokens."""
    return batch[0].shape[0] * patches + batch[1].numel()


# --- building ---------------------------------------------------------------------------------------------------------
def build_config(mcfg: MMTrainConfig, tokenizer: Any, answers: Sequence[str] = ()) -> models.MMConfig:
    vision = mcfg.vision()
    if mcfg.task == "caption":
        decoder = ModelConfig.preset(mcfg.decoder_preset).replace(
            vocab_size=tokenizer.vocab_size,
            num_hidden_layers=mcfg.decoder_layers,
            num_nextn_predict_layers=0,
            max_position_embeddings=512,
        )
        image_id = tokenizer._tok.token_to_id(IMAGE_TOKEN)
        return models.MMConfig("caption", vision, decoder=decoder, image_token_id=image_id, pool=mcfg.pool)
    # a vqa encoder reads the image's tokens before the question (fusion.py)
    room = mcfg.max_text_len + (vision.num_patches if mcfg.task == "vqa" else 0)
    text = text_config(mcfg.text_preset, tokenizer.vocab_size, room)
    if mcfg.text_layers:
        text = text.replace(num_hidden_layers=mcfg.text_layers)
    return models.MMConfig(
        mcfg.task,
        vision,
        text=text,
        embed_dim=mcfg.embed_dim,
        answers=list(answers),
        max_text_len=mcfg.max_text_len,
    )


def vision_of(model: nn.Module) -> nn.Module:
    return model.prefix.vision if isinstance(model, Captioner) else model.vision


def init_vision(model: nn.Module, folder: str) -> None:
    """Copy another multimodal model's vision encoder into `model` (same vision config required)."""
    donor, dcfg = models.load(folder)
    mine = vision_of(model)
    if dcfg.vision.to_dict() != mine.config.to_dict():
        raise ValueError(
            f"--init-vision {folder}: its vision encoder is {dcfg.vision.to_dict()}, this run's is "
            f"{mine.config.to_dict()}; pass the same --vision-preset / --image-size / --patch-size / options"
        )
    mine.load_state_dict(vision_of(donor).state_dict())


def make_batches(mcfg: MMTrainConfig, cfg: TrainConfig, split: str, seed: int) -> Any:
    if mcfg.data == "scenes":
        return scenes.SceneBatches(
            cfg.batch_size,
            seed=seed,
            size=mcfg.image_size,
            split=split,
            questions=mcfg.questions if mcfg.task == "vqa" else 1 if mcfg.task == "caption" else 0,
            paraphrase=mcfg.paraphrase if mcfg.task == "clip" else 0.0,
        )
    return FolderPairs(mcfg.data, mcfg.image_size, cfg.batch_size, seed, split)


def mm_train(cfg: TrainConfig, mcfg: MMTrainConfig, resume: bool = False) -> TrainResult:
    from deepsail.data.tokenizer import Tokenizer
    from deepsail.multimodal.evaluate import evaluate_model, quick_eval

    mcfg.validate()
    out = check_run_folder(cfg.out, resume)
    resume_from = check_resumable(cfg, resume)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if resume_from is not None:
        tokenizer = Tokenizer.load(resume_from)
    else:
        texts = scene_texts(seed=cfg.seed) if mcfg.data == "scenes" else [c for _, c in load_folder(mcfg.data)]
        tokenizer = train_tokenizer(texts, mcfg.vocab_size, image_token=mcfg.task == "caption")
    answers = list(scenes.ANSWERS) if mcfg.task == "vqa" else []
    mm_cfg = build_config(mcfg, tokenizer, answers)
    if resume_from is not None:
        model = models.load(resume_from)[0].train()
    else:
        model = models.build(mm_cfg)
        if mcfg.init_vision:
            init_vision(model, mcfg.init_vision)
    if mcfg.freeze_vision:
        vision_of(model).requires_grad_(False)
    extra: dict[str, Any] = {}
    if mcfg.task == "vqa":
        extra["answer_index"] = {a: i for i, a in enumerate(answers)}
    if mcfg.task == "caption":
        extra |= {"image_id": mm_cfg.image_token_id, "image_tokens": model.prefix.num_tokens}
    batches = TensorBatches(make_batches(mcfg, cfg, "train", cfg.seed), mcfg.task, tokenizer, mcfg, device, **extra)
    val_source = make_batches(mcfg, replace(cfg, batch_size=min(cfg.batch_size, 128)), "test", cfg.seed + 1)
    val = [to_batch(next(val_source), mcfg.task, tokenizer, mcfg, **extra) for _ in range(2)]
    patches = mm_cfg.vision.num_patches
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def validate(m: nn.Module) -> dict[str, float]:
        return quick_eval(m, [tuple(t.to(device) for t in b) for b in val], mcfg.task, LOSSES[mcfg.task])

    result = train_loop(
        model,
        batches,
        LOSSES[mcfg.task],
        cfg,
        evaluate=validate,
        tokens_per_batch=lambda b: tokens_in(b, patches),
        flops_per_token=6.0 * params,  # a dense estimate per image patch or text token
        tokenizer=tokenizer,
        resume_from=resume_from,
        run_info={"multimodal": mm_cfg.to_dict(), "mm_train": vars(mcfg)},
        name=f"mm {mcfg.task}",
        save_model=lambda m, folder: models.write_model(m, mm_cfg, folder),
    )
    final = models.save(model, mm_cfg, out / "model", tokenizer)
    if mcfg.eval_scenes and mcfg.data == "scenes":
        metrics = evaluate_model(final, out, gallery=mcfg.eval_scenes, seed=cfg.seed + 1)
        result.extra["eval"] = metrics
        atomic_write_json(out / "summary.json", result.to_dict())
    return result


@options(
    cfg=Options(
        TrainConfig,
        skip=("data", "model_preset", "tokenizer", "arch", "init", "seq_len", "dp_replicate", "dp_shard", "ep", "tp"),
        defaults={
            "out": "runs/mm",
            "minutes": 15.0,
            "batch_size": 128,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 50,
            "weight_decay": 0.05,
            "eval_every": 100,
            "ckpt_every": 200,
            "bias_update_rate": 0.0,
        },
    ),
    mcfg=Options(MMTrainConfig),
)
def mm_train_command(
    cfg: TrainConfig,
    mcfg: MMTrainConfig,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")] = False,
    given: frozenset[str] = frozenset(),
) -> None:
    """Train a multimodal model on the embedded procedural scenes or a folder of images/ + captions.jsonl: CLIP-style
    contrastive retrieval, VQA with cross-modal fusion, or LLaVA-style captioning with a deepsail decoder. Writes
    RUN/model, and (on scenes) RUN/report.md with Recall@K / VQA accuracy / caption scores on held-out scenes and
    held-out attribute combinations, with PNGs.

    \b
    Examples:
      deepsail mm train --task clip --minutes 15 --out runs/clip
      deepsail mm train --task vqa --window-sizes 2,4 --fuse-layers 1,3 --out runs/vqa
      deepsail mm train --task caption --init-vision runs/clip/model --out runs/cap
      deepsail mm train --task clip --data my_photos/ --image-size 96 --out runs/photos
    """
    if "steps" not in given:  # a time budget (15 minutes unless --minutes says otherwise) ends the run
        cfg = replace(cfg, steps=None)
    result = mm_train(cfg, mcfg, resume=resume)
    line = f"trained {result.step} steps in {result.elapsed_s / 60:.1f} min -> {Path(cfg.out) / 'model'}"
    typer.echo(line)
    if "eval" in result.extra:
        typer.echo(f"report: {Path(cfg.out) / 'report.md'}")
