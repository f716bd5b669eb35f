"""The PnP-OVSS proposer end to end against an independent computation of its steps.

A hand-made ITM GradCAM (random per token and round) replaces BLIP's, so the caption the model
sees, the patches Salience DropOut removes each round, the aggregated class maps and the final
scores can be recomputed here from the reference's description (docs/algorithms.md §2.3-2.5)
and compared number for number. Written against mutmut's survivors in ``pnp_ovss.py``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ovss_label.backend.proposers import create_proposer, pnp, pnp_ovss
from ovss_label.backend.proposers.presence import TEMPLATE, ClipPresence
from ovss_label.ontologies import Vocabulary

GRID = 4  # image_size 64: 4 x 4 patches of 16 px


@pytest.fixture(scope="module")
def tokenizer():
    return create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False).blip.tokenizer


def test_a_label_with_punctuation_stays_one_class_word(tokenizer):
    names = ["T-shirt", "person's bag", "traffic light", "cat"]
    caption, sizes = pnp.caption_words(tokenizer, names)
    assert caption == "A picture of T-shirt person'sbag trafficlight cat"
    words = ("T-shirt", "person'sbag", "trafficlight", "cat")
    assert sizes == [len(tokenizer.tokenize(w)) for w in words]
    # "-" (unknown to the tiny vocabulary) is a word of its own, not a "##" piece.
    assert tokenizer.tokenize("T-shirt")[:3] == ["t", "[UNK]", "s"]
    with pytest.raises(ValueError, match=r"^label '\\u200b' gives BLIP's tokenizer no word piece$"):
        pnp.caption_words(tokenizer, ["cat", "\u200b"])


def test_counted_pieces_equal_the_references_piece_marks_without_punctuation(tokenizer):
    caption, sizes = pnp.caption_words(tokenizer, ["potted plant", "cat", "tv"])
    tokens = [*tokenizer.tokenize(caption), "[SEP]"]
    maps = torch.rand(len(tokens), GRID, GRID, generator=torch.Generator().manual_seed(0))
    for last_sum in (False, True):
        torch.testing.assert_close(
            pnp.class_token_maps(tokens, maps, last_sum, sizes),
            pnp.class_token_maps(tokens, maps, last_sum),
        )
    # A class cut off by [SEP] (a caption truncated at 500 tokens) is left out.
    cut = [*tokens[: 3 + sizes[0] + 1], "[SEP]"]
    assert pnp.class_token_maps(cut, maps[: len(cut)], sizes=sizes).shape == (1, GRID, GRID)


def _fake_gradcam(seen: dict, head: int):
    """An ``itm_gradcam`` recording the caption tokens and input pixels of every call. Its maps
    are small random values (seeded by the round) plus spikes: in round r the first class row
    peaks at patch r and the last class row at patch 15 - r, so Salience DropOut must drop
    exactly those two; "of" and ``[SEP]`` peak higher elsewhere (patches 6, 7), which no
    class-row sum may count."""

    def gradcam(model, pixels, ids, mask, layer):
        seen["inputs"].append(pixels.clone())
        seen["tokens"] = seen["tokenizer"].convert_ids_to_tokens(ids[0])
        r, t = len(seen["inputs"]) - 1, ids.shape[1]
        g = torch.Generator().manual_seed(r)
        maps = torch.rand(1, 12, t, GRID * GRID, generator=g) * 0.01
        first, last = 1 + 3, t - 2  # rows of [ENC] a picture of | c1 ... ck | [SEP]
        maps[0, :, first, r] += 10.0
        maps[0, :, last, GRID * GRID - 1 - r] += 10.0
        maps[0, :, [3, t - 1], 6 + r % 2] += 100.0
        maps = maps.reshape(1, 12, t, GRID, GRID)
        seen["rounds"].append(maps[0, head, 1:].reshape(t - 1, -1).double().numpy())
        return SimpleNamespace(maps=maps, match_logit=torch.zeros(1))

    return gradcam


def _expected_maps(rounds, sizes, k, first_twice, last_sum):
    """The reference's steps written out: drop the ``k`` most salient patches (sum of the class
    rows ``[3:-1]``) after each round, zero dropped patches in later maps, count round 0 twice,
    average (the last class: sum, with ``last_sum``) each class's rows."""
    dropped, total, dropped_before = [], 0.0, []
    for r, rows in enumerate(rounds):
        dropped_before.append(set(dropped))
        kept = rows.copy()
        kept[:, dropped] = 0
        total = total + kept * (2 if r == 0 and first_twice else 1)
        salience = rows[3:-1].sum(axis=0)
        salience[dropped] = 0
        dropped = dropped + [int(p) for p in np.argsort(salience, kind="stable")[-k:]]
    classes, start = [], 3
    for n, size in enumerate(sizes):
        summed = total[start : start + size].sum(axis=0)
        classes.append(summed if (last_sum and n == len(sizes) - 1) else summed / size)
        start += size
    return np.stack(classes).reshape(-1, GRID, GRID), dropped_before


