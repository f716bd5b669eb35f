"""Frozen DINOv2 patch tokens cached on disk: computed once per image, backbone and scale.

Training the alignment module runs many epochs over the same images; the backbone is frozen,
so its patch tokens (``models/dinov2.py`` :func:`patch_tokens`) are computed once and stored.

Layout under the store's root, one file per image::

    <root>/<backbone fingerprint[:16]>/<short side>/<image sha256>.safetensors

- the backbone fingerprint (``LoadedDinov2.backbone_fingerprint``) covers the weight file, the
  timm model, Meta's interpolation and the preprocessing revision: another file or a change in
  how tokens are computed is another folder, never a stale hit;
- the image hash is ``proposers.cache.image_key`` (sha256 of shape, dtype and pixels);
- the file holds one fp16 tensor ``tokens`` (gh, gw, D) and string metadata: ``format``,
  ``shape``, ``backbone`` (timm model), ``weight``, ``fingerprint``, ``short_side``,
  ``image_size`` (H,W of the original image).

A key is the relative path without suffix, ``"<fp16>/<short side>/<image hash>"`` (a string, so
a training-set manifest can store it). Size: 2 bytes x D x gh x gw, e.g. 2.8 MB for ViT-L
(D = 1024) at 518x518 (37x37 patches), 1.9 MB for a 4:3 image at short side 448 (32x42).

Files are written atomically (a temp file in the same folder, fsync, ``os.replace``), so a
reader sees a whole file or none; two workers computing the same image both write valid files
and the last rename wins. The root can therefore live on a shared filesystem (NFS, a mounted
bucket with POSIX renames): workers only need read and write access to the same path. A file
that cannot be read (truncated, corrupt, written by another format) counts as missing and is
recomputed by :meth:`FeatureStore.get_or_compute`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ovss_label.converters import write_bytes_atomic

from ..models.dinov2 import LoadedDinov2, encode_size, patch_tokens
from ..proposers.cache import image_key

log = logging.getLogger(__name__)

FORMAT = "ovss-features/1"
SUFFIX = ".safetensors"
_KEY = re.compile(r"[0-9a-f]{16}/[0-9]{1,5}/[0-9a-f]{64}")


class MissingFeaturesError(KeyError):
    """No readable features under a key."""


class FeatureStore:
    """fp16 patch tokens on disk, one safetensors file per (backbone, short side, image).

    Args:
        root: The store's folder (created on first write); may be on a shared filesystem.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def key(self, image: NDArray[np.uint8], loaded: LoadedDinov2, short_side: int = 448) -> str:
        """``"<backbone fingerprint[:16]>/<short side>/<image sha256>"`` (module docstring)."""
        return f"{loaded.backbone_fingerprint[:16]}/{int(short_side)}/{image_key(image)}"

    def path(self, key: str) -> Path:
        """The file of ``key``; a string that is not a key is a ValueError (no path escapes)."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a feature key: {key!r}")
        return self.root / f"{key}{SUFFIX}"

    def has(self, key: str) -> bool:
        """True when ``key``'s file exists and its header is whole and ours (reads the header
        only: a truncated file is detected, a corrupt payload is not until :meth:`load`)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(key)), "pt") as f:
                return _valid_header(f.metadata(), key)
        except Exception:  # missing, truncated or foreign: SafetensorError, OSError...
            return False

    def load(self, key: str) -> torch.Tensor:
        """The (gh, gw, D) float32 CPU tokens of ``key``.

        Raises:
            MissingFeaturesError: There is no file, or it cannot be read (treated as missing).
        """
        tokens = self._read(self.path(key), key)
        if tokens is None:
            raise MissingFeaturesError(key)
        return tokens

    def get_or_compute(
        self, image: NDArray[np.uint8], loaded: LoadedDinov2, short_side: int = 448
    ) -> torch.Tensor:
        """The (gh, gw, D) float32 tokens of ``image``: read from disk, else computed with
        ``patch_tokens``, stored as fp16 and returned as stored (fp16 values in float32), so a
        hit and a miss give the same numbers."""
        key = self.key(image, loaded, short_side)
        path = self.path(key)
        cached = self._read(path, key)
        if cached is not None:
            return cached
        tokens = patch_tokens(loaded, image, short_side).to(torch.float16).contiguous()
        self._write(path, tokens, _metadata(key, tokens, loaded, image, short_side))
        return tokens.float()

    def bind(self, loaded: LoadedDinov2, short_side: int = 448) -> BoundFeatures:
        """This store with one backbone and scale: the ``FeatureBuilder`` interface
        ``training.data.build_training_set`` uses."""
        return BoundFeatures(self, loaded, short_side)

    def _read(self, path: Path, key: str) -> torch.Tensor | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata()
                if not _valid_header(metadata, key):
                    raise ValueError("not this key's features")
                tokens: torch.Tensor = f.get_tensor("tokens")
            shape = tuple(int(s) for s in metadata["shape"].split(","))
            if tuple(tokens.shape) != shape or tokens.dtype != torch.float16:
                raise ValueError(f"tensor {tuple(tokens.shape)} {tokens.dtype}, header {shape}")
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated, corrupt or foreign: recomputed by the caller
            log.warning("feature file %s unreadable (%s): treated as missing", path, exc)
            return None
        return tokens.float()

    def _write(self, path: Path, tokens: torch.Tensor, metadata: dict[str, str]) -> None:
        """Atomic write (module docstring): ``write_bytes_atomic``, fsync and rename."""
        from safetensors.torch import save

        write_bytes_atomic(path, save({"tokens": tokens}, metadata=metadata))


