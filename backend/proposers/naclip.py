"""``naclip``: training-free dense CLIP with neighbour-aware attention (Hajimiri et al., WACV 2025).

Follows sinahmr/NACLIP @0cac3a6 ``naclip.py`` (``forward_feature``, ``forward_slide``,
``predict``, ``postprocess_result``) with the defaults of ``configs/base_config.py`` and the
``cfg_*.py`` pipeline (docs/algorithms.md §1):

encode (image only):
  resize (short side 336, long side <= 2048, bilinear) -> normalise with the reference's
  mean/std -> sliding windows 224/112 -> NACLIP vision tower (``naclip_vit``) -> L2-normalised
  patch features per window; PAMR neighbour weights from the normalised input resized to the
  work frame.
score (words):
  per window cosine logits ``feats @ textᵀ`` -> bilinear to the window size -> windows summed
  and divided by their count -> bilinear to the work frame -> PAMR (10 steps, dilations 8, 16)
  -> ``softmax(40·logits)`` over all queries -> class = max over its synonyms -> argmax with
  ``prob_thd`` (below it: background) -> probabilities renormalised over classes.

Refined query maps are cached: each query's map after PAMR depends only on the image and that
query (every step is per query), so with a ``map_cache`` a vocabulary that shares queries with
an earlier one on the same image (an added label; the hidden background's 26 queries, shared
by every vocabulary) refines only its new queries, with the same numbers.

Deviations, each an option:
  ``background="auto"``: a project's labels rarely include a background class, and softmax over
  only "cat, dog" would paint every pixel cat or dog. Then the reference's own background line
  (``cls_voc21.txt`` line 0, 26 stuff names, minus any that is also a label) is added as a
  hidden class with ``prob_thd=0.1``, as in NACLIP's VOC21 and COCO-Object configs; its
  pixels get no label. ``"none"`` turns it off.
  ``max_side``: the work frame is capped (``frames.py``); images up to 2048 px are exact.
  Precision: fp32 everywhere; the reference runs fp16 on GPU (weights are fp16-exact anyway).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary, is_background

from ..models.clip import LoadedClip, tiny_requested
from ..models.clip_text import TextEncoder
from ..models.identity import ModelIdentity, WeightId, loaded_weight, settings_of
from ..models.naclip_vit import naclip_tokens
from ..models.pool import ModelPool, WeightRef
from .base import (
    Features,
    MethodPlan,
    Proposal,
    Proposer,
    register_method,
    with_hidden_background,
)
from .cache import FeatureCache, image_key
from .frames import Frames, sliding_windows
from .pamr import pamr_affinity, pamr_propagate

# mmseg SegDataPreProcessor in naclip.py: OpenAI CLIP mean/std x 255, rounded as written there.
PIXEL_MEAN = (122.771, 116.746, 104.094)
PIXEL_STD = (68.501, 66.632, 70.323)


@dataclass(frozen=True)
class NaclipConfig:
    """NACLIP settings; defaults are the reference's (``NACLIP.__init__``, ``cfg_*.py``)."""

    model: str = "clip_vit_b16"
    arch: str = "reduced"
    gaussian_std: float = 5.0
    short_side: int = 336
    slide_crop: int = 224
    slide_stride: int = 112
    logit_scale: float = 40.0
    pamr_steps: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    prob_thd: float | None = None  # None: 0.1 with a background class, else 0.0
    background: str = "auto"
    max_side: int = 2048
    window_batch: int = 8


