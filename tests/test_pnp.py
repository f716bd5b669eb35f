"""PnP-OVSS pieces: ITM GradCAM on a tiny BLIP, word pieces, Salience DropOut, thresholds, blur."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from ovss_label.backend.models.blip import build_tiny_blip, encode_caption, itm_gradcam
from ovss_label.backend.proposers import pnp

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "cat", "dog",
         "potted", "##plant", "tv", "##monitor", "chest", "##of", "##drawers",
         "[DEC]", "[ENC]"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizer(
        str(vocab), do_lower_case=True, additional_special_tokens=["[DEC]", "[ENC]"]
    )


@pytest.fixture(scope="module")
def blip():
    return build_tiny_blip(len(VOCAB))


CAPTION = "A picture of pottedplant tvmonitor chestofdrawers cat"


def test_caption_starts_with_enc_and_splits_into_word_pieces(tokenizer):
    ids, mask = encode_caption(tokenizer, CAPTION)
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[0] == "[ENC]" and tokens[-1] == "[SEP]" and mask.sum() == len(tokens)
    assert tokens[4:11] == ["potted", "##plant", "tv", "##monitor", "chest", "##of", "##drawers"]


def test_gradcam_from_autograd_equals_hook_and_backward(blip, tokenizer):
    ids, mask = encode_caption(tokenizer, CAPTION)
    pixels = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ours = itm_gradcam(blip, pixels, ids, mask, layer=7)
    # LAVIS style: keep the attention probabilities of layer 7 and their gradient from a hook.
    saved = {}

    def keep(module, args, output):
        probs = output[1]
        saved["probs"] = probs
        probs.register_hook(lambda grad: saved.__setitem__("grad", grad))

    handle = blip.text_encoder.encoder.layer[7].crossattention.self.register_forward_hook(keep)
    try:
        image = blip.vision_model(
            pixels.requires_grad_(True), interpolate_pos_encoding=True
        ).last_hidden_state
        ones = torch.ones(image.shape[:2], dtype=torch.long)
        out = blip.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                                encoder_attention_mask=ones, output_attentions=True,
                                return_dict=True)  # fmt: skip
        logit = blip.itm_head(out.last_hidden_state[:, 0])[:, 1]
        logit.sum().backward()
    finally:
        handle.remove()
    cam = (saved["probs"][..., 1:] * saved["grad"][..., 1:].clamp(min=0)).detach()
    cam = cam.reshape(1, 12, ids.shape[1], 3, 3).clamp(min=0)
    assert ours.maps.shape == (1, 12, ids.shape[1], 3, 3)  # 48 px input: 3 x 3 patches
    torch.testing.assert_close(ours.maps, cam)
    torch.testing.assert_close(ours.match_logit, logit.detach())


def test_word_pieces_merge_into_class_maps(tokenizer):
    ids, _ = encode_caption(tokenizer, CAPTION)
    tokens = tokenizer.convert_ids_to_tokens(ids[0])[1:]  # [ENC] dropped, as the reference
    maps = torch.arange(len(tokens), dtype=torch.float32)[:, None, None].expand(-1, 2, 2)
    classes = pnp.class_token_maps(tokens, maps)
    # rows: a=0 picture=1 of=2 potted=3 ##plant=4 tv=5 ##monitor=6 chest=7 ##of=8 ##drawers=9 cat=10
    assert classes[:, 0, 0].tolist() == [3.5, 5.5, 8.0, 10.0]
    last_two_pieces = [*tokens[:-1], "##x", "[SEP]"]  # the last class is cat + ##x (rows 10, 11)
    rows = torch.arange(len(last_two_pieces), dtype=torch.float32)[:, None, None].expand(-1, 2, 2)
    quirk = pnp.class_token_maps(last_two_pieces, rows, last_class_sum=True)
    fixed = pnp.class_token_maps(last_two_pieces, rows)
    assert quirk[-1, 0, 0] == 10 + 11 and fixed[-1, 0, 0] == 10.5
    assert torch.equal(quirk[:-1], fixed[:-1])  # only the last class differs
    # Tokens without [SEP] (not cut by the tokenizer): every row after the prefix is a class.
    no_end = pnp.class_token_maps(tokens[:-1], maps[:-1])
    torch.testing.assert_close(no_end, classes)


def test_salience_dropout_bookkeeping_both_rules():
    u = np.arange(25, dtype=float).reshape(5, 5)  # patch p has salience p
    first = pnp.drop_step(u, [], "topk", k=10)
    assert sorted(first) == list(range(15, 25))
    second = pnp.drop_step(u, first, "topk", k=10)  # dropped ones count as 0
    assert sorted(second) == list(range(5, 25))
    median = pnp.drop_step(u, [], "median")
    assert sorted(median) == list(range(12, 25))  # U >= median(0..24) = 12
    again = pnp.drop_step(u, median, "median")
    assert sorted(again) == list(range(6, 25))  # remaining 0..11: median 5.5
    with pytest.raises(ValueError, match="rule must be"):
        pnp.drop_step(u, [], "half")
    assert pnp.drop_step(u, []) == first  # the defaults: the updated code's top 10


def test_salience_dropout_counts_dropped_patches_as_zero_and_breaks_ties_by_index():
    # Fewer than k patches left above zero: dropped ones (salience 0) fill up the top k.
    u = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert pnp.drop_step(u, [4, 3], "topk", k=4) == [4, 3, 0, 1, 2]
    # Equal salience: the later index ranks higher (stable sort), whatever the array size.
    assert pnp.drop_step(np.zeros(1000), [], "topk", k=3) == [997, 998, 999]


def test_dropped_patches_are_zeroed_in_input_and_later_maps():
    pixels = torch.ones(1, 3, 48, 48)
    zeroed = pnp.zero_patches(pixels, [4, 2], grid=3)  # (1, 1) and (0, 2)
    assert (
        zeroed[0, :, 16:32, 16:32].abs().sum() == 0 and zeroed[0, :, 0:16, 32:48].abs().sum() == 0
    )
    assert zeroed.sum() == 3 * (48 * 48 - 2 * 256) and pixels.sum() == 3 * 48 * 48
    maps = torch.ones(2, 3, 3)
    masked = pnp.mask_dropped(maps, [4, 2])
    assert masked[:, 1, 1].sum() == 0 and masked[:, 0, 2].sum() == 0 and masked.sum() == 14


def test_rounds_aggregate_with_the_first_counted_twice():
    rounds = [torch.full((2, 2), v) for v in (1.0, 10.0, 100.0)]
    assert pnp.aggregate(rounds)[0, 0] == 1 + 1 + 10 + 100
    assert pnp.aggregate(rounds, first_twice=False)[0, 0] == 111


def test_thresholds_keep_raw_values_per_class():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 10.0]], [[5.0, 5.0], [5.0, 5.0]]])
    kept = pnp.threshold_maps(maps, threshold=0.15)  # class 0: keep >= 1.5
    assert kept[0].tolist() == [[0.0, 0.0], [2.0, 10.0]]
    assert kept[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]  # constant: normalises to 0, no NaN
    torch.testing.assert_close(pnp.threshold_maps(maps), kept)  # the reference's 0.15


def test_thresholds_are_min_max_normalised_and_inclusive():
    # Normalised: (x - min) / (max - min) = [0, .25, .5, 1] in both classes (spans 4 and 0.5).
    maps = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[0.0, 0.125], [0.25, 0.5]]])
    kept = pnp.threshold_maps(maps, threshold=0.5)
    assert kept.tolist() == [[[0.0, 0.0], [3.0, 5.0]], [[0.0, 0.0], [0.25, 0.5]]]


def test_background_channel_rule():
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 0] = 1
    with_bg, added = pnp.with_background(maps, always=True)
    assert added and with_bg[0].tolist() == [[0, 1], [1, 1]]
    five = np.zeros((5, 2, 2))
    assert pnp.with_background(five, always=False)[1] is False  # 5 classes: no background
    assert pnp.with_background(maps, always=False)[1] is True  # fewer than 3 classes
    assert pnp.with_background(np.zeros((3, 2, 2)), always=False)[1] is False  # 3: none
    single = pnp.with_background(maps.astype(np.float32), always=True)[0]
    assert single.dtype == np.float32  # the maps' dtype, not float64


def test_blur_equals_scipy_with_the_papers_sigma():
    rng = np.random.default_rng(0)
    maps = rng.random((2, 30, 40))
    maps[1] = 0  # an all-zero channel: 0, not NaN
    out = pnp.blur_maps(maps, 0.05)
    direct = gaussian_filter(maps[0], sigma=0.05 * 40)
    np.testing.assert_allclose(out[0], (direct - direct.min()) / (direct.max() - direct.min()))
    assert np.all(out[1] == 0)


def test_lavis_conventions_on_a_loaded_model(tmp_path):
    from transformers import BertTokenizer

    from ovss_label.backend.models.blip_loader import LAVIS_VISION_LN_EPS, _lavis_conventions

    model = build_tiny_blip(len(VOCAB))
    assert model.config.vision_config.layer_norm_eps == 1e-5  # HF's default
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB[:-1]) + "\n")  # no [ENC] in it
    plain = BertTokenizer(str(tmp_path / "vocab.txt"))
    _lavis_conventions(model, plain, lavis_ln_eps=True)
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == LAVIS_VISION_LN_EPS for m in norms)
    assert plain.convert_tokens_to_ids("[ENC]") == VOCAB.index("[ENC]")


def test_pnp_proposer_contract_and_blur_only_fallback(monkeypatch, caplog):
    from ovss_label.backend.proposers import create_proposer, pnp_ovss
    from ovss_label.ontologies import Vocabulary

    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    vocab = Vocabulary.from_labels("cat, potted plant, tv")
    features = proposer.encode(image)
    assert features.tensors["pixels"].shape == (1, 3, 64, 64)

    def no_crf(*args, **kwargs):
        raise ImportError("pydensecrf")

    monkeypatch.setattr(pnp_ovss, "dense_crf", no_crf)
    monkeypatch.setattr(pnp_ovss, "_CRF_WARNED", [])
    caplog.set_level("WARNING")
    proposal = proposer.score(features, vocab)
    assert "pydensecrf2 is not installed" in caplog.text
    assert proposal.scores.shape == (3, 40, 70) and proposal.scores.dtype == np.float32
    assert proposal.scores.min() >= 0 and proposal.scores.max() <= 1
    assert proposal.assignment.shape == (40, 70) and proposal.assignment.min() >= -1
    again = proposer.score(features, vocab)
    np.testing.assert_array_equal(proposal.scores, again.scores)


def _direct_crf(image, channels):
    """Labels of a dense CRF called on pydensecrf directly, with CutLER's constants (the
    reference's ``densecrf``): the oracle for ``pnp_ovss.dense_crf``."""
    densecrf = pytest.importorskip("pydensecrf.densecrf")
    from pydensecrf.utils import unary_from_softmax

    c, h, w = channels.shape
    probs = torch.softmax(torch.from_numpy(channels).float(), dim=0).numpy()
    crf = densecrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(unary_from_softmax(probs))
    crf.addPairwiseGaussian(sxy=3, compat=7)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=image, compat=10)
    return np.array(crf.inference(10)).reshape(c, h, w).argmax(axis=0)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_dense_crf_uses_cutlers_constants(seed):
    """Seeds 0 and 3 are inputs where a bilateral ``sxy`` of 51 or 11 mean-field iterations
    would change a pixel's label (every other constant changes several)."""
    from ovss_label.backend.proposers.pnp_ovss import dense_crf

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    channels = rng.random((3, 20, 30))
    np.testing.assert_array_equal(dense_crf(image, channels), _direct_crf(image, channels))


