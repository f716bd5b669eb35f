"""The proposer interface every method implements, and the registry of methods.

A proposer turns an image and a vocabulary into per-class score maps in two stateless steps:

- ``encode(image) -> Features``: everything that depends on the image only (backbone features,
  image-dependent refinement weights). Expensive; cached by :class:`FeatureCache`.
- ``score(features, vocabulary) -> Proposal``: everything that depends on the words. Cheap, so a
  second vocabulary on the same image costs only this step.

Proposers hold only immutable configuration and models in eval mode, so one instance serves
many threads (no ``set_image`` state, unlike ``SamPredictor``).

A method is registered as a **plan** function: from options alone (no model loaded) it decides
the config, the weights and artifacts, hence the model's identity (``models/identity.py``),
and returns a :class:`MethodPlan` whose ``build`` takes models from a ``ModelPool``. So the
server answers ``/setup`` with the identity its predictions will carry without loading, and a
server running several methods holds each model once.

Capabilities are explicit: a proposer that can embed free text for label matching returns an
embedder from :meth:`Proposer.text_embedder`; a composite passes its dense method's through.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from ovss_label.converters import Instance
from ovss_label.ontologies import BACKGROUND, Vocabulary

__all__ = ["BACKGROUND"]  # re-exported: proposers name the background class through base

from ..models.identity import ModelIdentity
from ..models.pool import ModelPool

if TYPE_CHECKING:
    from .cache import FeatureCache
    from .confidence import Calibration

# A class named BACKGROUND (any case: ontologies.is_background) scores like the others but
# never becomes an instance.


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
        confidence: (H, W) float32 in [0, 1]: the probability of the method's own decision at
            each pixel, for methods whose decision is not the top of ``scores`` (a hidden
            background class); None: ``scores.max(0)``. Read by ``top_confidence``.
    """

    labels: tuple[str, ...]
    scores: NDArray[Any]
    assignment: NDArray[Any] | None = None
    instances: list[Instance] | None = None
    confidence: NDArray[Any] | None = None

    def __post_init__(self) -> None:
        k = len(self.labels)
        if self.scores.ndim != 3 or self.scores.shape[0] != k:
            raise ValueError(f"scores must be ({k}, H, W), got {self.scores.shape}")
        if self.assignment is not None and self.assignment.shape != self.scores.shape[1:]:
            raise ValueError(f"assignment {self.assignment.shape} != {self.scores.shape[1:]}")
        if self.confidence is not None and self.confidence.shape != self.scores.shape[1:]:
            raise ValueError(f"confidence {self.confidence.shape} != {self.scores.shape[1:]}")

    def top_confidence(self) -> NDArray[Any]:
        """(H, W) float32: how sure the method is of each pixel's decision (``confidence``,
        else the best class score); what a prediction's ``score`` is made of
        (``confidence.py``)."""
        if self.confidence is not None:
            return self.confidence
        if self.scores.shape[0] == 0:
            return np.zeros(self.scores.shape[1:], np.float32)
        top: NDArray[Any] = self.scores.max(axis=0)
        return top


def with_hidden_background(vocabulary: Vocabulary) -> tuple[Vocabulary, bool]:
    """``vocabulary`` with a hidden background class at index 0, and True; or unchanged and
    False when it has a background class already.

    The hidden class is NACLIP's own background line (``cls_voc21.txt`` line 0: 26 stuff names,
    minus any that is also a label's synonym): a project's labels rarely include background,
    and a softmax over "cat, dog" alone would paint every pixel cat or dog. Its pixels get no
    label (the proposer returns -1 there).
    """
    from ovss_label.ontologies import is_background

    if any(is_background(n) for n in vocabulary.names):
        return vocabulary, False
    names = (BACKGROUND, *vocabulary.names)
    synonyms = (_stuff_names(vocabulary), *vocabulary.synonyms)
    return Vocabulary(names, synonyms, vocabulary.templates, vocabulary.name), True


