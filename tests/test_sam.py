"""SAM: builder and loader, stateless decoding against SamPredictor, prompts, one encoder pass."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from helpers import disc
from segment_anything import SamPredictor

from ovss_label.backend.models.sam import SAM_ARCHS, TINY_SAM_CFG, _create_sam, build_sam
from ovss_label.backend.proposers import FeatureCache, Proposal, create_proposer, propose
from ovss_label.backend.proposers.refine import RefineConfig, prompts_from_proposal
from ovss_label.backend.proposers.sam_prompts import SamEncoder, decode
from ovss_label.ontologies import Vocabulary


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """The tiny SAM saved as a plain state dict and loaded through the real loader."""
    path = tmp_path_factory.mktemp("sam") / "sam_tiny.pth"
    torch.save(_create_sam(TINY_SAM_CFG, seed=3).state_dict(), path)
    return build_sam("sam_tiny", checkpoint=path)


def _image(seed=0, h=48, w=80):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_builder_matches_segment_anything_layout():
    build = importlib.import_module("segment_anything.build_sam")
    ours, theirs = (
        _create_sam(SAM_ARCHS["sam_vit_b"]).state_dict(),
        build.build_sam_vit_b().state_dict(),
    )
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_checkpoint_round_trip_and_fingerprint(tiny_sam, tmp_path):
    path = tmp_path / "again.pth"
    torch.save({"model": tiny_sam.model.state_dict()}, path)  # a training-style wrapper
    again = build_sam("sam_tiny", checkpoint=path)
    for key, value in tiny_sam.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    assert again.fingerprint == tiny_sam.fingerprint != build_sam("sam_tiny").fingerprint


@pytest.mark.parametrize("prompt", ["point", "box", "box+point"])
def test_decode_equals_sam_predictor(tiny_sam, prompt):
    image = _image()
    predictor = SamPredictor(tiny_sam.model)
    predictor.set_image(image)
    features = SamEncoder(tiny_sam).encode(image)
    assert torch.allclose(features.tensors["embedding"], predictor.features)
    points = np.array([[[20.5, 10.5]], [[60.5, 30.5]]])
    boxes = np.array([[5.0, 2.0, 40.0, 30.0], [30.0, 10.0, 79.0, 47.0]])
    kwargs = {
        "points": points if "point" in prompt else None,
        "labels": np.ones((2, 1), np.int64) if "point" in prompt else None,
        "boxes": boxes if "box" in prompt else None,
    }
    masks, iou = decode(tiny_sam, features, **kwargs)
    assert masks.shape == (2, 48, 80) and masks.dtype == bool
    for b in range(2):
        ref_masks, ref_scores, _ = predictor.predict(
            point_coords=points[b] if "point" in prompt else None,
            point_labels=np.ones(1) if "point" in prompt else None,
            box=boxes[b] if "box" in prompt else None,
            multimask_output=True,
        )
        best = int(ref_scores.argmax())
        np.testing.assert_array_equal(masks[b], ref_masks[best])
        assert iou[b] == pytest.approx(ref_scores[best], abs=1e-5)


def _painted(h=60, w=100):
    scores = np.zeros((3, h, w), np.float32)
    scores[0] = 0.9  # background everywhere ...
    c_shape = disc(h, w, 30, 30, 18) & ~disc(h, w, 40, 30, 10)  # a C open to the right
    scores[1][c_shape], scores[0][c_shape] = 0.8, 0.1
    square = np.zeros((h, w), bool)
    square[10:30, 70:90] = True
    scores[2][square], scores[0][square] = 0.6, 0.1
    return Proposal(("background", "cup", "cat"), scores), c_shape


def test_prompts_from_hand_made_score_maps():
    proposal, c_shape = _painted()
    prompts = prompts_from_proposal(proposal, RefineConfig())
    assert prompts.classes.tolist() == [1, 2]  # best score first, background skipped
    ys, xs = np.nonzero(c_shape)
    np.testing.assert_array_equal(
        prompts.boxes[0], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    )
    np.testing.assert_array_equal(prompts.boxes[1], [70, 10, 90, 30])
    for (x, y), mask in zip(prompts.points[:, 0], [c_shape, proposal.scores[2] > 0.5], strict=True):
        assert mask[int(y), int(x)]  # the point is inside its part, even inside the C
    assert prompts.scores.tolist() == pytest.approx([0.8, 0.6])
    assert len(prompts_from_proposal(proposal, RefineConfig(max_prompts=1))) == 1
    assert len(prompts_from_proposal(proposal, RefineConfig(min_area=0.2))) == 0


def test_one_sam_encoder_pass_per_image(tiny_checkpoints, tiny_sam, monkeypatch):
    calls = []
    tiny_sam.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    cache = FeatureCache()
    from ovss_label.backend.proposers import refine

    monkeypatch.setattr(refine, "build_sam", lambda *a, **k: tiny_sam)
    proposer = create_proposer(
        "naclip+sam", tiny=True, checkpoint=tiny_checkpoints["openai"], background="none",
        feature_cache=cache, slide_crop=32, slide_stride=16, short_side=48,
    )  # fmt: skip
    image = _image(seed=1)
    for labels in ("cat, dog", "cup", "cat, cup, person"):
        proposal = propose(proposer, image, Vocabulary.from_labels(labels), cache)
        assert proposal.instances is not None
        for inst in proposal.instances:
            assert inst.mask.shape == (48, 80) and 0 <= inst.score <= 1
    cache.features(SamEncoder(tiny_sam), image)  # e.g. an interactive prompt later
    assert len(calls) == 1
    propose(proposer, _image(seed=2), Vocabulary.from_labels("cat"), cache)
    assert len(calls) == 2
