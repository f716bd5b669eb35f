"""The disk cache of DINOv2 patch tokens: round trip in fp16, one forward per image, keys by
backbone and scale, atomic files, unreadable files recomputed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ovss_label.backend.models.dinov2 import (
    DINOV2_ARCHS,
    _create_dinov2,
    load_dinov2,
    meta_state_dict,
    patch_tokens,
)
from ovss_label.backend.training import features as features_module
from ovss_label.backend.training.features import FeatureStore, MissingFeaturesError


@pytest.fixture(scope="module")
def backbone():
    return load_dinov2("dinov2_vitl14", tiny=True)


@pytest.fixture()
def forwards(monkeypatch) -> list[int]:
    """Counts the backbone forwards the store runs."""
    calls: list[int] = []
    real = features_module.patch_tokens

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_module, "patch_tokens", counted)
    return calls


def _image(seed: int = 0, shape=(300, 500, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_round_trip_is_fp16_of_the_tokens_and_computed_once(tmp_path, backbone, forwards):
    store, image = FeatureStore(tmp_path), _image()
    first = store.get_or_compute(image, backbone, 448)
    expected = patch_tokens(backbone, image, 448).half().float()
    assert first.shape == (32, 53, 64) and first.dtype == torch.float32
    assert torch.equal(first, expected) and len(forwards) == 1
    again = store.get_or_compute(image.copy(), backbone, 448)  # same pixels, another array
    assert torch.equal(again, first) and len(forwards) == 1  # read, not recomputed
    key = store.key(image, backbone, 448)
    sha = hashlib.sha256(f"{image.shape}{image.dtype}".encode() + image.tobytes()).hexdigest()
    assert key == f"{backbone.backbone_fingerprint[:16]}/448/{sha}"
    path = tmp_path / backbone.backbone_fingerprint[:16] / "448" / f"{sha}.safetensors"
    assert store.path(key) == path and store.has(key) and torch.equal(store.load(key), first)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["shape"] == "32,53,64" and meta["image_size"] == "300,500"
    assert meta["backbone"] == DINOV2_ARCHS["dinov2_vitl14"].timm_name
    assert meta["fingerprint"] == backbone.backbone_fingerprint and meta["short_side"] == "448"
    assert path.stat().st_size < 2 * 32 * 53 * 64 + 1024  # fp16 tokens and a small header
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_backbone_and_short_side_are_part_of_the_key(tmp_path, backbone, forwards):
    store, image = FeatureStore(tmp_path), _image(1, (60, 80, 3))
    checkpoint = tmp_path / "other.pth"  # another twin's weights, from a file
    twin = _create_dinov2(DINOV2_ARCHS["dinov2_vitl14"], 9, tiny=True)
    torch.save(meta_state_dict(twin), checkpoint)
    others = [
        (backbone, 112),
        (load_dinov2("dinov2_vitl14", checkpoint=checkpoint, tiny=True), 56),
        (load_dinov2("dinov2_vitl14_reg4", tiny=True), 56),
    ]
    paths = {store.path(store.key(image, backbone, 56))}
    store.get_or_compute(image, backbone, 56)
    for loaded, short_side in others:
        tokens = store.get_or_compute(image, loaded, short_side)
        assert tokens.shape[0] == short_side // 14
        paths.add(store.path(store.key(image, loaded, short_side)))
    assert len(paths) == 4 and all(p.is_file() for p in paths) and len(forwards) == 4
    assert store.key(_image(2, (60, 80, 3)), backbone, 56) != store.key(image, backbone, 56)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_an_unreadable_file_is_missing_and_recomputed(tmp_path, backbone, forwards, damage):
    store, image = FeatureStore(tmp_path), _image(3, (70, 90, 3))
    first = store.get_or_compute(image, backbone, 112)
    key = store.key(image, backbone, 112)
    path = store.path(key)
    data = path.read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\0" * 999, "empty": b""}
    path.write_bytes(damaged[damage])
    assert not store.has(key)
    with pytest.raises(MissingFeaturesError):
        store.load(key)
    again = store.get_or_compute(image, backbone, 112)
    assert torch.equal(again, first) and len(forwards) == 2
    assert store.has(key) and torch.equal(store.load(key), first)  # a whole file again


def test_keys_are_checked_and_missing_keys_raise(tmp_path, backbone):
    store = FeatureStore(tmp_path)
    key = store.key(_image(4, (28, 28, 3)), backbone, 28)
    assert not store.has(key)
    with pytest.raises(MissingFeaturesError):
        store.load(key)
    for bad in ("../../etc/passwd", key + "/..", "0" * 16 + "/28/" + "x" * 64):
        with pytest.raises(ValueError, match="not a feature key"):
            store.path(bad)


def test_bound_store_is_the_training_sets_feature_builder(tmp_path, backbone, forwards):
    features = FeatureStore(tmp_path).bind(backbone, short_side=448)
    image = _image(5)
    assert features.grid(image) == (32, 53)
    key, grid = features.ensure(image)
    assert grid == (32, 53) and features.has(key) and len(forwards) == 1
    assert features.ensure(image) == (key, grid) and len(forwards) == 1
    assert features.load(key).shape == (32, 53, 64)
    assert features.backbone == f"dinov2_vitl14@{backbone.backbone_fingerprint[:16]}"
    assert features.short_side == 448
