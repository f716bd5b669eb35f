"""SAM: builder and loader, stateless decoding against SamPredictor, prompts, one encoder pass."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from helpers import disc
from segment_anything import SamPredictor

from ovss_label.backend.models.pool import ModelPool, WeightRef
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


def test_one_sam_encoder_pass_per_image(tiny_checkpoints, tiny_files):
    cache, pool = FeatureCache(), ModelPool()
    proposer = create_proposer(
        "naclip+sam", tiny=True, checkpoint=tiny_checkpoints["openai"], background="none",
        sam_checkpoint=tiny_files["sam"], pool=pool, feature_cache=cache, slide_crop=32,
        slide_stride=16, short_side=48,
    )  # fmt: skip
    tiny_sam = pool.load(WeightRef("sam_vit_b", tiny_files["sam"], tiny=True))
    assert tiny_sam is proposer.sam  # the pool's one SAM: clicks would use it too
    calls = []
    tiny_sam.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
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


# Interactive clicks: the one-prompt decoder, crop-first upsampling, best of three.


@pytest.fixture(scope="module")
def two_block_sam():
    """The tiny SAM with a 2-block decoder (as ViT-B's): blocks after the first run too."""
    from ovss_label.backend.models.sam import LoadedSam

    return LoadedSam(_create_sam({**TINY_SAM_CFG, "decoder_depth": 2}, seed=5), "sam_tiny", True)


def _prompts(size):
    """(points, labels, boxes) kwargs for the prompt encoder, encoder-frame pixels, batch 1."""
    g = torch.Generator().manual_seed(size)
    pts, neg = torch.rand(1, 3, 2, generator=g) * size, torch.tensor([[1, 0, 1]], dtype=torch.int)
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]]) * size
    return [
        {"points": (pts[:, :1], torch.ones(1, 1, dtype=torch.int)), "boxes": None},
        {"points": (pts, neg), "boxes": None},
        {"points": None, "boxes": box},
        {"points": (pts[:, :2], neg[:, :2]), "boxes": box},
    ]


@pytest.mark.parametrize("multimask", [True, False])
def test_one_prompt_decoder_is_bit_identical_to_mask_decoder(two_block_sam, multimask):
    from ovss_label.backend.proposers.sam_decoder import decode_one, image_context

    model = two_block_sam.model
    for seed in range(3):
        embedding = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(seed))
        context = image_context(model, embedding)
        for prompt in _prompts(64):
            with torch.no_grad():
                sparse, dense = model.prompt_encoder(**prompt, masks=None)
                ref = model.mask_decoder(
                    image_embeddings=embedding,
                    image_pe=model.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask,
                )
            low_res, iou = decode_one(model, context, sparse, multimask)
            assert torch.equal(low_res, ref[0]) and torch.equal(iou, ref[1])