def _dropped(pixels: torch.Tensor) -> set[int]:
    blocks = pixels[0].reshape(3, GRID, 16, GRID, 16).abs().sum(dim=(0, 2, 4)).flatten()
    return {int(p) for p in torch.nonzero(blocks == 0).flatten()}


@pytest.mark.parametrize(
    ("first_twice", "last_class_sum", "labels"),
    [(True, False, "T-shirt, cat"), (False, True, "background, T-shirt, potted plant")],
)
def test_scores_are_the_references_steps_on_the_models_gradcam(
    monkeypatch, first_twice, last_class_sum, labels
):
    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False, rounds=3,
                               drop_k=2, head=4, first_twice=first_twice,
                               last_class_sum=last_class_sum)  # fmt: skip
    seen = {"inputs": [], "rounds": [], "tokenizer": proposer.blip.tokenizer}
    monkeypatch.setattr(pnp_ovss, "itm_gradcam", _fake_gradcam(seen, head=4))
    image = np.random.default_rng(0).integers(1, 256, (40, 70, 3), dtype=np.uint8)
    vocab = Vocabulary.from_labels(labels)
    features = proposer.encode(image)
    assert features.image_hw == (40, 70)
    proposal = proposer.score(features, vocab)

    words = [n.replace(" ", "") for n in vocab.names]
    assert seen["tokens"] == ["[ENC]", *proposer.blip.tokenizer.tokenize(
        "a picture of " + " ".join(words)), "[SEP]"]  # fmt: skip
    sizes = [len(proposer.blip.tokenizer.tokenize(w)) for w in words]
    expected, dropped = _expected_maps(seen["rounds"], sizes, 2, first_twice, last_class_sum)
    assert [_dropped(x) for x in seen["inputs"]] == dropped == [set(), {0, 15}, {0, 1, 14, 15}]
    scores, assignment = pnp_ovss.decide_on_caption(
        torch.from_numpy(expected).float(), np.arange(len(vocab)), len(vocab),
        features.tensors["image"].numpy(), proposer.config, lambda im, ch: ch.argmax(axis=0),
    )  # fmt: skip
    np.testing.assert_allclose(proposal.scores, scores, atol=1e-5)
    background = [k for k, n in enumerate(vocab.names) if n == "background"]
    assignment[np.isin(assignment, background)] = -1  # a background label's pixels: no label
    np.testing.assert_array_equal(proposal.assignment, assignment)
    if background:
        assert (proposal.assignment == -1).any() and not (proposal.assignment == 0).any()


def test_the_presence_filter_gets_the_images_clip_embedding_and_the_options(monkeypatch):
    options = {"presence": "clip", "presence_top_k": 2, "presence_threshold": 0.3}
    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False, rounds=1, **options)
    calls = []

    def present(self, embedding, vocabulary, top_k, threshold):
        calls.append((embedding, vocabulary, top_k, threshold))
        return np.array([True, False, True])

    monkeypatch.setattr(ClipPresence, "present", present)
    image = np.random.default_rng(1).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    features = proposer.encode(image)
    torch.testing.assert_close(features.tensors["clip_embedding"], proposer.presence.embed(image))
    vocab = Vocabulary.from_labels("cat, dog, cup")
    proposal = proposer.score(features, vocab)
    (embedding, vocabulary, top_k, threshold), = calls  # fmt: skip
    assert embedding is features.tensors["clip_embedding"] and vocabulary == vocab
    assert (top_k, threshold) == (2, 0.3)
    assert not proposal.scores[1].any() and proposal.scores[[0, 2]].any()
    assert proposer.text_embedder() is proposer.presence.text  # free text matched by CLIP too
    plain = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False)
    assert "clip_embedding" not in plain.encode(image).tensors
    assert isinstance(plain.text_embedder(), pnp_ovss.BlipTextEmbedder)


def test_the_crf_fallback_warns_once_with_the_install_command(monkeypatch, caplog):
    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=True, rounds=1)

    def no_crf(*args, **kwargs):
        raise ImportError("pydensecrf")

    monkeypatch.setattr(pnp_ovss, "dense_crf", no_crf)
    monkeypatch.setattr(pnp_ovss, "_CRF_WARNED", [])
    caplog.set_level("WARNING")
    channels = np.random.default_rng(2).random((3, 5, 6))
    for _ in range(2):
        decided = proposer._decide(np.zeros((5, 6, 3), np.uint8), channels)
        np.testing.assert_array_equal(decided, channels.argmax(axis=0))
    assert [r.getMessage() for r in caplog.records] == [
        "pydensecrf2 is not installed: PnP-OVSS runs blur-only (pip install 'ovss-label[crf]')"
    ]


class _AxisText:
    """Class k's synonyms along axes (cat, kitten -> 0, 1; dog -> 2; cup -> 3); records the
    vocabulary it was asked to embed."""

    def __init__(self):
        self.asked = []

    def query_features(self, vocab):
        self.asked.append(vocab)
        return torch.eye(4), [0, 0, 1, 2]