def test_clip_presence_filter_on_hand_made_embeddings():
    from ovss_label.backend.proposers.presence import ClipPresence
    from ovss_label.ontologies import Vocabulary

    class FixedText:  # text features along the axes: class k (its synonyms) -> axis k
        def query_features(self, vocab):
            return torch.eye(4)[[0, 1, 2, 3]], [0, 0, 1, 2]

    presence = ClipPresence(clip=None, text=FixedText())  # type: ignore[arg-type]
    vocab = Vocabulary(("cat", "dog", "cup"), (("cat", "kitten"), ("dog",), ("cup",)))
    image = torch.nn.functional.normalize(torch.tensor([0.1, 0.9, 0.3, 0.0]), dim=0)
    probs = presence.probabilities(image, vocab)  # cat = max(cat, kitten) = the 2nd axis
    assert probs.argmax() == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    assert presence.present(image, vocab, top_k=1).tolist() == [True, False, False]
    assert presence.present(image, vocab, top_k=2).tolist() == [True, True, False]  # dog > cup
    assert presence.present(image, vocab, threshold=0.99).tolist() == [True, False, False]


def test_pnp_with_clip_presence_scores_absent_labels_zero(monkeypatch):
    from ovss_label.backend.proposers import create_proposer
    from ovss_label.backend.proposers.presence import ClipPresence
    from ovss_label.ontologies import Vocabulary

    monkeypatch.setattr(
        ClipPresence, "present", lambda self, e, v, k, t: np.array([True, False, True])
    )
    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, presence="clip", crf=False)
    image = np.random.default_rng(2).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    proposal = proposer.score(proposer.encode(image), Vocabulary.from_labels("cat, dog, cup"))
    assert proposal.scores.shape == (3, 40, 70)
    assert not (proposal.assignment == 1).any()  # "dog" was filtered out


