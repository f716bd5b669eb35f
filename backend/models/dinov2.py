"""DINOv2 ViT-L/14 backbones through timm (plain and 4 registers), their tiny twins, patch tokens.

FMbSeg stage 2 (``reference/algorithms.md`` §3.4, §3.5b) trains on frozen DINOv2 patch tokens.
The models are timm's ``vit_large_patch14_dinov2.lvd142m`` and
``vit_large_patch14_reg4_dinov2.lvd142m`` (:data:`DINOV2_ARCHS`), built by one private
builder, :func:`_create_dinov2`, which also builds the tiny twin (the same registered timm
entrypoint at toy width and depth; timm ``test_vit``).

Weights are Meta's official state dicts (``dinov2/hub/backbones.py``), loaded by timm itself:
``create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path),
dynamic_img_size=True)`` reads the file with ``weights_only=True`` on CPU, converts Meta's keys
(``checkpoint_filter_fn``, ``_convert_dinov2``) and loads strictly; nothing goes online. (An
in-memory ``state_dict`` overlay is not used: timm deep-copies its pretrained cfg, so a 1.2 GB
dict would be copied and kept on the model.) The tiny twin is written in Meta's layout
(:func:`meta_state_dict`) and loaded through the same call, so the loader is what tests run.

Position embeddings at other sizes than 518×518 follow Meta's
``DinoVisionTransformer.interpolate_pos_encoding`` (``dinov2/models/vision_transformer.py``):

- plain model (``interpolate_offset=0.1``, ``interpolate_antialias=False``): bicubic with
  ``scale_factor=((gh + 0.1)/M, (gw + 0.1)/M)``; timm resamples by ``size=`` with antialias,
  which differs (algorithms.md: max 0.097 at 336×448 on real weights), so ``_pos_embed`` is
  replaced by :func:`interpolate_pos_encoding` (:class:`MetaPosEmbedViT`);
- reg4 model (offset 0, antialias True): Meta passes ``size=``, exactly timm's
  ``resample_abs_pos_embed``; timm's is kept. Meta names the axes ``B, nc, w, h = x.shape``
  (its ``w`` is the height, its ``sx`` scales rows); here they are (gh, gw) = (H/14, W/14).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from timm.models.vision_transformer import VisionTransformer

from .checkpoints import CheckpointError, file_hint, read_state_dict
from .clip import tiny_requested, warn_tiny
from .fingerprints import TINY, weight_fingerprint
from .weights import IMAGENET_MEAN, IMAGENET_STD, get_spec, resolve_weight

if TYPE_CHECKING:
    from .pool import WeightRef

log = logging.getLogger(__name__)

PATCH = 14
PATCH_TOKENS_REVISION = 1
"""Bumped when :func:`patch_tokens` computes other numbers from the same weights (resize,
normalisation); part of :attr:`LoadedDinov2.backbone_fingerprint`, so cached features go stale."""


@dataclass(frozen=True)
class Dinov2Arch:
    """One DINOv2 variant: the timm model and Meta's position-embedding interpolation.

    Attributes:
        timm_name: Registered timm model with its pretrained tag.
        reg_tokens: Register tokens (0 or 4); with the CLS token, the tokens before the patches.
        interpolate_offset: Meta's ``interpolate_offset`` (0.1 plain, 0.0 reg4).
        interpolate_antialias: Meta's ``interpolate_antialias`` (False plain, True reg4).
    """

    timm_name: str
    reg_tokens: int
    interpolate_offset: float
    interpolate_antialias: bool

    @property
    def timm_matches_meta(self) -> bool:
        """True when timm's ``resample_abs_pos_embed`` (``size=``, antialias) is Meta's."""
        return self.interpolate_offset == 0 and self.interpolate_antialias


DINOV2_ARCHS: dict[str, Dinov2Arch] = {
    "dinov2_vitl14": Dinov2Arch("vit_large_patch14_dinov2.lvd142m", 0, 0.1, False),
    "dinov2_vitl14_reg4": Dinov2Arch("vit_large_patch14_reg4_dinov2.lvd142m", 4, 0.0, True),
}
"""Weight-table name -> timm model and Meta's interpolation settings (hub defaults)."""

