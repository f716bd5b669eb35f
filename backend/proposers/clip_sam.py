"""``clip_sam``: FMbSeg stage 1 — CLIP finds the classes and where they are, SAM draws them.

Seifi et al., BMVC 2024 (arXiv 2403.09307) §3.1; no code was published (docs/algorithms.md §3.1).
What the paper states is followed; every value it leaves open is a :class:`ClipSamConfig`
field whose default is explained there.

encode (image only):
  over-sample (short side ``short_side``), sliding ``crop``/``stride`` windows; per window
  CLIP's own image embedding (the crop CLS, for presence) and dense patch features (NACLIP's
  last block, ``naclip_vit.clip_cls_and_naclip_tokens``), assembled into one full-image
  patch map (overlaps averaged); SAM's image embedding (shared through the feature cache).
score (words):
  1. presence: each crop votes for its closest class (one template); classes with more than
     ``min_crops`` votes are present (``fmbseg.present_classes``);
  2. stage 1.1: per present class, the ``points`` patches most similar to its text feature
     -> one SAM prompt of that many positive points -> the best of SAM's 3 masks;
  3. stage 1.2: SAM's automatic masks (on the same embedding), filtered by predicted IoU,
     stability and area, each labelled with the present class closest to its mean patch
     feature; a ``stage2_ratio`` random fraction is kept (the paper's sampling);
  4. merge: instances scored (1.1: SAM's predicted IoU; 1.2: predicted IoU x label confidence)
     and overlaps resolved by score in post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from segment_anything import SamAutomaticMaskGenerator

from ovss_label.converters import Instance
from ovss_label.converters.instance import min_area_pixels
from ovss_label.ontologies import Vocabulary, is_background

from ..models.clip import LoadedClip, tiny_requested
from ..models.clip_text import TextEncoder
from ..models.identity import ModelIdentity, WeightId, loaded_weight, settings_of
from ..models.naclip_vit import clip_cls_and_naclip_tokens
from ..models.pool import ModelPool, WeightRef
from ..models.sam import LoadedSam
from . import fmbseg
from .base import Features, MethodPlan, Proposal, Proposer, register_method
from .cache import FeatureCache, image_key
from .frames import sliding_windows
from .sam_prompts import SamEncoder, decode


@dataclass(frozen=True)
class ClipSamConfig:
    """FMbSeg stage-1 settings.

    Attributes:
        model: CLIP ViT-L/14, as the paper.
        short_side: Over-sampled short side (paper: "high resolution", value in its appendix):
            twice CLIP's 224 input, so objects span several crops.
        crop: Window size: CLIP's native input (no position-embedding interpolation).
        stride: Window stride: 50% overlap.
        gaussian_std: Dense features come from NACLIP's last block (the paper says "see
            appendix"; NACLIP is the stronger training-free choice and is verified here).
        templates: One template, as the paper ("a photo of a {}").
        min_crops: Presence needs more than this many crop votes (paper: "more than a
            predefined number of crops (set to 1)"; 0 is the other reading).
        points: Top patches per present class used as SAM points (paper: 5).
        amg_points_per_side, amg_pred_iou, amg_stability, amg_box_nms: SAM automatic mask
            generator settings (paper: appendix; library defaults).
        min_area: Smallest stage-1.2 mask as a fraction of the image.
        stage2_ratio: Fraction of stage-1.2 masks kept (paper: elided); all by default,
            since pre-annotations lose nothing by keeping them.
        seed: Seed of that sampling.
        logit_scale: Scale of the dense probability maps in ``Proposal.scores``.
    """

    model: str = "clip_vit_l14"
    short_side: int = 448
    crop: int = 224
    stride: int = 112
    gaussian_std: float = 5.0
    templates: tuple[str, ...] = ("a photo of a {}.",)
    min_crops: int = 1
    points: int = 5
    amg_points_per_side: int = 32
    amg_pred_iou: float = 0.88
    amg_stability: float = 0.95
    amg_box_nms: float = 0.7
    min_area: float = 0.001
    stage2_ratio: float = 1.0
    seed: int = 0
    logit_scale: float = 40.0


class ClipSamProposer(Proposer):
    """FMbSeg stage 1 (module docstring). Thread-safe."""

    name = "clip_sam"

    def __init__(
        self,
        clip: LoadedClip,
        sam: LoadedSam,
        config: ClipSamConfig,
        text: TextEncoder,
        cache: FeatureCache | None = None,
    ) -> None:
        self.clip, self.sam, self.config, self.text, self.cache = clip, sam, config, text, cache
        self.sam_encoder = SamEncoder(sam)

    @property
    def identity(self) -> ModelIdentity:
        clip, sam = loaded_weight("clip", self.clip), loaded_weight("sam", self.sam)
        return clip_sam_identity(self.config, clip, sam)

    def text_embedder(self) -> TextEncoder:
        return self.text

    @property
    def cache_key(self) -> str:
        c = self.config
        return (
            f"{self.model_version}-{self.clip.text_fingerprint}-{self.sam_encoder.cache_key}-"
            f"{c.short_side}-{c.crop}/{c.stride}-{c.gaussian_std}"
        )

    @torch.no_grad()
    def encode(self, image: NDArray[Any]) -> Features:
        """Features: ``cls`` (C, D) unit crop embeddings, ``patches`` (gh, gw, D) unit patch map
        in the over-sampled frame, ``sam.embedding``; meta: ``network`` size and ``sam`` part."""
        size = (int(image.shape[0]), int(image.shape[1]))
        network = self._network_size(size)
        net = self._normalise(image, network)
        boxes = sliding_windows(*network, self.config.crop, self.config.stride)
        cls, patches = self._crops(net, boxes)
        encoder = self.sam_encoder
        sam = (
            self.cache.features(encoder, image) if self.cache is not None else encoder.encode(image)
        )
        tensors = {"cls": cls, "patches": patches, "sam.embedding": sam.tensors["embedding"]}
        meta = {"network": network, "sam": sam}
        return Features(size, tensors, meta, image_key(image))

    def _network_size(self, size: tuple[int, int]) -> tuple[int, int]:
        # Sides floored to whole patches, so every window starts on the patch grid.
        patch, factor = self.clip.patch_size, self.config.short_side / min(size)
        return tuple(max(patch, int(s * factor + 0.5) // patch * patch) for s in size)  # type: ignore[return-value]

    def _normalise(self, image: NDArray[Any], network: tuple[int, int]) -> torch.Tensor:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # a writable copy
        x = F.interpolate(x, size=network, mode="bilinear", align_corners=False)[0]
        mean = torch.tensor(self.clip.mean).view(3, 1, 1) * 255
        std = torch.tensor(self.clip.std).view(3, 1, 1) * 255
        return ((x - mean) / std).to(self.clip.device)

    def _crops(
        self, net: torch.Tensor, boxes: list[tuple[int, int, int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        patch = self.clip.patch_size
        gh, gw = net.shape[1] // patch, net.shape[2] // patch
        # Overlapping windows' patch features are averaged and normalised; normalising the
        # sum is the same (a patch's window count is a positive factor), so no count is kept.
        summed, cls_all = None, []
        for y1, y2, x1, x2 in boxes:
            crop = net[:, y1:y2, x1:x2][None]
            cls, tokens = clip_cls_and_naclip_tokens(
                self.clip.model.visual, crop, self.config.gaussian_std
            )
            h, w = (y2 - y1) // patch, (x2 - x1) // patch
            feats = F.normalize(tokens[0, 1:], dim=-1).reshape(h, w, -1)
            summed = (
                torch.zeros(gh, gw, feats.shape[-1], device=net.device)
                if summed is None
                else summed
            )
            summed[y1 // patch : y1 // patch + h, x1 // patch : x1 // patch + w] += feats
            cls_all.append(F.normalize(cls[0], dim=-1))
        assert summed is not None
        return torch.stack(cls_all), F.normalize(summed, dim=-1)

    @torch.no_grad()
    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        """Dense probability maps as ``scores`` and the stage-1.1 + 1.2 ``instances``."""
        text, query_idx = self.text.query_features(vocabulary.with_templates(self.config.templates))
        text = text.to(features.tensors["cls"].device)
        idx = torch.tensor(query_idx, device=text.device)
        crop_sim = _class_max(features.tensors["cls"] @ text.T, idx, len(vocabulary))
        present = fmbseg.present_classes(crop_sim, self.config.min_crops)
        patches = features.tensors["patches"]
        patch_sim = _class_max(patches.flatten(0, 1) @ text.T, idx, len(vocabulary))
        patch_sim = patch_sim.T.reshape(len(vocabulary), *patches.shape[:2])
        wanted = present & np.array([not is_background(n) for n in vocabulary.names])
        instances = self._stage_one(features, patch_sim, wanted, vocabulary)
        instances += self._stage_two(features, text, idx, wanted, vocabulary)
        probs = torch.softmax(self.config.logit_scale * patch_sim, dim=0)
        scores = F.interpolate(probs[None], size=features.image_hw, mode="bilinear")[0]
        return Proposal(vocabulary.names, scores.cpu().numpy(), None, instances)

    def _stage_one(
        self, features: Features, patch_sim: torch.Tensor, wanted: NDArray[Any], vocab: Vocabulary
    ) -> list[Instance]:
        classes = np.flatnonzero(wanted)
        if not len(classes):
            return []
        network, (h, w) = features.meta["network"], features.image_hw
        scale = (h / network[0], w / network[1])
        points = np.stack(
            [
                fmbseg.patch_centres_to_pixels(
                    fmbseg.top_patches(patch_sim[k], self.config.points),
                    self.clip.patch_size,
                    scale,
                )
                for k in classes
            ]
        )
        labels = np.ones(points.shape[:2], np.int64)
        sam_features = features.meta["sam"]
        masks, iou = decode(self.sam, sam_features, points=points, labels=labels, cache=self.cache)
        return [
            Instance(m, vocab.names[k], float(np.clip(q, 0, 1)))
            for m, q, k in zip(masks, iou, classes, strict=True)
            if m.any()
        ]

    def _stage_two(
        self,
        features: Features,
        text: torch.Tensor,
        idx: torch.Tensor,
        wanted: NDArray[Any],
        vocab: Vocabulary,
    ) -> list[Instance]:
        if not wanted.any() or self.config.stage2_ratio <= 0:
            return []
        records = automatic_masks(self.sam, features.meta["sam"], self.config)
        h, w = features.image_hw
        smallest = min_area_pixels(self.config.min_area, h, w)  # postprocessing's rule
        records = [r for r in records if r["area"] >= smallest]
        if not records:
            return []
        rng = np.random.default_rng(self.config.seed)
        keep = rng.random(len(records)) < self.config.stage2_ratio
        records = [r for r, k in zip(records, keep, strict=True) if k]
        if not records:
            return []
        masks = np.stack([r["segmentation"] for r in records])
        mask_feats = fmbseg.mask_mean_features(masks, features.tensors["patches"])
        queries_present = wanted[idx.cpu().numpy()]
        labels, confidence = fmbseg.label_masks(mask_feats, text, queries_present)
        classes = idx.cpu().numpy()[labels]
        return [
            Instance(m, vocab.names[k], float(np.clip(r["predicted_iou"] * c, 0, 1)))
            for m, r, k, c in zip(masks, records, classes, confidence, strict=True)
        ]


def _class_max(similarity: torch.Tensor, idx: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, Q) query similarities -> (N, K) class similarities (max over synonyms)."""
    return torch.stack([similarity[:, idx == k].amax(dim=1) for k in range(num_classes)], dim=1)


def automatic_masks(
    sam: LoadedSam, sam_features: Features, config: ClipSamConfig
) -> list[dict[str, Any]]:
    """``SamAutomaticMaskGenerator.generate`` on the cached embedding (no second encoder pass).

    The generator's predictor is given the cached embedding where it would call the encoder;
    a fresh generator per call keeps threads apart. One crop layer (the full image), as the
    paper describes.
    """
    generator = SamAutomaticMaskGenerator(
        sam.model,
        points_per_side=config.amg_points_per_side,
        pred_iou_thresh=config.amg_pred_iou,
        stability_score_thresh=config.amg_stability,
        box_nms_thresh=config.amg_box_nms,
        crop_n_layers=0,
        output_mode="binary_mask",
    )
    predictor = generator.predictor

    def install_cached(image: NDArray[Any], image_format: str = "RGB") -> None:
        assert tuple(image.shape[:2]) == sam_features.meta["original_size"], image.shape
        predictor.reset_image()
        predictor.features = sam_features.tensors["embedding"]
        predictor.original_size = sam_features.meta["original_size"]
        predictor.input_size = sam_features.meta["input_size"]
        predictor.is_image_set = True

    predictor.set_image = install_cached
    h, w = sam_features.meta["original_size"]
    records: list[dict[str, Any]] = generator.generate(np.zeros((h, w, 3), np.uint8))
    return records


REVISION = 1
"""Bumped when stage 1's numbers change for the same weights and settings."""


def clip_sam_identity(config: ClipSamConfig, clip: WeightId, sam: WeightId) -> ModelIdentity:
    """FMbSeg stage 1's identity (plan and proposer both use this)."""
    settings = {"revision": REVISION, **settings_of(config)}
    return ModelIdentity.of("clip_sam", settings, [clip, sam])


@register_method("clip_sam")
def plan_clip_sam(
    *,
    tiny: bool | None = None,
    checkpoint: str | None = None,
    sam_model: str = "sam_vit_b",
    sam_checkpoint: str | None = None,
    **options: Any,
) -> MethodPlan:
    """FMbSeg stage 1 planned; ``options`` are :class:`ClipSamConfig` fields."""
    tiny = tiny_requested() if tiny is None else tiny
    config = ClipSamConfig(**options)
    clip_ref = WeightRef(config.model, checkpoint, tiny)
    sam_ref = WeightRef(sam_model, sam_checkpoint, tiny)

    def build(pool: ModelPool, cache: FeatureCache | None) -> ClipSamProposer:
        clip, sam = pool.load(clip_ref), pool.load(sam_ref)
        return ClipSamProposer(clip, sam, config, pool.text_encoder(clip), cache)

    identity = clip_sam_identity(config, clip_ref.weight_id("clip"), sam_ref.weight_id("sam"))
    return MethodPlan("clip_sam", identity, build)