def _two_of_five():
    """Hand-made caption maps: labels 1 and 3 of 5 in the caption, each bright on one side of
    a 24 x 36 image, both zero in the middle band."""
    maps = torch.zeros(2, 6, 9)
    maps[0, :, :3] = torch.linspace(1.0, 2.0, 18).reshape(6, 3)
    maps[1, :, 6:] = torch.linspace(2.0, 1.0, 18).reshape(6, 3)
    image = np.random.default_rng(3).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    return maps, np.array([1, 3]), image


def test_background_and_decision_run_over_the_caption_classes_only():
    from ovss_label.backend.proposers.pnp_ovss import PnpConfig, decide_on_caption

    maps, caption, image = _two_of_five()
    argmax = lambda image, channels: channels.argmax(axis=0)  # noqa: E731
    config = PnpConfig(always_background=False, crf=False)
    scores, assignment = decide_on_caption(maps, caption, 5, image, config, argmax)
    # Two caption classes (< 3): the reference adds the background channel; the vocabulary's
    # five labels would not have.
    assert set(np.unique(assignment)) == {-1, 1, 3}
    assert (assignment[:, 15:21] == -1).all()  # the band where both maps are zero
    assert scores.shape == (5, 24, 36) and scores.dtype == np.float32
    assert not scores[[0, 2, 4]].any() and scores[[1, 3]].max() == 1.0


