"""Brush RLE guarantees that the mutation run of ``converters/brush.py`` found untested.

The streams here are written by a small reference packer that follows the format description
of ``converters/brush.py`` bit by bit (header, tokens, padding), independent of the vectorised
code under test. It is checked once against label_studio_sdk's ``mask2rle``; the other tests
need no SDK call, so runs far longer than the SDK's 2**16-value chunk stay cheap.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle

from ovss_label.converters import BrushRLEError, brush_rle_to_mask, mask_to_brush_rle
from ovss_label.converters import brush as brush_module

SDK_SIZES = (3, 4, 8, 16)
CHUNK = 1 << 16

# A token: ("run", size index, length, value) or ("lit", size index, [values]).
Token = tuple


def _bits(value: int, width: int) -> str:
    assert 0 <= value < 1 << width, (value, width)
    return format(value, f"0{width}b")


def stream_bits(num: int, tokens: list[Token], sizes: tuple[int, ...] = SDK_SIZES) -> str:
    """The format, MSB first: header (num, word size - 1, four field sizes - 1), then tokens."""
    out = _bits(num, 32) + _bits(8 - 1, 5) + "".join(_bits(s - 1, 4) for s in sizes)
    for token in tokens:
        if token[0] == "run":
            _, index, n, value = token
            flag, words = "1", [value]
        else:
            _, index, words = token
            flag, n = "0", len(words)
        out += flag + _bits(index, 2) + _bits(n - 1, sizes[index])
        out += "".join(_bits(w, 8) for w in words)
    return out


def to_bytes(bits: str) -> list[int]:
    assert len(bits) % 8 == 0
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def pack(num: int, tokens: list[Token], sizes: tuple[int, ...] = SDK_SIZES) -> list[int]:
    """The stream with the SDK's padding: ``8 - len % 8`` zero bits (a whole byte if aligned)."""
    bits = stream_bits(num, tokens, sizes)
    return to_bytes(bits + "0" * (8 - len(bits) % 8))


def sdk_tokens(mask: np.ndarray) -> list[Token]:
    """The SDK encoder's tokens: each pixel run x4 as a repeated run in the smallest field that
    holds ``n - 1``; runs over 2**16 values as 2**16 chunks plus the remainder, all 16-bit."""
    tokens: list[Token] = []
    for value, group in itertools.groupby(mask.ravel().tolist()):
        n = 4 * sum(1 for _ in group)
        if n > CHUNK:
            while n > CHUNK:
                tokens.append(("run", 3, CHUNK, value))
                n -= CHUNK
            tokens.append(("run", 3, n, value))
        else:
            index = next(i for i, s in enumerate(SDK_SIZES) if n - 1 < 1 << s)
            tokens.append(("run", index, n, value))
    return tokens


def reference_rle(mask: np.ndarray) -> list[int]:
    return pack(mask.size * 4, sdk_tokens(mask))


def _runs_mask(w: int, runs: list[tuple[int, int]]) -> np.ndarray:
    """A (h, w) uint8 mask made of (value, pixel count) runs in row-major order."""
    flat = np.concatenate([np.full(n, v, np.uint8) for v, n in runs])
    assert flat.size % w == 0
    return flat.reshape(-1, w)


def test_reference_packer_agrees_with_the_sdk() -> None:
    # Pixel runs of 1..5, 64, 65 (4..20, 256, 260 values: every field size and its limits).
    runs = [(255, 1), (0, 2), (255, 3), (0, 4), (255, 5), (7, 64), (0, 65), (255, 16)]
    mask = _runs_mask(16, runs)
    assert reference_rle(mask) == mask2rle(mask)


