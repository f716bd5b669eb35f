"""Each method's defaults are its reference's, number for number, with where each comes from.

References (docs/algorithms.md, "Reference code"): sinahmr/NACLIP @0cac3a6 and
letitiabanana/PnP-OVSS @e439962 (cited by file and line below); SAM's settings are compared
with the installed ``segment_anything`` through ``inspect.signature``, so the test follows the
library, not a copy. A real model's plan must get these defaults (tiny twins may differ).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from ovss_label.backend.proposers import Features, clip_sam, method_plan
from ovss_label.backend.proposers.clip_sam import ClipSamConfig, automatic_masks
from ovss_label.backend.proposers.naclip import NaclipConfig
from ovss_label.backend.proposers.pnp_ovss import PnpConfig
from ovss_label.backend.proposers.refine import RefineConfig
from ovss_label.backend.proposers.sam_prompts import decode

NACLIP_REFERENCE: dict[str, Any] = {
    # naclip.py lines 20-22, NACLIP.__init__: arch='reduced', gaussian_std=5., pamr_steps=10,
    # pamr_stride=(8, 16), logit_scale=40, slide_stride=112, slide_crop=224. PAMR is on by
    # default: eval.py line 17 (--pamr default '') leaves pamr_steps at 10 (lines 54-57).
    "arch": "reduced",
    "gaussian_std": 5.0,
    "pamr_steps": 10,
    "pamr_dilations": (8, 16),
    "logit_scale": 40.0,
    "slide_crop": 224,
    "slide_stride": 112,
    # configs/cfg_*.py lines 14-16 (one per file): Resize(scale=(2048, 336),
    # keep_ratio=True): short side 336, long side at most 2048 (all but Cityscapes' 560).
    "short_side": 336,
    "max_side": 2048,
    # configs/base_config.py line 4: clip_path='ViT-B/16' (OpenAI weights).
    "model": "clip_vit_b16",
}
"""``prob_thd`` is left out on purpose: the reference's 0.0 (naclip.py line 22) becomes 0.1 with
the hidden background, as its VOC21 / COCO-Object configs (a documented deviation)."""

PNP_REFERENCE: dict[str, Any] = {
    # README.md lines 114-118, the run it documents: --img_size 336, --max_att_block_num 8,
    # --drop_iter 4, --prune_att_head 9, --threshold 0.15.
    "image_size": 336,
    "rounds": 4,
    "threshold": 0.15,
    # PnP_OVSS_0514_updated_segmentation.py line 619: layer = max_att_block_num - 1 = 7, a
    # 0-based index into the text encoder's layers (the paper's 1-based "layer 8"); line 620:
    # head = prune_att_head = 9, also used as a 0-based index (the paper's "head 10").
    "layer": 7,
    "head": 9,
    # Same file, line 643: save_len = 10; line 646: np.argsort(U)[-save_len:] (top 10 a round).
    "drop_rule": "topk",
    "drop_k": 10,
    # Same file, line 1149: def blurring(att_resize, img_shape, scale=0.05), σ = 0.05 x max side.
    "blur_sigma": 0.05,
}


def test_naclip_defaults_are_the_references():
    assert {k: asdict(NaclipConfig())[k] for k in NACLIP_REFERENCE} == NACLIP_REFERENCE
    # The real model's plan (what the server and predict build; no weights needed) keeps them.
    real = json.loads(method_plan("naclip", tiny=False).identity.settings)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in NACLIP_REFERENCE.items()}
    assert {k: real[k] for k in NACLIP_REFERENCE} == plain
    assert real["background"] == "auto" and real["prob_thd"] is None


def test_pnp_defaults_are_the_references():
    assert {k: asdict(PnpConfig())[k] for k in PNP_REFERENCE} == PNP_REFERENCE


def _defaults(function: Any) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


AMG_FIELDS = {
    "amg_points_per_side": "points_per_side",
    "amg_pred_iou": "pred_iou_thresh",
    "amg_stability": "stability_score_thresh",
    "amg_box_nms": "box_nms_thresh",
}
"""``ClipSamConfig`` field -> ``SamAutomaticMaskGenerator`` argument (FMbSeg leaves the values to
its appendix, docs/algorithms.md §3.3: the library's defaults are used)."""


def test_clip_sam_generator_thresholds_are_segment_anythings_defaults():
    library = _defaults(SamAutomaticMaskGenerator.__init__)
    config = asdict(ClipSamConfig())
    assert {f: config[f] for f in AMG_FIELDS} == {f: library[a] for f, a in AMG_FIELDS.items()}
    # docs/algorithms.md §4.4 (segment_anything 1.0): a library that changed them is noticed here.
    assert [library[a] for a in AMG_FIELDS.values()] == [32, 0.88, 0.95, 0.7]


@pytest.fixture(scope="module")
def tiny_sam():
    from ovss_label.backend.models.sam import TINY_SAM_CFG, LoadedSam, _create_sam

    return LoadedSam(_create_sam(TINY_SAM_CFG, seed=5), "sam_tiny", True)


def test_clip_sam_builds_the_default_generator(tiny_sam, monkeypatch):
    """With default settings, stage 1.2's generator is configured as SAM's default one."""
    built = []

    class Recording(SamAutomaticMaskGenerator):
        def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
            built.append(self)
            return []

    monkeypatch.setattr(clip_sam, "SamAutomaticMaskGenerator", Recording)
    features = Features((8, 8), {}, {"original_size": (8, 8)})
    assert automatic_masks(tiny_sam, features, ClipSamConfig()) == []
    ours, default = vars(built[0]), vars(SamAutomaticMaskGenerator(tiny_sam.model))
    assert ours.keys() == default.keys()
    for key in default.keys() - {"predictor", "point_grids"}:
        assert ours[key] == default[key], key
    for a, b in zip(ours["point_grids"], default["point_grids"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_sam_prompts_ask_for_sams_default_multimask():
    """SAM's predictor proposes 3 masks by default (``SamPredictor.predict``); prompts from
    refinement and clicks do too, keeping the best by predicted IoU (``sam_prompts.decode``)."""
    library = _defaults(SamPredictor.predict)["multimask_output"]
    assert library is True
    assert _defaults(decode)["multimask"] is library
    assert RefineConfig().multimask is library
