"""`deepsail mm eval` and `deepsail mm caption`: what a multimodal model can do, on scenes it never saw.

Two galleries of `gallery` scenes each, generated from a seed stream training never draws from:
    test      the training distribution (new scenes; every caption unique within the gallery)
    heldout   every scene holds at least one colour-shape combination training never showed (scenes.HELD_OUT):
              compositional generalisation
Per task:
    clip      image->text and text->image Recall@1/5/10 (chance = K / gallery) and mAP@R, where an item is
              relevant when its scene holds the same multiset of colour-shape objects (R = their count, so mAP@R
              asks how well the whole neighbourhood is ranked, not only the exact match); PNG of top-5 retrievals
    vqa       accuracy overall and per question kind, and the mean modality weight per kind
    caption   greedy captions through the serving engine (infer/engine.py, image embeddings in the placeholders),
              on at most 200 scenes per gallery (each is a generation): exact match, objects named right
              (parse_caption), held-out pairs named, corpus BLEU (sacrebleu, the eval extra), and the scenes'
              questions asked as image chats; PNG of images with their captions
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from torch import nn

from deepsail.eval.metrics import map_at_r, recall_at_k
from deepsail.files import atomic_write_json, atomic_write_text
from deepsail.multimodal import models, scenes
from deepsail.multimodal.align import ContrastiveModel, encode_texts
from deepsail.multimodal.connector import CAPTION_PROMPT, Captioner, chat_prompt
from deepsail.multimodal.images import load_image, to_tensor

KS = (1, 5, 10)


# --- during training --------------------------------------------------------------------------------------------------
@torch.no_grad()
def quick_eval(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]], task: str, loss_fn: Callable) -> dict:
    """The training loop's validation pass: mean loss (+ in-batch R@1 for clip, accuracy for vqa)."""
    was = model.training
    model.eval()
    out: dict[str, list[float]] = {}
    for b in batches:
        for k, v in loss_fn(model, b).items():
            out.setdefault(k, []).append(float(v))
        if task == "clip":
            images, ids, mask, _ = b
            sim = model.encode_image(images) @ model.encode_text(ids, mask).T
            out.setdefault("r1", []).append(float((sim.argmax(1) == torch.arange(len(sim))).float().mean()))
    model.train(was)
    return {k: float(np.mean(v)) for k, v in out.items()}


# --- retrieval --------------------------------------------------------------------------------------------------------
def object_key(scene: scenes.Scene) -> tuple:
    return tuple(sorted((o.colour, o.shape) for o in scene.objects))


@torch.no_grad()
def embed_all(model: ContrastiveModel, images: np.ndarray, texts: list[str], tokenizer: Any, max_len: int, chunk=256):
    dev = next(model.parameters()).device
    img = torch.cat(
        [model.encode_image(to_tensor(images[i : i + chunk]).to(dev)) for i in range(0, len(images), chunk)]
    )
    txt = []
    for i in range(0, len(texts), chunk):
        ids, mask = encode_texts(tokenizer, texts[i : i + chunk], max_len)
        txt.append(model.encode_text(ids.to(dev), mask.to(dev)))
    return img.float().cpu().numpy(), torch.cat(txt).float().cpu().numpy()


def eval_clip(model: ContrastiveModel, tokenizer: Any, cfg: models.MMConfig, gallery: list[scenes.Scene]) -> dict:
    images = np.stack([s.render(cfg.vision.image_size) for s in gallery])
    captions = [s.caption for s in gallery]
    img, txt = embed_all(model, images, captions, tokenizer, cfg.max_text_len)
    sim = img @ txt.T  # [images, captions]
    keys = [object_key(s) for s in gallery]
    same = torch.tensor([[a == b for b in keys] for a in keys])
    exact, sims = torch.eye(len(gallery), dtype=torch.bool), torch.from_numpy(sim)
    return {
        "image_to_text": recall_at_k(sims, exact, KS) | {"mAP@R": map_at_r(sims, same)},
        "text_to_image": recall_at_k(sims.T, exact, KS) | {"mAP@R": map_at_r(sims.T, same)},
        "chance_R@1": 1 / len(gallery),
        "_sim": sim,
        "_images": images,
        "_captions": captions,
    }


