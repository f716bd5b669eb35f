"""PAMR against a per-pixel loop written from the paper's formula, and on a hand-made edge."""

from __future__ import annotations

import itertools

import torch

from ovss_label.backend.proposers.pamr import pamr_affinity, pamr_propagate


def _clamp(v: int, n: int) -> int:
    return min(max(v, 0), n - 1)  # replicate padding


def _pamr_by_loops(image: torch.Tensor, mask: torch.Tensor, dilations, steps) -> torch.Tensor:
    """Slow PAMR: every pixel, every neighbour, from the formula in docs/algorithms.md §1.7."""
    _, h, w = image.shape
    offsets = [(dy, dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2) if (dy, dx) != (0, 0)]
    aff = torch.zeros(len(dilations) * 8, h, w, dtype=torch.float64)
    for y, x in itertools.product(range(h), range(w)):
        stencil = torch.stack(
            [
                image[:, _clamp(y + dy * d, h), _clamp(x + dx * d, w)]
                for d in dilations
                for dy, dx in itertools.product((-1, 0, 1), repeat=2)
            ]
        )
        std = stencil.std(dim=0)  # unbiased, per channel, over 9 * len(dilations) values
        slots = [
            -(image[:, y, x] - image[:, _clamp(y + dy * d, h), _clamp(x + dx * d, w)]).abs()
            / (1e-8 + 0.1 * std)
            for d in dilations
            for dy, dx in offsets
        ]
        aff[:, y, x] = torch.softmax(torch.stack(slots).mean(dim=1), dim=0)
    for _ in range(steps):
        new = torch.zeros_like(mask)
        for y, x in itertools.product(range(h), range(w)):
            slot = 0
            for d in dilations:
                for dy, dx in offsets:
                    new[:, y, x] += (
                        aff[slot, y, x] * mask[:, _clamp(y + dy * d, h), _clamp(x + dx * d, w)]
                    )
                    slot += 1
        mask = new
    return mask


def test_pamr_matches_the_formula_pixel_by_pixel():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(3, 7, 9, generator=gen, dtype=torch.float64)
    logits = torch.randn(4, 7, 9, generator=gen, dtype=torch.float64)
    dilations = (1, 3)
    expected = _pamr_by_loops(image, logits, dilations, steps=3)
    aff = pamr_affinity(image.float(), dilations)
    torch.testing.assert_close(aff.sum(0), torch.ones(7, 9))
    out = pamr_propagate(aff, logits.float(), dilations, num_iter=3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_pamr_stops_at_an_image_edge():
    # Left half dark, right half bright: labels must not leak across the edge.
    image = torch.zeros(3, 20, 40)
    image[:, :, 20:] = 1.0
    image += 0.01 * torch.randn(3, 20, 40, generator=torch.Generator().manual_seed(1))
    logits = torch.zeros(2, 20, 40)
    logits[0, :, :20] = 1.0  # class 0 exactly on the left
    logits[1, :, 20:] = 1.0
    out = pamr_propagate(pamr_affinity(image, (8, 16)), logits, (8, 16), num_iter=10)
    assert out[0, :, :20].min() > 0.99 and out[0, :, 20:].max() < 0.01
    assert out[1, :, 20:].min() > 0.99 and out[1, :, :20].max() < 0.01


def test_constant_maps_are_fixed_points_and_channels_are_independent():
    image = torch.randn(3, 30, 30, generator=torch.Generator().manual_seed(2))
    aff = pamr_affinity(image)
    constant = torch.full((3, 30, 30), 2.5)
    torch.testing.assert_close(pamr_propagate(aff, constant), constant)
    many = torch.randn(9, 30, 30, generator=torch.Generator().manual_seed(3))
    together = pamr_propagate(aff, many)
    torch.testing.assert_close(together[4:5], pamr_propagate(aff, many[4:5]))


def test_the_defaults_are_naclips_and_a_mismatched_affinity_is_named():
    import inspect

    import pytest

    defaults = {k: p.default for k, p in inspect.signature(pamr_propagate).parameters.items()}
    assert (
        defaults["dilations"] == (8, 16) and defaults["num_iter"] == 10
    )  # NACLIP's PAMR(10, [8, 16])
    image = torch.randn(3, 6, 5, generator=torch.Generator().manual_seed(1))
    aff = pamr_affinity(image, (1, 2))
    logits = torch.randn(2, 6, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pamr_propagate(aff, logits, (1, 2)),
                               pamr_propagate(aff, logits, (1, 2), 10))  # fmt: skip
    with pytest.raises(ValueError, match=r"^affinity \(16, 6, 5\) does not fit logits \(6, 4\)$"):
        pamr_propagate(aff, logits[:, :, :4], (1, 2))  # the right slots, another size
    with pytest.raises(ValueError, match=r"^affinity \(16, 6, 5\) does not fit logits \(6, 5\)$"):
        pamr_propagate(aff, logits, (1, 2, 3))  # the right size, other dilations