def _valid_header(metadata: dict[str, str] | None, key: str) -> bool:
    if not metadata or metadata.get("format") != FORMAT:
        return False
    backbone, short_side, _ = key.split("/")
    return metadata.get("fingerprint", "")[:16] == backbone and metadata.get("short_side") == (
        short_side
    )


def _metadata(
    key: str, tokens: torch.Tensor, loaded: LoadedDinov2, image: NDArray[Any], short_side: int
) -> dict[str, str]:
    return {
        "format": FORMAT,
        "shape": ",".join(str(s) for s in tokens.shape),
        "backbone": loaded.arch.timm_name,
        "weight": loaded.weight or loaded.name,
        "fingerprint": loaded.backbone_fingerprint,
        "short_side": key.split("/")[1],
        "image_size": f"{image.shape[0]},{image.shape[1]}",
    }


@dataclass(frozen=True)
class BoundFeatures:
    """A :class:`FeatureStore` for one backbone and short side (``FeatureStore.bind``).

    Attributes:
        store: The store.
        loaded: The backbone.
        short_side: Short side of the encoder input.
    """

    store: FeatureStore
    loaded: LoadedDinov2
    short_side: int = 448

    @property
    def backbone(self) -> str:
        """``<weight>@<backbone fingerprint[:16]>``: names the features in manifests."""
        return f"{self.loaded.weight or self.loaded.name}@{self.loaded.backbone_fingerprint[:16]}"

    def grid(self, image: NDArray[np.uint8]) -> tuple[int, int]:
        """(gh, gw) of ``image``'s tokens, without computing them."""
        patch = self.loaded.patch_size
        h, w = encode_size(image.shape[0], image.shape[1], self.short_side, patch)
        return h // patch, w // patch

    def ensure(self, image: NDArray[np.uint8]) -> tuple[str, tuple[int, int]]:
        """Computes and stores ``image``'s tokens if missing; returns (key, grid)."""
        key = self.store.key(image, self.loaded, self.short_side)
        if not self.store.has(key):
            self.store.get_or_compute(image, self.loaded, self.short_side)
        return key, self.grid(image)

    def has(self, key: str) -> bool:
        """See :meth:`FeatureStore.has`."""
        return self.store.has(key)

    def load(self, key: str) -> torch.Tensor:
        """See :meth:`FeatureStore.load`."""
        return self.store.load(key)
