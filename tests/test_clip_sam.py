"""FMbSeg stage 1 (clip_sam): presence, points, mask labelling by hand; AMG; one SAM pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovss_label.backend.models.naclip_vit import clip_cls_and_naclip_tokens, naclip_tokens
from ovss_label.backend.models.pool import ModelPool, WeightRef
from ovss_label.backend.models.sam import TINY_SAM_CFG, LoadedSam, _create_sam
from ovss_label.backend.proposers import FeatureCache, create_proposer, fmbseg, propose
from ovss_label.backend.proposers.clip_sam import ClipSamConfig, automatic_masks
from ovss_label.backend.proposers.sam_prompts import SamEncoder
from ovss_label.ontologies import Vocabulary


def test_presence_counts_crop_votes():
    # 4 crops x 3 classes: crops 0, 1 vote class 2; crop 2 votes class 0; crop 3 votes class 2.
    sims = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.1, 0.2], [0.5, 0.1, 0.2], [0.1, 0.1, 0.4]])
    assert fmbseg.present_classes(sims, min_crops=1).tolist() == [False, False, True]
    assert fmbseg.present_classes(sims, min_crops=0).tolist() == [True, False, True]
    assert fmbseg.present_classes(sims, min_crops=3).tolist() == [False, False, False]
    # The default is the paper's "more than 1 crop"; a class no crop votes for is still a
    # column of the answer (here the last one: votes 2, 1, 0).
    sims = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.1, 0.0], [0.1, 0.9, 0.0]])
    assert fmbseg.present_classes(sims).tolist() == [True, False, False]


def test_top_patches_and_their_pixel_centres():
    sim = torch.zeros(4, 6)
    sim[1, 2], sim[3, 5], sim[0, 0] = 0.9, 0.8, 0.7
    patches = fmbseg.top_patches(sim, n=2)
    assert patches.tolist() == [[1, 2], [3, 5]]
    # 14-px patches in a frame twice the original size: centres at (col+0.5)*14/2.
    xy = fmbseg.patch_centres_to_pixels(patches, 14, (0.5, 0.5))
    np.testing.assert_allclose(xy, [[2.5 * 7, 1.5 * 7], [5.5 * 7, 3.5 * 7]])
    # the paper's 5 points by default, best first; a grid smaller than that gives all of it
    ranked = torch.arange(24.0).reshape(4, 6)
    assert fmbseg.top_patches(ranked).tolist() == [[3, 5], [3, 4], [3, 3], [3, 2], [3, 1]]
    assert fmbseg.top_patches(ranked[:1, :3]).tolist() == [[0, 2], [0, 1], [0, 0]]


def test_masks_are_labelled_by_their_mean_patch_feature():
    # A 2x2 patch grid: left column feature e0 ("cat"), right column e1 ("dog").
    e0, e1, e2 = torch.eye(3)
    features = torch.stack([torch.stack([e0, e1]), torch.stack([e0, e1])])  # (2, 2, 3)
    left = np.zeros((20, 20), bool)
    left[:, :10] = True
    mostly_right = np.zeros((20, 20), bool)
    mostly_right[:, 6:] = True  # 40% of the left patches, all of the right ones
    mean = fmbseg.mask_mean_features(np.stack([left, mostly_right]), features)
    torch.testing.assert_close(mean[0], e0)
    torch.testing.assert_close(mean[1], F.normalize(0.4 * e0 + e1, dim=0))
    text = torch.stack([e0, e1, e2])
    labels, confidence = fmbseg.label_masks(mean, text, np.array([True, True, False]))
    assert labels.tolist() == [0, 1] and confidence[0] > 0.99
    only_cat = fmbseg.label_masks(mean, text, np.array([True, False, False]))[0]
    assert only_cat.tolist() == [0, 0]  # absent classes are never chosen


def test_crop_cls_is_clips_image_embedding(tiny_clip):
    visual, image = tiny_clip.model.visual, torch.randn(2, 3, 32, 32)  # the training size
    cls, tokens = clip_cls_and_naclip_tokens(visual, image)
    with torch.no_grad():
        torch.testing.assert_close(cls, tiny_clip.model.encode_image(image), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens, naclip_tokens(visual, image))


@pytest.fixture(scope="module")
def tiny_sam():
    return LoadedSam(_create_sam(TINY_SAM_CFG, seed=5), "sam_tiny", True)


def test_automatic_masks_run_on_the_cached_embedding(tiny_sam):
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    calls = []
    hook = tiny_sam.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        features = SamEncoder(tiny_sam).encode(image)
        config = ClipSamConfig(
            amg_points_per_side=4, amg_pred_iou=0.0, amg_stability=0.0, amg_box_nms=1.0
        )
        records = automatic_masks(tiny_sam, features, config)
    finally:
        hook.remove()
    assert len(calls) == 1 and records  # masks came out, from the one encoder pass
    for record in records:
        assert record["segmentation"].shape == (48, 80) and record["area"] > 0
        assert record["area"] == int(record["segmentation"].sum())


def test_automatic_masks_equal_segment_anythings_generator_with_the_configs_settings(tiny_sam):
    from segment_anything import SamAutomaticMaskGenerator

    image = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    config = ClipSamConfig(
        amg_points_per_side=5, amg_pred_iou=0.0, amg_stability=0.0, amg_box_nms=0.95
    )
    ours = automatic_masks(tiny_sam, SamEncoder(tiny_sam).encode(image), config)
    theirs = SamAutomaticMaskGenerator(
        tiny_sam.model, points_per_side=5, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        box_nms_thresh=0.95,
    ).generate(image)  # fmt: skip
    assert len(ours) == len(theirs) > 1
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(a["segmentation"], b["segmentation"])
        assert a["predicted_iou"] == pytest.approx(b["predicted_iou"], abs=1e-5)
        assert a["point_coords"] == b["point_coords"]


def test_one_sam_pass_across_refinement_and_both_stages(tiny_checkpoints, tiny_files):
    cache, pool = FeatureCache(), ModelPool()
    common = {"tiny": True, "checkpoint": tiny_checkpoints["openai"], "feature_cache": cache,
              "sam_checkpoint": tiny_files["sam"], "pool": pool}  # fmt: skip
    tiny_sam = pool.load(WeightRef("sam_vit_b", tiny_files["sam"], tiny=True))
    calls = []
    tiny_sam.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    fmb = create_proposer(
        "clip_sam", min_crops=0, amg_points_per_side=4, amg_pred_iou=0.0, amg_stability=0.0,
        amg_box_nms=1.0, min_area=0.0, **common,
    )  # fmt: skip
    refined = create_proposer("naclip+sam", background="none", **common)
    image = np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    vocab = Vocabulary.from_labels("cat, dog")
    first = propose(fmb, image, vocab, cache)
    propose(refined, image, vocab, cache)
    propose(fmb, image, Vocabulary.from_labels("cup"), cache)
    assert len(calls) == 1
    assert first.instances and first.scores.shape == (2, 48, 80)
    assert {i.label for i in first.instances} <= {"cat", "dog"}
    for inst in first.instances:
        assert inst.mask.shape == (48, 80) and 0 <= inst.score <= 1


def test_crop_features_are_clips_windows_over_the_normalised_resized_image(tiny_checkpoints):
    """``encode`` against the steps written out: resize (bilinear, half-pixel centres) so the
    short side is ``short_side`` and both sides are whole patches (rounded, then floored), CLIP's
    mean and std on 0-255 pixels, 32-px windows every 16 px, each window's unit CLS and its
    unit NACLIP patch tokens averaged where windows overlap."""
    from ovss_label.backend.models.weights import OPENAI_MEAN, OPENAI_STD

    proposer = create_proposer("clip_sam", tiny=True, checkpoint=tiny_checkpoints["openai"],
                               short_side=48, crop=32, stride=16, gaussian_std=3.0)  # fmt: skip
    # 53 * 1.2 = 63.6 rounds to 64; 33 * 48/25 = 63.4 rounds to 63, floored to 48.
    assert proposer._network_size((40, 53)) == (48, 64)
    assert proposer._network_size((25, 33)) == (48, 48)
    assert proposer._network_size((300, 20)) == (720, 48)
    image = np.random.default_rng(4).integers(0, 256, (40, 53, 3), dtype=np.uint8)
    features = proposer.encode(image)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(48, 64), mode="bilinear", align_corners=False)[0]
    net = (x - torch.tensor(OPENAI_MEAN)[:, None, None] * 255) / (
        torch.tensor(OPENAI_STD)[:, None, None] * 255
    )
    summed, count, cls = torch.zeros(3, 4, 32), torch.zeros(3, 4, 1), []
    for y in (0, 16):
        for x0 in (0, 16, 32):
            crop = net[:, y : y + 32, x0 : x0 + 32][None]
            window_cls, tokens = clip_cls_and_naclip_tokens(proposer.clip.model.visual, crop, 3.0)
            cls.append(F.normalize(window_cls[0], dim=-1))
            summed[y // 16 : y // 16 + 2, x0 // 16 : x0 // 16 + 2] += F.normalize(
                tokens[0, 1:], dim=-1
            ).reshape(2, 2, -1)
            count[y // 16 : y // 16 + 2, x0 // 16 : x0 // 16 + 2] += 1
    torch.testing.assert_close(features.tensors["cls"], torch.stack(cls))
    torch.testing.assert_close(features.tensors["patches"], F.normalize(summed / count, dim=-1))
    assert features.meta["network"] == (48, 64) and features.image_hw == (40, 53)


def _stage_proposer(tiny_checkpoints, **options):
    cache = FeatureCache()
    proposer = create_proposer("clip_sam", tiny=True, checkpoint=tiny_checkpoints["openai"],
                               short_side=48, crop=32, stride=16, feature_cache=cache,
                               **options)  # fmt: skip
    image = np.random.default_rng(5).integers(0, 256, (40, 53, 3), dtype=np.uint8)
    return proposer, proposer.encode(image), cache


def test_stage_one_prompts_sam_at_each_wanted_classs_top_patch_centres(
    tiny_checkpoints, monkeypatch
):
    """Stage 1.1: ``points`` top patches per wanted class, their centres mapped from the
    48 x 64 network frame to the 40 x 53 image, all positive, one SAM decode; an instance's
    score is SAM's predicted IoU clipped to [0, 1]; empty masks are dropped."""
    from ovss_label.backend.proposers import clip_sam

    proposer, features, cache = _stage_proposer(tiny_checkpoints, points=2)
    calls = []
    masks = np.zeros((3, 40, 53), bool)
    masks[0, :10], masks[1, 20:] = True, True  # mask 2 stays empty

    def decode(sam, sam_features, points, labels, cache):
        calls.append((sam, sam_features, points, labels, cache))
        return masks[: len(points)], np.array([1.3, -0.2, 0.5])[: len(points)]

    monkeypatch.setattr(clip_sam, "decode", decode)
    patch_sim = torch.zeros(4, 3, 4)  # 4 classes on the 3 x 4 patch grid
    patch_sim[0, 2, 3], patch_sim[0, 0, 1] = 0.9, 0.8
    patch_sim[2, 1, 0], patch_sim[2, 0, 2] = 0.7, 0.6
    patch_sim[3, 0, 0], patch_sim[3, 2, 2] = 0.5, 0.4
    vocab = Vocabulary.from_labels("cat, dog, cup, tv")
    wanted = np.array([True, False, True, True])
    found = proposer._stage_one(features, patch_sim, wanted, vocab)
    (sam, sam_features, points, labels, used_cache), = calls  # fmt: skip
    assert sam is proposer.sam and sam_features is features.meta["sam"] and used_cache is cache
    sy, sx = 40 / 48, 53 / 64
    expected = [[(3.5, 2.5), (1.5, 0.5)], [(0.5, 1.5), (2.5, 0.5)], [(0.5, 0.5), (2.5, 2.5)]]
    np.testing.assert_allclose(points, np.array(expected) * 16 * np.array([sx, sy]))
    assert labels.shape == (3, 2) and labels.dtype == np.int64 and (labels == 1).all()
    assert [(i.label, i.score) for i in found] == [("cat", 1.0), ("cup", 0.0)]
    assert proposer._stage_one(features, patch_sim, np.zeros(4, bool), vocab) == []


