"""Image files: sizes as Label Studio sees them (EXIF orientation applied)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ovss_label.converters.ls_tasks import file_name

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


def oriented_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only (no decoding)."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def image_size_from_dir(root: Path) -> Callable[[dict[str, Any], str], tuple[int, int] | None]:
    """A size lookup for ``export_tasks_to_coco``: the task image's file name under ``root``."""

    def lookup(task: dict[str, Any], url: str) -> tuple[int, int] | None:
        path = root / file_name(url)
        try:
            return oriented_size(path)
        except (OSError, UnidentifiedImageError):
            return None

    return lookup
