"""``fmbseg``: FMbSeg stage 2 at inference, a trained alignment head on frozen DINOv2.

Seifi et al. (BMVC 2024) §3.2, docs/algorithms.md §3.4; no code was published.

encode (image only): DINOv2 patch tokens at the head's input short side (``models/dinov2.py``
``patch_tokens``), kept in the shared feature cache.
score (words): the head aligns the tokens into CLIP ViT-L/14's text space; each class's text
prototype is CLIP's embedding of "a photo of a {}." [paper: the single template], synonyms
averaged (``training.data.class_prototypes``); cosine similarities → bilinear to the image →
``softmax(sim / τ)`` with the head's training temperature → argmax (``training.head``).
Prototypes are text, so classes never seen in training still work.

Deviation, an option as in NACLIP: ``background="auto"`` adds NACLIP's hidden background
class (26 stuff names) when the vocabulary has none, and its pixels get no label.

The head is an artifact (``--head RUN_DIR`` or ``OVSS_FMBSEG_HEAD``): its file's sha256 enters
the ``model_version``, and the backbone and input size it was trained on are checked against
the ones loaded (features of another backbone would be meaningless to it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary

from ..models.dinov2 import LoadedDinov2, patch_tokens
from ..models.fingerprints import file_sha256
from ..models.identity import ArtifactId, ModelIdentity, WeightId, loaded_weight, settings_of
from ..models.pool import ModelPool, WeightRef
from ..training.data import class_prototypes
from ..training.head import Head, load_head
from .base import (
    Features,
    MethodPlan,
    Proposal,
    Proposer,
    register_method,
    with_background_names,
    with_hidden_background,
)
from .cache import FeatureCache, image_key
from .confidence import read_calibration

TEMPLATE = "a photo of a {}."
REVISION = 1
"""Bumped when ``fmbseg``'s numbers change for the same weights, head and settings."""


@dataclass(frozen=True)
class FmbsegConfig:
    """Settings of ``fmbseg`` (the backbone, input size and text model come from the head).

    Attributes:
        background: ``"auto"`` (a hidden background class when the vocabulary has none) or
            ``"none"``.
        template: The prompt of every class's text prototype [paper].
    """

    background: str = "auto"
    template: str = TEMPLATE


class FmbsegProposer(Proposer):
    """A trained head on a loaded DINOv2 and CLIP text tower (module docstring)."""

    name = "fmbseg"

    def __init__(
        self, dinov2: LoadedDinov2, text: Any, head: Head, head_id: ArtifactId, config: FmbsegConfig
    ) -> None:
        self.dinov2, self.text, self.head, self.head_id = dinov2, text, head, head_id
        self.config = config
        self.short_side = int(head.meta["fingerprints"]["short_side"])
        _check_trained_with(
            head, "backbone_fingerprint", dinov2, dinov2.backbone_fingerprint, "backbone's features"
        )
        _check_trained_with(head, "text", text.clip, text.clip.text_fingerprint,
                            "CLIP text tower")  # fmt: skip

    @property
    def identity(self) -> ModelIdentity:
        weights = [loaded_weight("backbone", self.dinov2), loaded_weight("text", self.text.clip)]
        return fmbseg_identity(self.config, weights, self.head_id)

    def text_embedder(self) -> Any:
        return self.text

    @torch.no_grad()
    def encode(self, image: NDArray[Any]) -> Features:
        """Features: ``tokens`` (gh, gw, D) float32 DINOv2 patch tokens."""
        tokens = patch_tokens(self.dinov2, image, self.short_side)
        return Features((int(image.shape[0]), int(image.shape[1])), {"tokens": tokens}, {},
                        image_key(image))  # fmt: skip

    @torch.no_grad()
    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """Class probabilities (K, H, W) and the argmax (module docstring)."""
        vocab, hidden = vocabulary, False
        if self.config.background == "auto":
            vocab, hidden = with_hidden_background(vocabulary)
        prompts = with_background_names(replace(vocab, templates=(self.config.template,)))
        prototypes = class_prototypes(self.text, prompts)
        similarities = self.head.similarities(features.tensors["tokens"], prototypes)
        probs = self.head.probabilities(similarities, features.image_hw)
        assignment = probs.argmax(dim=0).numpy().astype(np.int16) - int(hidden)
        scores = (probs[1:] if hidden else probs).numpy().astype(np.float32)
        confidence = probs.max(dim=0).values.numpy().astype(np.float32)  # hidden class too
        return Proposal(vocabulary.names, scores, assignment, confidence=confidence)