def plot_retrievals(sim: np.ndarray, images: np.ndarray, captions: list[str], path: Path, queries: int = 6) -> Path:
    """Text -> image: each row a caption and its top-5 images, the right one framed green (others red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(queries, 6, figsize=(10, 1.9 * queries), dpi=100)
    for row, q in enumerate(np.linspace(0, len(captions) - 1, queries).astype(int)):
        top = np.argsort(-sim[:, q], kind="stable")[:5]  # images ranked for caption q
        axes[row, 0].text(0, 0.5, _wrap(captions[q], 28), fontsize=7, va="center")
        axes[row, 0].axis("off")
        for col, j in enumerate(top, start=1):
            ax = axes[row, col]
            ax.imshow(images[j])
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if j == q else "tab:red")
                side.set_linewidth(3 if j == q else 1)
    fig.suptitle("text -> image: top 5 (green frame = the described scene)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])


# --- vqa --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def eval_vqa(model: nn.Module, tokenizer: Any, cfg: models.MMConfig, gallery: list[scenes.Scene], seed: int) -> dict:
    rng = np.random.default_rng([seed, 99])
    dev = next(model.parameters()).device
    index = {a: i for i, a in enumerate(cfg.answers)}
    right: dict[str, list[bool]] = {}
    weight: dict[str, list[float]] = {}
    for start in range(0, len(gallery), 128):
        chunk = gallery[start : start + 128]
        qs = [(i, q) for i, s in enumerate(chunk) for q in s.questions(rng, 3)]
        images = to_tensor(np.stack([s.render(cfg.vision.image_size) for s in chunk])).to(dev)
        ids, mask = encode_texts(tokenizer, [q.text for _, q in qs], cfg.max_text_len)
        logits, w = model(images, ids.to(dev), mask.to(dev), torch.tensor([i for i, _ in qs], device=dev))
        pred = logits.argmax(-1).cpu().tolist()
        for (_, q), p, wi in zip(qs, pred, w[:, 1].cpu().tolist()):
            right.setdefault(q.kind, []).append(p == index[q.answer])
            weight.setdefault(q.kind, []).append(wi)
    every = [x for v in right.values() for x in v]
    return {
        "accuracy": float(np.mean(every)),
        "questions": len(every),
        "per_kind": {k: float(np.mean(v)) for k, v in sorted(right.items())},
        "image_weight_per_kind": {k: float(np.mean(v)) for k, v in sorted(weight.items())},
    }


# --- captions ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_captions(
    model: Captioner,
    tokenizer: Any,
    cfg: models.MMConfig,
    images: np.ndarray,
    prompts: Sequence[str] | None = None,
    max_tokens: int = 64,
) -> list[str]:
    """Greedy answers for images (uint8 [N, H, W, 3]) through the continuous-batching engine, as serving runs them."""
    from deepsail.infer.engine import Engine, EngineConfig, SamplingParams

    dev = next(model.parameters()).device
    engine = Engine(model.decoder, tokenizer, EngineConfig(max_batch_size=64, image_token_id=cfg.image_token_id))
    n = model.prefix.num_tokens
    handles = []
    for start in range(0, len(images), 64):
        prefix = model.prefix(to_tensor(images[start : start + 64]).to(dev))
        for k in range(len(prefix)):
            prompt = chat_prompt(
                tokenizer, cfg.image_token_id, n, (prompts or [CAPTION_PROMPT] * len(images))[start + k]
            )
            handles.append(
                engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), image_embeds=prefix[k])
            )
        engine.run_until_idle()
    return [h.result(timeout=0)[0].strip() for h in handles]


def eval_caption(model: Captioner, tokenizer: Any, cfg: models.MMConfig, gallery: list[scenes.Scene]) -> dict:
    images = np.stack([s.render(cfg.vision.image_size) for s in gallery])
    hyps = generate_captions(model, tokenizer, cfg, images)
    refs = [s.caption for s in gallery]
    objects_right, named, held_named, held_total = [], 0, 0, 0
    for hyp, scene in zip(hyps, gallery):
        parsed = scenes.parse_caption(hyp) or []
        truth = [(o.size, o.colour, o.shape, scenes.CELLS[o.cell]) for o in scene.objects]
        objects_right.append(sorted(parsed) == sorted(truth))
        found = Counter(parsed) & Counter(truth)  # objects named with all four attributes right
        named += sum(found.values())
        for t in truth:
            if (t[1], t[2]) in scenes.HELD_OUT:
                held_total += 1
                held_named += found[t] > 0
    out = {
        "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])),
        "object_accuracy": float(np.mean(objects_right)),
        # the share of the scenes' objects named exactly right, and of those whose colour-shape pair was held out
        "object_recall": named / sum(len(s.objects) for s in gallery),
        "held_out_pair_recall": held_named / held_total if held_total else None,
        "parsed": float(np.mean([scenes.parse_caption(h) is not None for h in hyps])),
        "samples": [{"reference": r, "generated": h} for r, h in list(zip(refs, hyps))[:8]],
        "_images": images,
        "_hyps": hyps,
    }
    try:
        from deepsail.eval.metrics import bleu

        out["bleu"] = bleu(hyps, refs)
    except ImportError:
        out["bleu"] = None  # sacrebleu is in the eval extra
    return out


def eval_chat_vqa(model: Captioner, tokenizer: Any, cfg: models.MMConfig, gallery: list[scenes.Scene], seed: int):
    """The captioner asked the scenes' questions (3 each) as image chats, greedy: exact-answer accuracy per kind."""
    rng = np.random.default_rng([seed, 99])
    asked = [(i, q) for i, s in enumerate(gallery) for q in s.questions(rng, 3)]
    images = np.stack([gallery[i].render(cfg.vision.image_size) for i, _ in asked])
    answers = generate_captions(model, tokenizer, cfg, images, [q.text for _, q in asked], max_tokens=8)
    right: dict[str, list[bool]] = {}
    for (_, q), a in zip(asked, answers):
        right.setdefault(q.kind, []).append(a == q.answer)
    every = [x for v in right.values() for x in v]
    return {"accuracy": float(np.mean(every)), "per_kind": {k: float(np.mean(v)) for k, v in sorted(right.items())}}