TINY_NAME = "dinov2_tiny"
TINY_DINOV2_CFG: dict[str, Any] = {"embed_dim": 64, "depth": 2, "num_heads": 2}
"""Overrides of the timm entrypoint's ViT-L arguments for the tiny twin (patch 14, 518 px and
the register count stay the variant's)."""
_COMMON: dict[str, Any] = {"dynamic_img_size": True, "num_classes": 0, "init_values": 1.0}


def interpolate_pos_encoding(
    pos_embed: torch.Tensor, grid: tuple[int, int], offset: float, antialias: bool
) -> torch.Tensor:
    """Meta's ``interpolate_pos_encoding`` for a (gh, gw) patch grid.

    Args:
        pos_embed: (1, 1 + M*M, D) CLS then patch position embeddings, M = 37 for 518 px.
        grid: (gh, gw) patches = (H // 14, W // 14) of the input.
        offset: Meta's ``interpolate_offset``; > 0 interpolates by ``scale_factor`` (gh + offset)
            / M on rows, (gw + offset) / M on columns, 0 by ``size=grid``.
        antialias: Meta's ``interpolate_antialias``.

    Returns:
        (1, 1 + gh*gw, D) in ``pos_embed``'s dtype (computed in float32), patches row-major; the
        table itself when ``grid == (M, M)`` (Meta's early return).
    """
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    assert m * m == n, f"{n} patch position embeddings are not a square grid"
    gh, gw = grid
    if (gh, gw) == (m, m):
        return pos_embed
    pos = pos_embed.float()
    dim = pos.shape[-1]
    table = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    if offset:
        scale = (float(gh + offset) / m, float(gw + offset) / m)
        patch = F.interpolate(table, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patch = F.interpolate(table, size=(gh, gw), mode="bicubic", antialias=antialias)
    assert patch.shape[-2:] == (gh, gw), (patch.shape, grid)
    patch = patch.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)
    return torch.cat([pos[:, :1], patch], dim=1).to(pos_embed.dtype)


class MetaPosEmbedViT(VisionTransformer):
    """timm's ``VisionTransformer`` with Meta's position interpolation; only ``_pos_embed``
    differs (:func:`_use_meta_pos_embed`). Needs ``dynamic_img_size=True``, CLS, no registers."""

    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, gh, gw, D) patch embeddings -> (B, 1 + gh*gw, D) CLS + patches + positions."""
        assert x.ndim == 4 and self.cls_token is not None and self.reg_token is None
        assert self.pos_embed is not None
        b, gh, gw, dim = x.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, gh * gw, dim)], dim=1)
        pos = interpolate_pos_encoding(
            self.pos_embed, (gh, gw), self.interpolate_offset, self.interpolate_antialias
        )
        out: torch.Tensor = self.pos_drop(tokens + pos)
        return out


def _use_meta_pos_embed(model: VisionTransformer, arch: Dinov2Arch) -> VisionTransformer:
    """``model`` (in place) with Meta's interpolation when timm's is not already Meta's."""
    if arch.timm_matches_meta:
        return model
    assert type(model) is VisionTransformer, type(model)
    model.__class__ = MetaPosEmbedViT
    assert isinstance(model, MetaPosEmbedViT)
    model.interpolate_offset = arch.interpolate_offset
    model.interpolate_antialias = arch.interpolate_antialias
    return model


def _create_dinov2(
    arch: Dinov2Arch, seed: int = 0, *, tiny: bool = False, file: Path | None = None
) -> VisionTransformer:
    """Builds a DINOv2 through ``timm.create_model``: random (deterministic per ``seed``) or,
    with ``file``, loaded by timm from a Meta-format (or timm-format) state dict. Returns it in
    eval mode, frozen (no parameter requires grad), fp32 on CPU."""
    import timm

    kwargs = {**_COMMON, **(TINY_DINOV2_CFG if tiny else {})}
    if file is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch.timm_name, **kwargs)
    assert isinstance(model, VisionTransformer), type(model)
    return _use_meta_pos_embed(model, arch).eval().requires_grad_(False)


