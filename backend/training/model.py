"""FMbSeg stage 2: the alignment module that maps frozen DINOv2 patch tokens into CLIP text space.

Seifi et al., BMVC 2024 (docs/algorithms.md §3.4). The paper gives **one transformer block**
(multi-head self-attention over the image's patches + MLP, no cross-attention to text) whose
output lives in the CLIP ViT-L/14 text space. The rest is reconstructed or chosen here:

- [reconstructed] a pre-LN block at the DINOv2 width (1024), then a projection 1024 → 768;
- [choose] a final LayerNorm before the projection (GPT-2's ``ln_f``, CLIP's ``ln_post``): a
  pre-LN block leaves the residual stream un-normalised, and the projection should see
  features of a fixed scale whatever the magnitude of the DINOv2 tokens;
- [choose] outputs L2-normalised (the loss and inference compare them with unit text
  embeddings by dot product).

Layout follows nanoGPT ``model.py``: a config dataclass, the block's parts, the module.
Tensors are batch-first: (B, N, C) for B images of N patch tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AlignmentConfig:
    """Architecture of :class:`AlignmentModule` (JSON-able through ``dataclasses.asdict``).

    Attributes:
        in_dim: Token width; 1024 = DINOv2 ViT-L/14 [paper: the backbone].
        out_dim: Output width; 768 = CLIP ViT-L/14 text embedding [paper: the target space].
        heads: Attention heads; 16 = DINOv2 ViT-L's own head count (64 channels per head)
            [choose]. Must divide ``in_dim``.
        mlp_ratio: MLP hidden width / ``in_dim``; 4.0 as in ViT and DINOv2 [choose].
        dropout: Attention and residual dropout; 0.0 [choose]: the paper trains 10 epochs on
            frozen features and mentions no regularisation.
        bias: Biases in the Linears and LayerNorms; True as in ViT/DINOv2 [choose].
    """

    in_dim: int = 1024
    out_dim: int = 768
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        if self.in_dim <= 0 or self.out_dim <= 0 or self.heads <= 0:
            raise ValueError(f"dimensions and heads must be positive: {self}")
        if self.in_dim % self.heads:
            raise ValueError(f"heads={self.heads} does not divide in_dim={self.in_dim}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width, ``round(in_dim * mlp_ratio)``."""
        return round(self.in_dim * self.mlp_ratio)


class SelfAttention(nn.Module):
    """Multi-head self-attention over one image's patches, with an optional key padding mask."""

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.dropout = config.dropout
        # One fused q/k/v projection, as nanoGPT's c_attn and DINOv2's attn.qkv.
        self.qkv = nn.Linear(config.in_dim, 3 * config.in_dim, bias=config.bias)
        self.proj = nn.Linear(config.in_dim, config.in_dim, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x: (B, N, C) float; keep: (B, 1, 1, N) bool, True for real keys, or None.

        Returns (B, N, C). Padded *keys* get zero attention weight, so a real patch's output
        does not depend on how much padding follows it; padded *queries* still attend to the
        real keys (a finite, meaningless value the caller discards).
        """
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, N, C) -> (B, heads, N, C/heads)
        q, k, v = (t.view(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(b, n, c)
        out: torch.Tensor = self.resid_dropout(self.proj(y))
        return out


class Mlp(nn.Module):
    """Linear → GELU (exact, erf form, as DINOv2) → Linear → dropout."""

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.in_dim, config.hidden_dim, bias=config.bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(config.hidden_dim, config.in_dim, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, N, C)."""
        out: torch.Tensor = self.dropout(self.proj(self.gelu(self.fc(x))))
        return out


class AlignmentModule(nn.Module):
    """One pre-LN transformer block at ``in_dim``, final LayerNorm, projection to ``out_dim``.

    ``x ← x + attn(ln_1(x))``; ``x ← x + mlp(ln_2(x))``; ``z = normalize(proj(ln_f(x)))``.

    Initialisation [choose, nanoGPT's]: every Linear weight ~ N(0, 0.02), biases 0, LayerNorms
    (weight 1, bias 0). Deterministic under ``torch.manual_seed``. The small weights make the
    untrained block close to the identity on the residual stream, so training starts from a
    random linear projection of the DINOv2 features. nanoGPT's extra 1/√(2·n_layer) scaling of
    the residual projections is left out: with one block it is a constant factor of no
    consequence.
    """

    def __init__(self, config: AlignmentConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AlignmentConfig()
        c = self.config
        self.ln_1 = nn.LayerNorm(c.in_dim, bias=c.bias)
        self.attn = SelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.in_dim, bias=c.bias)
        self.mlp = Mlp(c)
        self.ln_f = nn.LayerNorm(c.in_dim, bias=c.bias)
        self.proj = nn.Linear(c.in_dim, c.out_dim, bias=c.bias)
        self.apply(_init_weights)

    def forward(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Align patch tokens with the CLIP text space.

        Args:
            tokens: (B, N, in_dim) float, DINOv2 patch tokens (CLS and registers dropped).
            padding_mask: (B, N) bool, True where a token is padding (PyTorch's
                ``key_padding_mask`` convention), so images with different patch counts can
                share a batch; None when every token is real. Each image needs a real token.

        Returns:
            (B, N, out_dim), same dtype as ``tokens``: unit vectors at real tokens, zero
            vectors at padded ones (so they cannot pass for embeddings by accident).
        """
        keep = self._attention_mask(tokens, padding_mask)
        x = tokens + self.attn(self.ln_1(tokens), keep)
        x = x + self.mlp(self.ln_2(x))
        z = F.normalize(self.proj(self.ln_f(x)), dim=-1)
        if padding_mask is not None:
            z = z.masked_fill(padding_mask[..., None], 0.0)
        return z

    def _attention_mask(
        self, tokens: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Check the inputs; (B, N) padding → (B, 1, 1, N) keep mask for SDPA (True = attend)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.in_dim:
            raise ValueError(
                f"tokens must be (B, N, {self.config.in_dim}), got {tuple(tokens.shape)}"
            )
        if padding_mask is None:
            return None
        if padding_mask.dtype != torch.bool or padding_mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"padding_mask must be bool {tuple(tokens.shape[:2])}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )
        # An image of padding only would softmax over nothing (NaN); refuse it loudly.
        if bool(padding_mask.all(dim=1).any()):
            raise ValueError("every image needs at least one real (unpadded) token")
        return ~padding_mask[:, None, None, :]

    def num_parameters(self) -> int:
        """Number of parameters (all trainable; 13,385,472 for the default config)."""
        return sum(p.numel() for p in self.parameters())

    def config_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict, for checkpoints (see :meth:`from_state`)."""
        return dataclasses.asdict(self.config)

    @classmethod
    def from_state(
        cls, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
    ) -> AlignmentModule:
        """Rebuild a module from ``config_dict()`` and ``state_dict()`` (strict key match)."""
        fields = {f.name for f in dataclasses.fields(AlignmentConfig)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown AlignmentConfig keys: {sorted(unknown)}")
        module = cls(AlignmentConfig(**config))
        module.load_state_dict(state_dict, strict=True)
        return module


def _init_weights(module: nn.Module) -> None:
    """nanoGPT's scheme: Linear weights ~ N(0, 0.02), zero biases; LayerNorm keeps (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
