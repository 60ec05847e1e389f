"""Segment memory (Transformer-XL): exact against a whole-document forward, the in-order loader, training + resume."""

from __future__ import annotations

import json

import pytest
import torch

import deepsail as ds
from deepsail.data.loader import SegmentLoader, TokenStream
from deepsail.model.memory import SegmentMemory
from deepsail.train.config import TrainConfig
from deepsail.train.pretrain import pretrain


@pytest.mark.parametrize("preset", ["deepseek-v3-debug", "llama-3-8b-debug"])
def test_segments_with_memory_equal_the_whole_document(preset):
    """With a memory as long as everything before it, segment k's logits are the whole document's at those
    positions: the kept keys are rotated back to relative positions exactly. A shorter memory differs (it forgets)."""
    torch.manual_seed(0)
    model = ds.Transformer(ds.ModelConfig.preset(preset).replace(num_nextn_predict_layers=0)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(ids).logits
        long, short = SegmentMemory(16), SegmentMemory(4)
        for k in range(3):
            seg = ids[:, 8 * k : 8 * (k + 1)]
            got = long.forward(model, seg).logits
            assert (got - whole[:, 8 * k : 8 * (k + 1)]).abs().max() < 1e-4, k
            forgot = short.forward(model, seg).logits
        assert (forgot - whole[:, 16:]).abs().max() > 1e-3
        assert long.past[0][0].shape[1] == 16 and short.past[0][0].shape[1] == 4


def test_gradients_stay_inside_the_segment():
    torch.manual_seed(0)
    model = ds.Transformer(ds.ModelConfig.preset("deepseek-v3-debug")).train()
    memory = SegmentMemory(8)
    ids = torch.randint(0, 512, (2, 16))
    memory.forward(model, ids[:, :8], labels=ids[:, :8]).loss.backward()
    assert all(not t.requires_grad for layer in memory.past for t in layer)
    out = memory.forward(model, ids[:, 8:], labels=ids[:, 8:])
    assert torch.isfinite(out.loss)


def test_segment_loader_reads_each_lane_in_order(tiny_data_dir):
    loader = SegmentLoader(tiny_data_dir, "train", batch_size=3, seq_len=16)
    stream = TokenStream(tiny_data_dir, "train")
    x0, y0 = next(loader)
    x1, _ = next(loader)
    for b in range(3):
        start = b * loader.lane
        assert x0[b].tolist() == stream.read(start, 16).tolist()
        assert x1[b].tolist() == stream.read(start + 16, 16).tolist()  # segment 2 continues segment 1
        assert y0[b, -1] == x1[b, 0]
    state = loader.state_dict()
    again = SegmentLoader(tiny_data_dir, "train", batch_size=3, seq_len=16)
    again.load_state_dict(state)
    assert torch.equal(next(again)[0], next(loader)[0])
    with pytest.raises(ValueError, match="same data and batch geometry"):
        SegmentLoader(tiny_data_dir, "train", batch_size=2, seq_len=16).load_state_dict(state)


def test_pretrain_with_segment_memory_resumes_exactly(tiny_data_dir, tmp_path):
    def cfg(out, steps):
        return TrainConfig(
            data=str(tiny_data_dir), out=str(out), steps=steps, batch_size=2, seq_len=32, warmup_steps=1,
            precision="fp32", eval_every=0, eval_batches=1, log_every=1, ckpt_every=2, lr=3e-3,
            arch=("segment_memory=32",),
        )  # fmt: skip

    whole = pretrain(cfg(tmp_path / "whole", 4))
    pretrain(cfg(tmp_path / "cut", 2))
    resumed = pretrain(cfg(tmp_path / "cut", 4), resume=True)
    assert ds.from_pretrained(whole.checkpoint).config.segment_memory == 32
    losses = [
        [json.loads(line)["loss"] for line in open(run / "metrics.jsonl") if '"train"' in line][-1]
        for run in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and resumed.step == 4
