"""The interface, the registry, the feature cache and post-processing, with stub proposers."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import disc
from PIL import Image
from shapely.geometry import Polygon

from ovss_label.backend.models.identity import ModelIdentity
from ovss_label.backend.proposers import (
    FeatureCache,
    Features,
    PostprocessConfig,
    Proposal,
    Proposer,
    available_proposers,
    create_proposer,
    proposal_to_instances,
    propose,
)
from ovss_label.converters import Instance, instances_to_results
from ovss_label.ontologies import Vocabulary


class PaintingProposer(Proposer):
    """Paints known shapes: class k scores 1 inside disc k. Counts encode calls."""

    name = "paint"

    def __init__(self):
        self.encodes = 0
        self.lock = threading.Lock()

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.of("paint", {"revision": 1}, [])

    def encode(self, image):
        with self.lock:
            self.encodes += 1
        return Features(image.shape[:2], {"pixels": torch.from_numpy(image.copy())})

    def score(self, features, vocabulary):
        h, w = features.image_hw
        scores = np.zeros((len(vocabulary), h, w), np.float32)
        for k in range(len(vocabulary)):
            scores[k][disc(h, w, 20 + 40 * k, 30, 12)] = 0.9
        return Proposal(vocabulary.names, scores)


def test_registry_lists_and_builds_naclip():
    from ovss_label.methods import METHODS

    assert sorted(METHODS) == available_proposers()  # the CLI's choices are the registry
    with pytest.raises(ValueError, match=r"available: .*naclip"):
        create_proposer("nope")
    naclip = create_proposer("naclip", tiny=True)
    assert naclip.model_version.startswith("naclip·b16·tiny·")


def test_proposal_validates_shapes():
    with pytest.raises(ValueError, match=r"scores must be \(2, H, W\)"):
        Proposal(("a", "b"), np.zeros((3, 4, 4), np.float32))


def test_cache_encodes_each_image_once_per_proposer():
    proposer, cache = PaintingProposer(), FeatureCache()
    image = np.zeros((60, 100, 3), np.uint8)
    for labels in ("a", "a, b", "b, c"):
        propose(proposer, image, Vocabulary.from_labels(labels), cache)
    assert proposer.encodes == 1 and (cache.hits, cache.misses) == (2, 1)
    propose(proposer, image + 1, Vocabulary.from_labels("a"), cache)  # other pixels
    assert proposer.encodes == 2


def test_cache_evicts_least_recently_used_within_budget():
    def feats(n_bytes):
        return Features((1, 1), {"x": torch.zeros(n_bytes // 4)})

    cache = FeatureCache(max_bytes=1000)
    cache.put(("a", "p"), feats(400))
    cache.put(("b", "p"), feats(400))
    assert cache.get(("a", "p")) is not None  # a is now most recent
    cache.put(("c", "p"), feats(400))
    assert cache.get(("b", "p")) is None and cache.get(("a", "p")) is not None
    assert cache.nbytes == 800 and len(cache) == 2
    cache.put(("huge", "p"), feats(4000))
    assert cache.get(("huge", "p")) is None and len(cache) == 2


def test_cache_is_thread_safe():
    proposer, cache = PaintingProposer(), FeatureCache(max_bytes=10 * 60 * 100 * 3)
    images = [np.full((60, 100, 3), i, np.uint8) for i in range(20)]
    errors = []

    def work(offset):
        try:
            for i in range(40):
                image = images[(i + offset) % 20]
                assert cache.features(proposer, image).tensors["pixels"][0, 0, 0] == image[0, 0, 0]
        except AssertionError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cache.nbytes <= cache.max_bytes and len(cache) <= 10


def test_painted_shapes_become_instances_with_scores():
    proposal = PaintingProposer().score(Features((60, 120), {}), Vocabulary.from_labels("a, b"))
    instances = proposal_to_instances(proposal, PostprocessConfig())
    assert [i.label for i in instances] == ["a", "b"]
    for k, inst in enumerate(instances):
        assert np.array_equal(inst.mask, disc(60, 120, 20 + 40 * k, 30, 12))
        assert inst.score == pytest.approx(0.9)


def test_components_min_area_background_and_holes():
    scores = np.zeros((3, 50, 50), np.float32)
    scores[1, 5:25, 5:25] = 0.8  # a square with a hole
    scores[1, 12:16, 12:16] = 0.0
    scores[1, 40:42, 40:42] = 0.8  # a 4-px blob: below min_area
    scores[1, 30:40, 5:15] = 0.6  # a second component
    scores[0] = 0.7 * (scores[1] == 0)  # background everywhere else
    proposal = Proposal(("background", "cat", "dog"), scores)
    instances = proposal_to_instances(proposal, PostprocessConfig(min_area=0.002))
    assert [i.label for i in instances] == ["cat", "cat"] and instances[0].score == pytest.approx(
        0.8
    )
    assert instances[0].has_holes() and instances[0].area == 400 - 16
    merged = proposal_to_instances(proposal, PostprocessConfig(min_area=0.0, split="class"))
    assert len(merged) == 1 and merged[0].area == 400 - 16 + 4 + 100


def test_method_instances_resolve_overlaps_by_score():
    a = Instance(disc(40, 40, 15, 20, 10), "a", 0.9)
    b = Instance(disc(40, 40, 25, 20, 10), "b", 0.5)
    proposal = Proposal(("a", "b"), np.zeros((2, 40, 40), np.float32), instances=[b, a])
    kept = proposal_to_instances(proposal, PostprocessConfig(min_area=0.0))
    assert [i.label for i in kept] == ["a", "b"]
    assert np.array_equal(kept[0].mask, a.mask) and not (kept[1].mask & a.mask).any()


def _corner_touching_proposal(seed: int) -> Proposal:
    """(3, 60, 80) scores: "a" paints shapes whose pixels meet at corners, plus 3% specks;
    "b" a checkerboard patch (one 8-connected part); background wins everywhere else."""
    yy, xx = np.mgrid[:60, :80]
    a = (xx == yy + 2) & (yy < 20)  # diagonal chain
    a |= ((xx >= 30) & (xx < 40) & (yy >= 2) & (yy < 12)) | (
        (xx >= 40) & (xx < 52) & (yy >= 12) & (yy < 24)
    )  # squares touching at a corner
    a |= ((xx - 20 == yy - 44) | (xx - 20 == 44 - yy)) & (np.abs(yy - 44) <= 10)  # an X
    a ^= np.random.default_rng(seed).random((60, 80)) < 0.03
    b = ((xx + yy) % 2 == 0) & (xx >= 60) & (yy >= 30) & (yy < 50) & ~a
    scores = np.zeros((3, 60, 80), np.float32)
    scores[1][a], scores[2][b] = 0.9, 0.8
    scores[0] = 0.7 * ~(a | b)
    return Proposal(("background", "a", "b"), scores)


def _polygon_areas_px(results: list[dict]) -> list[float]:
    return [
        Polygon(
            np.array(r["value"]["points"]) * [r["original_width"] / 100, r["original_height"] / 100]
        ).area
        for r in results
    ]


@pytest.mark.parametrize("seed", range(3))
def test_instance_count_equals_polygon_region_count(seed):
    """The acceptance of issue 11: one polygon region per instance, none below --min-area."""
    config = PostprocessConfig(min_area=0.002)  # 9.6 -> 10 px of 60 x 80
    instances = proposal_to_instances(_corner_touching_proposal(seed), config)
    assert {i.label for i in instances} == {"a", "b"}
    assert len(instances_to_results(instances, "polygon")) == len(instances)
    results = instances_to_results(instances, "polygon", min_area_fraction=config.min_area)
    assert len(results) == len(instances)
    assert min(_polygon_areas_px(results)) >= config.min_area * 60 * 80


def test_class_split_polygon_parts_are_the_component_instances():
    """A whole-class instance keeps its specks as a brush; as polygons, --min-area drops them."""
    proposal = _corner_touching_proposal(0)
    parts = proposal_to_instances(proposal, PostprocessConfig(min_area=0.002))
    classes = proposal_to_instances(proposal, PostprocessConfig(min_area=0.002, split="class"))
    results = instances_to_results(classes, "polygon", min_area_fraction=0.002)
    assert len(classes) == 2 and len(results) == len(parts)
    assert min(_polygon_areas_px(results)) >= 0.002 * 60 * 80


def test_min_area_is_a_fraction_of_the_image_counted_in_pixels():
    from ovss_label.converters.instance import min_area_pixels

    assert min_area_pixels(0.001, 512, 512) == 263  # ceil(262.144)
    assert min_area_pixels(0.0057, 100, 100) == 57  # 57.00000000000001 in floats
    assert min_area_pixels(0.0, 10, 10) == 1  # an empty part is never an instance
    with pytest.raises(ValueError, match="fraction"):
        min_area_pixels(1.5, 10, 10)
    scores = np.zeros((1, 100, 100), np.float32)
    scores[0, 10, 10:67] = 0.9  # 57 px
    scores[0, 50, 10:66] = 0.9  # 56 px
    kept = proposal_to_instances(Proposal(("a",), scores), PostprocessConfig(min_area=0.0057))
    assert [i.area for i in kept] == [57]


def test_a_decoded_image_is_hashed_once_across_every_cache_of_a_composite(tmp_path, monkeypatch):
    """A cold naclip+sam prediction reads the image's hash in several caches (the composite's
    features, NACLIP's, SAM's, the refined maps): the pixels are hashed once."""
    import hashlib
    from types import SimpleNamespace

    from ovss_label.backend.proposers import cache as cache_module
    from ovss_label.images import load_rgb

    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    cache = FeatureCache()
    proposer = create_proposer("naclip+sam", tiny=True, background="none", feature_cache=cache)
    hashed = []

    def counting(data=b""):
        hashed.append(1)
        return hashlib.sha256(data)

    monkeypatch.setattr(cache_module, "hashlib", SimpleNamespace(sha256=counting))
    propose(proposer, image, Vocabulary.from_labels("cat, dog"), cache)
    assert len(hashed) == 1 and len(cache) >= 3  # one hash, several cache entries
    writable = np.array(image)  # a copy its owner may change: hashed every time it is asked
    cache_module.image_key(writable)
    cache_module.image_key(writable)
    assert len(hashed) == 3
    frozen = cache_module.freeze(writable)  # read-only in place: from now on hashed once
    assert frozen is writable and not writable.flags.writeable
    cache_module.image_key(frozen)
    cache_module.image_key(frozen)
    assert len(hashed) == 4