def meta_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """``model``'s weights in Meta's checkpoint layout (keys of ``dinov2_vitl14_pretrain.pth``).

    The inverse of timm's ``_convert_dinov2``: a ``mask_token`` (zeros) is added and, with
    registers, ``reg_token`` becomes ``register_tokens`` and a zero CLS position is put in
    front of the patch positions (timm folded it into ``cls_token``), so loading gives back
    exactly ``model``'s tensors. Used to write tiny checkpoints in the real format.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.zeros(1, dim)
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
        sd["pos_embed"] = torch.cat([torch.zeros(1, 1, dim), sd["pos_embed"]], dim=1)
    return sd


@dataclass(frozen=True)
class LoadedDinov2:
    """A frozen DINOv2 ready for feature extraction.

    Attributes:
        model: timm ``VisionTransformer`` (:class:`MetaPosEmbedViT` for the plain model), eval
            mode, frozen, fp32, on ``device``.
        name: Weight-table name (``dinov2_vitl14``) or ``dinov2_tiny``.
        tiny: True for the tiny twin.
        arch: The variant (timm model, registers, Meta's interpolation).
        mean: RGB normalisation mean in [0, 1] units (ImageNet).
        std: RGB normalisation std in [0, 1] units.
        file_fingerprint: The weight file's fingerprint (``fingerprints.py``), ``"tiny"`` for
            a random twin; it goes into model identities.
        weight: The weight-table name asked for (``dinov2_vitl14`` also for its tiny twin).
        file: The weight file loaded; None for a random twin.
    """

    model: VisionTransformer
    name: str
    tiny: bool
    arch: Dinov2Arch
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    file_fingerprint: str = TINY
    weight: str = ""
    file: Path | None = None

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        device: torch.device = self.model.patch_embed.proj.weight.device
        return device

    @property
    def patch_size(self) -> int:
        """Patch side in pixels (14)."""
        return int(self.model.patch_embed.patch_size[0])

    @property
    def embed_dim(self) -> int:
        """Token width D (1024 for ViT-L, 64 for the twin)."""
        return int(self.model.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in ``forward_features``: CLS + registers (1 or 5)."""
        return int(self.model.num_prefix_tokens)

    @cached_property
    def backbone_fingerprint(self) -> str:
        """32 hex digits naming the features this model computes: the timm model, Meta's
        interpolation, :data:`PATCH_TOKENS_REVISION` and the weights (the file's fingerprint;
        for a random twin a hash of its tensors). Keys the feature disk cache."""
        weights = self.file_fingerprint if self.file_fingerprint != TINY else self._weights_hash()
        record = {"arch": self.arch.__dict__, "revision": PATCH_TOKENS_REVISION, "w": weights}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]

    def to(self, device: str | torch.device) -> LoadedDinov2:
        """This backbone with its model moved to ``device`` (in place; returns self)."""
        self.model.to(device)
        return self

    def _weights_hash(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for key, value in self.model.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


def load_dinov2(
    name: str | WeightRef = "dinov2_vitl14",
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    tiny: bool | None = None,
    device: str | torch.device = "cpu",
) -> LoadedDinov2:
    """Builds a DINOv2 and loads its weights (``build_sam``'s contract, for DINOv2).

    Args:
        name: A key of :data:`DINOV2_ARCHS`, or a ``pool.WeightRef`` (its name, checkpoint and
            tiny flag are used; ``checkpoint`` and ``tiny`` must then be left unset).
        checkpoint: Explicit weight file (Meta's layout, or timm's); None resolves it.
        tiny: Use the tiny twin; None follows ``OVSS_TINY``. Without a ``checkpoint`` the twin
            (seed 0) is written in Meta's layout to a temporary file and loaded from it; with
            one, the tiny architecture is loaded from that file.
        device: Where to put the model.

    Raises:
        MissingWeightError: The weight file is not found (one-line message).
        CheckpointError: The file cannot be read or does not fit the architecture.
    """
    if not isinstance(name, str):
        ref = name
        name, checkpoint, tiny = ref.name, ref.checkpoint, ref.tiny
    if name not in DINOV2_ARCHS:
        raise ValueError(f"unknown DINOv2 {name!r}; known: {', '.join(DINOV2_ARCHS)}")
    arch, spec = DINOV2_ARCHS[name], get_spec(name)
    tiny = tiny_requested() if tiny is None else tiny
    if tiny and checkpoint is None:
        return _random_twin(arch, name).to(device)
    path = resolve_weight(spec, checkpoint)  # an explicit file must exist
    model = _load(arch, path, tiny=tiny)
    if tiny:  # the twin's architecture from a file (tests)
        fingerprint = weight_fingerprint(None, path)
        return LoadedDinov2(model, TINY_NAME, True, arch, file_fingerprint=fingerprint,
                            weight=name, file=path).to(device)  # fmt: skip
    return LoadedDinov2(model, name, False, arch, spec.mean, spec.std,
                        weight_fingerprint(spec, path), name, path).to(device)  # fmt: skip


def _random_twin(arch: Dinov2Arch, name: str) -> LoadedDinov2:
    """The seed-0 tiny twin, written in Meta's layout and loaded back through :func:`_load`."""
    warn_tiny(f"DINOv2 twin of {name}")
    with tempfile.TemporaryDirectory(prefix="ovss-dinov2-") as folder:
        path = Path(folder) / f"{TINY_NAME}.pth"
        torch.save(meta_state_dict(_create_dinov2(arch, tiny=True)), path)
        model = _load(arch, path, tiny=True)
    return LoadedDinov2(model, TINY_NAME, True, arch, weight=name)


def _load(arch: Dinov2Arch, path: Path, *, tiny: bool) -> VisionTransformer:
    """timm's offline file load (module docstring); failures become one-line CheckpointErrors."""
    try:
        model = _create_dinov2(arch, tiny=tiny, file=path)
    except Exception as exc:  # torch, timm and filter errors come in many types
        read_state_dict(path)  # an unreadable file: raises the reader's one-line error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} does not fit DINOv2 {arch.timm_name}"
            f"{' (tiny twin)' if tiny else ''}: {first}{file_hint(path)}"
        ) from exc
    log.info("loaded DINOv2 weights from %s", path)
    return model


