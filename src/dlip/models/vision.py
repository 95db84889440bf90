"""Vision tower: timm's VisionTransformer with BLIP's settings, layer taps and pos-embed resize.

Subclassing keeps timm's parameter names, which are BLIP's (`cls_token`, `pos_embed`,
`patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dlip.models.config import VisionConfig
from dlip.models.outputs import NO_TAPS, Taps


class VisionTower(VisionTransformer):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
            num_classes=0,
            global_pool="",
            class_token=True,
        )
        self.cfg = cfg

    def forward_tokens(
        self, pixels: Tensor, taps: Taps = NO_TAPS
    ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
        """(B, 3, S, S) -> tokens (B, 1+N, D) after the final norm, plus tapped layers."""
        size = self.cfg.image_size
        if pixels.shape[-2:] != (size, size):
            raise ValueError(
                f"vision tower expects {size}x{size} pixels, got {tuple(pixels.shape[-2:])}; "
                "resize the input or the model (BLIP.set_image_size)"
            )
        taps = taps.resolve(range(len(self.blocks)))
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(pixels))))
        hidden: dict[int, Tensor] = {}
        attn: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            if i in taps.attn:
                x, attn[i] = block_with_probs(block, x)
            elif self.grad_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in taps.hidden:
                hidden[i] = x
        return self.norm(x), hidden, attn


def block_with_probs(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm Block forward that also returns the attention probabilities (B, H, T, T)."""
    attn = block.attn
    b, t, _ = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, T, d)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    ctx = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(b, t, attn.attn_dim)
    ctx = attn.proj_drop(attn.proj(attn.norm(ctx)))
    x = x + block.drop_path1(block.ls1(ctx))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, probs


def resize_pos_embed(pos_embed: Tensor, new_grid: int) -> Tensor:
    """(1, 1+g*g, D) -> (1, 1+G*G, D): keep CLS, bicubic-resize the patch grid (as BLIP)."""
    n = pos_embed.shape[1] - 1
    old_grid = round(n**0.5)
    if old_grid * old_grid != n:
        raise ValueError(f"pos_embed with {n} patch positions is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid, old_grid, d).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, d).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=1)