@pytest.mark.parametrize("always_background", [True, False])
def test_three_caption_classes_get_background_only_when_always(always_background):
    """The steps written out: threshold, bilinear (corners aligned) to the image, the background
    channel (always, or with fewer than 3 caption classes), blur with the config's σ, argmax,
    then caption order -> vocabulary index (int16, -1 background)."""
    from ovss_label.backend.proposers import pnp
    from ovss_label.backend.proposers.pnp_ovss import PnpConfig, decide_on_caption

    maps, _, image = _two_of_five()
    maps = torch.cat([maps, torch.zeros(1, 6, 9)])
    maps[2, :3, 3:6] = 3.0  # a third class in the top of the middle band
    caption = np.array([4, 1, 3])
    config = PnpConfig(always_background=always_background, crf=False, blur_sigma=0.1)
    argmax = lambda image, channels: channels.argmax(axis=0)  # noqa: E731
    scores, assignment = decide_on_caption(maps, caption, 5, image, config, argmax)

    full = torch.nn.functional.interpolate(
        pnp.threshold_maps(maps, config.threshold)[None], size=(24, 36), mode="bilinear",
        align_corners=True,
    )[0].numpy()  # fmt: skip
    if always_background:
        full = np.concatenate([(full.max(axis=0) == 0)[None].astype(full.dtype), full])
    channels = pnp.blur_maps(full, 0.1)
    to_vocabulary = np.array([-1, 4, 1, 3] if always_background else [4, 1, 3])
    np.testing.assert_array_equal(assignment, to_vocabulary[channels.argmax(axis=0)])
    assert assignment.dtype == np.int16
    assert (assignment == -1).any() == always_background
    np.testing.assert_allclose(scores[[4, 1, 3]], channels[-3:], atol=1e-6)
    assert not scores[[0, 2]].any()