def plot_captions(images: np.ndarray, hyps: list[str], refs: list[str], path: Path, n: int = 8) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, n // 2, figsize=(12, 6.5), dpi=100)
    for ax, img, hyp, ref in zip(axes.flat, images, hyps, refs):
        ax.imshow(img)
        ax.set_xticks([])
        ax.set_yticks([])
        shown = "".join(c if c.isprintable() else "?" for c in hyp)  # an untrained model emits control bytes
        ax.set_title(_wrap(shown, 30), fontsize=7, color="tab:green" if hyp == ref else "tab:red")
    fig.suptitle("generated captions (green = exactly the reference)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --- the whole evaluation ---------------------------------------------------------------------------------------------
def evaluate_model(folder: str | Path, out: str | Path, gallery: int = 1000, seed: int = 1) -> dict[str, Any]:
    """Evaluate a saved model on both galleries; write out/mm_eval.json, out/report.md and the PNGs."""
    from deepsail.data.tokenizer import Tokenizer

    if gallery < 10:
        raise ValueError(f"--gallery {gallery}: need at least 10 scenes for Recall@10")
    folder, out = Path(folder), Path(out)
    model, cfg = models.load(folder)
    tokenizer = Tokenizer.load(folder)
    results: dict[str, Any] = {"task": cfg.task, "gallery": gallery, "model": str(folder)}
    pngs = []
    for split in ("test", "heldout"):
        g = scenes.make_scenes(gallery if cfg.task != "caption" else min(gallery, 200), seed, split)
        if cfg.task == "clip":
            r = eval_clip(model, tokenizer, cfg, g)
            if split == "test":
                pngs.append(plot_retrievals(r["_sim"], r["_images"], r["_captions"], out / "retrieval_test.png"))
        elif cfg.task == "vqa":
            r = eval_vqa(model, tokenizer, cfg, g, seed)
        else:
            r = eval_caption(model, tokenizer, cfg, g)
            r["chat_vqa"] = eval_chat_vqa(model, tokenizer, cfg, g, seed)
            if split == "test":
                pngs.append(plot_captions(r["_images"], r["_hyps"], [s.caption for s in g], out / "captions_test.png"))
        results[split] = {k: v for k, v in r.items() if not k.startswith("_")}
    atomic_write_json(out / "mm_eval.json", results)
    write_report(out, results, pngs)
    return results


def write_report(out: Path, results: dict[str, Any], pngs: list[Path]) -> Path:
    task, g = results["task"], results["gallery"]
    lines = [f"# deepsail mm: {task}", "", f"Model: `{results['model']}`. Held-out galleries of generated scenes."]
    lines += ["", "![training loss](loss.png)", ""] if (out / "loss.png").exists() else [""]
    if task == "clip":
        lines += [
            f"Retrieval over {g} scenes per gallery (chance R@1 = {1 / g:.4f}); `heldout` scenes each hold a "
            "colour-shape combination never seen in training.",
            "",
            "| gallery | direction | R@1 | R@5 | R@10 | mAP@R |",
            "|---|---|---|---|---|---|",
        ]
        for split in ("test", "heldout"):
            for d in ("image_to_text", "text_to_image"):
                r = results[split][d]
                lines.append(
                    f"| {split} | {d.replace('_', ' ')} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | "
                    f"{r['mAP@R']:.3f} |"
                )
    elif task == "vqa":
        kinds = list(results["test"]["per_kind"])
        lines += [
            "VQA accuracy (answer classification), 3 questions per scene.",
            "",
            "| gallery | all | " + " | ".join(kinds) + " |",
            "|---|---|" + "---|" * len(kinds),
        ]
        for split in ("test", "heldout"):
            r = results[split]
            lines.append(
                f"| {split} | {r['accuracy']:.3f} | " + " | ".join(f"{r['per_kind'][k]:.3f}" for k in kinds) + " |"
            )
        w = results["test"]["image_weight_per_kind"]
        lines += ["", "Mean image weight of the dynamic modality mix, per question kind (test):", ""]
        lines += [
            "| " + " | ".join(w) + " |",
            "|" + "---|" * len(w),
            "| " + " | ".join(f"{v:.2f}" for v in w.values()) + " |",
        ]
    else:
        lines += [
            "Greedy captions through the serving engine.",
            "",
            "| gallery | exact match | all objects right | objects named right | held-out pairs named | BLEU |",
            "|---|---|---|---|---|---|",
        ]
        for split in ("test", "heldout"):
            r = results[split]
            b = f"{r['bleu']:.1f}" if r.get("bleu") is not None else "n/a (pip install 'deepsail[eval]')"
            held = r["held_out_pair_recall"]
            lines.append(
                f"| {split} | {r['exact_match']:.3f} | {r['object_accuracy']:.3f} | {r['object_recall']:.3f} | "
                f"{'-' if held is None else f'{held:.3f}'} | {b} |"
            )
        kinds = list(results["test"]["chat_vqa"]["per_kind"])
        lines += ["", "Asked the scenes' questions in the chat (3 per scene), exact answers:", ""]
        lines += ["| gallery | all | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
        for split in ("test", "heldout"):
            v = results[split]["chat_vqa"]
            lines.append(
                f"| {split} | {v['accuracy']:.3f} | "
                + " | ".join(f"{v['per_kind'].get(k, 0):.3f}" for k in kinds)
                + " |"
            )
        lines += ["", "| reference | generated |", "|---|---|"]
        lines += [f"| {s['reference']} | {s['generated']} |" for s in results["test"]["samples"]]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def mm_eval_command(
    model: Annotated[str, typer.Argument(help="A multimodal model folder (RUN/model).")],
    out: Annotated[
        str, typer.Option(help="Where mm_eval.json, report.md and the PNGs go (default: beside MODEL).")
    ] = "",
    gallery: Annotated[int, typer.Option(help="Scenes per gallery (test and held-out combinations).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the galleries' scene streams.")] = 1,
) -> None:
    """Evaluate a multimodal model on held-out procedural scenes and on held-out attribute combinations: Recall@1/5/10
    and mAP@R (clip), accuracy per question kind (vqa), exact match / BLEU / object accuracy (caption).

    \b
    Examples:
      deepsail mm eval runs/clip/model
      deepsail mm eval runs/vqa/model --gallery 500 --out runs/vqa/eval
    """
    target = Path(out) if out else Path(model).parent
    results = evaluate_model(model, target, gallery=gallery, seed=seed)
    typer.echo(f"{results['task']}: report {target / 'report.md'}")
    for split in ("test", "heldout"):
        r = results[split]
        if results["task"] == "clip":
            typer.echo(
                f"  {split}: image->text R@1 {r['image_to_text']['R@1']:.3f}, "
                f"text->image R@1 {r['text_to_image']['R@1']:.3f}"
            )
        elif results["task"] == "vqa":
            typer.echo(f"  {split}: accuracy {r['accuracy']:.3f}")
        else:
            typer.echo(f"  {split}: exact match {r['exact_match']:.3f}, objects right {r['object_accuracy']:.3f}")


def mm_caption_command(
    model: Annotated[str, typer.Argument(help="A caption model folder (RUN/model of `mm train --task caption`).")],
    images: Annotated[list[str], typer.Argument(help="Image files (PNG, JPEG, ...).")],
    prompt: Annotated[str, typer.Option(help="What to ask about each image.")] = CAPTION_PROMPT,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 64,
) -> None:
    """Caption images (or answer --prompt about them) with a captioning model, greedy.

    \b
    Examples:
      deepsail mm caption runs/cap/model scene.png
      deepsail mm caption runs/cap/model a.png b.png --prompt "how many objects are there?"
    """
    from deepsail.data.tokenizer import Tokenizer

    m, cfg = models.load(model)
    if cfg.task != "caption":
        raise ValueError(f"{model} is a {cfg.task} model; `mm caption` needs one trained with --task caption")
    tokenizer = Tokenizer.load(model)
    pixels = np.stack([load_image(p, cfg.vision.image_size) for p in images])
    for path, text in zip(images, generate_captions(m, tokenizer, cfg, pixels, [prompt] * len(images), max_tokens)):
        typer.echo(f"{path}: {text}")