def _check_trained_with(head: Head, key: str, model: Any, found: str, what: str) -> None:
    """Refuses a model other than the one the head was trained with (``fingerprints[key]``):
    features or prototypes of another model would mean nothing to it."""
    trained = head.meta["fingerprints"].get(key)
    if trained and trained != found:
        raise ValueError(
            f"this head was trained on another {what} ({trained[:12]}; loaded "
            f"{model.weight or model.name} is {found[:12]}): load the one it was trained with"
        )


def fmbseg_identity(
    config: FmbsegConfig, weights: list[WeightId], head: ArtifactId
) -> ModelIdentity:
    """``fmbseg``'s identity: settings, the backbone and text files, the head's content."""
    settings = {"revision": REVISION, **settings_of(config)}
    return ModelIdentity.of("fmbseg", settings, weights, [head])


def head_file(head: str | os.PathLike[str] | None) -> Path:
    """The head file named by ``head`` (a run folder or the file), else ``OVSS_FMBSEG_HEAD``.

    Raises:
        ValueError: None given, or nothing there (says how to train one).
    """
    given = head or os.environ.get("OVSS_FMBSEG_HEAD") or ""
    if not given:
        raise ValueError(
            "fmbseg needs a trained head: `ovss-label train ... -o RUN_DIR`, then --head RUN_DIR"
            " (or OVSS_FMBSEG_HEAD)"
        )
    path = Path(given)
    path = path / "head.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no trained head at {path}: run `ovss-label train ... -o RUN_DIR`")
    return path


@register_method("fmbseg")
def plan_fmbseg(
    *,
    tiny: bool | None = None,
    head: str | os.PathLike[str] | None = None,
    checkpoint: str | None = None,
    text_checkpoint: str | None = None,
    **options: Any,
) -> MethodPlan:
    """``fmbseg`` planned: ``head`` (or ``OVSS_FMBSEG_HEAD``) is a training run folder or its
    ``head.safetensors``; ``checkpoint`` / ``text_checkpoint`` are explicit DINOv2 / CLIP
    files; ``options`` are :class:`FmbsegConfig` fields. Reads only the head's metadata."""
    from ..models.clip import tiny_requested

    tiny = tiny_requested() if tiny is None else tiny
    config = FmbsegConfig(**options)
    if config.background not in ("auto", "none"):
        raise ValueError(f"background must be 'auto' or 'none', got {config.background!r}")
    path = head_file(head)
    meta = _head_meta(path)
    backbone = WeightRef(meta["backbone_weight"], checkpoint, tiny)
    text = WeightRef(meta["text_weight"], text_checkpoint, tiny)
    head_id = ArtifactId("head", path.parent.name, file_sha256(path))

    def build(pool: ModelPool, cache: FeatureCache | None) -> FmbsegProposer:
        clip = pool.load(text)
        loaded = load_head(path)
        proposer = FmbsegProposer(pool.load(backbone), pool.text_encoder(clip), loaded, head_id,
                                  config)  # fmt: skip
        proposer.calibration = read_calibration(path.parent)  # written by a learning job
        return proposer

    weights = [backbone.weight_id("backbone"), text.weight_id("text")]
    return MethodPlan("fmbseg", fmbseg_identity(config, weights, head_id), build)


def _head_meta(path: Path) -> dict[str, str]:
    """The head's ``fingerprints`` (backbone and text weights, short side), without its weights."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["meta"])
        found: dict[str, str] = meta["fingerprints"]
        missing = [k for k in ("backbone_weight", "text_weight", "short_side") if k not in found]
        if missing:
            raise KeyError(f"no {', '.join(missing)} in its metadata")
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path}: not a trained head ({err})") from err
    return found
