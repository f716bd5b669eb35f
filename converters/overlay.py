"""Mask overlays as PNG: the image, each instance in its class colour, outlines and a legend.

Format contract:
    input image: (H, W, 3) uint8 RGB in the original frame (EXIF orientation applied), the
    frame every ``Instance.mask`` (H, W) bool lives in. Colours: ``"#rrggbb"`` per label, the
    same as the Label Studio config written for the vocabulary (``ontologies.class_colors``).
    Output: an RGB PNG of size (W + legend width, max(H, legend height)); masks are blended at
    ``alpha`` over the image with a 1-px outline in the full colour; the legend lists each
    label present with its colour, instance count and best score.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from .instance import Instance

__all__ = ["overlay_image", "write_overlay"]

_LEGEND_WIDTH = 220
_ROW = 18


def _rgb(color: str) -> tuple[int, int, int]:
    value = color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def overlay_image(
    image: NDArray[Any],
    instances: Sequence[Instance],
    colors: Mapping[str, str],
    *,
    alpha: float = 0.5,
    title: str = "",
) -> Image.Image:
    """The overlay as a PIL image (module docstring).

    Args:
        image: (H, W, 3) uint8 RGB.
        instances: Masks of the image's size.
        colors: Label -> ``"#rrggbb"``; labels not in it are drawn white.
        alpha: Mask opacity in [0, 1].
        title: A line written at the top of the legend (e.g. the model version).
    """
    canvas = image.astype(np.float32)
    for inst in instances:
        if inst.mask.shape != image.shape[:2]:
            raise ValueError(f"mask {inst.mask.shape} does not match image {image.shape[:2]}")
        rgb = np.array(_rgb(colors.get(inst.label, "#ffffff")), np.float32)
        canvas[inst.mask] = (1 - alpha) * canvas[inst.mask] + alpha * rgb
    out = canvas.round().astype(np.uint8)
    for inst in instances:
        contours, _ = cv2.findContours(
            inst.mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, _rgb(colors.get(inst.label, "#ffffff")), 1)
    return _with_legend(Image.fromarray(out), instances, colors, title)


def _with_legend(
    picture: Image.Image, instances: Sequence[Instance], colors: Mapping[str, str], title: str
) -> Image.Image:
    rows: dict[str, list[float]] = {}
    for inst in instances:
        rows.setdefault(inst.label, []).append(inst.score if inst.score is not None else 1.0)
    title_lines = [title[i : i + 34] for i in range(0, len(title), 34)][:2] or ["proposals"]
    lines = len(title_lines) + 1 + max(len(rows), 1)
    height = max(picture.height, lines * _ROW + 8)
    sheet = Image.new("RGB", (picture.width + _LEGEND_WIDTH, height), (24, 24, 24))
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x, y = picture.width + 8, 6
    for line in title_lines:
        draw.text((x, y), line, fill=(230, 230, 230), font=font)
        y += _ROW
    draw.text((x, y), f"{len(instances)} instances", fill=(180, 180, 180), font=font)
    for label, scores in rows.items():
        y += _ROW
        draw.rectangle((x, y + 2, x + 12, y + 14), fill=_rgb(colors.get(label, "#ffffff")))
        text = f"{label[:20]}  x{len(scores)}  {max(scores):.2f}"
        draw.text((x + 18, y), text, fill=(230, 230, 230), font=font)
    if not rows:
        draw.text((x, y + _ROW), "(nothing found)", fill=(180, 180, 180), font=font)
    return sheet


def write_overlay(
    path: str | os.PathLike[str],
    image: NDArray[Any],
    instances: Sequence[Instance],
    colors: Mapping[str, str],
    **options: Any,
) -> None:
    """Writes :func:`overlay_image` as PNG to ``path``."""
    overlay_image(image, instances, colors, **options).save(os.fspath(path), format="PNG")
