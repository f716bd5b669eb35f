"""Label Studio brush RLE: a vectorised encoder and decoder, byte-identical to the SDK's.

Format contract (Label Studio ``BrushLabels``, ``value.format == "rle"``)
=======================================================================
This is *not* COCO RLE. It is thi-ng/umbrella ``rle-pack``, as ported in
``label_studio_sdk.converter.brush`` (``mask2rle``/``encode_rle``/``decode_rle``):

- The payload is an RGBA image of the original size, flattened row-major to H*W*4 values; Label
  Studio draws the alpha channel. ``mask2rle`` repeats every mask value 4 times, so R=G=B=A=value.
  Masks must be 0/255: a 0/1 mask decodes to alpha 1, which Label Studio shows as invisible.
- The values are packed MSB-first into a bit stream, emitted as a JSON list of ints 0..255:

  header   32 bits  num      number of values (= H*W*4)
            5 bits  ws - 1   word size minus one (the SDK writes 7: 8-bit words)
          4x4 bits  s_i - 1  the four run-length field sizes (the SDK writes 3, 4, 8, 16)
  tokens   1 bit    flag     1 = repeated run, 0 = literal run
            2 bits  i        index into the four field sizes
          s_i bits  n - 1    run length minus one
          then one word (flag 1) or n words (flag 0)

- The SDK encoder writes only repeated runs, choosing the smallest field that holds ``n - 1``; runs
  longer than 2**16 are split into 2**16-value chunks and the remainder, all with the 16-bit field.
  A run of one value would be written as a one-word literal, but after the x4 repeat every run
  has at least 4 values. Padding: ``8 - len % 8`` zero bits, i.e. a whole zero byte when the
  stream is already byte-aligned. We reproduce all of this, byte for byte.
- Strokes drawn in the Label Studio editor are encoded by its JavaScript ``rle-pack`` and may
  contain literal runs; the decoder reads both kinds and the header's own field sizes.

Frames: ``mask`` is (H, W), row 0 at the top, in the image's original pixel grid
(``original_height`` x ``original_width`` of the result).
"""

from __future__ import annotations

from array import array
from functools import lru_cache
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BrushRLEError", "brush_rle_bytes", "brush_rle_to_mask", "mask_to_brush_rle"]

_HEADER_BITS = 32 + 5 + 4 * 4
_SDK_RLE_SIZES = (3, 4, 8, 16)
_MAX_CHUNK = 1 << 16
_TOKEN_HEAD_BITS = 1 + 2 + 16  # flag, size index, longest length field


class BrushRLEError(ValueError):
    """A brush RLE payload that cannot be decoded into the stated image size."""


def mask_to_brush_rle(mask: NDArray[Any]) -> list[int]:
    """Encode a mask as Label Studio brush RLE, byte-identical to the SDK's ``mask2rle``.

    Args:
        mask: (H, W) mask. ``bool`` is written as 0/255 (what Label Studio shows); integer arrays
            must hold values in 0..255 and are written as given, like ``mask2rle``.

    Returns:
        The RLE bytes as a list of ints in 0..255 (the ``value.rle`` of a ``brushlabels`` result).
    """
    rle: list[int] = brush_rle_bytes(mask).tolist()
    return rle


def brush_rle_bytes(mask: NDArray[Any]) -> NDArray[np.uint8]:
    """:func:`mask_to_brush_rle` as a (n_bytes,) uint8 array (no Python ints yet)."""
    values = _as_uint8_mask(mask).ravel()
    if values.size == 0:
        raise ValueError("cannot encode an empty (zero-pixel) mask as brush RLE")
    if values.size * 4 >= 1 << 32:  # the header counts RGBA values in 32 bits
        raise ValueError(f"mask of {values.size} pixels is too large for brush RLE (< 2**30)")
    # Runs of the mask; after the x4 repeat each run is 4x as long and no run has length 1.
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change))
    run_values = values[starts]
    run_lengths = np.diff(np.concatenate((starts, [values.size]))).astype(np.int64) * 4
    codes, widths = _run_tokens(run_lengths, run_values)
    header = _header(values.size * 4)
    return _pack(header, codes, widths)


def _as_uint8_mask(mask: NDArray[Any]) -> NDArray[Any]:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask.astype(np.uint8) * np.uint8(255)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"mask must be bool or integer 0..255, got dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError("integer mask values must lie in 0..255 (use 0/255 for Label Studio)")
    return mask.astype(np.uint8, copy=False)


def _header(num: int) -> list[tuple[int, int]]:
    fields = [(num, 32), (8 - 1, 5)]
    fields += [(size - 1, 4) for size in _SDK_RLE_SIZES]
    return fields