def test_presence_probabilities_are_clips_softmax_over_the_best_synonym():
    text = _AxisText()
    presence = ClipPresence(clip=None, text=text)  # type: ignore[arg-type]
    vocab = Vocabulary(("cat", "dog", "cup"), (("cat", "kitten"), ("dog",), ("cup",)))
    image = torch.nn.functional.normalize(torch.tensor([0.1, 0.2, 0.21, 0.0]), dim=0)
    probs = presence.probabilities(image, vocab)
    best = torch.stack([image[:2].max(), image[2], image[3]])  # cat = max(cat, kitten)
    torch.testing.assert_close(probs, torch.softmax(100 * best, dim=0))  # CLIP's scale, 100
    assert text.asked == [vocab.with_templates(TEMPLATE)]


def test_presence_keeps_labels_by_threshold_then_top_k_and_always_the_best():
    presence = ClipPresence(clip=None, text=None)  # type: ignore[arg-type]
    probs = torch.tensor([0.6, 0.3, 0.1])
    presence.probabilities = lambda e, v: probs  # type: ignore[method-assign]
    vocab = Vocabulary.from_labels("cat, dog, cup")
    assert presence.present(None, vocab).tolist() == [True, True, True]  # defaults keep all
    assert presence.present(None, vocab, threshold=0.3).tolist() == [True, True, False]
    assert presence.present(None, vocab, top_k=2, threshold=0.35).tolist() == [True, False, False]
    assert presence.present(None, vocab, top_k=2).tolist() == [True, True, False]
    assert presence.present(None, vocab, threshold=0.9).tolist() == [True, False, False]


def test_the_references_last_class_sum_changes_a_class_map_but_no_output(monkeypatch, tokenizer):
    """The quirk scales the last class's map by its piece count; the per-class min-max of the
    threshold and of the blur undo a positive scale, so scores and labels are the same."""
    caption, sizes = pnp.caption_words(tokenizer, ["cat", "T-shirt"])
    assert sizes[-1] > 1  # the last class has several pieces: the quirk does change its map
    tokens = [*tokenizer.tokenize(caption), "[SEP]"]
    maps = torch.rand(len(tokens), GRID, GRID, generator=torch.Generator().manual_seed(1))
    summed = pnp.class_token_maps(tokens, maps, True, sizes)
    torch.testing.assert_close(summed[-1], pnp.class_token_maps(tokens, maps, False, sizes)[-1]
                               * sizes[-1])  # fmt: skip
    image = np.random.default_rng(1).integers(1, 256, (40, 70, 3), dtype=np.uint8)
    proposals = []
    for last_class_sum in (False, True):
        proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False, rounds=2,
                                   last_class_sum=last_class_sum)  # fmt: skip
        seen = {"inputs": [], "rounds": [], "tokenizer": proposer.blip.tokenizer}
        monkeypatch.setattr(pnp_ovss, "itm_gradcam", _fake_gradcam(seen, head=proposer.config.head))
        proposals.append(
            proposer.score(proposer.encode(image), Vocabulary.from_labels("cat, T-shirt"))
        )
    np.testing.assert_allclose(proposals[0].scores, proposals[1].scores, atol=1e-6)
    np.testing.assert_array_equal(proposals[0].assignment, proposals[1].assignment)


def test_a_vocabulary_longer_than_blips_caption_is_refused_with_what_to_do(monkeypatch):
    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False, rounds=1)
    seen = {"inputs": [], "rounds": [], "tokenizer": proposer.blip.tokenizer}
    monkeypatch.setattr(pnp_ovss, "itm_gradcam", _fake_gradcam(seen, head=proposer.config.head))
    labels = [f"cat{k}" for k in range(300)]  # "cat", "##0" ...: 2-3 pieces each, > 500 in all
    _, sizes = pnp.caption_words(proposer.blip.tokenizer, labels)
    fits = np.searchsorted(np.cumsum(sizes), 500 - 2 - 3, side="right")  # [CLS] [SEP], prefix
    image = np.full((32, 32, 3), 100, np.uint8)
    message = (f"the caption holds {fits} of 300 labels (BLIP reads 500 tokens): caption fewer "
               "with presence='clip' and presence_top_k")  # fmt: skip
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        proposer.score(proposer.encode(image), Vocabulary.from_labels(", ".join(labels)))


def test_presence_clip_and_a_presence_filter_come_together():
    """``presence='clip'`` without a filter, or a filter with ``presence='all'``, is refused
    with the rule."""
    from ovss_label.backend.proposers.pnp_ovss import PnpConfig, PnpOvssProposer

    blip = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False).blip
    rule = "presence 'clip' needs a CLIP presence filter, 'all' none"
    for config, presence in [(PnpConfig(presence="clip"), None), (PnpConfig(), object())]:
        with pytest.raises(ValueError) as refused:
            PnpOvssProposer(blip, config, presence)
        assert str(refused.value) == rule
