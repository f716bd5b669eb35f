"""NACLIP's neighbour-aware vision tower, on an open_clip ``VisionTransformer``.

Follows sinahmr/NACLIP @0cac3a6 ``clip/model.py`` (``VisionTransformer.forward``,
``interpolate_pos_encoding``, ``gaussian_window``, ``get_attention_addition``, ``custom_attn``)
with ``set_params('reduced', 'naclip', 5.0)``:

- blocks 0..L-2 are CLIP's own;
- the last block's attention is key-key: ``softmax(K Kᵀ / sqrt(d) + Ω) V``, then ``out_proj``;
- ``arch='reduced'`` drops the last block's residual and FFN (the block output is the
  attention output); ``'vanilla'`` keeps them (an ablation of the paper);
- ``ln_post`` and ``proj`` are applied to every token, CLS included.

Ω is the unnormalised Gaussian over patch-grid distance, σ in patch units, with zero CLS row
and column. The reference builds it by convolving one-hot maps with a Gaussian window; this
module evaluates the same closed form directly (the test checks the two agree).

open_clip is batch-first (B, L, C); the reference is LND. Shapes below are batch-first.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_OMEGA_CACHE: dict[tuple[int, int, float, torch.device], torch.Tensor] = {}


def gaussian_omega(
    grid_h: int, grid_w: int, std: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Ω: (1 + gh*gw, 1 + gh*gw) float32, ``exp(-d²/(2σ²))`` between patches, CLS row/col 0.

    Patches are numbered row-major on the (grid_h, grid_w) grid, as the token order.
    """
    key = (grid_h, grid_w, float(std), torch.device(device))
    cached = _OMEGA_CACHE.get(key)
    if cached is not None:
        return cached
    ii, jj = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32),
        torch.arange(grid_w, dtype=torch.float32),
        indexing="ij",
    )
    coords = torch.stack([ii.flatten(), jj.flatten()], dim=1)
    dist2 = torch.cdist(coords, coords).square()
    n = grid_h * grid_w
    omega = torch.zeros(n + 1, n + 1)
    omega[1:, 1:] = torch.exp(-dist2 / (2 * std**2))
    omega = omega.to(device)
    _OMEGA_CACHE[key] = omega
    return omega


def interpolate_pos_embed(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Positional embedding for a (grid_h, grid_w) patch grid, exactly as the reference.

    Args:
        pos: (1 + N0, C) CLIP positional embedding on its square training grid.
        grid_h: Patch rows of the input (H // patch).
        grid_w: Patch columns (W // patch).

    Returns:
        (1 + grid_h*grid_w, C). Interpolation happens only when the token count differs (the
        reference's test); then bicubic with ``scale_factor=((g+0.1)/g0)`` and
        ``recompute_scale_factor=False`` (DINO's +0.1 trick). A ``size=`` call differs by up
        to 0.016 (docs/algorithms.md §5, check E3).
    """
    n0 = pos.shape[0] - 1
    if grid_h * grid_w == n0:
        return pos
    g0 = int(math.sqrt(n0))
    dim = pos.shape[-1]
    grid = pos[1:].reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        mode="bicubic",
        scale_factor=((grid_h + 0.1) / g0, (grid_w + 0.1) / g0),
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert grid.shape[-2:] == (grid_h, grid_w), grid.shape
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, dim)], dim=0)


def neighbour_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, omega: torch.Tensor
) -> torch.Tensor:
    """NACLIP attention: ``out_proj(softmax(K Kᵀ·d^-1/2 + Ω) V)`` (the query is unused).

    Args:
        attn: The block's attention (its ``in_proj`` and ``out_proj`` weights are used).
        x: (B, L, C) the block's ``ln_1`` output.
        omega: (L, L) additive bias, shared by heads and batch.

    Returns:
        (B, L, C).
    """
    b, length, width = x.shape
    heads = attn.num_heads
    _, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    k = k.reshape(b, length, heads, width // heads).transpose(1, 2)
    v = v.reshape(b, length, heads, width // heads).transpose(1, 2)
    # SDPA computes softmax(q kᵀ / sqrt(d) + mask) v; with q = k that is the key-key attention.
    out = F.scaled_dot_product_attention(k, k, v, attn_mask=omega.to(x.dtype))
    projected: torch.Tensor = attn.out_proj(out.transpose(1, 2).reshape(b, length, width))
    return projected


def _trunk(visual: Any, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Patch embedding, (interpolated) positions, ``ln_pre`` and blocks 0..L-2: (B, 1+N, C)."""
    x = visual.conv1(images)
    grid_h, grid_w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = x + interpolate_pos_embed(visual.positional_embedding, grid_h, grid_w).to(x.dtype)
    x = visual.ln_pre(x)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x, int(grid_h), int(grid_w)


def _neighbour_block(
    visual: Any, x: torch.Tensor, grid: tuple[int, int], std: float, arch: str
) -> torch.Tensor:
    last = visual.transformer.resblocks[-1]
    omega = gaussian_omega(grid[0], grid[1], std, x.device)
    out = neighbour_attention(last.attn, last.ln_1(x), omega)
    if arch == "vanilla":
        out = x + out
        out = out + last.mlp(last.ln_2(out))
    tokens: torch.Tensor = visual.ln_post(out) @ visual.proj
    return tokens


@torch.no_grad()
def naclip_tokens(
    visual: Any, images: torch.Tensor, std: float = 5.0, arch: str = "reduced"
) -> torch.Tensor:
    """All output tokens of NACLIP's vision tower.

    Args:
        visual: ``open_clip`` ``VisionTransformer`` (``model.visual``).
        images: (B, 3, H, W) float32 normalised RGB; H and W are floored to the patch grid by
            the patch convolution, as in the reference.
        std: σ of Ω in patch units (``gaussian_std``).
        arch: ``"reduced"`` (NACLIP) or ``"vanilla"`` (keep residual and FFN).

    Returns:
        (B, 1 + gh*gw, D) float32: ``ln_post(tokens) @ proj``, CLS first.
    """
    if arch not in ("reduced", "vanilla"):
        raise ValueError(f"arch must be 'reduced' or 'vanilla', got {arch!r}")
    x, grid_h, grid_w = _trunk(visual, images)
    return _neighbour_block(visual, x, (grid_h, grid_w), std, arch)


@torch.no_grad()
def clip_cls_and_naclip_tokens(
    visual: Any, images: torch.Tensor, std: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's own image embedding and NACLIP's dense tokens, sharing blocks 0..L-2.

    Returns:
        ``(cls, tokens)``: (B, D) the standard image embedding (the unmodified last block,
        ``ln_post`` of the CLS token, ``proj``; equal to ``encode_image`` at the training
        size) and (B, 1 + gh*gw, D) as :func:`naclip_tokens`.
    """
    x, grid_h, grid_w = _trunk(visual, images)
    standard = visual.transformer.resblocks[-1](x)
    cls: torch.Tensor = visual.ln_post(standard[:, 0]) @ visual.proj
    return cls, _neighbour_block(visual, x, (grid_h, grid_w), std, "reduced")
