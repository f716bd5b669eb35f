"""Mask overlays as PNG: the image, each instance in its class colour, outlines and a legend.

Format contract:
    input image: (H, W, 3) uint8 RGB in the original frame (EXIF orientation applied), the
    frame every ``Instance.mask`` (H, W) bool lives in. Colours: ``"#rrggbb"`` per label, the
    same as the Label Studio config written for the vocabulary (``ontologies.class_colors``).
    Output: an RGB PNG of size (W + legend width, max(H, legend height)); masks are blended at
    ``alpha`` over the image with a 1-px outline in the full colour; the legend lists each
    label present with its colour, instance count and best score, under the title (wrapped
    at ``-``, ``+`` and spaces, so a model version is never cut mid-word) and, when given, a
    banner in white on red (e.g. "this was made by a tiny random model").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from .instance import Instance

__all__ = ["BANNER_RGB", "overlay_image", "title_lines", "write_overlay"]

_LEGEND_WIDTH = 220
_ROW = 18
_TITLE_CHARS = 34  # what fits in the legend in PIL's default font
BANNER_RGB = (200, 0, 0)


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
    banner: str = "",
) -> Image.Image:
    """The overlay as a PIL image (module docstring).

    Args:
        image: (H, W, 3) uint8 RGB.
        instances: Masks of the image's size.
        colors: Label -> ``"#rrggbb"``; labels not in it are drawn white.
        alpha: Mask opacity in [0, 1].
        title: Written at the top of the legend (e.g. the model version), wrapped by
            :func:`title_lines`.
        banner: A warning above the title, white on a red band ``BANNER_RGB``; "" for none.
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
    return _with_legend(Image.fromarray(out), instances, colors, title, banner)


def title_lines(title: str, width: int = _TITLE_CHARS) -> list[str]:
    """``title`` in lines of at most ``width`` characters, broken after ``-``, ``+``, ``·``
    (model versions) or a space; only a piece longer than a whole line is cut."""
    lines = [""]
    for piece in re.findall(r"[^-+· ]*[-+· ]|[^-+· ]+$", title):
        if lines[-1] and len(lines[-1]) + len(piece.rstrip()) > width:
            lines.append("")
        lines[-1] += piece
        while len(lines[-1]) > width:
            lines[-1:] = [lines[-1][:width], lines[-1][width:]]
    return [line.rstrip() for line in lines if line.strip()]


def _with_legend(
    picture: Image.Image,
    instances: Sequence[Instance],
    colors: Mapping[str, str],
    title: str,
    banner: str,
) -> Image.Image:
    rows: dict[str, list[float]] = {}
    for inst in instances:
        rows.setdefault(inst.label, []).append(inst.score if inst.score is not None else 1.0)
    banner_lines = title_lines(banner)
    text_lines = title_lines(title) or ["proposals"]
    lines = len(banner_lines) + len(text_lines) + 1 + max(len(rows), 1)
    height = max(picture.height, lines * _ROW + 8)
    sheet = Image.new("RGB", (picture.width + _LEGEND_WIDTH, height), (24, 24, 24))
    sheet.paste(picture, (0, 0))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x, y = picture.width + 8, 6
    if banner_lines:
        bottom = y + len(banner_lines) * _ROW - 2
        draw.rectangle((picture.width, 0, sheet.width - 1, bottom), fill=BANNER_RGB)
    for line in banner_lines:
        draw.text((x, y), line, fill=(255, 255, 255), font=font)
        y += _ROW
    for line in text_lines:
        draw.text((x, y), line, fill=(230, 230, 230), font=font)
        y += _ROW
    count = f"{len(instances)} instance" + ("" if len(instances) == 1 else "s")
    draw.text((x, y), count, fill=(180, 180, 180), font=font)
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