class NaclipProposer(Proposer):
    """NACLIP on one loaded CLIP (module docstring). Thread-safe."""

    name = "naclip"

    def __init__(
        self,
        clip: LoadedClip,
        config: NaclipConfig,
        text: TextEncoder,
        map_cache: FeatureCache | None = None,
    ) -> None:
        _check_background(config.background)
        self.clip, self.config, self.text, self.map_cache = clip, config, text, map_cache
        self._queries: dict[Vocabulary, tuple[torch.Tensor, list[int]]] = {}
        self._lock = threading.Lock()

    @property
    def identity(self) -> ModelIdentity:
        return naclip_identity(self.config, loaded_weight("clip", self.clip))

    def text_embedder(self) -> TextEncoder:
        return self.text

    @property
    def cache_key(self) -> str:
        c = self.config
        return (
            f"{self.model_version}-{self.clip.text_fingerprint}-{c.arch}-{c.short_side}-"
            f"{c.slide_crop}/{c.slide_stride}-{c.pamr_dilations}-{c.max_side}"
        )

    # ---- encode: image only -------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: NDArray[Any]) -> Features:
        """Features: ``windows`` (n, gh, gw, D) unit patch features (one tensor per window size,
        ``feats_<i>``), ``affinity`` (16, *work) PAMR weights; meta: frames and window boxes."""
        _check_image(image)
        c = self.config
        size = (int(image.shape[0]), int(image.shape[1]))
        frames = Frames.for_image(size, c.short_side, max_side=c.max_side)
        if min(frames.network) < self.clip.patch_size:
            raise ValueError(
                f"image {size[1]}x{size[0]} is too elongated: resized to {frames.network[1]}x"
                f"{frames.network[0]} it is narrower than one {self.clip.patch_size}-px patch"
            )
        net = self._normalise(frames.to_network(image))
        boxes = sliding_windows(*frames.network, c.slide_crop, c.slide_stride)
        tensors = {f"feats_{i}": f for i, f in enumerate(self._window_features(net, boxes))}
        if c.pamr_steps > 0:
            tensors["affinity"] = pamr_affinity(frames.to_work(net), c.pamr_dilations)
        return Features(size, tensors, {"frames": frames, "boxes": boxes}, image_key(image))

    def _normalise(self, rgb: NDArray[Any]) -> torch.Tensor:
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()  # a writable copy
        mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        std = torch.tensor(PIXEL_STD).view(3, 1, 1)
        return ((x - mean) / std).to(self.clip.device)

    def _window_features(
        self, net: torch.Tensor, boxes: list[tuple[int, int, int, int]]
    ) -> list[torch.Tensor]:
        """(gh, gw, D) unit patch features per window, computed in batches of equal size."""
        crops = [net[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes]
        out: list[torch.Tensor] = [torch.empty(0)] * len(crops)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            by_size.setdefault(tuple(crop.shape), []).append(i)
        patch = self.clip.patch_size
        for shape, idx in by_size.items():
            gh, gw = shape[1] // patch, shape[2] // patch
            for start in range(0, len(idx), self.config.window_batch):
                chunk = idx[start : start + self.config.window_batch]
                batch = torch.stack([crops[i] for i in chunk])
                c = self.config
                tokens = naclip_tokens(self.clip.model.visual, batch, c.gaussian_std, c.arch)
                feats = F.normalize(tokens[:, 1:], dim=-1).reshape(len(chunk), gh, gw, -1)
                for i, f in zip(chunk, feats, strict=True):
                    out[i] = f  # stays on the model's device: scoring runs there too
        return out

    # ---- score: words -----------------------------------------------------------------
    @torch.no_grad()
    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """Class probabilities (K, H, W) and the reference's per-pixel decision."""
        vocab, hidden_bg = self._with_background(vocabulary)
        text, query_idx = self._query_features(vocab)
        text = text.to(features.tensors["feats_0"].device)
        frames: Frames = features.meta["frames"]
        logits = self._refined_logits(features, text, vocab)
        bg = _background_index(vocab)
        probs, pred = self._postprocess(logits, query_idx, self._threshold(bg), bg)
        probs, pred = probs.cpu(), pred.cpu()
        confidence = None
        if hidden_bg:  # the hidden class's pixels are decided too: their confidence counts
            top = frames.to_original(probs.max(dim=0).values[None])[0].clamp_(0, 1)
            confidence = top.numpy().astype(np.float32, copy=False)
            probs, pred = probs[1:], pred - 1  # hidden background -> index -1 (no label)
        scores = frames.to_original(probs).clamp_(0, 1).cpu().numpy()
        assignment = _nearest(pred, frames.original).numpy().astype(np.int16)
        return Proposal(vocabulary.names, scores.astype(np.float32, copy=False), assignment,
                        confidence=confidence)  # fmt: skip

    def _refined_logits(
        self, features: Features, text: torch.Tensor, vocab: Vocabulary
    ) -> torch.Tensor:
        """(Q, *work) query logits after PAMR, from ``map_cache`` where possible."""
        queries = vocab.queries()[0]
        keys = [self._map_key(features, q, vocab.templates) for q in queries]
        maps: list[torch.Tensor | None] = [None] * len(queries)
        if self.map_cache is not None:
            for i, key in enumerate(keys):
                hit = self.map_cache.get(key) if key[0] else None
                maps[i] = hit.tensors["map"] if hit is not None else None
        missing = [i for i, m in enumerate(maps) if m is None]
        if missing:
            fresh = self._refine(features, text[missing])
            for row, i in enumerate(missing):
                maps[i] = fresh[row]
                if self.map_cache is not None and keys[i][0]:
                    stored = {"map": fresh[row].clone()}
                    self.map_cache.put(keys[i], Features(features.image_hw, stored))
        return torch.stack([m for m in maps if m is not None])

    def _refine(self, features: Features, text: torch.Tensor) -> torch.Tensor:
        """(Q, *work): sliding-window logits, bilinear to the work frame, PAMR."""
        frames: Frames = features.meta["frames"]
        logits = frames.to_work(self._slide_logits(features, text, frames.network))
        if "affinity" not in features.tensors:
            return logits
        affinity = features.tensors["affinity"].to(logits.device)
        return pamr_propagate(affinity, logits, self.config.pamr_dilations, self.config.pamr_steps)

    def _map_key(
        self, features: Features, query: str, templates: tuple[str, ...]
    ) -> tuple[str, str]:
        if not features.key:
            return ("", "")
        digest = hashlib.sha1("\n".join((query, *templates)).encode()).hexdigest()
        return (features.key, f"{self.cache_key}|query:{digest}")

    def _slide_logits(
        self, features: Features, text: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """``forward_slide``: (Q, h, w) window-averaged cosine logits in the network frame."""
        preds = text.new_zeros(text.shape[0], *size)
        count = text.new_zeros(1, *size)
        for i, (y1, y2, x1, x2) in enumerate(features.meta["boxes"]):
            feats = features.tensors[f"feats_{i}"]
            window = (feats @ text.T).permute(2, 0, 1)
            window = F.interpolate(window[None], size=(y2 - y1, x2 - x1), mode="bilinear")[0]
            preds[:, y1:y2, x1:x2] += window
            count[:, y1:y2, x1:x2] += 1
        return preds / count

    def _postprocess(
        self, logits: torch.Tensor, query_idx: list[int], prob_thd: float, bg: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``postprocess_result``: (K, H, W) renormalised probabilities, (H, W) int64 labels.

        Pixels whose best class probability is below ``prob_thd`` go to class ``bg`` (the
        reference's class 0, which is its background line); -1 when there is none.
        """
        assert query_idx == sorted(query_idx), "queries must be grouped by class"
        probs = torch.softmax(logits * self.config.logit_scale, dim=0)
        sizes = torch.unique_consecutive(torch.tensor(query_idx), return_counts=True)[1]
        synonyms = len(sizes) != len(query_idx)
        if synonyms:
            # A class's queries are consecutive (Vocabulary.queries): max over views, no gathers.
            groups = torch.split(probs, sizes.tolist())
            probs = torch.stack([g[0] if len(g) == 1 else g.amax(dim=0) for g in groups])
        best, pred = probs.max(dim=0)  # one pass for the value and the (first) argmax
        pred[best < prob_thd] = bg
        if synonyms:  # without synonyms the softmax already sums to 1
            probs /= probs.sum(dim=0, keepdim=True)
        return probs, pred

    def _threshold(self, bg: int) -> float:
        if self.config.prob_thd is not None:
            return self.config.prob_thd
        return 0.1 if bg >= 0 else 0.0

    def _with_background(self, vocabulary: Vocabulary) -> tuple[Vocabulary, bool]:
        if self.config.background == "none":
            return vocabulary, False
        return with_hidden_background(vocabulary)

    def _query_features(self, vocab: Vocabulary) -> tuple[torch.Tensor, list[int]]:
        with self._lock:
            cached = self._queries.get(vocab)
        if cached is None:
            cached = self.text.query_features(vocab)
            with self._lock:
                if len(self._queries) > 32:
                    self._queries.clear()
                self._queries[vocab] = cached
        return cached


def _background_index(vocab: Vocabulary) -> int:
    return next((k for k, n in enumerate(vocab.names) if is_background(n)), -1)


def _nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(labels.shape) == tuple(size):
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()


def _check_image(image: NDArray[Any]) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"image is empty: {image.shape}")


TINY_NACLIP_SETTINGS: dict[str, Any] = {"background": "none"}
"""``NaclipConfig`` fields the tiny twin runs with (explicit options override them), so that
``--tiny`` draws masks on a photo: with the hidden background's 26 stuff queries against a few
labels, the random twin gives nearly every pixel to the background and the demo finds nothing.
The real model's defaults are untouched."""


REVISION = 1
"""Bumped when NACLIP's numbers change for the same weights and settings."""
RUNTIME_FIELDS = ("window_batch",)
"""Config fields that change speed or memory only: not part of the identity."""


def naclip_identity(config: NaclipConfig, clip: WeightId) -> ModelIdentity:
    """NACLIP's identity: its settings and the CLIP file (plan and proposer both use this)."""
    settings = {"revision": REVISION, **settings_of(config, RUNTIME_FIELDS)}
    return ModelIdentity.of("naclip", settings, [clip])


@register_method("naclip")
def plan_naclip(
    *, tiny: bool | None = None, checkpoint: str | None = None, **options: Any
) -> MethodPlan:
    """NACLIP planned; ``options`` are :class:`NaclipConfig` fields. The refined query maps
    (module docstring) are kept in the ``feature_cache`` given to ``build``, if any."""
    tiny = tiny_requested() if tiny is None else tiny
    if tiny:
        options = {**TINY_NACLIP_SETTINGS, **options}
    config = NaclipConfig(**options)
    _check_background(config.background)
    ref = WeightRef(config.model, checkpoint, tiny)

    def build(pool: ModelPool, cache: FeatureCache | None) -> NaclipProposer:
        clip = pool.load(ref)
        return NaclipProposer(clip, config, pool.text_encoder(clip), cache)

    return MethodPlan("naclip", naclip_identity(config, ref.weight_id("clip")), build)


def _check_background(background: str) -> None:
    if background not in ("auto", "none"):
        raise ValueError(f"background must be 'auto' or 'none', got {background!r}")
