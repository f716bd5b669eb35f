"""How methods are planned and built: ``<dense>+sam`` plans and how they prompt SAM, the
registry, the background vocabularies the methods score, a trained head's checks on the models
it is given, overlap resolution and the image-hash memo.

Written against mutmut's survivors in ``backend/proposers`` (docs/mutation.md); each test states
what a user relies on: the ``model_version`` promised before loading is the one served, a head
refuses models it was not trained with and says which.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ovss_label.backend.models.identity import settings_of
from ovss_label.backend.models.pool import ModelPool, WeightRef
from ovss_label.backend.proposers import base
from ovss_label.backend.proposers.base import (
    BACKGROUND,
    method_plan,
    register_method,
    with_background_names,
    with_hidden_background,
)
from ovss_label.backend.proposers.cache import FeatureCache, image_key
from ovss_label.backend.proposers.refine import RefineConfig, with_sam
from ovss_label.ontologies import Vocabulary, load

STUFF = load("voc21").synonyms[0]  # NACLIP's background line: cls_voc21.txt line 0


@pytest.fixture()
def naclip_files(tiny_checkpoints, tiny_files) -> dict[str, object]:
    return {"tiny": True, "checkpoint": str(tiny_checkpoints["openai"]),
            "sam_checkpoint": tiny_files["sam"], "background": "none"}  # fmt: skip


def test_a_sam_plan_promises_the_identity_its_proposer_serves(naclip_files):
    """``with_sam`` itself (the registry holds the closures it made at import)."""
    refine = RefineConfig(prompt="box", max_prompts=3, threshold=0.4)
    plan = with_sam("naclip")(refine=refine, slide_stride=8, **naclip_files)
    assert plan.method == "naclip+sam"
    assert plan.identity == method_plan("naclip+sam", refine=refine, slide_stride=8,
                                        **naclip_files).identity  # fmt: skip
    pool, cache = ModelPool(), FeatureCache()
    proposer = plan.build(pool, cache)
    assert proposer.identity == plan.identity and proposer.name == "naclip+sam"
    assert proposer.config == refine and proposer.cache is cache
    assert proposer.sam is pool.load(WeightRef("sam_vit_b", naclip_files["sam_checkpoint"], True))
    assert proposer.dense.name == "naclip" and proposer.dense.map_cache is cache
    assert proposer.dense.config.slide_stride == 8  # the dense options reach the dense method
    image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    features = proposer.encode(image)
    assert features.image_hw == (24, 40) and features.key == image_key(image)
    settings = json.loads(plan.identity.settings)
    assert settings["refine"] == {"revision": 1, **settings_of(refine)}
    assert settings["dense"]["slide_stride"] == 8
    sam = plan.identity.weights[-1]
    assert (sam.role, sam.name) == ("sam", "sam_vit_b")
    sam_file = WeightRef("sam_vit_b", naclip_files["sam_checkpoint"], True)
    assert sam.fingerprint == sam_file.fingerprint()


def test_a_sam_plans_defaults_and_its_models_come_from_the_options(naclip_files, monkeypatch):
    default = json.loads(with_sam("naclip")(**naclip_files).identity.settings)["refine"]
    assert default == {"revision": 1, **settings_of(RefineConfig())}
    with pytest.raises(ValueError, match=r"prompt must be one of .* got 'boxes'"):
        with_sam("naclip")(refine=RefineConfig(prompt="boxes"), **naclip_files)
    # tiny=None reads OVSS_TINY, for SAM as for the dense method.
    options = {k: v for k, v in naclip_files.items() if k != "tiny"}
    monkeypatch.setenv("OVSS_TINY", "1")
    assert with_sam("naclip")(**options).identity == with_sam("naclip")(**naclip_files).identity
    monkeypatch.delenv("OVSS_TINY")
    real = with_sam("naclip")(sam_model="sam_vit_h", **{**options, "sam_checkpoint": None})
    assert [(w.role, w.name) for w in real.identity.weights] == [
        ("clip", "clip_vit_b16"), ("sam", "sam_vit_h")]  # fmt: skip
    assert real.identity.weights[1].fingerprint == WeightRef("sam_vit_h").fingerprint()


def test_a_method_is_registered_once_under_its_name(monkeypatch):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    planned = []

    @register_method("probe")
    def plan_probe(**options):
        planned.append(options)
        return "planned"

    assert method_plan("probe", tiny=True) == "planned" and planned == [{"tiny": True}]
    with pytest.raises(ValueError, match=r"^method 'probe' registered twice$"):
        register_method("probe")(plan_probe)
    with pytest.raises(ValueError) as unknown:
        method_plan("nope")
    available = str(unknown.value).removeprefix("unknown method 'nope'; available: ")
    assert "naclip" in available.split(", ") and "pnp_ovss" in available.split(", ")


def test_a_named_background_class_gets_the_stuff_names_and_keeps_the_vocabularys_name():
    vocab = Vocabulary(("Background", "cat", "sky"), (("Background",), ("cat",), ("sky",)),
                       ("a photo of a {}.",), "pets")  # fmt: skip
    named = with_background_names(vocab)
    assert named.names == vocab.names and named.name == "pets"
    assert named.templates == vocab.templates
    # The stuff line minus what is already a label's synonym ("sky").
    assert named.synonyms == (tuple(s for s in STUFF if s != "sky"), ("cat",), ("sky",))
    own = Vocabulary(("background", "cat"), (("floor", "wall"), ("cat",)))
    assert with_background_names(own).synonyms == (("floor", "wall"), ("cat",))


def test_the_hidden_background_is_added_only_when_there_is_none():
    vocab = Vocabulary(("cat", "dog"), (("cat",), ("dog",)), ("a {}.",), "pets")
    hidden, added = with_hidden_background(vocab)
    assert added and hidden.names == (BACKGROUND, "cat", "dog") and hidden.name == "pets"
    assert hidden.synonyms[0] == STUFF and hidden.templates == ("a {}.",)
    with_bg = Vocabulary.from_labels(["background", "cat"])
    assert with_hidden_background(with_bg) == (with_bg, False)


def _head_with(tiny_head, folder, key: str, fingerprint: str | None):
    """A copy of ``tiny_head`` in ``folder`` whose recorded ``key`` fingerprint is
    ``fingerprint`` (None: not recorded, as a head trained before it was)."""
    from ovss_label.backend.training.head import load_head, save_head

    head = load_head(tiny_head)
    fingerprints = {k: v for k, v in head.meta["fingerprints"].items() if k != key}
    if fingerprint is not None:
        fingerprints[key] = fingerprint
    path = folder / "head.safetensors"
    save_head(path, head.module, {**head.meta, "fingerprints": fingerprints})
    return path


@pytest.mark.parametrize(
    ("key", "what", "model"),
    [
        ("backbone_fingerprint", "backbone's features", "dinov2"),
        ("text", "CLIP text tower", "clip"),
    ],
)
def test_a_head_refuses_models_it_was_not_trained_with(tiny_head, tmp_path, key, what, model):
    from ovss_label.backend.proposers import create_proposer

    pool = ModelPool()
    proposer = create_proposer("fmbseg", tiny=True, head=str(tiny_head), pool=pool)
    loaded = proposer.dinov2 if model == "dinov2" else proposer.text.clip
    found = loaded.backbone_fingerprint if model == "dinov2" else loaded.text_fingerprint
    other = _head_with(tiny_head, tmp_path / key, key, "0123456789abcdef" * 4)
    expected = (
        f"this head was trained on another {what} (0123456789ab; loaded "
        f"{loaded.weight or loaded.name} is {found[:12]}): load the one it was trained with"
    )
    with pytest.raises(ValueError) as err:
        create_proposer("fmbseg", tiny=True, head=str(other), pool=pool)
    assert str(err.value) == expected


def test_a_head_without_a_recorded_fingerprint_is_not_checked(tiny_head, tmp_path):
    from ovss_label.backend.proposers import create_proposer

    path = _head_with(tiny_head, tmp_path / "old", "text", None)
    assert create_proposer("fmbseg", tiny=True, head=str(path)).name == "fmbseg"


def test_mask_features_keep_the_feature_dtype_and_confidence_is_clips_softmax():
    from ovss_label.backend.proposers import fmbseg

    features = torch.nn.functional.normalize(torch.randn(2, 2, 3, dtype=torch.float64), dim=-1)
    mask = np.zeros((1, 20, 20), bool)
    mask[0, :, :10] = True
    mean = fmbseg.mask_mean_features(mask, features)
    assert mean.dtype == torch.float64
    torch.testing.assert_close(mean[0], torch.nn.functional.normalize(features[:, 0].sum(0), dim=0))
    text = torch.eye(3, dtype=torch.float64)
    cosine = mean[0] @ text.T
    _, confidence = fmbseg.label_masks(mean, text, np.array([True, True, False]))
    expected = torch.softmax(100.0 * cosine[:2], dim=0).max()  # CLIP's trained scale, 100
    assert confidence[0] == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize(
    ("prompt", "multimask"), [("box+point", True), ("box", False), ("point", True)]
)
def test_sam_refinement_prompts_sam_as_configured(naclip_files, monkeypatch, prompt, multimask):
    """Each dense part becomes the configured prompt (its box, its interior point with a
    positive label, or both) in one decode on the shared cache; an instance's score is the
    dense class's mean score over SAM's mask times SAM's predicted IoU, clipped to [0, 1]."""
    from ovss_label.backend.proposers import refine
    from ovss_label.backend.proposers.base import Proposal

    config = RefineConfig(prompt=prompt, multimask=multimask)
    cache = FeatureCache()
    proposer = with_sam("naclip")(refine=config, **naclip_files).build(ModelPool(), cache)
    assert proposer.name == "naclip+sam"
    calibration = object()  # e.g. a trained fmbseg head's map: SAM's masks are scored by it too
    monkeypatch.setattr(proposer.dense, "calibration", calibration, raising=False)
    assert refine.SamRefined(proposer.dense, proposer.sam, config).calibration is calibration
    scores = np.zeros((2, 20, 30), np.float32)
    scores[0, 2:8, 3:9], scores[1, 10:18, 12:28] = 0.8, 0.6
    dense = Proposal(("cat", "dog"), scores)
    prompts = refine.prompts_from_proposal(dense, config)
    calls = []
    masks = np.zeros((2, 20, 30), bool)
    masks[0, :10], masks[1, 10:] = True, True

    def decode(sam, sam_features, *, points, labels, boxes, multimask, cache):
        calls.append({"points": points, "labels": labels, "boxes": boxes,
                      "multimask": multimask, "cache": cache, "sam": sam})  # fmt: skip
        return masks, np.array([0.5, 5.0])  # dog: 0.256 x 5 > 1

    monkeypatch.setattr(refine, "decode", decode)
    found = proposer._instances("sam features", dense, prompts)
    (call,) = calls
    assert call["sam"] is proposer.sam and call["cache"] is cache
    assert call["multimask"] is multimask
    if "point" in prompt:
        np.testing.assert_array_equal(call["points"], prompts.points)
        assert call["labels"].dtype == np.int64 and (call["labels"] == 1).all()
        assert call["labels"].shape == (2, 1)
    else:
        assert call["points"] is None and call["labels"] is None
    if "box" in prompt:
        np.testing.assert_array_equal(call["boxes"], prompts.boxes)
    else:
        assert call["boxes"] is None
    cat = float(scores[0][masks[0]].mean()) * 0.5  # prompts come best first: cat, then dog
    assert [(i.label, i.score) for i in found] == [("cat", pytest.approx(cat)), ("dog", 1.0)]
    # SAM's predicted IoU is a regression and may come out below 0: the score stays at 0
    monkeypatch.setattr(refine, "decode", lambda *a, **k: (masks, np.array([-0.2, 5.0])))
    assert [i.score for i in proposer._instances("sam features", dense, prompts)] == [0.0, 1.0]


