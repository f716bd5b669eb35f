"""Converter benchmark: our brush RLE encoder/decoder against the SDK's, and mask -> polygons.

Run ``python bench/converters.py`` (``--repeat N`` for more runs). Every row is timed in this one
run on this machine: the median of N warm runs (the first, cold call is discarded), and the
ratios compare rows measured side by side. Outputs are checked to be identical before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from rich.console import Console
from rich.table import Table

from ovss_label.converters import brush_rle_to_mask, mask_to_brush_rle, mask_to_polygons

SIZE = 1024


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up: first-touch page faults and caches are not what we compare
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def smooth_mask() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    mask = (xx - 400) ** 2 + (yy - 500) ** 2 < 300**2
    mask |= (xx - 850) ** 2 / 4 + (yy - 200) ** 2 < 120**2
    return mask & ~((xx - 400) ** 2 + (yy - 500) ** 2 < 80**2)


def blob_mask(seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).random((SIZE, SIZE)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 25)
    return smooth > np.quantile(smooth, 0.6)


def brush_rows(repeat: int) -> list[tuple[str, str, str, str, str]]:
    masks = {
        "smooth 1024²": smooth_mask(),
        "50% noise 1024²": np.random.default_rng(0).random((SIZE, SIZE)) < 0.5,
    }
    rows = []
    for name, mask in masks.items():
        values = mask.astype(np.uint8) * 255
        rle = mask2rle(values)
        assert mask_to_brush_rle(values) == rle, "encoder output differs from the SDK's"
        decoded = decode_rle(rle).reshape(SIZE, SIZE, 4)[:, :, 3]
        assert np.array_equal(brush_rle_to_mask(rle, SIZE, SIZE), decoded), "decoder differs"
        sdk_enc = median_seconds(lambda v=values: mask2rle(v), max(1, repeat // 3))
        our_enc = median_seconds(lambda v=values: mask_to_brush_rle(v), repeat)
        sdk_dec = median_seconds(lambda r=rle: decode_rle(r), max(1, repeat // 3))
        our_dec = median_seconds(lambda r=rle: brush_rle_to_mask(r, SIZE, SIZE), repeat)
        rows.append(
            (f"encode {name}", f"{len(rle):,} B", _ms(sdk_enc), _ms(our_enc), _x(sdk_enc, our_enc))
        )
        rows.append((f"decode {name}", "", _ms(sdk_dec), _ms(our_dec), _x(sdk_dec, our_dec)))
    return rows


def polygon_rows(repeat: int) -> list[tuple[str, ...]]:
    masks = {"smooth 1024² (2 parts, 1 hole)": smooth_mask(), "blobs 1024²": blob_mask()}
    rows = []
    for name, mask in masks.items():
        polygons = mask_to_polygons(mask)
        seconds = median_seconds(lambda m=mask: mask_to_polygons(m), repeat)
        rings = [r for p in polygons for r in (p.exterior, *p.interiors)]
        vertices = sum(len(r.coords) - 1 for r in rings)
        rate = f"{1 / seconds:.0f} masks/s, {mask.size / seconds / 1e6:.0f} Mpx/s"
        rows.append((name, str(len(polygons)), str(vertices), _ms(seconds), rate))
    return rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _x(reference: float, ours: float) -> str:
    return f"{reference / ours:.1f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    console = Console()
    table = Table(
        title="Label Studio brush RLE: label_studio_sdk vs ovss-label (median of warm runs)"
    )
    for column in ("case", "RLE size", "SDK", "ovss-label", "speed-up"):
        table.add_column(column, justify="right" if column != "case" else "left")
    for row in brush_rows(args.repeat):
        table.add_row(*row)
    console.print(table)
    table = Table(title="mask_to_polygons (tolerance 1 px, IoU guard 0.98)")
    for column in ("mask", "polygons", "vertices", "time", "throughput"):
        table.add_column(column)
    for row in polygon_rows(args.repeat):
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
