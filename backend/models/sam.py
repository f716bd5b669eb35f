"""SAM builders: ViT-B/L/H from ``segment_anything`` and their tiny twin.

:data:`SAM_ARCHS` holds the constants of segment_anything ``build_sam.py`` (``_build_sam`` and
``build_sam_vit_{b,l,h}``) as data; one private builder, :func:`_create_sam`, assembles
``Sam(ImageEncoderViT, PromptEncoder, MaskDecoder)`` from any row, so the tiny twin (64-px
input, 32-wide) is the production code at toy size. Unlike ``build_sam.py``, weights are read
through :mod:`.checkpoints` (``weights_only=True``, CPU, strict), never with a bare
``torch.load``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from .checkpoints import apply_filters, load_into, read_state_dict
from .clip import tiny_requested, warn_tiny
from .fingerprints import TINY, weight_fingerprint
from .weights import get_spec, resolve_weight

log = logging.getLogger(__name__)

_COMMON: dict[str, Any] = {
    "image_size": 1024,
    "prompt_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp": 2048,
    "decoder_heads": 8,
    "iou_hidden": 256,
    "window": 14,
}

SAM_ARCHS: dict[str, dict[str, Any]] = {
    "sam_vit_b": {"arch": "vit_b", "dim": 768, "depth": 12, "heads": 12, "global": (2, 5, 8, 11)},
    "sam_vit_l": {
        "arch": "vit_l",
        "dim": 1024,
        "depth": 24,
        "heads": 16,
        "global": (5, 11, 17, 23),
    },
    "sam_vit_h": {
        "arch": "vit_h",
        "dim": 1280,
        "depth": 32,
        "heads": 16,
        "global": (7, 15, 23, 31),
    },
}
"""Weight-table name -> encoder constants of ``build_sam_vit_{b,l,h}``."""

TINY_NAME = "sam_tiny"
TINY_SAM_CFG: dict[str, Any] = {
    "arch": "tiny",
    "dim": 32,
    "depth": 1,
    "heads": 2,
    "global": (0,),
    "image_size": 64,
    "prompt_dim": 32,
    "decoder_depth": 1,
    "decoder_mlp": 64,
    "decoder_heads": 2,
    "iou_hidden": 32,
    "window": 2,
}
_FILTERS = ("unwrap", "strip_module_prefix")


@dataclass(frozen=True)
class LoadedSam:
    """A SAM ready for inference.

    Attributes:
        model: ``segment_anything.modeling.Sam`` in eval mode, fp32.
        name: Weight-table name (``sam_vit_b``) or ``sam_tiny``.
        tiny: True for the random tiny twin.
        file_fingerprint: The weight file's fingerprint (``fingerprints.py``), ``"tiny"`` for
            a random twin; it goes into model identities.
        weight: The weight-table name asked for (``sam_vit_b`` also for its tiny twin): the
            name model identities use.
    """

    model: Sam
    name: str
    tiny: bool
    file_fingerprint: str = TINY
    weight: str = ""

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the first values of every weight: tells checkpoints apart, cheaply (computed
        once per loaded model; every ``SamEncoder`` keys the feature cache with it)."""
        digest = hashlib.blake2b(digest_size=8)
        for key, value in self.model.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().flatten()[:256].float().cpu().numpy().tobytes())
        return digest.hexdigest()

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        device: torch.device = self.model.pixel_mean.device
        return device

    @property
    def image_size(self) -> int:
        """Long side of the encoder input (1024; 64 for the tiny twin)."""
        return int(self.model.image_encoder.img_size)


def _create_sam(cfg: dict[str, Any], seed: int = 0) -> Sam:
    """Builds a randomly initialised SAM from a ``SAM_ARCHS`` row (plus ``_COMMON``)."""
    c = {**_COMMON, **cfg}
    grid = c["image_size"] // 16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=c["depth"],
                embed_dim=c["dim"],
                img_size=c["image_size"],
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=c["heads"],
                patch_size=16,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=c["global"],
                window_size=c["window"],
                out_chans=c["prompt_dim"],
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=c["prompt_dim"],
                image_embedding_size=(grid, grid),
                input_image_size=(c["image_size"], c["image_size"]),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=c["decoder_depth"],
                    embedding_dim=c["prompt_dim"],
                    mlp_dim=c["decoder_mlp"],
                    num_heads=c["decoder_heads"],
                ),
                transformer_dim=c["prompt_dim"],
                iou_head_depth=3,
                iou_head_hidden_dim=c["iou_hidden"],
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


def build_sam(
    name: str = "sam_vit_b",
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    tiny: bool | None = None,
    device: str | torch.device = "cpu",
) -> LoadedSam:
    """Builds a SAM and loads its weights (``build_clip``'s contract, for SAM).

    Args:
        name: A key of :data:`SAM_ARCHS`.
        checkpoint: Explicit weight file; None resolves it (``weights.resolve_weight``).
        tiny: Use the tiny random twin; None follows ``OVSS_TINY``. With a ``checkpoint`` the
            tiny architecture is loaded from that file.
        device: Where to put the model.
    """
    if name not in SAM_ARCHS and name != TINY_NAME:
        raise ValueError(f"unknown SAM {name!r}; known: {', '.join([*SAM_ARCHS, TINY_NAME])}")
    tiny = tiny_requested() if tiny is None else tiny
    if tiny or name == TINY_NAME:
        model = _create_sam(TINY_SAM_CFG)
        fingerprint = TINY
        if checkpoint is not None:
            _load_weights(model, Path(checkpoint))
            fingerprint = weight_fingerprint(None, Path(checkpoint))
        else:
            warn_tiny(f"SAM twin of {name}")
        return LoadedSam(model.to(device), TINY_NAME, True, fingerprint, name)
    spec = get_spec(name)
    model = _create_sam(SAM_ARCHS[name])
    path = resolve_weight(spec, checkpoint)
    _load_weights(model, path)
    return LoadedSam(model.to(device), name, False, weight_fingerprint(spec, path), name)


def _load_weights(model: Sam, path: Path) -> None:
    load_into(model, apply_filters(read_state_dict(path), _FILTERS), source=str(path))
    log.info("loaded SAM weights from %s", path)
