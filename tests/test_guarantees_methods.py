"""Method guarantees checked on the factory-built proposers (tiny twins), issue 18.

Each test fails with a realistic one-line bug planted (named in its docstring) that the older
tests let through, and passes without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ovss_label.backend.proposers import Features, Proposal, create_proposer
from ovss_label.ontologies import Vocabulary


def _dropped_patches(pixels: torch.Tensor, grid: int, patch: int = 16) -> set[int]:
    """Flat indices of the all-zero 16 x 16 patches of a (1, 3, S, S) input."""
    blocks = pixels[0].reshape(3, grid, patch, grid, patch).abs().sum(dim=(0, 2, 4))
    return {int(p) for p in torch.nonzero(blocks.flatten() == 0).flatten()}


def test_pnp_only_class_word_piece_rows_decide_which_patches_are_dropped(monkeypatch):
    """Salience DropOut sums the class word pieces' GradCAM rows (reference: rows ``[3:-1]``
    after ``[ENC]``, ``PnP_OVSS_0514_updated_segmentation.py`` line 639). A hand-made GradCAM
    makes the prefix rows and ``[SEP]`` far more salient elsewhere: planted ``maps[3:]`` (the
    ``[SEP]`` row counted) or ``maps[2:-1]`` ("of" counted) drops those patches instead."""
    from ovss_label.backend.proposers import pnp_ovss

    grid, inputs = 4, []  # image_size 64: 4 x 4 patches
    proposer = create_proposer("pnp_ovss", tiny=True, image_size=64, crf=False, rounds=3, drop_k=2)
    vocab = Vocabulary.from_labels("cat, dog")

    def fake_gradcam(model, pixels, ids, mask, layer):
        inputs.append(pixels.clone())
        tokens = proposer.blip.tokenizer.convert_ids_to_tokens(ids[0])
        rows = torch.zeros(len(tokens), grid * grid)
        for t, token in enumerate(tokens):
            if token in ("a", "picture", "of"):
                rows[t, [12, 13]] = 500.0  # the caption's prefix
            elif token == "[SEP]":
                rows[t, [14, 15]] = 1000.0
            elif token != "[ENC]":  # class word pieces: salience falls with the index
                rows[t, :12] = torch.arange(12, 0, -1, dtype=torch.float32)
        heads = rows.reshape(1, 1, len(tokens), grid, grid).expand(1, 12, -1, -1, -1)
        return SimpleNamespace(maps=heads.clone(), match_logit=torch.zeros(1))

    monkeypatch.setattr(pnp_ovss, "itm_gradcam", fake_gradcam)
    image = np.random.default_rng(0).integers(1, 256, (40, 70, 3), dtype=np.uint8)
    proposal = proposer.score(proposer.encode(image), vocab)
    assert proposal.scores.shape == (2, 40, 70)
    tokens = proposer.blip.tokenizer.tokenize("a picture of cat dog")
    assert tokens[3:] == ["c", "##a", "##t", "d", "##o", "##g"]  # word pieces, as the reference
    # Round by round: the 2 most salient class patches are dropped from the next input.
    assert [_dropped_patches(x, grid) for x in inputs] == [set(), {0, 1}, {0, 1, 2, 3}]


def _mmseg_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``forward_slide``'s windows (docs/algorithms.md §1.6), written out independently."""
    n_h, n_w = (max(side - crop + stride - 1, 0) // stride + 1 for side in (h, w))
    boxes = []
    for ih in range(n_h):
        for iw in range(n_w):
            y2, x2 = min(ih * stride + crop, h), min(iw * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def test_naclip_factory_runs_the_references_windows_and_gaussian(tiny_checkpoints, monkeypatch):
    """The factory's NACLIP (no options) runs the reference pipeline: resize to short side 336,
    224 px windows every 112 px, Ω with σ = 5 in every window (``naclip.py`` lines 20-22 @0cac3a6).
    Planted: another σ or stride in ``NaclipConfig``'s defaults."""
    from ovss_label.backend.proposers import naclip

    stds = []
    real = naclip.naclip_tokens

    def recording(visual, images, std=5.0, arch="reduced"):
        stds.append((std, tuple(images.shape[-2:])))
        return real(visual, images, std, arch)

    monkeypatch.setattr(naclip, "naclip_tokens", recording)
    proposer = create_proposer("naclip", tiny=True, checkpoint=tiny_checkpoints["openai"])
    image = np.random.default_rng(0).integers(0, 256, (240, 357, 3), dtype=np.uint8)
    features = proposer.encode(image)
    assert features.meta["frames"].network == (336, 500)  # 240 x 357 -> short side 336
    assert features.meta["boxes"] == _mmseg_windows(336, 500, 224, 112)
    assert len(features.meta["boxes"]) == 2 * 4  # docs/algorithms.md §1.6: 336 x 500 -> 2 x 4
    assert {s for s, _ in stds} == {5.0} and {size for _, size in stds} == {(224, 224)}
    proposal = proposer.score(features, Vocabulary.from_labels("cat, dog"))
    assert proposal.scores.shape == (2, 240, 357)


def test_naclip_arch_option_reaches_the_vision_tower(tiny_checkpoints):
    """``arch="vanilla"`` keeps the last block's residual and FFN: other features than the
    reference's ``reduced`` (the option was once ignored)."""
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    common = {"tiny": True, "checkpoint": tiny_checkpoints["openai"], "short_side": 48,
              "slide_crop": 32, "slide_stride": 16}  # fmt: skip
    reduced = create_proposer("naclip", **common).encode(image)
    vanilla = create_proposer("naclip", arch="vanilla", **common).encode(image)
    assert not torch.allclose(reduced.tensors["feats_0"], vanilla.tensors["feats_0"])


def test_sam_prompts_and_automatic_masks_use_postprocessings_min_area(monkeypatch):
    """One minimum area everywhere: at ``min_area=0.0057`` on 100 x 100 px, float noise makes
    ``ceil(0.0057 * 100 * 100)`` 58 px while ``min_area_pixels`` (postprocessing) says 57, so a
    57-px part must get a SAM prompt and a 57-px automatic mask must be kept."""
    from ovss_label.backend.proposers import clip_sam
    from ovss_label.backend.proposers.refine import RefineConfig, prompts_from_proposal
    from ovss_label.converters.instance import min_area_pixels

    assert min_area_pixels(0.0057, 100, 100) == 57
    scores = np.zeros((1, 100, 100), np.float32)
    scores[0, 10:13, 10:29] = 0.9  # 57 px
    proposal = Proposal(("cat",), scores)
    assert len(prompts_from_proposal(proposal, RefineConfig(min_area=0.0057))) == 1
    mask = np.zeros((100, 100), bool)
    mask[10:13, 10:29] = True
    record = {"segmentation": mask, "area": 57, "predicted_iou": 0.9}
    monkeypatch.setattr(clip_sam, "automatic_masks", lambda *a: [record])
    stage = clip_sam.ClipSamProposer.__new__(clip_sam.ClipSamProposer)
    stage.config, stage.sam = clip_sam.ClipSamConfig(min_area=0.0057), None
    features = Features((100, 100), {"patches": torch.ones(4, 4, 8) / 8**0.5}, {"sam": None})
    found = stage._stage_two(features, torch.ones(1, 8) / 8**0.5, torch.tensor([0]),
                             np.array([True]), Vocabulary.from_labels("cat"))  # fmt: skip
    assert [int(i.mask.sum()) for i in found] == [57]