def test_the_crf_sees_the_background_and_caption_channels_only():
    pytest.importorskip("pydensecrf.densecrf")
    from ovss_label.backend.proposers import pnp
    from ovss_label.backend.proposers.pnp_ovss import PnpConfig, decide_on_caption, dense_crf

    maps, caption, image = _two_of_five()
    config = PnpConfig(always_background=False)
    _, assignment = decide_on_caption(maps, caption, 5, image, config, dense_crf)
    # The reference's unary: [background, caption classes], from the same maps, by pydensecrf.
    full = torch.nn.functional.interpolate(
        pnp.threshold_maps(maps, config.threshold)[None], size=(24, 36), mode="bilinear",
        align_corners=True,
    )[0].numpy()  # fmt: skip
    channels = pnp.blur_maps(np.concatenate([(full.max(axis=0) == 0)[None], full]))
    assert channels.shape[0] == 3
    expected = _direct_crf(image, channels)
    np.testing.assert_array_equal(assignment, np.array([-1, 1, 3])[expected])


REFERENCE_DEFAULTS = {
    "image_size": 336, "layer": 7, "head": 9, "rounds": 4, "drop_rule": "topk", "drop_k": 10,
    "first_twice": True, "threshold": 0.15, "blur_sigma": 0.05, "always_background": True,
    "last_class_sum": False, "crf": True, "presence": "all", "presence_top_k": 0,
    "presence_threshold": 0.0,
}  # fmt: skip
"""PnpConfig's defaults: the reference README run and the paper's Table 2, number for number."""


def test_real_defaults_stay_the_references_and_only_the_tiny_twin_gets_its_settings(monkeypatch):
    from dataclasses import asdict

    from ovss_label.backend.models.blip import TINY_PNP_SETTINGS
    from ovss_label.backend.models.blip_loader import LoadedBlip
    from ovss_label.backend.proposers import create_proposer, pnp_ovss

    assert asdict(pnp_ovss.PnpConfig()) == REFERENCE_DEFAULTS
    monkeypatch.delenv("OVSS_PNP_TUNED", raising=False)
    # A stand-in for the real BLIP (no weights offline): what the factory configures is tested.
    from ovss_label.backend.models import pool

    real = LoadedBlip(build_tiny_blip(len(VOCAB)), None, "blip_itm_large_flickr", False)
    monkeypatch.setattr(pool, "_build", lambda ref, device: real)
    monkeypatch.setattr(pool.WeightRef, "fingerprint", lambda self: "stand-in")
    assert asdict(create_proposer("pnp_ovss", tiny=False).config) == REFERENCE_DEFAULTS
    assert (
        asdict(
            create_proposer(
                "pnp_ovss",
            ).config
        )
        == REFERENCE_DEFAULTS
    )  # OVSS_TINY unset
    tiny = create_proposer("pnp_ovss", tiny=True).config
    assert asdict(tiny) == {**REFERENCE_DEFAULTS, **TINY_PNP_SETTINGS}
    assert tiny.layer != REFERENCE_DEFAULTS["layer"]  # the twin's last layer has no gradient
    assert create_proposer("pnp_ovss", tiny=True, threshold=0.3).config.threshold == 0.3


def test_blips_input_is_a_bicubic_square_normalised_with_clips_statistics():
    """LAVIS's ``BlipImageEvalProcessor``: resize to (size, size) bicubic, ToTensor, Normalize
    with mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711)."""
    from PIL import Image

    from ovss_label.backend.proposers.pnp_ovss import square_pixels

    image = np.random.default_rng(4).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    square = np.asarray(Image.fromarray(image).resize((16, 16), Image.Resampling.BICUBIC))
    mean = np.array([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    expected = (square.transpose(2, 0, 1) / 255.0 - mean) / std
    got = square_pixels(image, 16)
    assert got.shape == (1, 3, 16, 16) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-5)