@pytest.mark.parametrize(
    ("w", "runs"),
    [
        # One run of 169900 pixels = 679600 values: ten full 2**16 chunks and a remainder.
        (60000, [(0, 100), (255, 169900), (0, 10000)]),
        # 2**18 pixels = 16 chunks exactly, the last one full too.
        (1 << 12, [(0, 1 << 18)]),
        # Exactly 2**16 values (no split), one more pixel (split, 4-value 16-bit remainder),
        # then a run over 8 chunks of a value other than 0/255.
        (4096, [(255, 16384), (0, 16385), (9, 9 * 16384 + 7), (0, 16384 - 8)]),
    ],
    ids=["10-chunks", "16-full-chunks", "around-the-split"],
)
def test_runs_longer_than_the_chunk_are_split_like_the_sdk_and_round_trip(
    w: int, runs: list[tuple[int, int]]
) -> None:
    mask = _runs_mask(w, runs)
    rle = mask_to_brush_rle(mask)
    assert rle == reference_rle(mask)
    np.testing.assert_array_equal(brush_rle_to_mask(rle, *mask.shape), mask)


def _values(tokens: list[Token]) -> np.ndarray:
    out: list[int] = []
    for token in tokens:
        out += [token[3]] * token[2] if token[0] == "run" else list(token[2])
    return np.asarray(out, np.uint8)


