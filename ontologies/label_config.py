"""Label Studio labeling configs generated from a ``Vocabulary``.

The generated config round-trips: ``Vocabulary.from_label_config(label_config(v, kind))`` has
the names and synonyms of ``v`` (synonyms travel in the ``predicted_values`` attribute).
"""

from __future__ import annotations

import colorsys
from xml.sax.saxutils import escape

from .vocabulary import Vocabulary

IMAGE_TAG = "image"
"""Name of the ``<Image>`` object tag; predictions use it as ``to_name``."""
BRUSH_TAG = "brush"
"""Name of the ``<BrushLabels>`` control; brush predictions use it as ``from_name``."""
POLYGON_TAG = "polygon"
"""Name of the ``<PolygonLabels>`` control; polygon predictions use it as ``from_name``."""
RECTANGLE_TAG = "bbox"
"""Name of the ``<RectangleLabels>`` control; box predictions use it as ``from_name``."""

# kind -> (control tag, control name) pairs, in output order.
_CONTROLS: dict[str, tuple[tuple[str, str], ...]] = {
    "brush": (("BrushLabels", BRUSH_TAG),),
    "polygon": (("PolygonLabels", POLYGON_TAG),),
    "both": (("BrushLabels", BRUSH_TAG), ("PolygonLabels", POLYGON_TAG)),
    "rectangle": (("RectangleLabels", RECTANGLE_TAG),),
}
LABEL_CONFIG_KINDS = tuple(_CONTROLS)
"""Accepted ``kind`` values of :func:`label_config`."""

# Escape what XML attribute normalisation would otherwise turn into spaces, plus quotes.
_ATTR_ENTITIES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}
_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def _attr(value: str) -> str:
    return '"' + escape(value, _ATTR_ENTITIES) + '"'


def class_colors(num_classes: int) -> list[str]:
    """Returns a deterministic, visually distinct colour per class index.

    Hues step by the golden-ratio conjugate (consecutive classes land far apart on the colour
    wheel); saturation and value alternate so that classes with close hues still differ.

    Args:
        num_classes: How many colours to return.

    Returns:
        ``"#rrggbb"`` strings; entry ``i`` is the colour of class ``i``.
    """
    colors = []
    for i in range(num_classes):
        hue = (i * _GOLDEN_RATIO_CONJUGATE) % 1.0
        saturation = (0.85, 0.6)[i % 2]
        value = (0.95, 0.75)[(i // 2) % 2]
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colors.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colors


def _label_line(name: str, synonyms: tuple[str, ...], color: str) -> str:
    line = f"    <Label value={_attr(name)} background={_attr(color)}"
    if synonyms != (name,):
        bad = [s for s in synonyms if "," in s]
        if bad:
            # predicted_values is comma-separated, so a comma would split one query in two.
            raise ValueError(
                f"class {name!r}: synonyms {bad} contain ','; remove the comma to put them in "
                "a Label Studio predicted_values attribute"
            )
        line += f" predicted_values={_attr(','.join(synonyms))}"
    return line + "/>"


def _controls(kind: str) -> list[tuple[str, str]]:
    controls: list[tuple[str, str]] = []
    for part in kind.split("+"):
        if part not in _CONTROLS:
            raise ValueError(
                f"unknown kind {kind!r}; use one of {', '.join(LABEL_CONFIG_KINDS)}"
                " or several joined by '+'"
            )
        controls += [c for c in _CONTROLS[part] if c not in controls]
    return controls


def label_config(vocab: Vocabulary, kind: str = "brush", *, image_value: str = "$image") -> str:
    """Builds a Label Studio labeling config for a vocabulary.

    Args:
        vocab: The classes; each becomes a ``<Label>`` whose value is the class name, with a
            ``predicted_values`` attribute holding the synonyms when they differ from the name.
        kind: ``"brush"`` (BrushLabels), ``"polygon"`` (PolygonLabels), ``"both"`` (both
            controls, same colours) or ``"rectangle"`` (RectangleLabels); or several joined
            by ``+`` (``"polygon+rectangle"``), in that order.
        image_value: The ``<Image value>``: the task data field, e.g. ``"$image"``.

    Returns:
        The config XML: a ``<View>`` with ``<Image name="image">`` and the control(s) named
        :data:`BRUSH_TAG`, :data:`POLYGON_TAG` or :data:`RECTANGLE_TAG`.

    Raises:
        ValueError: Unknown ``kind``, empty ``image_value``, or a synonym holding a comma.
    """
    controls = _controls(kind)
    if not image_value.strip():
        raise ValueError("image_value is empty; pass the task data field, e.g. '$image'")
    colors = class_colors(len(vocab))
    labels = [
        _label_line(name, syns, color)
        for name, syns, color in zip(vocab.names, vocab.synonyms, colors, strict=True)
    ]
    lines = ["<View>", f'  <Image name={_attr(IMAGE_TAG)} value={_attr(image_value)} zoom="true"/>']
    for tag, control in controls:
        lines.append(f"  <{tag} name={_attr(control)} toName={_attr(IMAGE_TAG)}>")
        lines += labels
        lines.append(f"  </{tag}>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"
