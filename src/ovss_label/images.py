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


def load_rgb(path: Path, max_pixels: int | None = None) -> Any:
    """Decodes an image file to (H, W, 3) uint8 RGB in the frame Label Studio shows.

    EXIF orientation is applied; grayscale, palette, RGBA (composited on black, as alpha is
    not part of the photo), CMYK and 16-bit images are converted.

    Raises:
        ValueError: The file is not a readable image, or has more than ``max_pixels`` pixels
            (the message names it).
    """
    return _decode(path, str(path), max_pixels)


def decode_rgb(data: bytes, name: str = "image", max_pixels: int | None = None) -> Any:
    """:func:`load_rgb` for bytes in memory (downloaded task media)."""
    import io

    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Any, name: str, max_pixels: int | None) -> Any:
    import numpy as np
    from PIL import ImageOps

    try:
        with Image.open(source) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"{width}x{height} px is more than the {max_pixels:,} px limit")
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(image, dtype=np.float64)
                top = 65535.0 if wide.max() > 255 else 255.0
                image = Image.fromarray((wide / top * 255).round().astype(np.uint8))
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {name}: {exc}") from exc
