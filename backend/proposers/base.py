"""The proposer interface every method implements, and the registry of methods.

A proposer turns an image and a vocabulary into per-class score maps in two stateless steps:

- ``encode(image) -> Features``: everything that depends on the image only (backbone features,
  image-dependent refinement weights). Expensive; cached by :class:`FeatureCache`.
- ``score(features, vocabulary) -> Proposal``: everything that depends on the words. Cheap, so a
  second vocabulary on the same image costs only this step.

Proposers hold only immutable configuration and models in eval mode, so one instance serves
many threads (no ``set_image`` state, unlike ``SamPredictor``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from numpy.typing import NDArray

from ovss_label.converters import Instance
from ovss_label.ontologies import Vocabulary

BACKGROUND = "background"
"""A class with this name (any case) scores like the others but never becomes an instance."""


@dataclass(frozen=True)
class Features:
    """What ``encode`` computed for one image; immutable once built.

    Attributes:
        image_hw: (H, W) of the original image.
        tensors: Named CPU/GPU tensors (method-specific, documented by each proposer).
        meta: Small plain values (window boxes, frame sizes).
        key: Content hash of the image (``cache.image_key``), or "" when unknown; keys caches
            of results derived from these features.
    """

    image_hw: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (what the feature cache budgets)."""
        return sum(t.element_size() * t.nelement() for t in self.tensors.values())


@dataclass
class Proposal:
    """Per-class scores for one image, in the original frame.

    Attributes:
        labels: The K class names, vocabulary order.
        scores: (K, H, W) float32 in [0, 1].
        assignment: (H, W) int16 class index per pixel, -1 where the method assigns no class;
            None lets post-processing decide from ``scores``.
        instances: Instances the method already drew (e.g. SAM masks), or None.
    """

    labels: tuple[str, ...]
    scores: NDArray[Any]
    assignment: NDArray[Any] | None = None
    instances: list[Instance] | None = None

    def __post_init__(self) -> None:
        k = len(self.labels)
        if self.scores.ndim != 3 or self.scores.shape[0] != k:
            raise ValueError(f"scores must be ({k}, H, W), got {self.scores.shape}")
        if self.assignment is not None and self.assignment.shape != self.scores.shape[1:]:
            raise ValueError(f"assignment {self.assignment.shape} != {self.scores.shape[1:]}")


class Proposer(ABC):
    """One open-vocabulary segmentation method (module docstring)."""

    name: str = ""

    @property
    @abstractmethod
    def model_version(self) -> str:
        """Identifies model + weights + settings; Label Studio's ``model_version``."""

    @property
    def cache_key(self) -> str:
        """Keys cached features: two proposers with equal keys produce equal features."""
        return self.model_version

    @abstractmethod
    def encode(self, image: NDArray[Any]) -> Features:
        """Image-dependent work. ``image``: (H, W, 3) uint8 RGB, EXIF orientation applied."""

    @abstractmethod
    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """Word-dependent work on cached features; scores in the original frame."""


ProposerFactory = Callable[..., Proposer]
_REGISTRY: dict[str, ProposerFactory] = {}


def register_proposer(name: str) -> Callable[[ProposerFactory], ProposerFactory]:
    """Decorator: makes ``factory(**options)`` available as method ``name``."""

    def wrap(factory: ProposerFactory) -> ProposerFactory:
        if name in _REGISTRY:
            raise ValueError(f"proposer {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_proposers() -> list[str]:
    """Registered method names."""
    from . import clip_sam, naclip, pnp_ovss, refine  # noqa: F401  (register on import)

    return sorted(_REGISTRY)


def create_proposer(name: str, **options: Any) -> Proposer:
    """Builds method ``name`` with keyword options (e.g. ``tiny=True``, ``checkpoint=...``)."""
    methods = available_proposers()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return _REGISTRY[name](**options)
