"""``pnp_ovss``: BLIP cross-attention sharpened by ITM GradCAM, Salience DropOut, blur, dense CRF.

Luo et al., CVPR 2024; follows letitiabanana/PnP-OVSS @e439962 (the updated code,
docs/algorithms.md §2.0) with the pure pieces in ``pnp.py`` and the model in ``models/blip.py``:

encode (image only): square resize to ``image_size`` (bicubic, aspect not kept, as
  ``Dataset.py``), CLIP mean/std normalisation; the original RGB kept for the CRF.
score (words): caption "A picture of" + class names (spaces removed); ``rounds`` times: zero
  the dropped patches in the input, GradCAM of layer ``layer`` head ``head``, dropped patches
  zeroed in the map, drop the next patches (``drop_rule``); aggregate (first round twice);
  word pieces -> class maps (each label's pieces counted, ``pnp.caption_words``); per-class
  min-max threshold; bilinear (align_corners) to the original size; background channel;
  Gaussian blur (σ = ``blur_sigma`` x max side); dense CRF
  with CutLER's constants when ``pydensecrf2`` is installed (``pip install
  'ovss-label[crf]'``), else one warning and the blurred maps' argmax.

Class presence: the reference asks GPT-4o which classes each image shows; a self-hosted backend
cannot, so by default every label goes into the caption (the CVPR paper's setting). Expected
cost: absent classes still receive some attention mass and can take pixels from present ones.
Option ``presence="clip"``: CLIP ViT-L/14-336 scores the whole image against each label ("a
photo of a {}.", synonyms by max, softmax at CLIP's scale 100) and only the ``presence_top_k``
best and/or those above ``presence_threshold`` go into the caption (at least one); the others
score 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image

from ovss_label.ontologies import Vocabulary, is_background

from ..models.blip import (
    CAPTION_TOKENS,
    TINY_PNP_SETTINGS,
    BlipTextEmbedder,
    check_layer_head,
    encode_caption,
    itm_gradcam,
)
from ..models.blip_loader import LoadedBlip
from ..models.clip import tiny_requested
from ..models.identity import ArtifactId, ModelIdentity, WeightId, loaded_weight, settings_of
from ..models.pool import ModelPool, WeightRef
from ..models.weights import OPENAI_MEAN, OPENAI_STD
from ..store import Tuned, load_tuned
from . import pnp
from .base import (
    Features,
    MethodPlan,
    Proposal,
    Proposer,
    TextEmbedder,
    register_method,
)
from .cache import FeatureCache

log = logging.getLogger(__name__)
_CRF_WARNED: list[bool] = []


@dataclass(frozen=True)
class PnpConfig:
    """PnP-OVSS settings; defaults are the reference README run and the paper's Table 2.

    Attributes:
        image_size: BLIP input side (``--img_size 336``).
        layer: Cross-attention layer, 0-based (paper: layer 8).
        head: Head, 0-based (paper: head 10).
        rounds: Salience DropOut rounds (``--drop_iter 4``).
        drop_rule: ``"topk"`` (code: 10 patches per round) or ``"median"`` (CVPR paper).
        drop_k: Patches per round for ``topk``.
        first_twice: Count the first round twice when aggregating (reference behaviour).
        threshold: Per-class min-max threshold (0.15).
        blur_sigma: Blur σ as a fraction of the image's longer side (0.05).
        always_background: Add the background channel always (VOC/COCO-Object; the default for
            labelling projects) rather than only with fewer than 3 classes (stuff datasets).
        last_class_sum: Reproduce the reference's last-class quirk (off: a bug). It scales
            one class map by its piece count, which the per-class min-max of the threshold
            and of the blur undo: scores and labels are the same either way (a test checks).
        crf: Use the dense CRF when ``pydensecrf2`` is installed.
        presence: ``"all"`` labels in the caption, or ``"clip"`` (module docstring).
        presence_top_k: With ``"clip"``: keep this many best labels (0: no limit).
        presence_threshold: With ``"clip"``: keep labels with at least this probability.
    """

    image_size: int = 336
    layer: int = 7
    head: int = 9
    rounds: int = 4
    drop_rule: str = "topk"
    drop_k: int = 10
    first_twice: bool = True
    threshold: float = 0.15
    blur_sigma: float = 0.05
    always_background: bool = True
    last_class_sum: bool = False
    crf: bool = True
    presence: str = "all"
    presence_top_k: int = 0
    presence_threshold: float = 0.0


class PnpOvssProposer(Proposer):
    """PnP-OVSS (module docstring). Thread-safe: every call builds its own graph."""

    name = "pnp_ovss"

    def __init__(
        self,
        blip: LoadedBlip,
        config: PnpConfig,
        presence: Any = None,
        tuned: Tuned | None = None,
    ) -> None:
        _check_presence(config)
        if (config.presence == "clip") != bool(presence):
            raise ValueError("presence 'clip' needs a CLIP presence filter, 'all' none")
        self.blip, self.config, self.presence, self.tuned = blip, config, presence, tuned

    @property
    def identity(self) -> ModelIdentity:
        weights = [loaded_weight("blip", self.blip)]
        if self.presence is not None:  # the CLIP presence filter's weights decide too
            weights.append(loaded_weight("presence", self.presence.clip))
        return pnp_identity(self.config, weights, self.tuned)

    def text_embedder(self) -> TextEmbedder:
        """The presence filter's CLIP when there is one, else BLIP's own ITC embedding."""
        return self.presence.text if self.presence is not None else BlipTextEmbedder(self.blip)

    def encode(self, image: NDArray[Any]) -> Features:
        """Features: ``pixels`` (1, 3, S, S) normalised; ``image`` (H, W, 3) uint8 for the CRF."""
        pixels = square_pixels(image, self.config.image_size)
        tensors = {"pixels": pixels, "image": torch.from_numpy(np.array(image))}
        if self.presence is not None:
            tensors["clip_embedding"] = self.presence.embed(image)
        return Features((int(image.shape[0]), int(image.shape[1])), tensors)

    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """Blurred class maps as ``scores`` and the CRF (or argmax) decision."""
        keep = self._present(features, vocabulary)
        names = [n for n, k in zip(vocabulary.names, keep, strict=True) if k]
        caption, sizes = pnp.caption_words(self.blip.tokenizer, names)
        ids, mask = encode_caption(self.blip.tokenizer, caption)
        tokens = self.blip.tokenizer.convert_ids_to_tokens(ids[0])[1:]  # [ENC] row dropped
        merged = self._dropout_rounds(features.tensors["pixels"], ids, mask)
        classes = pnp.class_token_maps(tokens, merged, self.config.last_class_sum, sizes)
        if classes.shape[0] != len(names):
            raise ValueError(
                f"the caption holds {classes.shape[0]} of {len(names)} labels (BLIP reads "
                f"{CAPTION_TOKENS} tokens): caption fewer with presence='clip' and presence_top_k"
            )
        scores, assignment = decide_on_caption(
            classes, np.flatnonzero(keep), len(keep), features.tensors["image"].numpy(),
            self.config, self._decide,
        )  # fmt: skip
        for k, name in enumerate(vocabulary.names):
            if is_background(name):
                assignment[assignment == k] = -1
        return Proposal(vocabulary.names, scores, assignment)

    def _present(self, features: Features, vocabulary: Vocabulary) -> NDArray[Any]:
        """(K,) bool: the labels that go into the caption."""
        if self.presence is None:
            return np.ones(len(vocabulary), bool)
        c = self.config
        return self.presence.present(  # type: ignore[no-any-return]
            features.tensors["clip_embedding"], vocabulary, c.presence_top_k, c.presence_threshold
        )

    def _dropout_rounds(
        self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(T-1, P, P): the aggregated GradCAM of every caption token (``[ENC]`` excluded)."""
        c, grid = self.config, self.config.image_size // 16
        device = next(self.blip.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        dropped: list[int] = []
        rounds = []
        for _ in range(c.rounds):
            inputs = pnp.zero_patches(pixels, dropped, grid).to(device)
            cam = itm_gradcam(self.blip.model, inputs, ids, mask, c.layer)
            maps = cam.maps[0, c.head, 1:].cpu()  # rows: caption tokens after [ENC]
            rounds.append(pnp.mask_dropped(maps, dropped))
            salience = maps[3:-1].sum(dim=0).numpy()  # class word pieces only
            dropped = pnp.drop_step(salience, dropped, c.drop_rule, c.drop_k)
        return pnp.aggregate(rounds, c.first_twice)

    def _decide(self, image: NDArray[Any], channels: NDArray[Any]) -> NDArray[Any]:
        if self.config.crf:
            try:
                return dense_crf(image, channels)
            except ImportError:
                if not _CRF_WARNED:
                    _CRF_WARNED.append(True)
                    log.warning("pydensecrf2 is not installed: PnP-OVSS runs blur-only "
                                "(pip install 'ovss-label[crf]')")  # fmt: skip
        decided: NDArray[Any] = channels.argmax(axis=0)
        return decided


def decide_on_caption(
    caption_maps: torch.Tensor,
    caption: NDArray[Any],
    n_labels: int,
    image: NDArray[Any],
    config: PnpConfig,
    decide: Callable[[NDArray[Any], NDArray[Any]], NDArray[Any]],
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Thresholds, the background rule, blur and the decision (CRF or argmax) over
    ``[background] + the caption's classes``, mapped back to vocabulary indices.

    The reference builds all of these from the caption's classes only (``best_class_idx_list``;
    ``PnP_OVSS_0514_updated_segmentation.py`` around lines 440-462, ``densecrf`` 1056-1069): the
    "fewer than three classes" background rule counts them, and the CRF's unary has their
    channels alone (all-zero channels of other labels would change its mean field). A label
    left out of the caption (the CLIP presence filter) gets no channel, no score and no pixel.

    Args:
        caption_maps: (Kc, P, P) class maps in caption order.
        caption: (Kc,) int, the vocabulary index of each caption class.
        n_labels: K, the vocabulary's size.
        image: (H, W, 3) uint8 RGB, original frame (the CRF's pairwise term).
        config: Threshold, background rule and blur.
        decide: (image, (C, H, W) maps) -> (H, W) channel index.

    Returns:
        ``(scores, assignment)``: (K, H, W) float32 blurred maps (zeros outside the caption)
        and (H, W) int16 vocabulary index, -1 for background.
    """
    thresholded = pnp.threshold_maps(caption_maps, config.threshold).float()
    size = (int(image.shape[0]), int(image.shape[1]))
    full = F.interpolate(thresholded[None], size=size, mode="bilinear", align_corners=True)
    channels, has_bg = pnp.with_background(full[0].numpy(), config.always_background)
    blurred = pnp.blur_maps(channels, config.blur_sigma)
    labels = decide(image, blurred)
    to_vocabulary = np.concatenate([[-1], caption]) if has_bg else np.asarray(caption)
    scores = np.zeros((n_labels, *size), np.float32)
    scores[caption] = blurred[1:] if has_bg else blurred
    return scores, to_vocabulary[labels].astype(np.int16)


def square_pixels(image: NDArray[Any], size: int) -> torch.Tensor:
    """(1, 3, size, size) CLIP-normalised: a bicubic square resize (``Dataset.py``: the aspect
    ratio is not kept; outputs are resized back to the original size)."""
    square = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(square)).permute(2, 0, 1).float()[None] / 255
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


def dense_crf(image: NDArray[Any], channels: NDArray[Any], iterations: int = 10) -> NDArray[Any]:
    """Dense CRF labels with CutLER's constants (``maskcut/crf.py``), as the reference.

    Args:
        image: (H, W, 3) uint8 RGB.
        channels: (C, H, W) maps in [0, 1]; their softmax over C gives the unaries.

    Raises:
        ImportError: ``pydensecrf2`` is not installed.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = channels.shape
    probs = torch.softmax(torch.from_numpy(channels).float(), dim=0).numpy()
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=3, compat=7)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    q = np.array(crf.inference(iterations)).reshape(c, h, w)
    labels: NDArray[Any] = q.argmax(axis=0)
    return labels


REVISION = 1
"""Bumped when PnP-OVSS's numbers change for the same weights and settings."""
PRESENCE_CLIP = "clip_vit_l14_336"
"""The CLIP of ``presence="clip"`` (``presence.py``)."""


def pnp_identity(config: PnpConfig, weights: list[WeightId], tuned: Tuned | None) -> ModelIdentity:
    """PnP-OVSS's identity: settings, BLIP (+ presence CLIP) files, the tuned configuration
    read (plan and proposer both use this)."""
    settings = {"revision": REVISION, **settings_of(config)}
    artifacts = [ArtifactId("tuned", tuned.name, tuned.digest)] if tuned is not None else []
    return ModelIdentity.of("pnp_ovss", settings, weights, artifacts)


def _check_presence(config: PnpConfig) -> None:
    if config.presence not in ("all", "clip"):
        raise ValueError(f"presence must be 'all' or 'clip', got {config.presence!r}")


@register_method("pnp_ovss")
def plan_pnp_ovss(
    *,
    tiny: bool | None = None,
    checkpoint: str | None = None,
    model: str = "blip_itm_large_flickr",
    tuned: str | None = None,
    **options: Any,
) -> MethodPlan:
    """PnP-OVSS planned; ``checkpoint`` is a BLIP folder; ``options`` are :class:`PnpConfig`
    fields; ``tuned`` (or ``OVSS_PNP_TUNED``) names an ``ovss-label tune`` result (read from
    the store) whose layer, head, threshold and blur σ are used. The tiny twin starts from
    ``TINY_PNP_SETTINGS`` (``models/blip.py``: why) instead of the reference's defaults.

    Raises:
        ValueError: ``layer`` or ``head`` is not in the loaded BLIP (at build; names the
            allowed ranges), or the tuned configuration is missing.
    """
    tuned = tuned or os.environ.get("OVSS_PNP_TUNED") or None
    record = load_tuned(tuned) if tuned else None
    if record is not None:
        options = {**record.settings, **options}
    tiny = tiny_requested() if tiny is None else tiny
    if tiny:
        options = {**TINY_PNP_SETTINGS, **options}
    config = PnpConfig(**options)
    _check_presence(config)
    blip_ref = WeightRef(model, checkpoint, tiny)
    refs = {"blip": blip_ref}
    if config.presence == "clip":
        refs["presence"] = WeightRef(PRESENCE_CLIP, None, tiny)

    def build(pool: ModelPool, cache: FeatureCache | None) -> PnpOvssProposer:
        blip = pool.load(blip_ref)
        check_layer_head(blip.model, [config.layer], [config.head], blip.name)
        presence = None
        if "presence" in refs:
            from .presence import ClipPresence

            clip = pool.load(refs["presence"])
            presence = ClipPresence(clip, pool.text_encoder(clip))
        return PnpOvssProposer(blip, config, presence, record)

    weights = [ref.weight_id(role) for role, ref in refs.items()]
    return MethodPlan("pnp_ovss", pnp_identity(config, weights, record), build)
