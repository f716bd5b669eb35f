"""``<dense>+sam``: crisp SAM masks from the score maps of any dense proposer.

The dense method decides which class is where; SAM draws the outline:

1. **Prompts from score maps**: the dense per-pixel decision (``postprocess.assignment_of``) is
   split into 8-connected parts per class (background classes and parts below ``min_area``
   skipped). Each part gives one prompt: its bounding box (pixel-edge frame, xyxy) and/or one
   positive point at its most interior pixel (the maximum of the distance transform, so the
   point lies inside even for C-shaped parts). At most ``max_prompts`` parts, best mean score
   first.
2. **One decoder pass** for all prompts of all classes on the image's one SAM embedding
   (``sam_prompts.decode``); with ``multimask`` the best of SAM's 3 candidates by predicted IoU.
3. **Score** of an instance: the mean dense score of its class over the SAM mask, times SAM's
   predicted IoU. Overlaps are resolved by score in post-processing (higher keeps the pixel).

Sub-features (the dense method's and SAM's) are cached separately when a ``FeatureCache`` is
given, under their own keys, so every SAM use on an image shares one encoder pass. The
composite's own ``Features`` holds the same tensors, so a cache counts them twice: the budget
errs on the safe side.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import Instance
from ovss_label.converters.instance import min_area_pixels
from ovss_label.ontologies import Vocabulary, is_background

from ..models.clip import tiny_requested
from ..models.identity import ModelIdentity, WeightId, loaded_weight, settings_of
from ..models.pool import ModelPool, WeightRef
from ..models.sam import LoadedSam
from .base import (
    Features,
    MethodPlan,
    Proposal,
    Proposer,
    TextEmbedder,
    method_plan,
    register_method,
)
from .cache import FeatureCache, image_key
from .postprocess import assignment_of
from .sam_prompts import SamEncoder, decode

PROMPT_MODES = ("box+point", "box", "point")


@dataclass(frozen=True)
class RefineConfig:
    """See the module docstring."""

    prompt: str = "box+point"
    multimask: bool = True
    max_prompts: int = 64
    min_area: float = 0.001
    threshold: float = 0.5


@dataclass(frozen=True)
class Prompts:
    """B prompts, one per connected part of a class, original pixels.

    Attributes:
        classes: (B,) int class index into the vocabulary.
        boxes: (B, 4) float xyxy (pixel-edge frame).
        points: (B, 1, 2) float (x, y) at pixel centres.
        scores: (B,) float mean class score over the part.
    """

    classes: NDArray[Any]
    boxes: NDArray[Any]
    points: NDArray[Any]
    scores: NDArray[Any]

    def __len__(self) -> int:
        return len(self.classes)


def prompts_from_proposal(proposal: Proposal, config: RefineConfig) -> Prompts:
    """Step 1 of the module docstring."""
    labels = assignment_of(proposal, config.threshold)
    h, w = labels.shape
    min_pixels = min_area_pixels(config.min_area, h, w)  # the rule postprocessing applies
    found: list[tuple[float, int, list[float], list[float]]] = []
    for k, name in enumerate(proposal.labels):
        if is_background(name) or not (labels == k).any():
            continue
        count, parts = cv2.connectedComponents((labels == k).astype(np.uint8), connectivity=8)
        for i in range(1, count):
            part = parts == i
            if np.count_nonzero(part) < min_pixels:
                continue
            ys, xs = np.nonzero(part)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            inside = cv2.distanceTransform(np.pad(part, 1).astype(np.uint8), cv2.DIST_L2, 5)
            r, c = np.unravel_index(int(inside.argmax()), inside.shape)
            score = float(proposal.scores[k][part].mean())
            found.append((score, k, box, [c - 1 + 0.5, r - 1 + 0.5]))
    found.sort(key=lambda item: -item[0])
    found = found[: config.max_prompts]
    return Prompts(
        np.array([f[1] for f in found], np.int64),
        np.array([f[2] for f in found], np.float64).reshape(-1, 4),
        np.array([f[3] for f in found], np.float64).reshape(-1, 1, 2),
        np.array([f[0] for f in found], np.float64),
    )


class SamRefined(Proposer):
    """A dense proposer followed by SAM (module docstring). Thread-safe."""

    def __init__(
        self,
        dense: Proposer,
        sam: LoadedSam,
        config: RefineConfig | None = None,
        cache: FeatureCache | None = None,
    ) -> None:
        self.dense, self.sam, self.cache = dense, sam, cache
        self.config = _checked(config or RefineConfig())
        self.sam_encoder = SamEncoder(sam)
        self.name = f"{dense.name}+sam"
        # The dense method's confidence is the raw score here too (``confidence.py``).
        self.calibration = dense.calibration

    @property
    def identity(self) -> ModelIdentity:
        return refined_identity(self.dense.identity, self.config, loaded_weight("sam", self.sam))

    def text_embedder(self) -> TextEmbedder | None:
        return self.dense.text_embedder()  # the dense method decides which label is where

    @property
    def cache_key(self) -> str:
        return f"{self.dense.cache_key}+{self.sam_encoder.cache_key}"

    def encode(self, image: NDArray[Any]) -> Features:
        """The dense method's features and SAM's embedding (from ``cache`` when given)."""
        parts = {"dense": self._features(self.dense, image), "sam": self._features(None, image)}
        tensors = {f"{p}.{k}": v for p, f in parts.items() for k, v in f.tensors.items()}
        meta = {"parts": parts}
        return Features(parts["sam"].image_hw, tensors, meta, image_key(image))

    def _features(self, proposer: Proposer | None, image: NDArray[Any]) -> Features:
        encoder: Any = proposer if proposer is not None else self.sam_encoder
        if self.cache is not None:
            return self.cache.features(encoder, image)
        features: Features = encoder.encode(image)
        return features

    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """The dense proposal with ``instances`` drawn by SAM."""
        parts = features.meta["parts"]
        dense = self.dense.score(parts["dense"], vocabulary)
        prompts = prompts_from_proposal(dense, self.config)
        dense.instances = self._instances(parts["sam"], dense, prompts) if len(prompts) else []
        return dense

    def _instances(
        self, sam_features: Features, dense: Proposal, prompts: Prompts
    ) -> list[Instance]:
        use_box, use_point = "box" in self.config.prompt, "point" in self.config.prompt
        masks, iou = decode(
            self.sam,
            sam_features,
            points=prompts.points if use_point else None,
            labels=np.ones(prompts.points.shape[:2], np.int64) if use_point else None,
            boxes=prompts.boxes if use_box else None,
            multimask=self.config.multimask,
            cache=self.cache,
        )
        found = []
        for mask, quality, k in zip(masks, iou, prompts.classes, strict=True):
            if mask.any():
                semantic = float(dense.scores[k][mask].mean())
                score = float(np.clip(semantic * quality, 0.0, 1.0))
                found.append(Instance(mask, dense.labels[k], score))
        return found


def _checked(config: RefineConfig) -> RefineConfig:
    if config.prompt not in PROMPT_MODES:
        raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {config.prompt!r}")
    return config


REVISION = 1
"""Bumped when refinement's numbers change for the same weights and settings."""


