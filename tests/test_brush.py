"""Brush RLE: byte equality with label_studio_sdk's mask2rle/decode_rle, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import disc, load_export, sdk_alpha
from label_studio_sdk.converter.brush import encode_rle, mask2rle

from ovss_label.converters import BrushRLEError, brush_rle_to_mask, mask_to_brush_rle

RNG = np.random.default_rng(0)


def _structured() -> list[np.ndarray]:
    h, w = 61, 83
    yy, xx = np.mgrid[:h, :w]
    masks = [
        disc(h, w, 40, 30, 20),
        disc(h, w, 40, 30, 20) & ~disc(h, w, 40, 30, 8),
        (xx // 3) % 2 == 0,  # vertical stripes: many short runs
        (yy // 5) % 2 == 0,  # horizontal stripes: long runs
        (xx + yy) % 2 == 0,  # checkerboard: every run has one pixel
        np.zeros((h, w), bool),
        np.ones((h, w), bool),
        np.ones((1, 1), bool),
        np.zeros((1, 7), bool),
    ]
    # Runs around the SDK's 2**16-value split (x4 repeat: 16384 pixels).
    for n in (16383, 16384, 16385, 32768, 32769, 50000):
        m = np.zeros((1, n + 5), bool)
        m[0, :n] = True
        masks.append(m)
    return [m.astype(np.uint8) * 255 for m in masks]


def _random() -> list[np.ndarray]:
    masks = []
    for h, w in [(1, 1), (2, 3), (17, 31), (64, 64), (100, 150)]:
        for density in (0.02, 0.5, 0.98):
            masks.append((RNG.random((h, w)) < density).astype(np.uint8) * 255)
    masks.append(RNG.integers(0, 256, (33, 47)).astype(np.uint8))  # any uint8, not just 0/255
    masks.append((RNG.random((40, 40)) < 0.5).astype(np.uint8))  # 0/1 is encoded as given
    return masks


@pytest.mark.parametrize("mask", _structured() + _random(), ids=lambda m: f"{m.shape}")
def test_encoder_is_byte_identical_to_sdk_and_decoder_inverts_it(mask: np.ndarray) -> None:
    ours = mask_to_brush_rle(mask)
    assert ours == mask2rle(mask)
    decoded = brush_rle_to_mask(ours, *mask.shape)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, sdk_alpha(ours, *mask.shape))
    np.testing.assert_array_equal(decoded, mask)


def test_1024_noise_mask_is_byte_identical() -> None:
    mask = (np.random.default_rng(1).random((1024, 1024)) < 0.5).astype(np.uint8) * 255
    ours = mask_to_brush_rle(mask)
    assert ours == mask2rle(mask)
    np.testing.assert_array_equal(brush_rle_to_mask(ours, 1024, 1024), mask)


def test_bool_masks_are_written_as_0_255() -> None:
    mask = disc(20, 30, 10, 10, 6)
    assert mask_to_brush_rle(mask) == mask2rle(mask.astype(np.uint8) * 255)


def test_decoder_reads_literal_runs_like_the_sdk() -> None:
    # Not x4-repeated: encode_rle writes every single value as a one-word literal.
    values = RNG.integers(0, 256, 4 * 9 * 7).astype(np.uint8)
    rle = encode_rle(values)
    np.testing.assert_array_equal(brush_rle_to_mask(rle, 9, 7), sdk_alpha(rle, 9, 7))


def test_decoder_reads_editor_strokes_with_multi_value_literals() -> None:
    # Task 107 of the fixture: RGBA colour stream packed with 8-value literal chunks.
    result = load_export()[-1]["annotations"][0]["result"][0]
    h, w, rle = result["original_height"], result["original_width"], result["value"]["rle"]
    decoded = brush_rle_to_mask(rle, h, w)
    np.testing.assert_array_equal(decoded, sdk_alpha(rle, h, w))
    assert set(np.unique(decoded)) == {0, 255}


def test_decoder_accepts_bytes() -> None:
    mask = disc(12, 12, 6, 6, 4)
    rle = mask_to_brush_rle(mask)
    np.testing.assert_array_equal(brush_rle_to_mask(bytes(rle), 12, 12) > 0, mask)


def test_size_mismatch_names_original_width() -> None:
    rle = mask_to_brush_rle(disc(10, 20, 5, 5, 3))
    with pytest.raises(BrushRLEError, match="original_width"):
        brush_rle_to_mask(rle, 20, 10 + 1)


def test_truncated_stream_is_an_error() -> None:
    rle = mask_to_brush_rle(disc(40, 40, 20, 20, 10))
    with pytest.raises(BrushRLEError):
        brush_rle_to_mask(rle[:-3], 40, 40)
    with pytest.raises(BrushRLEError, match="too short"):
        brush_rle_to_mask(rle[:4], 40, 40)


def test_unsupported_word_size_and_bad_values() -> None:
    header = f"{4 * 4:032b}{15:05b}" + "0010001101111111"  # word size 16
    stream = header + "1" + "00" + "011" + "0" * 16
    stream += "0" * (-len(stream) % 8)
    rle = [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]
    with pytest.raises(BrushRLEError, match="word size 16"):
        brush_rle_to_mask(rle, 2, 2)
    with pytest.raises(BrushRLEError, match=r"0\.\.255"):
        brush_rle_to_mask([0, 300, 1], 2, 2)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros((2, 2, 2), np.uint8), "2-D"),
        (np.full((2, 2), 256, np.int64), "0..255"),
        (np.full((2, 2), 0.5), "dtype"),
    ],
)
def test_encoder_rejects_bad_masks(mask: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mask_to_brush_rle(mask)