def encode_size(
    height: int, width: int, short_side: int = 448, patch: int = PATCH, max_side: int = 1792
) -> tuple[int, int]:
    """The encoder input size (H', W') for an image of ``height`` x ``width`` pixels.

    The image is scaled so its short side is ``short_side`` (or less, so that the long side is
    at most ``max_side``, aspect kept), then each side is rounded half up to a multiple of
    ``patch``, at least one patch. E.g. 300x500 at 448: 448 x 746.7 -> (448, 742), grid (32, 53).
    """
    scale = min(short_side / min(height, width), max_side / max(height, width))

    def side(pixels: int) -> int:
        return max(patch, math.floor(pixels * scale / patch + 0.5) * patch)

    return side(height), side(width)


def preprocess(
    loaded: LoadedDinov2, image: NDArray[np.uint8], size: tuple[int, int]
) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (1, 3, H', W') float32 on ``loaded.device``, normalised.

    Resizing is ``torchvision.transforms.v2.functional.resize`` on float pixels in [0, 1],
    bicubic with ``antialias=True`` (what ``transforms.Resize`` does on tensors); values the
    bicubic kernel pushes slightly outside [0, 1] are kept (no uint8 rounding).
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None]  # writable
    pixels = pixels.to(loaded.device, torch.float32) / 255.0
    if tuple(pixels.shape[-2:]) != size:
        pixels = TF.resize(pixels, list(size), InterpolationMode.BICUBIC, antialias=True)
    mean = torch.tensor(loaded.mean, device=loaded.device).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std, device=loaded.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def patch_tokens(
    loaded: LoadedDinov2, image: NDArray[np.uint8], short_side: int = 448
) -> torch.Tensor:
    """Frozen DINOv2 patch tokens of one image.

    Args:
        loaded: The backbone.
        image: HxWx3 uint8 RGB (original frame).
        short_side: Short side of the encoder input (:func:`encode_size`).

    Returns:
        (gh, gw, D) float32 on CPU, (gh, gw) = ``encode_size(H, W, short_side)`` / 14: the
        ``forward_features`` tokens (after the final norm) without CLS and registers; patch
        (i, j) covers rows [14i, 14i+14), columns [14j, 14j+14) of the resized image.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    size = encode_size(image.shape[0], image.shape[1], short_side, loaded.patch_size)
    with torch.inference_mode():
        tokens = loaded.model.forward_features(preprocess(loaded, image, size))
    gh, gw = size[0] // loaded.patch_size, size[1] // loaded.patch_size
    patches = tokens[0, loaded.num_prefix_tokens :]
    assert patches.shape[0] == gh * gw, (tokens.shape, size)
    return patches.reshape(gh, gw, -1).float().cpu()
