"""SAM rows of ``bench/proposers.py``: encoder, refinement 1 vs 20 classes, clip_sam stages.

SAM ViT-B with random weights (same compute as the released one) on a 480x640 photo. The
refinement runs the real ``SamRefined`` code after a stub dense method that paints K classes
(two blobs each), so the SAM side is measured alone: encoder, prompts from the score maps, one
decoder pass for all prompts, best-of-3 chosen before upsampling.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ovss_label.backend.models.clip import LoadedClip, _create_clip, _openai_cfg, text_fingerprint
from ovss_label.backend.models.clip_text import TextEncoder
from ovss_label.backend.models.identity import ModelIdentity
from ovss_label.backend.models.sam import SAM_ARCHS, LoadedSam, _create_sam
from ovss_label.backend.models.weights import OPENAI_MEAN, OPENAI_STD
from ovss_label.backend.proposers import FeatureCache, Features, Proposal, Proposer
from ovss_label.backend.proposers.clip_sam import ClipSamConfig, ClipSamProposer
from ovss_label.backend.proposers.refine import SamRefined
from ovss_label.backend.proposers.sam_prompts import SamEncoder
from ovss_label.ontologies import Vocabulary, load

Row = tuple[str, ...]


class PaintedClasses(Proposer):
    """K classes, each two discs on a grid; no model."""

    name = "painted"

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.of("painted", {}, [])

    def encode(self, image: Any) -> Features:
        return Features((int(image.shape[0]), int(image.shape[1])), {})

    def score(self, features: Features, vocabulary: Vocabulary) -> Proposal:
        h, w = features.image_hw
        k = len(vocabulary)
        scores = np.zeros((k, h, w), np.float32)
        yy, xx = np.mgrid[:h, :w]
        rng = np.random.default_rng(k)
        for i in range(k):
            for cy, cx in rng.uniform((20, 20), (h - 20, w - 20), size=(2, 2)):
                scores[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 18**2] = 0.9
        return Proposal(vocabulary.names, scores)


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sam_rows(
    image: Any, limit: float, count_flops: Any, cache_dir: Any, points_per_side: int
) -> list[Row]:
    """Rows (workload, detail, time, note) for a 480x640 ``image``; ``limit`` in FLOP/s."""
    sam = LoadedSam(_create_sam(SAM_ARCHS["sam_vit_b"]), "sam_vit_b", False)
    encoder = SamEncoder(sam)
    encoder.encode(image[:64, :64])  # warm-up: kernel selection, allocator
    seconds = _seconds(lambda: encoder.encode(image))
    x = torch.zeros(1, 3, 1024, 1024)
    flops = count_flops(lambda: sam.model.image_encoder(x))
    rate = flops / seconds
    rows = [
        ("SAM ViT-B encoder, 1024x1024 input", f"{flops / 1e9:.0f} GFLOP", _ms(seconds),
         f"{rate / 1e9:.0f} GFLOP/s = {rate / limit:.0%} of matmul"),
    ]  # fmt: skip
    refined = SamRefined(PaintedClasses(), sam)
    times = {}
    for k in (1, 20):
        vocab = Vocabulary.from_labels([f"class{i}" for i in range(k)])
        start = time.perf_counter()
        instances = refined.score(refined.encode(image), vocab).instances or []
        times[k] = time.perf_counter() - start
        rows.append((f"refinement, {k} class(es), encoder included", f"{len(instances)} masks",
                     _ms(times[k]), ""))  # fmt: skip
    ratio = times[20] / times[1]
    verdict = "[green]PASS[/]" if ratio <= 1.5 else "[red]FAIL[/]"
    rows.append(("20 classes / 1 class, target <= 1.5x", verdict, f"{ratio:.2f}x", ""))
    return rows + clip_sam_rows(image, sam, cache_dir, points_per_side)


def clip_sam_rows(image: Any, sam: LoadedSam, cache_dir: Any, points_per_side: int) -> list[Row]:
    """clip_sam per image: CLIP ViT-L/14 crops, stage 1.1, stage 1.2 (SAM embedding cached)."""
    model = _create_clip(_openai_cfg("ViT-L-14"))
    clip = LoadedClip(
        model, "clip_vit_l14", False, OPENAI_MEAN, OPENAI_STD, 14, text_fingerprint(model)
    )
    cache = FeatureCache()
    cache.features(SamEncoder(sam), image)  # measured above; shared as in production
    text = TextEncoder(clip, cache=cache_dir)
    vocab = load("voc20")
    # Random weights make presence arbitrary; min_crops=0 lets the crops' votes decide alone.
    config = ClipSamConfig(min_crops=0, amg_points_per_side=points_per_side)
    full = ClipSamProposer(clip, sam, config, text, cache)
    only_first = ClipSamProposer(clip, sam, replace(config, stage2_ratio=0.0), text, cache)
    text.query_features(vocab.with_templates(config.templates))  # text on disk beforehand
    start = time.perf_counter()
    features = full.encode(image)
    t_encode = time.perf_counter() - start
    start = time.perf_counter()
    first = only_first.score(features, vocab).instances or []
    t_first = time.perf_counter() - start
    start = time.perf_counter()
    both = full.score(features, vocab).instances or []
    t_both = time.perf_counter() - start
    crops = features.tensors["cls"].shape[0]
    return [
        ("clip_sam encode: CLIP ViT-L/14 crops", f"{crops} crops of 224", _ms(t_encode),
         "SAM embedding from the cache"),
        ("clip_sam stage 1.1 (presence, top-5 points)", f"{len(first)} masks", _ms(t_first), ""),
        ("clip_sam stage 1.2 (automatic masks)", f"{len(both) - len(first)} masks",
         _ms(t_both - t_first), f"{points_per_side}x{points_per_side} points"),
    ]  # fmt: skip


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"
