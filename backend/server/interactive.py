"""Interactive prompts: smart KeyPointLabels (positive and negative) and RectangleLabels -> SAM;
a TextArea prompt -> an ad-hoc open-vocabulary query with the project's method.

Label Studio posts the user's regions as ``context.result`` (docs/label_studio.md §2.4): keypoints
``value.x, value.y`` and rectangles ``value.x, y, width, height`` in percent of
``original_width/height``; a keypoint's ``is_positive`` says foreground (default) or
background; the chosen label is ``value.keypointlabels[0]`` / ``value.rectanglelabels[0]`` (or
``value.labels[0]``). All points and the last rectangle form one SAM prompt on the image's
cached embedding; the answer is one prediction in ``results[0]`` holding the mask: one brush
region, or in a polygon-only project one polygon region per connected part.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import Instance
from ovss_label.ontologies import Vocabulary

from ..models.sam import LoadedSam
from ..predict import Output
from ..proposers import FeatureCache
from ..proposers.sam_prompts import SamEncoder, decode

PROMPT_TYPES = ("keypointlabels", "rectanglelabels")


@dataclass(frozen=True)
class ClickPrompt:
    """One SAM prompt from the user's regions, original pixels.

    Attributes:
        points: (N, 2) float (x, y), or None.
        point_labels: (N,) int, 1 foreground / 0 background.
        box: (4,) float xyxy, or None.
        label: The label the user chose, or None.
    """

    points: NDArray[Any] | None
    point_labels: NDArray[Any] | None
    box: NDArray[Any] | None
    label: str | None


def text_prompt(context: Any) -> str | None:
    """The text of a TextArea region in ``context.result`` (an ad-hoc query), or None.

    Label Studio sends ``value.text`` as a list of strings; a bare string is accepted as one.

    Raises:
        ValueError: ``value.text`` is neither (e.g. a number): the request is malformed.
    """
    items = context.get("result") if isinstance(context, dict) else None
    for region in items if isinstance(items, list) else []:
        if isinstance(region, dict) and region.get("type") == "textarea":
            value = region.get("value")
            texts = value.get("text") if isinstance(value, dict) else None
            texts = [texts] if isinstance(texts, str) else texts or []
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("a textarea region's value.text must be a list of strings")
            text = texts[0].strip() if texts else ""
            if text:
                return text
    return None


def label_for_text(text: str, vocabulary: Vocabulary, encoder: Any | None) -> str:
    """The project label an ad-hoc query's masks get.

    A label or synonym equal to the text (any case) wins; otherwise the label whose text
    embedding is closest to the query's (the method's own CLIP text encoder), else the first.
    """
    lowered = text.lower()
    for name, synonyms in zip(vocabulary.names, vocabulary.synonyms, strict=True):
        if lowered == name.lower() or lowered in (s.lower() for s in synonyms):
            return str(name)
    if encoder is None:
        return str(vocabulary.names[0])
    labels, idx = encoder.query_features(vocabulary)
    query, _ = encoder.query_features(Vocabulary(("q",), ((text,),), vocabulary.templates))
    similarity = (labels @ query[0]).tolist()
    best = max(range(len(idx)), key=lambda i: similarity[i])
    return str(vocabulary.names[idx[best]])


def has_prompt(context: Any) -> bool:
    """True when the context holds keypoint or rectangle regions."""
    items = context.get("result") if isinstance(context, dict) else None
    return isinstance(items, list) and any(
        isinstance(r, dict) and r.get("type") in PROMPT_TYPES for r in items
    )


def click_prompt(context: dict[str, Any], height: int, width: int) -> ClickPrompt:
    """The SAM prompt of ``context.result`` for an image of (height, width) pixels."""
    points, labels, box, label = [], [], None, None
    for region in context.get("result", []):
        kind, value = region.get("type"), region.get("value") or {}
        if kind not in PROMPT_TYPES:
            continue
        chosen = value.get(kind) or value.get("labels") or []
        label = chosen[0] if chosen else label
        x, y = float(value["x"]) * width / 100, float(value["y"]) * height / 100
        if kind == "keypointlabels":
            points.append((x, y))
            labels.append(0 if region.get("is_positive") is False else 1)
        else:
            w, h = float(value["width"]) * width / 100, float(value["height"]) * height / 100
            box = np.array([x, y, x + w, y + h])
    return ClickPrompt(
        np.array(points, np.float64) if points else None,
        np.array(labels, np.int64) if labels else None,
        box,
        label,
    )


def interactive_prediction(
    sam: LoadedSam,
    cache: FeatureCache,
    image: NDArray[Any],
    context: dict[str, Any],
    output: Output,
    labels: tuple[str, ...],
) -> tuple[list[dict[str, Any]], float]:
    """Result items (one mask: a brush region, or a polygon per part) and its score for one
    interactive request; a label that is not one of ``labels`` becomes the first of them."""
    fallback_label = labels[0]
    prompt = click_prompt(context, int(image.shape[0]), int(image.shape[1]))
    features = cache.features(SamEncoder(sam), image)
    masks, iou = decode(
        sam,
        features,
        points=prompt.points[None] if prompt.points is not None else None,
        labels=prompt.point_labels[None] if prompt.point_labels is not None else None,
        boxes=prompt.box[None] if prompt.box is not None else None,
        multimask=prompt.box is None,  # SAM's advice: one mask for a box, best of 3 for clicks
        cache=cache,  # the next click on this image skips the decoder's image-only work
    )
    score = float(np.clip(iou[0], 0, 1))
    label = prompt.label if prompt.label in labels else fallback_label  # never an unknown label
    instance = Instance(masks[0], label, score)
    single = replace(output, kind="brush" if output.kind in ("brush", "both") else "polygon")
    return single.results([instance]), score