def test_every_part_above_min_area_gets_a_prompt_after_a_small_one():
    from ovss_label.backend.proposers.base import Proposal
    from ovss_label.backend.proposers.refine import prompts_from_proposal

    scores = np.zeros((1, 20, 20), np.float32)
    scores[0, 0, 0] = 0.9  # a 1-px speck first in raster order, below min_area
    scores[0, 10:15, 10:15] = 0.7
    prompts = prompts_from_proposal(Proposal(("cat",), scores), RefineConfig(min_area=0.01))
    assert len(prompts) == 1 and prompts.boxes.tolist() == [[10.0, 10.0, 15.0, 15.0]]


def test_overlaps_go_to_the_higher_score_and_a_background_instance_is_skipped():
    from ovss_label.backend.proposers.postprocess import resolve_overlaps
    from ovss_label.converters import Instance

    def square(y, x):
        mask = np.zeros((10, 10), bool)
        mask[y : y + 4, x : x + 4] = True
        return mask

    kept = resolve_overlaps(
        [
            Instance(square(0, 0), "cat", None),  # no score: ranks as 0
            Instance(square(2, 2), "dog", 0.4),
            Instance(square(0, 0), "background", 0.9),
            Instance(square(6, 6), "cup", 0.1),
        ],
        min_pixels=1,
    )
    assert [(i.label, i.score, int(i.mask.sum())) for i in kept] == [
        ("dog", 0.4, 16), ("cup", 0.1, 16), ("cat", None, 12)]  # fmt: skip


