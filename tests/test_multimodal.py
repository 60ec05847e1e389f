"""Multimodal models (deepsail.multimodal): the ViT and its options, the bidirectional text encoder, the contrastive
loss, fusion + VQA, the captioner through the serving engine, save/load, and a tiny contrastive run that learns."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepsail.infer.engine import Engine, EngineConfig, SamplingParams
from deepsail.model.config import ModelConfig
from deepsail.multimodal import models, scenes
from deepsail.multimodal.align import ContrastiveModel, TextEncoder, contrastive_loss, encode_texts, text_config
from deepsail.multimodal.connector import IMAGE_TOKEN, Captioner, chat_example, chat_prompt
from deepsail.multimodal.evaluate import eval_clip
from deepsail.multimodal.fusion import VQAModel
from deepsail.multimodal.images import to_tensor
from deepsail.multimodal.train import (
    MMTrainConfig,
    clip_loss,
    scene_texts,
    to_batch,
    train_tokenizer,
)
from deepsail.multimodal.vision import VisionConfig, VisionEncoder
from deepsail.train.config import TrainConfig
from deepsail.train.loop import seed_everything, train_loop

VISION = VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(scene_texts(600), 400, image_token=True)


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return to_tensor(np.stack([s.render(size) for s in scenes.make_scenes(n, seed, "test")]))


# --- vision ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"positions": "learned"},
        {"window_sizes": (2,)},
        {"fuse_layers": (0, 1)},
        {"window_sizes": (2,), "fuse_layers": (0, 1)},
    ],
)
def test_vit_shapes_and_options(options):
    torch.manual_seed(0)
    enc = VisionEncoder(replace(VISION, **options))
    out = enc(images(3))
    assert out.patches.shape == (3, 16, 64) and out.pooled.shape == (3, 64)
    assert torch.isfinite(out.patches).all()
    if options.get("window_sizes"):
        w = out.window_weights
        assert w.shape == (3, 1, 2)  # one windowed block (all but the last), candidates: 2x2 tiles and global
        assert torch.allclose(w.sum(-1), torch.ones(3, 1))
    out.pooled.sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in enc.parameters())


def test_window_attention_stays_in_its_tile():
    """With the gate forced onto the 2x2 tiles, a patch's output depends only on the patches of its own tile."""
    torch.manual_seed(0)
    cfg = replace(VISION, num_layers=1, window_sizes=(2,), window_layers=(0,))
    enc = VisionEncoder(cfg)
    with torch.no_grad():
        enc.blocks[0].attn.window_gate.bias.copy_(torch.tensor([50.0, -50.0]))
    x = images(1)
    base = enc(x).patches
    y = x.clone()
    y[..., 16:, 16:] = -y[..., 16:, 16:]  # bottom-right quarter of the image = the bottom-right 2x2 patch tile
    changed = (enc(y).patches - base).abs().amax(-1)[0].view(4, 4) > 1e-5
    expect = torch.zeros(4, 4, dtype=torch.bool)
    expect[2:, 2:] = True
    # the final norm/fusion is per patch: only the tile's patches move
    assert torch.equal(changed, expect)


def test_vision_config_errors():
    for bad, msg in [
        (dict(image_size=30), "multiple of patch_size"),
        (dict(positions="sinusoidal"), "rope2d"),
        (dict(window_sizes=(3,)), "divide"),
        (dict(fuse_layers=(5,)), "fuse_layers"),
    ]:
        with pytest.raises(ValueError, match=msg):
            VisionEncoder(replace(VISION, **bad))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        VisionEncoder(VISION)(torch.zeros(1, 3, 64, 64))