def test_stage_two_labels_sampled_automatic_masks_by_their_mean_patch_feature(
    tiny_checkpoints, monkeypatch
):
    """Stage 1.2: automatic masks of at least ``min_area``, a ``stage2_ratio`` sample (seeded),
    each labelled with the wanted class nearest its mean patch feature; score = SAM's
    predicted IoU x the label's probability, clipped to [0, 1]."""
    from ovss_label.backend.proposers import clip_sam

    proposer, features, _ = _stage_proposer(tiny_checkpoints, stage2_ratio=0.5, seed=3)
    records = []
    for i in range(8):
        mask = np.zeros((40, 53), bool)
        mask[:, i * 6 : i * 6 + 6] = True
        records.append({"segmentation": mask, "area": int(mask.sum()), "predicted_iou": 1.5})
    records.append({"segmentation": records[0]["segmentation"], "area": 2, "predicted_iou": 1.0})
    asked = []
    monkeypatch.setattr(clip_sam, "automatic_masks", lambda *a: asked.append(a) or records)
    text, query_idx = proposer.text.query_features(Vocabulary.from_labels("cat, dog"))
    idx = torch.tensor(query_idx)
    vocab, wanted = Vocabulary.from_labels("cat, dog"), np.array([True, True])
    found = proposer._stage_two(features, text, idx, wanted, vocab)
    keep = np.random.default_rng(3).random(8) < 0.5  # the 2-px mask is below min_area first
    sampled = np.stack([r["segmentation"] for r, k in zip(records, keep, strict=False) if k])
    labels, confidence = fmbseg.label_masks(
        fmbseg.mask_mean_features(sampled, features.tensors["patches"]), text, wanted
    )
    assert [i.label for i in found] == [vocab.names[k] for k in labels]
    assert [i.score for i in found] == pytest.approx(np.clip(1.5 * confidence, 0, 1).tolist())
    assert all(np.array_equal(i.mask, m) for i, m in zip(found, sampled, strict=True))
    assert 0 < len(found) < 8 and len(asked) == 1
    # two classes equally near every mask: each label's probability is 1/2, the score 1.5 / 2
    twins = text[torch.zeros(len(text), dtype=torch.long)]
    even = proposer._stage_two(features, twins, idx, wanted, vocab)
    assert [i.score for i in even] == pytest.approx([0.75] * len(found))
    asked.clear()
    assert proposer._stage_two(features, text, idx, np.zeros(2, bool), vocab) == []
    assert not asked  # nothing wanted: no automatic masks at all
    none, _, _ = _stage_proposer(tiny_checkpoints, stage2_ratio=0.0)
    assert none._stage_two(features, text, idx, wanted, vocab) == [] and not asked