def test_an_images_remembered_hash_is_forgotten_with_the_image(monkeypatch):
    """Hashed twice, an image is remembered once (the second weak reference replaces the
    first, which then never calls back) and forgotten with it, raising nothing inside the
    garbage collector."""
    import gc
    import sys

    from ovss_label.backend.proposers import cache as cache_module

    errors = []
    monkeypatch.setattr(sys, "unraisablehook", errors.append)
    image = cache_module.freeze(np.zeros((4, 4, 3), np.uint8))
    key = image_key(image)
    assert image_key(image) == key
    ident = id(image)
    assert cache_module._keys[ident][1] == key
    del image
    gc.collect()
    assert ident not in cache_module._keys
    assert errors == []


def test_a_head_is_found_from_a_run_folder_or_the_variable_or_says_how_to_train_one(
    tiny_head, tmp_path, monkeypatch
):
    from ovss_label.backend.proposers.aligned import head_file

    assert head_file(tiny_head.parent) == tiny_head  # a run folder: its head.safetensors
    assert head_file(str(tiny_head)) == tiny_head
    monkeypatch.setenv("OVSS_FMBSEG_HEAD", str(tiny_head.parent))
    assert head_file(None) == tiny_head
    monkeypatch.delenv("OVSS_FMBSEG_HEAD")
    with pytest.raises(ValueError) as err:
        head_file(None)
    assert str(err.value) == (
        "fmbseg needs a trained head: `ovss-label train ... -o RUN_DIR`, then --head RUN_DIR"
        " (or OVSS_FMBSEG_HEAD)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"^no trained head at .*empty.head\.safetensors: run "):
        head_file(empty)


def test_top_confidence_is_the_best_class_score_and_zero_without_classes():
    from ovss_label.backend.proposers.base import Proposal

    scores = np.random.default_rng(0).random((1, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(Proposal(("cat",), scores).top_confidence(), scores[0])
    empty = Proposal((), np.zeros((0, 4, 5), np.float32)).top_confidence()
    assert empty.shape == (4, 5) and empty.dtype == np.float32 and not empty.any()