def _run_tokens(lengths: NDArray[Any], values: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any]]:
    """Tokens of repeated runs as (code, bit width) pairs, in stream order.

    A token is ``1 | size index (2) | length - 1 (size bits) | value (8)``; at most 27 bits.
    """
    if lengths.size and lengths.max() > _MAX_CHUNK:
        lengths, values, forced_16 = _split_long_runs(lengths, values)
    else:
        forced_16 = None
    # Smallest field that holds length - 1: 3 bits (<= 8), 4 (<= 16), 8 (<= 256), else 16.
    size_index = np.searchsorted(np.array([8, 16, 256]), lengths)
    if forced_16 is not None:
        size_index[forced_16] = 3
    size_bits = np.asarray(_SDK_RLE_SIZES, dtype=np.int64)[size_index]
    code = (((4 | size_index) << size_bits | (lengths - 1)) << 8) | values.astype(np.int64)
    return code.astype(np.uint64), 3 + size_bits + 8


def _split_long_runs(
    lengths: NDArray[Any], values: NDArray[Any]
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """The SDK's split of runs over 2**16: full 2**16 chunks, then the remainder.

    Returns the new lengths and values, and which tokens must keep the 16-bit field (the
    remainder of a split run does, however short it is).
    """
    n_chunks = np.where(lengths > _MAX_CHUNK, -(-lengths // _MAX_CHUNK), 1)
    run = np.repeat(np.arange(lengths.size), n_chunks)
    last = np.cumsum(n_chunks) - 1
    new_lengths = np.full(run.size, _MAX_CHUNK, dtype=np.int64)
    new_lengths[last] = lengths - (n_chunks - 1) * _MAX_CHUNK
    forced = np.zeros(run.size, dtype=bool)
    forced[last[n_chunks > 1]] = True
    return new_lengths, values[run], forced


def _pack(
    header: list[tuple[int, int]], codes: NDArray[Any], widths: NDArray[Any]
) -> NDArray[np.uint8]:
    """MSB-first bit packing of (code, width <= 32) fields, with the SDK's padding rule.

    Every field lands in one or two big-endian 32-bit words; the fields' bits are disjoint, so
    the words are the *sums* of their contributions, which ``bincount`` adds exactly (float64
    holds integers below 2**53).
    """
    codes = np.concatenate((np.array([c for c, _ in header], dtype=np.uint64), codes))
    widths = np.concatenate((np.array([w for _, w in header], dtype=np.int64), widths))
    ends = np.cumsum(widths)
    starts = ends - widths
    n_bits = int(ends[-1])
    n_bytes = (n_bits + 8 - n_bits % 8) // 8  # the SDK pads a whole byte when already aligned
    n_words = -(-n_bytes // 4) + 1
    word = starts >> 5
    spill = (starts & 31) + widths - 32  # > 0: that many low bits go into the next word
    left = np.maximum(-spill, 0).astype(np.uint64)
    right = np.maximum(spill, 0).astype(np.uint64)
    hi = (codes << left) >> right
    lo = (codes << (np.uint64(32) - right)) & np.uint64(0xFFFFFFFF)  # 0 when nothing spills
    total = np.bincount(word, weights=hi.astype(np.float64), minlength=n_words)
    total += np.bincount(word + 1, weights=lo.astype(np.float64), minlength=n_words)[:n_words]
    out: NDArray[np.uint8] = total.astype(np.uint64).astype(">u4").view(np.uint8)
    return out[:n_bytes]


def brush_rle_to_mask(
    rle: list[int] | bytes | NDArray[Any], height: int, width: int
) -> NDArray[Any]:
    """Decode Label Studio brush RLE to the alpha channel, like the SDK's ``decode_rle``.

    Args:
        rle: the ``value.rle`` list of ints 0..255 (or the same bytes).
        height: ``original_height`` of the result, in pixels.
        width: ``original_width`` of the result, in pixels.

    Returns:
        (height, width) uint8 alpha values (0/255 for masks written by Label Studio or by us).

    Raises:
        BrushRLEError: the stream is truncated, malformed, or does not hold height*width*4 values.
    """
    data = _as_bytes(rle)
    if data.size * 8 < _HEADER_BITS:
        raise BrushRLEError(f"brush RLE too short for its header ({data.size} bytes)")
    bits = np.unpackbits(data)
    num, word_size, sizes = _read_header(bits)
    if num != height * width * 4:
        raise BrushRLEError(
            f"brush RLE holds {num} values but {height}x{width} RGBA needs {height * width * 4}"
            " (original_width/original_height do not match the mask)"
        )
    if word_size != 8:
        raise BrushRLEError(f"unsupported brush RLE word size {word_size} (Label Studio uses 8)")
    values = _decode_tokens(data, num, sizes)
    return values[3::4].reshape(height, width)


def _as_bytes(rle: list[int] | bytes | NDArray[Any]) -> NDArray[Any]:
    if isinstance(rle, (bytes, bytearray)):
        return np.frombuffer(bytes(rle), dtype=np.uint8)
    arr = np.asarray(rle)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise BrushRLEError("brush RLE must be a flat list of integers 0..255")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise BrushRLEError("brush RLE values must lie in 0..255")
    return arr.astype(np.uint8)


def _read_header(bits: NDArray[Any]) -> tuple[int, int, tuple[int, ...]]:
    def field(start: int, n: int) -> int:
        return int("".join(map(str, bits[start : start + n].tolist())), 2)

    num = field(0, 32)
    word_size = field(32, 5) + 1
    sizes = tuple(field(37 + 4 * i, 4) + 1 for i in range(4))
    return num, word_size, sizes


def _bit_windows(data: NDArray[Any]) -> NDArray[Any]:
    """(n_bits,) uint32: at each bit offset p, the bits from p on, left-aligned (>= 25 valid).

    Built per in-byte shift instead of per bit, so no gather over all bit offsets is needed.
    """
    padded = np.concatenate((data, np.zeros(4, dtype=np.uint8))).astype(np.uint32)
    n = data.size
    word = padded[:n] << 24 | padded[1 : n + 1] << 16 | padded[2 : n + 2] << 8 | padded[3 : n + 3]
    win = np.empty((n, 8), dtype=np.uint32)
    for shift in range(8):
        win[:, shift] = word << np.uint32(shift)
    return win.ravel()


@lru_cache(maxsize=4)
def _token_bits_table(sizes: tuple[int, ...], word_size: int) -> NDArray[Any]:
    """Length in bits of a token, indexed by its first 19 bits (flag, size index, length - 1)."""
    head = np.arange(1 << _TOKEN_HEAD_BITS, dtype=np.uint32)
    size = np.asarray(sizes, dtype=np.uint32)[head >> np.uint32(16) & np.uint32(3)]
    count = (head << np.uint32(16) >> (np.uint32(32) - size)) + np.uint32(1)
    words = np.where(head >> np.uint32(18) == 1, np.uint32(1), count)
    table: NDArray[np.int32] = (3 + size + word_size * words).astype(np.int32)
    return table


def _decode_tokens(data: NDArray[Any], num: int, sizes: tuple[int, ...]) -> NDArray[Any]:
    """Decode the token stream after the header into ``num`` uint8 values.

    Where a token starts depends on every token before it, so the chain of starts is followed in
    Python, over a ``next start`` table that numpy computes for every bit offset at once (one
    lookup of the token's first 19 bits): one list lookup per token.
    """
    win = _bit_windows(data)
    n_bits = win.size
    token_bits = _token_bits_table(sizes, 8)[win >> np.uint32(32 - _TOKEN_HEAD_BITS)]
    next_start = np.arange(n_bits, dtype=np.int32) + token_bits
    starts = _follow_chain(next_start, n_bits)
    if starts.size == 0:
        raise BrushRLEError(f"brush RLE has no runs after its header, expected {num} values")

    head = win[starts]
    size = np.asarray(sizes, dtype=np.int64)[(head >> np.uint32(29) & np.uint32(3)).astype(np.intp)]
    count = ((head << np.uint32(3)).astype(np.int64) >> (32 - size)) + 1
    ends = np.cumsum(count)
    n_tokens = int(np.searchsorted(ends, num)) + 1
    if n_tokens > starts.size or ends[n_tokens - 1] != num:
        got = int(ends[min(n_tokens, starts.size) - 1])
        raise BrushRLEError(f"brush RLE decodes to {got} values, expected {num} (corrupt data)")
    if next_start[starts[n_tokens - 1]] > n_bits:
        raise BrushRLEError("brush RLE is truncated: its last run is cut off")
    starts, size, count = starts[:n_tokens], size[:n_tokens], count[:n_tokens]
    is_run = (head[:n_tokens] >> np.uint32(31)) == 1
    # A repeated run holds one word; a literal run holds `count` words, one value each.
    n_words = np.where(is_run, 1, count)
    first = np.repeat(starts + 3 + size, n_words)
    offset = np.arange(first.size) - np.repeat(np.cumsum(n_words) - n_words, n_words)
    values = (win[first + 8 * offset] >> np.uint32(24)).astype(np.uint8)
    repeats = np.where(np.repeat(is_run, n_words), np.repeat(count, n_words), 1)
    return np.repeat(values, repeats)


def _follow_chain(next_start: NDArray[Any], n_bits: int) -> NDArray[Any]:
    """Bit offsets of consecutive tokens, from the end of the header to the end of the data.

    A plain walk; jumping several tokens per step costs more in random-access numpy gathers over
    every bit offset than it saves in interpreted steps (measured).
    """
    nxt = memoryview(next_start)  # type: ignore[arg-type]  # numpy arrays are buffers
    starts = array("q")  # appends as fast as a list; numpy reads it without a copy
    append = starts.append
    p, last = _HEADER_BITS, n_bits - 3  # a token needs at least its flag and size-index bits
    while p <= last:  # a token running past the end stops the walk; the caller checks it
        append(p)
        p = nxt[p]
    return np.frombuffer(starts, dtype=np.int64)
