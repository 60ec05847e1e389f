"""The image encoder: a Vision Transformer (Dosovitskiy et al. 2021) with the design's two options.

    image [B, 3, H, W] -> patches (a strided conv: one linear map per patch) -> [B, N, D]
      -> num_layers pre-norm blocks (RMSNorm, SDPA attention, SwiGLU MLP; deepsail's own layers)
      -> the outputs of `fuse_layers` fused (or the last block's alone) -> final norm
    -> patch features [B, N, D] (what VQA fusion and the captioner's connector read) and their mean [B, D]

Positions are learned (one vector per patch) or 2-D rotary: half of each head's rotation pairs turn with the
patch's row, half with its column, so attention sees relative offsets along both axes and nothing is learned.

Dynamic window attention (`window_sizes`, the design's "windowed attention whose window adapts per image"):
a windowed layer attends within non-overlapping w x w tiles of patches for each candidate w, and globally, and
mixes the candidates with per-image softmax weights read from the layer's own input (its mean token). An image of
small objects can lean on tight windows, a sparse one on global attention; the weights are in
`VisionOutput.window_weights` for the report. Every candidate shares the one q/k/v projection, so a candidate costs
one more SDPA call over N tokens, not another layer.

Hierarchical fusion (`fuse_layers`, the design's "hierarchical feature fusion"): the normed outputs of several
depths are concatenated per patch and projected back to D, so edges and colours from a low block reach the heads
beside the high block's object-level features (as FPN/ViTDet read several stages).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepsail.model.layers import MLP, Linear, RMSNorm, apply_rope

VISION_PRESETS: dict[str, dict[str, Any]] = {
    # 0.78M parameters: enough for the procedural scenes at 64 px (the full runs in README use it)
    "vit-tiny": dict(hidden_size=128, num_layers=4, num_heads=4),
    # 4.9M parameters: for larger images or a user's own data
    "vit-small": dict(hidden_size=256, num_layers=6, num_heads=8),
}


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 0  # 0: 8/3 * hidden rounded to 64 (SwiGLU's usual width)
    positions: str = "rope2d"  # "rope2d" | "learned"
    rope_theta: float = 100.0  # a grid is at most a few dozen patches wide: no need for LLM-sized wavelengths
    window_sizes: tuple[int, ...] = ()  # candidate tiles, in patches (e.g. (2, 4)); () = global attention only
    window_layers: tuple[int, ...] = ()  # which blocks window; () with window_sizes = every block but the last
    fuse_layers: tuple[int, ...] = ()  # blocks whose outputs are fused; () = the last block's alone
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.window_sizes, self.window_layers = tuple(self.window_sizes), tuple(self.window_layers)
        self.fuse_layers = tuple(self.fuse_layers)
        if not self.intermediate_size:
            self.intermediate_size = 64 * max(1, round(8 * self.hidden_size / 3 / 64))
        if self.window_sizes and not self.window_layers:
            self.window_layers = tuple(range(self.num_layers - 1))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        def bad(why: str) -> None:
            raise ValueError(f"vision config: {why}")

        if self.image_size % self.patch_size:
            bad(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.positions not in ("rope2d", "learned"):
            bad(f"positions={self.positions!r}; expected 'rope2d' or 'learned'")
        if self.positions == "rope2d" and self.head_dim % 4:
            bad(f"2-D rotary positions need a head dim divisible by 4 (one pair per axis); got {self.head_dim}")
        for w in self.window_sizes:
            if w < 1 or self.grid % w or w >= self.grid:
                bad(f"window size {w} must divide the {self.grid}x{self.grid} patch grid and be smaller than it")
        for name, layers in (("window_layers", self.window_layers), ("fuse_layers", self.fuse_layers)):
            if any(not 0 <= i < self.num_layers for i in layers):
                bad(f"{name} {list(layers)} must index blocks 0..{self.num_layers - 1}")
        if self.window_layers and not self.window_sizes:
            bad("window_layers given without window_sizes")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"vision config has unknown fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> VisionConfig:
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset {name!r}; choose one of {sorted(VISION_PRESETS)}")
        return cls(**{**VISION_PRESETS[name], **changes})


@dataclass
class VisionOutput:
    patches: torch.Tensor  # [B, N, D] fused, normed patch features
    pooled: torch.Tensor  # [B, D] their mean
    window_weights: torch.Tensor | None = None  # [B, windowed layers, candidates]: the per-image window mix


def rope_2d(config: VisionConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [1, 1, N, head_dim/2] for patches in row-major order: the first half of the pairs turn with the row,
    the second half with the column (the layout `apply_rope` rotates, non-interleaved)."""
    quarter = config.head_dim // 4
    inv_freq = config.rope_theta ** (-torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    idx = torch.arange(config.grid, device=device, dtype=torch.float32)
    rows, cols = idx.repeat_interleave(config.grid), idx.repeat(config.grid)
    angles = torch.cat((rows[:, None] * inv_freq, cols[:, None] * inv_freq), dim=-1)  # [N, head_dim/2]
    return angles.cos()[None, None], angles.sin()[None, None]


def window_masks(config: VisionConfig, device: torch.device) -> torch.Tensor:
    """[K, N, N] True where two patches share a w x w tile, one per candidate window size."""
    idx = torch.arange(config.grid, device=device)
    rows, cols = idx.repeat_interleave(config.grid), idx.repeat(config.grid)
    masks = []
    for w in config.window_sizes:
        tile = (rows // w) * (config.grid // w) + cols // w
        masks.append(tile[:, None] == tile[None, :])
    return torch.stack(masks)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, windowed: bool) -> None:
        super().__init__()
        d, self.n_heads = config.hidden_size, config.num_heads
        self.qkv = Linear(d, 3 * d, bias=True)
        self.proj = Linear(d, d, bias=True)
        self.rope = config.positions == "rope2d"
        # candidates: each window size, then global; the gate reads the layer's mean input token
        self.window_gate = Linear(d, len(config.window_sizes) + 1, bias=True) if windowed else None
        if self.window_gate is not None:
            nn.init.zeros_(self.window_gate.weight)  # start as an even mix of every candidate
            nn.init.zeros_(self.window_gate.bias)

    def forward(
        self, x_BND: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x_BND.shape
        q, k, v = self.qkv(x_BND).view(B, N, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
        if self.rope:
            q, k = apply_rope(q, cos, sin, False), apply_rope(k, cos, sin, False)
        out = F.scaled_dot_product_attention(q, k, v)  # global attention
        weights = None
        if self.window_gate is not None:
            weights = self.window_gate(x_BND.mean(dim=1)).float().softmax(dim=-1)  # [B, K + 1]
            mixed = out * weights[:, -1, None, None, None].to(out.dtype)
            for i, mask in enumerate(masks):
                local = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                mixed = mixed + local * weights[:, i, None, None, None].to(out.dtype)
            out = mixed
        return self.proj(out.transpose(1, 2).reshape(B, N, D)), weights


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, windowed: bool) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = VisionAttention(config, windowed)
        self.norm2 = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: Any, sin: Any, masks: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.norm1(x), cos, sin, masks)
        x = x + attended
        return x + self.mlp(self.norm2(x)), weights


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.pos_embed = (
            nn.Parameter(torch.randn(config.num_patches, d) * 0.02) if config.positions == "learned" else None
        )
        self.blocks = nn.ModuleList(VisionBlock(config, i in config.window_layers) for i in range(config.num_layers))
        fused = config.fuse_layers or (config.num_layers - 1,)
        self.fuse_norms = nn.ModuleList(RMSNorm(d, config.norm_eps) for _ in fused)
        self.fuse = Linear(d * len(fused), d, bias=False) if len(fused) > 1 else None
        self.norm = RMSNorm(d, config.norm_eps)
        self._fused = fused
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gates = {id(b.attn.window_gate) for b in self.blocks}  # zero-initialised: start as an even mix
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in gates:
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:  # scale the residual writers down with depth, as GPT-2 does
            nn.init.normal_(b.attn.proj.weight, std=0.02 / math.sqrt(2 * self.config.num_layers))
            nn.init.normal_(b.mlp.down_proj.weight, std=0.02 / math.sqrt(2 * self.config.num_layers))

    def forward(self, images: torch.Tensor) -> VisionOutput:
        """images [B, 3, H, W] float in [-1, 1] (`images.to_tensor`), H = W = config.image_size."""
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (3, c.image_size, c.image_size):
            raise ValueError(
                f"the vision encoder takes images [B, 3, {c.image_size}, {c.image_size}]; got {list(images.shape)}"
            )
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        cos = sin = masks = None
        if self.pos_embed is not None:
            x = x + self.pos_embed
        else:
            cos, sin = rope_2d(c, x.device)
        if c.window_sizes:
            masks = window_masks(c, x.device)
        outs, weights = {}, []
        for i, block in enumerate(self.blocks):
            x, w = block(x, cos, sin, masks)
            if w is not None:
                weights.append(w)
            if i in self._fused:
                outs[i] = x
        parts = [norm(outs[i]) for norm, i in zip(self.fuse_norms, self._fused)]
        fused = self.fuse(torch.cat(parts, dim=-1)) if self.fuse is not None else parts[0]
        patches = self.norm(fused)
        return VisionOutput(patches, patches.mean(dim=1), torch.stack(weights, dim=1) if weights else None)