def with_background_names(vocabulary: Vocabulary) -> Vocabulary:
    """``vocabulary`` where a background class known only by its name ("background") gets
    NACLIP's background line as its synonyms, the text ``with_hidden_background`` gives the
    hidden one (``fmbseg`` is trained and scored with the same background prototype)."""
    from ovss_label.ontologies import is_background

    rows = tuple(
        _stuff_names(vocabulary) if is_background(name) and syns == (name,) else syns
        for name, syns in zip(vocabulary.names, vocabulary.synonyms, strict=True)
    )
    return Vocabulary(vocabulary.names, rows, vocabulary.templates, vocabulary.name)


def _stuff_names(vocabulary: Vocabulary) -> tuple[str, ...]:
    """``cls_voc21.txt`` line 0 (26 stuff names) minus any that is a synonym of a class."""
    from ovss_label.ontologies import load

    taken = {s.lower() for syns in vocabulary.synonyms for s in syns}
    stuff = tuple(s for s in load("voc21").synonyms[0] if s.lower() not in taken)
    return stuff or (BACKGROUND,)


class TextEmbedder(Protocol):
    """Embeds a vocabulary's queries in a space where free text can be matched to labels."""

    def query_features(self, vocabulary: Vocabulary) -> tuple[torch.Tensor, list[int]]:
        """(Q, D) unit rows, one per query (synonym) in class order, and each one's class."""
        ...


class Proposer(ABC):
    """One open-vocabulary segmentation method (module docstring)."""

    name: str = ""
    calibration: Calibration | None = None
    """Maps raw confidence to accuracy for the prediction ``score`` (``confidence.py``); set
    from ``calibration.json`` beside a trained head, None for zero-shot methods."""

    @property
    @abstractmethod
    def identity(self) -> ModelIdentity:
        """What this model is: method, settings, the files it loaded (``models/identity.py``)."""

    @property
    def model_version(self) -> str:
        """Label Studio's ``model_version``: the identity's short string."""
        return self.identity.version

    @property
    def cache_key(self) -> str:
        """Keys cached features: two proposers with equal keys produce equal features."""
        return self.model_version

    def text_embedder(self) -> TextEmbedder | None:
        """An embedder for matching free text to labels, or None (module docstring)."""
        return None

    @abstractmethod
    def encode(self, image: NDArray[Any]) -> Features:
        """Image-dependent work. ``image``: (H, W, 3) uint8 RGB, EXIF orientation applied."""

    @abstractmethod
    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """Word-dependent work on cached features; scores in the original frame."""


@dataclass(frozen=True)
class MethodPlan:
    """A method decided from its options, nothing loaded yet.

    Attributes:
        method: The registered name.
        identity: The identity the built proposer will report (same files, same settings).
        build: ``build(pool, feature_cache)`` loads the models from ``pool`` and returns the
            proposer; ``feature_cache`` (optional) also holds derived maps (NACLIP's refined
            query maps, the ``+sam`` sub-features), one memory budget for all.
    """

    method: str
    identity: ModelIdentity
    build: Callable[[ModelPool, FeatureCache | None], Proposer]


PlanFunction = Callable[..., MethodPlan]
_REGISTRY: dict[str, PlanFunction] = {}


def register_method(name: str) -> Callable[[PlanFunction], PlanFunction]:
    """Decorator: ``plan(**options) -> MethodPlan`` becomes method ``name``."""

    def wrap(plan: PlanFunction) -> PlanFunction:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = plan
        return plan

    return wrap


def available_proposers() -> list[str]:
    """Registered method names."""
    from . import aligned, clip_sam, naclip, pnp_ovss, refine  # noqa: F401  (register on import)

    return sorted(_REGISTRY)


def method_plan(name: str, **options: Any) -> MethodPlan:
    """Method ``name`` planned with keyword options (``tiny``, ``checkpoint``, ``sam_model``,
    config fields...); loads nothing.

    Raises:
        ValueError: Unknown method or option values (one line).
    """
    methods = available_proposers()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(methods)}")
    return _REGISTRY[name](**options)


def create_proposer(
    name: str,
    *,
    pool: ModelPool | None = None,
    feature_cache: FeatureCache | None = None,
    device: str = "cpu",
    **options: Any,
) -> Proposer:
    """Builds method ``name`` (options as :func:`method_plan`) with models from ``pool`` (a
    private one on ``device`` when None)."""
    plan = method_plan(name, **options)
    return plan.build(pool if pool is not None else ModelPool(device), feature_cache)
