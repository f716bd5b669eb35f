"""The proposers' small contracts: what a ``Proposal`` accepts, which images a method takes,
the sliding windows NACLIP slides, when an image's hash may be remembered, what keys SAM's
features, a head's metadata, and the first steps of post-processing (threshold, classes
without pixels, order by score).

Written against mutmut's survivors in ``backend/proposers`` (docs/mutation.md).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from ovss_label.backend.models.sam import TINY_SAM_CFG, LoadedSam, _create_sam
from ovss_label.backend.proposers import Proposal
from ovss_label.backend.proposers.aligned import _head_meta
from ovss_label.backend.proposers.cache import FeatureCache, freeze, image_key
from ovss_label.backend.proposers.frames import sliding_windows
from ovss_label.backend.proposers.naclip import _check_image
from ovss_label.backend.proposers.postprocess import (
    PostprocessConfig,
    assignment_of,
    proposal_to_instances,
)
from ovss_label.backend.proposers.sam_prompts import SamEncoder


def _exact(message: str) -> str:
    return f"^{re.escape(message)}$"


def test_a_proposal_names_the_shape_that_does_not_fit():
    scores = np.zeros((2, 4, 5), np.float32)
    with pytest.raises(ValueError, match=_exact("scores must be (3, H, W), got (2, 4, 5)")):
        Proposal(("a", "b", "c"), scores)
    with pytest.raises(ValueError, match=_exact("assignment (5, 4) != (4, 5)")):
        Proposal(("a", "b"), scores, assignment=np.zeros((5, 4), np.int16))
    with pytest.raises(ValueError, match=_exact("confidence (4, 4) != (4, 5)")):
        Proposal(("a", "b"), scores, confidence=np.zeros((4, 4), np.float32))


@pytest.mark.parametrize(
    ("image", "message"),
    [(np.zeros((4, 4, 4), np.uint8), "image must be (H, W, 3) uint8 RGB, got (4, 4, 4) uint8"),
     (np.zeros((4, 4, 3), np.float32),
      "image must be (H, W, 3) uint8 RGB, got (4, 4, 3) float32"),
     (np.zeros((4, 4), np.uint8), "image must be (H, W, 3) uint8 RGB, got (4, 4) uint8"),
     (np.zeros((0, 5, 3), np.uint8), "image is empty: (0, 5, 3)")],
)  # fmt: skip
def test_a_method_refuses_an_image_it_cannot_read(image, message):
    with pytest.raises(ValueError, match=_exact(message)):
        _check_image(image)
    _check_image(np.zeros((1, 1, 3), np.uint8))  # one pixel is an image


@pytest.mark.parametrize("crop, stride", [(16, 8), (16, 16), (5, 1), (16, 3)])
def test_sliding_windows_cover_the_image_with_crop_sized_windows_and_no_extra_row(crop, stride):
    """mmseg ``slide_inference``: ``ceil((h - crop) / stride) + 1`` rows (one when the image is
    no larger than the crop), the last shifted back inside, row-major order."""
    for height, width in [(1, 1), (crop - 1, crop), (crop, crop + 1), (crop + 1, 2 * crop + 2),
                          (crop + stride, 3), (crop + stride + 1, crop + 2 * stride)]:  # fmt: skip
        boxes = sliding_windows(height, width, crop, stride)
        rows = 1 if height <= crop else math.ceil((height - crop) / stride) + 1
        cols = 1 if width <= crop else math.ceil((width - crop) / stride) + 1
        assert len(boxes) == rows * cols, (height, width)
        covered = np.zeros((height, width), bool)
        for y1, y2, x1, x2 in boxes:
            assert (y2 - y1, x2 - x1) == (min(crop, height), min(crop, width))
            covered[y1:y2, x1:x2] = True
        assert covered.all()
        assert boxes == sorted(boxes, key=lambda b: (b[0], b[2]))
    assert sliding_windows(3, 2, 1, 1) == [(y, y + 1, x, x + 1) for y in range(3) for x in range(2)]
    assert sliding_windows(30, 40, 0, 8) == [(0, 30, 0, 40)]  # crop 0: the whole image


def test_a_read_only_view_of_pixels_someone_can_change_is_hashed_every_time():
    owner = np.zeros((4, 4, 3), np.uint8)
    view = owner[:, :]
    view.flags.writeable = False  # read-only, but its owner is not
    before = image_key(view)
    owner[0, 0, 0] = 9
    assert image_key(view) != before  # a remembered hash would serve stale features
    frozen = freeze(np.zeros((4, 4, 3), np.uint8))
    assert image_key(frozen) == image_key(np.zeros((4, 4, 3), np.uint8))


def test_two_sams_never_share_features_in_one_cache():
    sams = [LoadedSam(_create_sam(TINY_SAM_CFG, seed=s), "sam_tiny", True) for s in (0, 1)]
    encoders = [SamEncoder(sam) for sam in sams]
    assert encoders[0].cache_key != encoders[1].cache_key
    assert sams[0].fingerprint in encoders[0].cache_key
    cache, image = FeatureCache(), np.full((40, 56, 3), 120, np.uint8)
    embeddings = [cache.features(e, image).tensors["embedding"] for e in encoders]
    assert not torch.equal(*embeddings) and len(cache) == 2


def test_a_heads_missing_metadata_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "head.safetensors"
    meta = {"fingerprints": {"text_weight": "t"}}
    save_file({"w": torch.zeros(1)}, str(path), metadata={"meta": json.dumps(meta)})
    message = f"{path}: not a trained head ('no backbone_weight, short_side in its metadata')"
    with pytest.raises(ValueError, match=_exact(message)):
        _head_meta(path)
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=_exact(f"{path}: not a trained head ('meta')")):
        _head_meta(path)


def test_a_pixel_at_the_threshold_keeps_its_class():
    scores = np.array([[[0.5, 0.2, 0.7]], [[0.1, 0.4, 0.2]]], np.float32)  # (2, 1, 3)
    labels = assignment_of(Proposal(("a", "b"), scores), threshold=0.5)
    assert labels.dtype == np.int16 and labels.tolist() == [[0, -1, 0]]


def test_a_class_without_pixels_does_not_end_the_others_and_order_is_by_score():
    scores = np.zeros((4, 6, 6), np.float32)
    scores[0, :, :3] = 0.6  # "cat" on the left
    scores[3, :, 3:] = 0.9  # "cup" on the right; "dog" and "bird" nowhere
    config = PostprocessConfig(threshold=0.5, min_area=0.0)
    found = proposal_to_instances(Proposal(("cat", "dog", "bird", "cup"), scores), config)
    assert [(i.label, round(i.score, 3), int(i.mask.sum())) for i in found] == [
        ("cup", 0.9, 18), ("cat", 0.6, 18)]  # fmt: skip
    # A class whose pixels all score 0 (threshold 0) comes last, not first.
    zero = np.zeros((2, 2, 4), np.float32)
    zero[1, :, 2:] = 0.3
    found = proposal_to_instances(Proposal(("a", "b"), zero), PostprocessConfig(0.0, 0.0))
    assert [i.label for i in found] == ["b", "a"]
    with pytest.raises(ValueError, match=_exact("split must be 'components' or 'class', got 'x'")):
        proposal_to_instances(Proposal(("a", "b"), zero), PostprocessConfig(split="x"))


def test_instances_below_min_score_are_dropped_and_unscored_ones_kept():
    """The score floor keeps a score equal to ``min_score``; an instance without a score (a
    method that gives none) is not judged by it."""
    from ovss_label.backend.proposers.base import Instance

    scores = np.zeros((3, 4, 6), np.float32)
    scores[0, :, :2], scores[1, :, 2:4], scores[2, :, 4:] = 0.4, 0.5, 0.9
    config = PostprocessConfig(threshold=0.3, min_area=0.0, min_score=0.5)
    found = proposal_to_instances(Proposal(("a", "b", "c"), scores), config)
    assert [(i.label, round(i.score, 3)) for i in found] == [("c", 0.9), ("b", 0.5)]
    left, right = np.zeros((2, 4, 6), bool)
    left[:, :3], right[:, 3:] = True, True
    given = [Instance(left, "low", 0.2), Instance(right, "unscored", None)]
    kept = proposal_to_instances(Proposal(("low",), scores[:1], None, given), config)
    assert [i.label for i in kept] == ["unscored"]


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        ("naclip", "some", "background must be 'auto' or 'none', got 'some'"),
        ("pnp", "gpt", "presence must be 'all' or 'clip', got 'gpt'"),
    ],
)
def test_a_methods_options_are_refused_with_what_they_may_be(check, value, message):
    from ovss_label.backend.proposers import naclip, pnp_ovss

    with pytest.raises(ValueError) as refused:
        if check == "naclip":
            naclip._check_background(value)
        else:
            pnp_ovss._check_presence(pnp_ovss.PnpConfig(presence=value))
    assert str(refused.value) == message


def test_every_methods_identity_holds_its_revision_settings_weights_and_artifacts():
    """What ``model_version`` is a digest of: a change of code revision, of any output-changing
    setting, of a tuned file or a trained head is another model (the key names are part of
    the digest: renaming one would re-version every published prediction)."""
    from ovss_label.backend.models.identity import ArtifactId, WeightId, settings_of
    from ovss_label.backend.proposers import aligned, clip_sam, naclip, pnp_ovss, refine
    from ovss_label.backend.store import Tuned

    clip, sam = WeightId("clip", "clip_vit_b16", "c1"), WeightId("sam", "sam_vit_b", "s1")
    head = ArtifactId("head", "run-3", "d1")
    tuned = Tuned("mine", {"threshold": 0.2}, "abc123")
    cases = [
        (naclip.naclip_identity(naclip.NaclipConfig(), clip), naclip, naclip.NaclipConfig(),
         [clip], []),
        (clip_sam.clip_sam_identity(clip_sam.ClipSamConfig(), clip, sam), clip_sam,
         clip_sam.ClipSamConfig(), [clip, sam], []),
        (aligned.fmbseg_identity(aligned.FmbsegConfig(), [clip], head), aligned,
         aligned.FmbsegConfig(), [clip], [head]),
        (pnp_ovss.pnp_identity(pnp_ovss.PnpConfig(), [clip], tuned), pnp_ovss,
         pnp_ovss.PnpConfig(), [clip], [ArtifactId("tuned", "mine", "abc123")]),
    ]  # fmt: skip
    for identity, module, config, weights, artifacts in cases:
        runtime = naclip.RUNTIME_FIELDS if module is naclip else ()
        expected = {"revision": module.REVISION, **settings_of(config, runtime)}
        assert json.loads(identity.settings) == expected, identity.method
        assert list(identity.weights) == weights and list(identity.artifacts) == artifacts
    assert pnp_ovss.pnp_identity(pnp_ovss.PnpConfig(), [clip], None).artifacts == ()
    dense = cases[3][0]
    refined = refine.refined_identity(dense, refine.RefineConfig(), sam)
    assert json.loads(refined.settings) == {
        "dense": json.loads(dense.settings),
        "refine": {"revision": refine.REVISION, **settings_of(refine.RefineConfig())},
    }
    assert refined.method == "pnp_ovss+sam" and refined.artifacts == dense.artifacts
    assert list(refined.weights) == [clip, sam]