# --- text ------------------------------------------------------------------------------------------------------------
def test_text_encoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    enc = TextEncoder(text_config("text-tiny", 300)).eval()
    ids = torch.randint(0, 300, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    states, pooled = enc(ids, mask)
    later = ids.clone()
    later[0, -1] = (later[0, -1] + 1) % 300
    states2, _ = enc(later, mask)
    assert (states2[0, 0] - states[0, 0]).abs().max() > 1e-4  # the first token sees the last one
    padded = torch.cat([ids, torch.randint(0, 300, (1, 4))], dim=1)
    pmask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    states3, pooled3 = enc(padded, pmask)
    torch.testing.assert_close(pooled3, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states3[:, :8], states, atol=1e-5, rtol=1e-5)


# --- the contrastive loss --------------------------------------------------------------------------------------------
def test_contrastive_loss_matches_clip_formula():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(math.log(1 / 0.07))
    logits = img @ txt.T / 0.07
    expect = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale), expect)
    # rows 0 and 1 the same pair: their targets share the mass
    same = torch.eye(5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    targets = same.float() / same.float().sum(1, keepdim=True)
    expect2 = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(contrastive_loss(img, txt, scale, same), expect2)


def test_logit_scale_is_clamped_at_100():
    model = ContrastiveModel(VISION, text_config("text-tiny", 300), 32)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    ids, mask = torch.randint(0, 300, (2, 5)), torch.ones(2, 5)
    model(images(2), ids, mask)
    assert model.logit_scale.item() == pytest.approx(math.log(100))


# --- vqa -------------------------------------------------------------------------------------------------------------
def test_vqa_model_shares_the_image_pass_and_masks_padding(tokenizer):
    torch.manual_seed(0)
    model = VQAModel(VISION, text_config("text-tiny", tokenizer.vocab_size, 64), len(scenes.ANSWERS)).eval()
    ids, mask = encode_texts(tokenizer, ["what colour is the circle?", "how many objects are there?"], 32)
    x = images(1)
    logits, weights = model(x, ids, mask, torch.tensor([0, 0]))
    assert logits.shape == (2, len(scenes.ANSWERS)) and torch.allclose(weights.sum(-1), torch.ones(2))
    alone, _ = model(x, ids[1:, : int(mask[1].sum())], mask[1:, : int(mask[1].sum())])
    torch.testing.assert_close(alone, logits[1:], atol=1e-5, rtol=1e-5)  # padding changes nothing


# --- captioner ------------------------------------------------------------------------------------------------------
def captioner(tokenizer) -> Captioner:
    dec = ModelConfig.preset("deepseek-v3-debug").replace(vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    return Captioner(VISION, dec, tokenizer._tok.token_to_id(IMAGE_TOKEN), pool=2).eval()


def test_chat_example_targets_only_the_answer(tokenizer):
    image_id = tokenizer._tok.token_to_id(IMAGE_TOKEN)
    x, y = chat_example(tokenizer, image_id, 4, "describe the image.", "a small red circle in the center")
    assert x.count(image_id) == 4
    answer = [t for t in y if t != -100]
    assert tokenizer.decode(answer).startswith("a small red circle in the center")
    prompt = chat_prompt(tokenizer, image_id, 4)
    assert x[: len(prompt)] == prompt  # generation starts where training's answer starts


def test_engine_with_image_embeds_matches_a_full_forward(tokenizer):
    """Greedy tokens from the serving engine (images spliced at prefill, paged cache) equal a plain loop of full
    forwards over the spliced embeddings; two images behind the same prompt are not shared by the prefix cache."""
    model = captioner(tokenizer)
    image_id = model.image_token_id
    x = images(2)
    with torch.no_grad():
        prefix = model.prefix(x)
    prompt = chat_prompt(tokenizer, image_id, model.prefix.num_tokens)
    engine = Engine(model.decoder, tokenizer, EngineConfig(block_size=4, image_token_id=image_id))
    handles = [
        engine.submit(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), image_embeds=p)
        for p in prefix
    ]
    engine.run_until_idle()
    got = [h.result(timeout=0)[1] for h in handles]
    for k in range(2):
        ids = torch.tensor([prompt])
        want = []
        with torch.no_grad():
            for _ in range(6):
                logits = model.decoder(ids, inputs_embeds=model.embed(ids, x[k : k + 1])).logits
                want.append(int(logits[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
        assert got[k] == want
    with pytest.raises(ValueError, match="image_embeds"):
        engine.submit(prompt, SamplingParams(max_tokens=2))  # placeholders without images
    with pytest.raises(ValueError, match=r"must be \[image placeholders"):
        engine.submit(prompt, SamplingParams(max_tokens=2), image_embeds=prefix[0][:3])
    plain = Engine(model.decoder, tokenizer, EngineConfig())
    with pytest.raises(ValueError, match="takes no images"):
        plain.submit(prompt, SamplingParams(max_tokens=2), image_embeds=prefix[0])


# --- save / load -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["clip", "vqa", "caption"])
def test_save_load_round_trip(task, tokenizer, tmp_path):
    mcfg = MMTrainConfig(task=task, image_size=32, vision_preset="vit-tiny", decoder_preset="deepseek-v3-debug")
    cfg = models.MMConfig(
        task,
        VISION,
        text=text_config("text-tiny", tokenizer.vocab_size, 64) if task != "caption" else None,
        decoder=ModelConfig.preset("deepseek-v3-debug").replace(
            vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0
        )
        if task == "caption"
        else None,
        answers=list(scenes.ANSWERS) if task == "vqa" else [],
        image_token_id=tokenizer._tok.token_to_id(IMAGE_TOKEN),
    )
    torch.manual_seed(0)
    model = models.build(cfg).eval()
    models.save(model, cfg, tmp_path / "m", tokenizer)
    loaded, cfg2 = models.load(tmp_path / "m")
    assert cfg2.to_dict() == cfg.to_dict()
    raw = next(scenes.SceneBatches(2, size=32, questions=1))
    extra = {
        "answer_index": {a: i for i, a in enumerate(scenes.ANSWERS)},
        "image_id": cfg.image_token_id,
        "image_tokens": 16,
    }
    batch = to_batch(raw, task, tokenizer, mcfg, **extra)
    with torch.no_grad():
        a = {
            "clip": clip_loss,
            "vqa": lambda m, b: {"loss": m(*b[:4])[0]},
            "caption": lambda m, b: {"loss": m(*b).loss},
        }
        torch.testing.assert_close(a[task](model, batch)["loss"], a[task](loaded, batch)["loss"])
    if task == "caption":  # the decoder folder is an ordinary model folder
        from deepsail.model import from_pretrained

        assert from_pretrained(tmp_path / "m").config.vocab_size == tokenizer.vocab_size
        assert models.load_image_prefix(tmp_path / "m")[1] == cfg.image_token_id
    (tmp_path / "m" / "mm.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        models.load(tmp_path / "m")
    with pytest.raises(ValueError, match="not a deepsail multimodal model"):
        models.load(tmp_path)


# --- a tiny run that learns ------------------------------------------------------------------------------------------
def test_tiny_contrastive_run_learns(tokenizer, tmp_path):
    """60 steps on 32-px scenes: the loss falls and image->text R@1 over 100 held-out scenes beats chance (0.01)
    many times over."""
    seed_everything(0)
    mcfg = MMTrainConfig(task="clip", image_size=32, max_text_len=48)
    cfg = models.MMConfig("clip", VISION, text=text_config("text-tiny", tokenizer.vocab_size), embed_dim=64)
    model = models.build(cfg)
    from deepsail.multimodal.train import TensorBatches

    source = scenes.SceneBatches(48, seed=0, size=32, paraphrase=0.0)
    batches = TensorBatches(source, "clip", tokenizer, mcfg, torch.device("cpu"))
    tcfg = TrainConfig(
        out=str(tmp_path / "run"),
        steps=60,
        batch_size=48,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=10,
        eval_every=0,
        ckpt_every=0,
        log_every=10,
        precision="fp32",
        weight_decay=0.0,
        bias_update_rate=0.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_loop(
            model,
            batches,
            clip_loss,
            tcfg,
            tokens_per_batch=lambda b: b[1].numel(),
            name="mm clip",
            save_model=lambda m, folder: models.write_model(m, cfg, folder),
        )
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    r = eval_clip(model, tokenizer, cfg, scenes.make_scenes(100, 1, "test"))
    print("tiny run R@1", r["image_to_text"]["R@1"], "loss", losses[0], losses[-1])
    assert r["image_to_text"]["R@1"] > 0.1  # chance is 0.01


# --- the verbs -------------------------------------------------------------------------------------------------------
def test_mm_verbs_end_to_end(tmp_path):
    """`mm train --task caption` (tiny, 3 steps) writes a model, its report and caption PNG; `mm caption` captions a
    PNG; a damaged image, a text-only folder and a vqa run on a user folder are one-line errors; `--resume` goes on."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from deepsail.cli import app

    runner = CliRunner()
    run = tmp_path / "cap"
    args = ["mm", "train", "--task", "caption", "--image-size", "32", "--decoder-preset", "deepseek-v3-debug"]
    args += ["--decoder-layers", "1", "--batch-size", "4", "--eval-scenes", "10", "--vocab-size", "300"]
    args += ["--log-every", "1", "--ckpt-every", "2", "--pool", "2", "--precision", "fp32", "--out", str(run)]
    result = runner.invoke(app, [*args, "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert (run / "model" / "mm_config.json").is_file() and (run / "captions_test.png").is_file()
    report = json.loads((run / "mm_eval.json").read_text())
    assert set(report) >= {"test", "heldout"} and 0 <= report["test"]["object_accuracy"] <= 1
    result = runner.invoke(app, [*args, "--steps", "3", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "trained 3 steps" in result.output

    png = tmp_path / "scene.png"
    Image.fromarray(scenes.make_scenes(1, 0, "test")[0].render(48)).save(png)
    result = runner.invoke(app, ["mm", "caption", str(run / "model"), str(png), "--max-tokens", "4"])
    assert result.exit_code == 0 and result.output.startswith(f"{png}: "), result.output

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    for argv, expect in [
        (["mm", "caption", str(run / "model"), str(bad)], "not an image"),
        (["mm", "caption", str(tmp_path), str(png)], "not a deepsail multimodal model"),
        (["mm", "train", "--task", "vqa", "--data", str(tmp_path), "--out", str(tmp_path / "v")], "needs questions"),
        (["mm", "train", "--task", "ocr", "--out", str(tmp_path / "o")], "--task 'ocr'"),
    ]:
        result = runner.invoke(app, argv)
        assert result.exit_code == 1 and "error:" in result.output and expect in result.output, result.output


def test_mm_train_on_a_folder_and_init_vision(tmp_path):
    """A user's images/ + captions.jsonl trains a clip model (and resumes); --init-vision copies a vision tower
    exactly, and refuses one of another shape by name."""
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from deepsail.cli import app

    data = tmp_path / "photos"
    (data / "images").mkdir(parents=True)
    lines = []
    for i, scene in enumerate(scenes.make_scenes(12, 3, "test")):
        Image.fromarray(scene.render(40)).save(data / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": scene.caption}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    common = ["--image-size", "32", "--batch-size", "6", "--vocab-size", "300", "--precision", "fp32"]
    result = runner.invoke(
        app, ["mm", "train", "--data", str(data), *common, "--steps", "2", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    donor, _ = models.load(tmp_path / "a" / "model")
    result = runner.invoke(
        app,
        ["mm", "train", *common, "--task", "vqa", "--steps", "1", "--eval-scenes", "0", "--lr", "1e-9", "--min-lr", "0"]
        + ["--init-vision", str(tmp_path / "a" / "model"), "--freeze-vision", "--out", str(tmp_path / "b")],
    )
    assert result.exit_code == 0, result.output
    vqa, _ = models.load(tmp_path / "b" / "model")
    for k, v in donor.vision.state_dict().items():
        assert torch.equal(v, vqa.vision.state_dict()[k]), k  # copied, and frozen
    result = runner.invoke(
        app,
        ["mm", "train", "--image-size", "64", "--steps", "1", "--init-vision", str(tmp_path / "a" / "model")]
        + ["--out", str(tmp_path / "c")],
    )
    assert result.exit_code == 1 and "pass the same --vision-preset" in result.output, result.output


def _gather_worker(out: str) -> None:
    """One torchrun rank of the test below: the global batch's first or second half."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    img, txt = (
        F.normalize(torch.randn(8, 16, generator=g), dim=-1),
        F.normalize(torch.randn(8, 16, generator=g), dim=-1),
    )
    mine_img = img[4 * rank : 4 * rank + 4].clone().requires_grad_()
    mine_txt = txt[4 * rank : 4 * rank + 4].clone().requires_grad_()
    loss = contrastive_loss(mine_img, mine_txt, torch.tensor(2.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine_img.grad}, f"{out}.{rank}")
    dist.barrier()  # neither rank tears the group down while the other is still in a collective
    dist.destroy_process_group()


def test_contrastive_loss_gathers_across_ranks(tmp_path):
    """Under a process group, each rank's loss is the global batch's (its negatives are every rank's rows) and the
    gradient reaching its own rows is the global loss's, summed over the ranks that computed it (open_clip's
    gather_with_grad, as DDP then averages it)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*cmd, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 16, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    want = contrastive_loss(img, txt, torch.tensor(2.0))
    want.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}")
        torch.testing.assert_close(got["loss"], want.detach())
        torch.testing.assert_close(got["grad"], 2 * img.grad[4 * rank : 4 * rank + 4])


if __name__ == "__main__":  # a torchrun rank of test_contrastive_loss_gathers_across_ranks
    import sys

    _gather_worker(sys.argv[1])