@pytest.mark.parametrize(
    ("h", "w"),
    [(1, 1), (1, 7), (3, 2), (17, 5), (48, 80), (80, 48), (37, 61), (61, 37), (64, 64),
     (480, 640), (641, 479), (200, 1000), (999, 201), (512, 512), (1080, 1920)],
)  # fmt: skip
@pytest.mark.parametrize("side", [64, 1024])
def test_crop_first_upsampling_equals_postprocess_masks(h, w, side):
    from types import SimpleNamespace

    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide

    from ovss_label.backend.proposers.sam_prompts import upscale_masks

    input_size = ResizeLongestSide(side).get_preprocess_shape(h, w, side)
    if min(input_size) == 0:
        pytest.skip("SAM itself cannot resize this image to that side")
    sam_like = SimpleNamespace(image_encoder=SimpleNamespace(img_size=side))
    g = torch.Generator().manual_seed(h * 7 + w)
    low_res = torch.randn(2, 1, side // 4, side // 4, generator=g) * 4
    ref = Sam.postprocess_masks(sam_like, low_res, input_size, (h, w))  # type: ignore[arg-type]
    got = upscale_masks(low_res, input_size, (h, w), side)
    assert torch.equal(got, ref)


@pytest.mark.parametrize(("h", "w"), [(48, 80), (80, 48), (33, 33), (7, 50)])
@pytest.mark.parametrize("prompt", ["point", "box", "points+box"])
def test_one_click_equals_sam_predictor(two_block_sam, h, w, prompt):
    image = _image(seed=h, h=h, w=w)
    predictor = SamPredictor(two_block_sam.model)
    predictor.set_image(image)
    features = SamEncoder(two_block_sam).encode(image)
    points = np.array([[w * 0.3, h * 0.6], [w * 0.8, h * 0.2]])
    kwargs = {
        "point_coords": points if "point" in prompt else None,
        "point_labels": np.array([1, 0]) if "point" in prompt else None,
        "box": np.array([1.0, 1.0, w * 0.7, h - 1.0]) if "box" in prompt else None,
    }
    multimask = prompt == "point"
    ref_masks, ref_scores, _ = predictor.predict(**kwargs, multimask_output=multimask)
    masks, iou = decode(
        two_block_sam,
        features,
        points=points[None] if "point" in prompt else None,
        labels=kwargs["point_labels"][None] if "point" in prompt else None,
        boxes=kwargs["box"][None] if "box" in prompt else None,
        multimask=multimask,
    )
    best = int(ref_scores.argmax())
    np.testing.assert_array_equal(masks[0], ref_masks[best])
    assert iou[0] == ref_scores[best]


def test_every_candidate_is_considered(two_block_sam):
    """Predicted IoUs rank the third candidate first: its mask is the answer, for one click (the
    cached decoder) and for a batch (``MaskDecoder``), as ``SamPredictor`` chooses."""
    head = two_block_sam.model.mask_decoder.iou_prediction_head
    ranked = torch.tensor([[0.5, 0.1, 0.2, 0.9]])  # token 0 is the single-mask output
    hook = head.register_forward_hook(lambda module, args, out: ranked.expand_as(out))
    try:
        image = _image(seed=4)
        predictor = SamPredictor(two_block_sam.model)
        predictor.set_image(image)
        point = np.array([[30.5, 20.5]])
        ref_masks, ref_scores, _ = predictor.predict(point, np.array([1]), multimask_output=True)
        assert ref_scores.tolist() == pytest.approx([0.1, 0.2, 0.9])
        assert not np.array_equal(ref_masks[2], ref_masks[0])  # the choice is visible
        features = SamEncoder(two_block_sam).encode(image)
        ones = np.ones((1, 1), np.int64)
        masks, iou = decode(two_block_sam, features, points=point[None], labels=ones)
        np.testing.assert_array_equal(masks[0], ref_masks[2])
        assert iou[0] == pytest.approx(0.9)
        batch = np.stack([point, point + 10])
        masks, iou = decode(two_block_sam, features, points=batch, labels=np.ones((2, 1)))
        np.testing.assert_array_equal(masks[0], ref_masks[2])
        assert iou.tolist() == pytest.approx([0.9, 0.9])
    finally:
        hook.remove()


def test_decoder_contexts_live_in_the_feature_cache_beside_the_embedding(two_block_sam):
    """One prompt's decoder context is kept in the cache it is given (one memory budget):
    hits and misses give the same masks, and a small budget evicts contexts like features."""
    encoder = SamEncoder(two_block_sam)
    images = [_image(seed=s) for s in range(4)]
    features = [encoder.encode(image) for image in images]
    points, labels = np.array([[[20.5, 10.5]]]), np.ones((1, 1), np.int64)
    plain = [decode(two_block_sam, f, points=points, labels=labels)[0] for f in features]
    cache = FeatureCache()
    for f, mask in zip(features * 2, plain * 2, strict=True):  # misses, then hits
        cached = decode(two_block_sam, f, points=points, labels=labels, cache=cache)[0]
        np.testing.assert_array_equal(cached, mask)
    assert (cache.misses, cache.hits) == (4, 4) and len(cache) == 4
    one_entry = cache.nbytes // 4
    small = FeatureCache(max_bytes=one_entry * 2)
    for f in features:
        decode(two_block_sam, f, points=points, labels=labels, cache=small)
    assert len(small) == 2 and small.nbytes <= one_entry * 2  # the budget holds
    unkeyed = type(features[0])(features[0].image_hw, features[0].tensors, features[0].meta, "")
    np.testing.assert_array_equal(
        decode(two_block_sam, unkeyed, points=points, labels=labels, cache=cache)[0], plain[0]
    )
