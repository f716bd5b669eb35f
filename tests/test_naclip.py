"""NACLIP pieces, each against formulas written independently here (docs/algorithms.md §1, §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovss_label.backend.models.clip_text import TextEncoder
from ovss_label.backend.models.naclip_vit import (
    gaussian_omega,
    interpolate_pos_embed,
    naclip_tokens,
)
from ovss_label.backend.proposers.frames import Frames, sliding_windows
from ovss_label.backend.proposers.naclip import NaclipConfig, NaclipProposer
from ovss_label.ontologies import Vocabulary


def _omega_by_convolution(h: int, w: int, std: float) -> torch.Tensor:
    """The reference construction: a (2h-1, 2w-1) Gaussian window convolved with one-hot maps."""
    ks = [
        torch.linspace(-(n - 1) / 2, (n - 1) / 2, n) / (std * math.sqrt(2))
        for n in (2 * h - 1, 2 * w - 1)
    ]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    onehots = torch.eye(h * w).view(h * w, 1, h, w)
    out = F.conv2d(onehots, window[None, None], padding="same").view(h * w, h * w)
    return F.pad(out, (1, 0, 1, 0))


@pytest.mark.parametrize(("h", "w"), [(5, 7), (14, 14), (3, 1)])
def test_omega_is_the_unnormalised_gaussian_with_zero_cls(h, w):
    omega = gaussian_omega(h, w, 5.0)
    torch.testing.assert_close(omega, _omega_by_convolution(h, w, 5.0), atol=1e-6, rtol=0)
    assert omega[0].abs().sum() == 0 and omega[:, 0].abs().sum() == 0
    assert torch.allclose(omega[1:, 1:].diagonal(), torch.ones(h * w))  # peak 1, not normalised
    # Patch (0, 0) to patch (0, 1): distance 1 -> exp(-1 / 50).
    if w > 1:
        assert math.isclose(float(omega[1, 2]), math.exp(-1 / 50), rel_tol=1e-6)


def test_position_embedding_interpolation_uses_the_plus_point_one_scale():
    pos = torch.randn(1 + 14 * 14, 8)
    out = interpolate_pos_embed(pos, 21, 28)
    grid = pos[1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(
        grid, scale_factor=(21.1 / 14, 28.1 / 14), mode="bicubic", recompute_scale_factor=False
    )
    assert torch.equal(out[1:], expected.permute(0, 2, 3, 1).reshape(-1, 8))
    assert torch.equal(out[0], pos[0])
    by_size = F.interpolate(grid, size=(21, 28), mode="bicubic").permute(0, 2, 3, 1).reshape(-1, 8)
    assert not torch.allclose(out[1:], by_size)  # why the exact call matters (check E3)
    assert interpolate_pos_embed(pos, 7, 28) is pos  # same token count: the reference keeps it


def test_neighbour_aware_tower_recomputed_by_hand(tiny_clip):
    visual = tiny_clip.model.visual
    images = torch.randn(2, 3, 48, 64)
    ours = naclip_tokens(visual, images, std=5.0)
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1)
        x = visual.ln_pre(x + interpolate_pos_embed(visual.positional_embedding, 3, 4))
        x = visual.transformer.resblocks[0](x)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(x)
        w, b = last.attn.in_proj_weight, last.attn.in_proj_bias
        k = y @ w[64:128].T + b[64:128]
        v = y @ w[128:].T + b[128:]
        omega = _omega_by_convolution(3, 4, 5.0)
        attn = torch.softmax(k @ k.transpose(1, 2) / 8.0 + omega, dim=-1)  # 1 head of 64
        out = last.attn.out_proj(attn @ v)  # no residual, no FFN
        expected = visual.ln_post(out) @ visual.proj
    assert ours.shape == (2, 13, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_sliding_windows_tile_like_mmseg():
    boxes = sliding_windows(336, 500, 224, 112)
    assert len(boxes) == 2 * 4
    cover = np.zeros((336, 500), int)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (224, 224)
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1 and boxes[-1] == (112, 336, 276, 500)  # last one shifted inside
    assert sliding_windows(336, 448, 0, 112) == [(0, 336, 0, 448)]
    assert sliding_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]


def test_frames_follow_mmseg_resize():
    assert Frames.for_image((480, 640), 336).network == (336, 448)
    assert Frames.for_image((375, 500), 336).network == (336, 448)
    tall = Frames.for_image((100, 3000), 336)
    assert tall.network == (68, 2048)  # long side capped at 2048
    big = Frames.for_image((3000, 4000), 336, max_side=2048)
    assert big.work == (1536, 2048) and big.original == (3000, 4000)


@pytest.fixture(scope="module")
def proposer(tiny_clip):
    config = NaclipConfig(background="none", slide_crop=32, slide_stride=16, short_side=48)
    return NaclipProposer(tiny_clip, config, TextEncoder(tiny_clip))


def _image(h=60, w=90, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_proposal_contract(proposer):
    vocab = Vocabulary(("cat", "person"), (("cat",), ("person", "person in shirt")))
    image = _image()
    proposal = proposer.score(proposer.encode(image), vocab)
    assert proposal.scores.shape == (2, 60, 90) and proposal.scores.dtype == np.float32
    assert proposal.scores.min() >= 0 and proposal.scores.max() <= 1
    np.testing.assert_allclose(proposal.scores.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(proposal.assignment, proposal.scores.argmax(0))
    again = proposer.score(proposer.encode(image), vocab)
    np.testing.assert_array_equal(proposal.scores, again.scores)  # deterministic


def test_postprocess_takes_synonym_max_then_threshold_then_renormalises(proposer):
    # Two classes, the second with two synonyms; logits chosen by hand at 2 pixels.
    logits = torch.tensor([[0.30, 0.10], [0.20, 0.10], [0.25, 0.10]]).view(3, 1, 2)
    probs, pred = proposer._postprocess(logits, [0, 1, 1], prob_thd=0.5, bg=-1)
    soft = torch.softmax(logits * 40, dim=0)
    per_class = torch.stack([soft[0], torch.maximum(soft[1], soft[2])])
    torch.testing.assert_close(probs, per_class / per_class.sum(0))
    # pixel 0: class 0 wins with p > 0.5; pixel 1: all equal (1/3 < 0.5) -> no class.
    assert pred.flatten().tolist() == [0, -1]


def test_cached_features_serve_any_vocabulary(proposer):
    image = _image(seed=3)
    features = proposer.encode(image)
    for vocab in (Vocabulary.from_labels("a, b, c"), Vocabulary.from_labels("dog")):
        fresh = proposer.score(proposer.encode(image), vocab)
        np.testing.assert_array_equal(proposer.score(features, vocab).scores, fresh.scores)


def test_window_batching_does_not_change_results(tiny_clip, proposer):
    single = NaclipProposer(
        tiny_clip, NaclipConfig(**{**proposer.config.__dict__, "window_batch": 1}), proposer.text
    )
    image, vocab = _image(seed=4), Vocabulary.from_labels("a, b")
    a = proposer.score(proposer.encode(image), vocab).scores
    b = single.score(single.encode(image), vocab).scores
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_auto_background_is_hidden_and_unlabels_pixels(tiny_clip):
    config = NaclipConfig(slide_crop=32, slide_stride=16, short_side=48)
    auto = NaclipProposer(tiny_clip, config, TextEncoder(tiny_clip))
    vocab = Vocabulary.from_labels("cat, sky")  # 'sky' is a label, so not a background query
    extended, hidden = auto._with_background(vocab)
    assert hidden and extended.names[0] == "background" and "sky" not in extended.synonyms[0]
    assert len(extended.synonyms[0]) == 25
    proposal = auto.score(auto.encode(_image(seed=5)), vocab)
    assert proposal.scores.shape[0] == 2 and proposal.assignment.min() >= -1
    assert auto._threshold(0) == 0.1 and auto._threshold(-1) == 0.0


def test_bad_images_are_refused_with_the_reason(proposer):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        proposer.encode(np.zeros((10, 10), np.uint8))


def test_too_elongated_images_fail_with_a_reason(proposer):
    with pytest.raises(ValueError, match="too elongated"):
        proposer.encode(np.zeros((2, 400, 3), np.uint8))


def test_unwritable_text_cache_degrades_to_no_cache(tiny_clip, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    encoder = TextEncoder(tiny_clip, cache=blocker)
    assert encoder.cache is None
    assert encoder.prompt_embeddings(["a photo of a cat."]).shape == (1, 32)


@pytest.mark.gpu
def test_gpu_scores_match_cpu(tiny_checkpoints):
    from ovss_label.backend.proposers import create_proposer

    options = {
        "checkpoint": tiny_checkpoints["openai"],
        "background": "none",
        "model": "clip_vit_b16",
    }
    cpu = create_proposer("naclip", tiny=True, device="cpu", **options)
    gpu = create_proposer("naclip", tiny=True, device="cuda", **options)
    image, vocab = _image(seed=6), Vocabulary.from_labels("a, b")
    np.testing.assert_allclose(
        gpu.score(gpu.encode(image), vocab).scores,
        cpu.score(cpu.encode(image), vocab).scores,
        atol=1e-4,
    )


def test_refined_query_maps_are_reused_across_vocabularies(tiny_clip, proposer, monkeypatch):
    from ovss_label.backend.proposers import FeatureCache
    from ovss_label.backend.proposers import naclip as naclip_module

    cached = NaclipProposer(tiny_clip, proposer.config, proposer.text, FeatureCache(1 << 30))
    refined: list[int] = []
    real = naclip_module.pamr_propagate

    def counting(affinity, logits, *args):
        refined.append(logits.shape[0])
        return real(affinity, logits, *args)

    monkeypatch.setattr(naclip_module, "pamr_propagate", counting)
    image = _image(seed=7)
    features = cached.encode(image)
    first = Vocabulary(("cat", "person"), (("cat",), ("person", "person in shirt")))
    cached.score(features, first)
    second = Vocabulary(("person", "dog"), (("person", "person in shirt"), ("dog",)))
    result = cached.score(features, second)
    assert refined == [3, 1]  # the second vocabulary refines only "dog"
    fresh = proposer.score(proposer.encode(image), second)  # no map cache
    np.testing.assert_allclose(result.scores, fresh.scores, atol=1e-6)
    np.testing.assert_array_equal(result.assignment, fresh.assignment)


def test_one_proposer_serves_threads(proposer):
    from concurrent.futures import ThreadPoolExecutor

    images = [_image(seed=s) for s in range(4)]
    vocab = Vocabulary.from_labels("a, b, c")
    serial = [proposer.score(proposer.encode(img), vocab).scores for img in images]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(
            pool.map(lambda img: proposer.score(proposer.encode(img), vocab).scores, images * 2)
        )
    for i, scores in enumerate(parallel):
        np.testing.assert_array_equal(scores, serial[i % 4])


def test_window_logits_are_upsampled_bilinearly_and_averaged_where_windows_overlap(proposer):
    """mmseg's ``slide_inference`` (docs/algorithms.md §1.6) written out: each window's patch
    logits, bilinear with half-pixel centres to the window's pixels, summed over the windows
    that cover a pixel and divided by their number."""
    features = proposer.encode(_image())
    network = features.meta["frames"].network
    boxes = features.meta["boxes"]
    assert len(boxes) > 2 and boxes[0][3] > boxes[1][2]  # the windows overlap
    text = F.normalize(torch.randn(3, features.tensors["feats_0"].shape[-1]), dim=-1)
    total, count = torch.zeros(3, *network), torch.zeros(1, *network)
    for i, (y1, y2, x1, x2) in enumerate(boxes):
        patch_logits = torch.einsum("hwd,qd->qhw", features.tensors[f"feats_{i}"], text)
        total[:, y1:y2, x1:x2] += F.interpolate(
            patch_logits[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
        )[0]
        count[:, y1:y2, x1:x2] += 1
    expected = total / count
    torch.testing.assert_close(proposer._slide_logits(features, text, network), expected)


def test_pamr_runs_with_the_configs_steps_and_dilations(tiny_clip, monkeypatch):
    from ovss_label.backend.proposers import naclip as naclip_module

    config = NaclipConfig(background="none", slide_crop=32, slide_stride=16, short_side=48,
                          pamr_steps=3, pamr_dilations=(1, 4))  # fmt: skip
    proposer = NaclipProposer(tiny_clip, config, TextEncoder(tiny_clip))
    calls = []
    real = naclip_module.pamr_propagate
    monkeypatch.setattr(naclip_module, "pamr_propagate",
                        lambda *args: calls.append(args[2:]) or real(*args))  # fmt: skip
    proposer.score(proposer.encode(_image()), Vocabulary.from_labels("cat, dog"))
    assert calls == [((1, 4), 3)]


def test_features_without_an_image_key_never_share_refined_maps(tiny_clip, proposer):
    from dataclasses import replace

    from ovss_label.backend.proposers import FeatureCache

    cache = FeatureCache(1 << 30)
    cached = NaclipProposer(tiny_clip, proposer.config, proposer.text, cache)
    vocab = Vocabulary.from_labels("cat, dog")
    first, second = (replace(cached.encode(_image(seed=s)), key="") for s in (1, 2))
    cached.score(first, vocab)
    assert len(cache) == 0  # nothing to file the maps under
    result = cached.score(second, vocab)
    np.testing.assert_array_equal(result.scores, proposer.score(second, vocab).scores)


def test_network_input_is_mmsegs_normalisation_of_the_resized_image(proposer, monkeypatch):
    """NACLIP's ``data_preprocessor``: (pixel - mean) / std per RGB channel, mmseg's CLIP
    values, on the image resized to the network frame."""
    from ovss_label.backend.proposers import naclip as naclip_module

    assert naclip_module.PIXEL_MEAN == (122.771, 116.746, 104.094)
    assert naclip_module.PIXEL_STD == (68.501, 66.632, 70.323)
    seen = []
    real = NaclipProposer._window_features

    def recording(self, net, boxes):
        seen.append(net)
        return real(self, net, boxes)

    monkeypatch.setattr(NaclipProposer, "_window_features", recording)
    image = _image()
    features = proposer.encode(image)
    resized = torch.from_numpy(features.meta["frames"].to_network(image)).permute(2, 0, 1)
    mean = torch.tensor([122.771, 116.746, 104.094])[:, None, None]
    std = torch.tensor([68.501, 66.632, 70.323])[:, None, None]
    torch.testing.assert_close(seen[0], (resized.float() - mean) / std)


def test_labels_decided_in_a_smaller_work_frame_are_resized_nearest(tiny_clip, monkeypatch):
    config = NaclipConfig(background="none", slide_crop=32, slide_stride=16, short_side=48,
                          max_side=40)  # fmt: skip
    proposer = NaclipProposer(tiny_clip, config, TextEncoder(tiny_clip))
    decided = []
    real = NaclipProposer._postprocess
    monkeypatch.setattr(NaclipProposer, "_postprocess",
                        lambda *a: decided.append(real(*a)) or decided[-1])  # fmt: skip
    proposal = proposer.score(proposer.encode(_image(60, 90)), Vocabulary.from_labels("cat, dog"))
    work_labels = decided[0][1]
    assert tuple(work_labels.shape) != (60, 90) and proposal.assignment.shape == (60, 90)
    expected = F.interpolate(work_labels[None, None].float(), size=(60, 90), mode="nearest")
    np.testing.assert_array_equal(proposal.assignment, expected[0, 0].long().numpy())


def test_postprocess_threshold_is_strict_and_the_background_index(proposer):
    from ovss_label.backend.proposers.naclip import _background_index

    assert _background_index(Vocabulary.from_labels("cat, dog")) == -1
    assert _background_index(Vocabulary.from_labels("cat, background, dog")) == 1
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3))
    probs, _ = proposer._postprocess(logits, [0, 1, 2], 0.0, 0)
    best = probs.max(dim=0).values
    _, pred = proposer._postprocess(logits, [0, 1, 2], float(best[0, 0]), 0)
    assert pred[0, 0] == probs[:, 0, 0].argmax()  # exactly at the threshold: kept
    assert (pred[best < best[0, 0]] == 0).all()  # below it: background


def test_query_features_are_computed_once_per_vocabulary(tiny_clip):
    config = NaclipConfig(background="none", slide_crop=32, slide_stride=16, short_side=48)
    text = TextEncoder(tiny_clip)
    calls = []
    real = text.query_features
    text.query_features = lambda vocab: calls.append(vocab) or real(vocab)  # type: ignore[method-assign]
    proposer = NaclipProposer(tiny_clip, config, text)
    features = proposer.encode(_image())
    for labels in ("cat, dog", "cup", "cat, dog"):
        proposer.score(features, Vocabulary.from_labels(labels))
    assert [v.names for v in calls] == [("cat", "dog"), ("cup",)]


def test_frames_resize_with_half_pixel_centres_and_cap_the_work_frame_at_2048():
    frames = Frames.for_image((1, 4), short_side=1)
    assert frames.original == (1, 4)
    two = torch.tensor([[[0.0, 1.0]]])  # (1, 1, 2) maps -> 4 columns: mmseg's resize
    torch.testing.assert_close(frames.to_original(two), torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))
    assert Frames.for_image((10, 2048), 336).work == (10, 2048)  # at the cap: unchanged
    assert Frames.for_image((10, 2049), 336).work[1] == 2048  # over it: scaled down


def test_window_features_are_unit_patch_tokens_on_the_windows_grid(proposer):
    """Each window's features: NACLIP's tokens without CLS, unit length per patch, laid out on
    that window's (rows, cols) patch grid; a non-square window (crop 0 on a wide image, VOC's
    configs) keeps its own grid."""
    c, patch = proposer.config, proposer.clip.patch_size
    net = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(5))
    boxes = [(0, 32, 0, 64), (0, 32, 0, 32), (0, 32, 32, 64)]
    got = proposer._window_features(net, boxes)
    for (y1, y2, x1, x2), feats in zip(boxes, got, strict=True):
        tokens = naclip_tokens(proposer.clip.model.visual, net[None, :, y1:y2, x1:x2],
                               c.gaussian_std, c.arch)[0, 1:]  # fmt: skip
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        expected = unit.reshape((y2 - y1) // patch, (x2 - x1) // patch, -1)
        torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