@pytest.mark.parametrize(
    ("sizes", "tokens"),
    [
        # Multi-value literals with distinct values (the alpha is every 4th value).
        (SDK_SIZES, [("lit", 1, list(range(10, 22))), ("run", 0, 4, 255)]),
        (SDK_SIZES, [("run", 2, 20, 0), ("lit", 0, [1, 2, 3, 4, 5, 6, 7, 8]), ("run", 0, 4, 9)]),
        # Field sizes other than the SDK's are read from the header.
        ((5, 2, 12, 7), [("run", 2, 1000, 255), ("lit", 1, [3, 1, 4, 1]), ("run", 3, 100, 0)]),
        # A single token whose padding is shorter than a token head (3 bits): 53 + 17 + 2.
        ((6, 4, 8, 16), [("run", 0, 4, 255)]),
        ((6, 4, 8, 16), [("run", 0, 64, 255)]),
    ],
)
def test_decoder_reads_any_field_sizes_and_literal_runs(
    sizes: tuple[int, ...], tokens: list[Token]
) -> None:
    values = _values(tokens)
    assert values.size % 4 == 0
    rle = pack(values.size, tokens, sizes)
    decoded = brush_rle_to_mask(rle, 1, values.size // 4)
    np.testing.assert_array_equal(decoded.ravel(), values[3::4])


def test_overlong_runs_report_how_many_values_they_hold() -> None:
    rle = pack(16, [("run", 1, 12, 255), ("run", 0, 8, 0)])  # 20 values for a 2x2 mask
    with pytest.raises(BrushRLEError, match=r"decodes to 20 values, expected 16"):
        brush_rle_to_mask(rle, 2, 2)


def test_a_literal_run_cut_off_by_the_end_of_the_stream_is_truncated() -> None:
    full = pack(16, [("lit", 1, list(range(16)))])
    np.testing.assert_array_equal(brush_rle_to_mask(full, 2, 2).ravel(), [3, 7, 11, 15])
    with pytest.raises(BrushRLEError, match=r"^brush RLE is truncated: its last run is cut off$"):
        brush_rle_to_mask(full[:10], 2, 2)


def test_a_stream_ending_right_after_a_token_head_is_truncated() -> None:
    # 53 header bits, a 15-value run (16 bits with a 5-bit field), then only the next token's
    # flag and size index in the stream's last 3 bits: the run it starts is cut off.
    bits = stream_bits(16, [("run", 0, 15, 255)], (5, 4, 8, 16)) + "100"
    assert len(bits) == 72
    rle = to_bytes(bits)
    with pytest.raises(BrushRLEError, match="truncated"):
        brush_rle_to_mask(rle, 2, 2)


def test_a_stream_shorter_than_its_header_is_rejected_as_such() -> None:
    rle = mask_to_brush_rle(np.full((2, 2), 255, np.uint8))
    for cut in range(1, 7):  # the header has 53 bits: 6 bytes are too short, 7 are enough
        with pytest.raises(BrushRLEError, match="too short for its header"):
            brush_rle_to_mask(rle[:cut], 2, 2)


def test_size_mismatch_states_both_value_counts() -> None:
    rle = mask_to_brush_rle(np.zeros((10, 20), np.uint8))
    with pytest.raises(BrushRLEError, match=r"holds 800 values but 20x11 RGBA needs 880 "):
        brush_rle_to_mask(rle, 20, 11)


def test_payload_must_be_a_flat_list_of_byte_values() -> None:
    rle = mask_to_brush_rle(np.full((3, 3), 255, np.uint8))
    assert brush_rle_to_mask(rle, 3, 3).min() == 255
    with pytest.raises(BrushRLEError, match="flat list of integers"):
        brush_rle_to_mask([float(b) for b in rle], 3, 3)
    with pytest.raises(BrushRLEError, match="flat list of integers"):
        brush_rle_to_mask(np.asarray(rle)[None, :], 3, 3)
    # 256 must not wrap to 0 (the first byte of this stream is 0).
    assert rle[0] == 0
    with pytest.raises(BrushRLEError, match=r"values must lie in 0\.\.255"):
        brush_rle_to_mask([256, *rle[1:]], 3, 3)


class _PassedError(Exception):
    """Raised when the encoder goes past its size check (so no huge mask is ever built)."""


class _SizedMask:
    """Stands in for a flattened mask of ``size`` pixels: only its size can be read."""

    def __init__(self, size: int) -> None:
        self.size = size

    def ravel(self) -> _SizedMask:
        return self

    def __getitem__(self, key: object) -> None:
        raise _PassedError


@pytest.mark.parametrize(
    ("pixels", "accepted"),
    [(1 << 30, False), ((1 << 30) + 1, False), (5 << 30, False), ((1 << 30) - 1, True)],
)
def test_the_32_bit_value_count_limits_masks_to_under_2_30_pixels(
    monkeypatch: pytest.MonkeyPatch, pixels: int, accepted: bool
) -> None:
    # The header counts RGBA values (4 per pixel) in 32 bits: 2**30 pixels no longer fit.
    monkeypatch.setattr(brush_module, "_as_uint8_mask", lambda mask: _SizedMask(pixels))
    if accepted:
        with pytest.raises(_PassedError):
            mask_to_brush_rle(np.zeros((1, 1), np.uint8))
    else:
        with pytest.raises(ValueError, match=rf"mask of {pixels} pixels is too large"):
            mask_to_brush_rle(np.zeros((1, 1), np.uint8))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: mask_to_brush_rle(np.zeros((0, 5), bool)),
            "cannot encode an empty (zero-pixel) mask as brush RLE",
        ),
        (
            lambda: mask_to_brush_rle(np.zeros((2, 2, 2), bool)),
            "mask must be 2-D (H, W), got shape (2, 2, 2)",
        ),
        (
            lambda: mask_to_brush_rle(np.zeros((2, 2))),
            "mask must be bool or integer 0..255, got dtype float64",
        ),
        (
            lambda: mask_to_brush_rle(np.full((2, 2), 300)),
            "integer mask values must lie in 0..255 (use 0/255 for Label Studio)",
        ),
        (
            lambda: brush_rle_to_mask([1, 2, 3, 4], 2, 2),
            "brush RLE too short for its header (4 bytes)",
        ),
        (
            lambda: brush_rle_to_mask(mask_to_brush_rle(np.ones((2, 2), bool)), 2, 3),
            "brush RLE holds 16 values but 2x3 RGBA needs 24"
            " (original_width/original_height do not match the mask)",
        ),
        (
            lambda: brush_rle_to_mask([[1, 2]], 2, 2),
            "brush RLE must be a flat list of integers 0..255",
        ),
        (lambda: brush_rle_to_mask([1, 300], 2, 2), "brush RLE values must lie in 0..255"),
    ],
)
def test_encoder_and_decoder_errors_say_exactly_what_is_wrong(call, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        call()
    assert str(caught.value) == message