def refined_identity(dense: ModelIdentity, config: RefineConfig, sam: WeightId) -> ModelIdentity:
    """``<dense>+sam``'s identity: the dense model's, SAM's file and the refinement settings
    (plan and proposer both use this)."""
    settings = {
        "dense": json.loads(dense.settings),
        "refine": {"revision": REVISION, **settings_of(config)},
    }
    weights = [*dense.weights, sam]
    return ModelIdentity.of(f"{dense.method}+sam", settings, weights, dense.artifacts)


def with_sam(dense_method: str) -> Callable[..., MethodPlan]:
    """The plan of ``<dense_method>+sam``: the dense method (its options passed through)
    followed by SAM."""

    def plan(
        *,
        tiny: bool | None = None,
        sam_model: str = "sam_vit_b",
        sam_checkpoint: str | None = None,
        refine: RefineConfig | None = None,
        **dense_options: Any,
    ) -> MethodPlan:
        tiny = tiny_requested() if tiny is None else tiny
        dense = method_plan(dense_method, tiny=tiny, **dense_options)
        config = _checked(refine or RefineConfig())
        sam_ref = WeightRef(sam_model, sam_checkpoint, tiny)

        def build(pool: ModelPool, cache: FeatureCache | None) -> SamRefined:
            return SamRefined(dense.build(pool, cache), pool.load(sam_ref), config, cache)

        identity = refined_identity(dense.identity, config, sam_ref.weight_id("sam"))
        return MethodPlan(f"{dense_method}+sam", identity, build)

    return plan


for _dense in ("naclip", "pnp_ovss", "fmbseg"):
    register_method(f"{_dense}+sam")(with_sam(_dense))
