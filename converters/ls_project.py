"""A Label Studio project's labeling config, parsed once: vocabulary, result targets, method and
options, for every reader (the server and ``predict --project``, ``predict --label-config``,
``export``).

Format contract (Label Studio labeling config XML, 1.20-1.23)
=============================================================
A ``<View>`` with an ``<Image name="image" value="$image"/>`` object and labelling controls::

    <BrushLabels name="brush" toName="image" ovss_method="naclip+sam" ovss_min_score="0.3">
      <Label value="person" predicted_values="person,pedestrian"/>
    </BrushLabels>
    <PolygonLabels name="polygon" toName="image">...</PolygonLabels>

- Vocabulary: the ``<Label value>`` strings of every image-labelling control
  (``IMAGE_LABEL_TAGS``) in config order; a label's text queries are its ``predicted_values``
  split on ``,`` (else the value itself), merged over controls (``Vocabulary.from_interface``).
- Result targets: the BrushLabels and/or PolygonLabels control whose ``name`` predictions carry
  as ``from_name``, the ``<Image>`` it points at (``to_name``) and that image's task data field
  (``value="$image"`` -> ``data["image"]``). A config with neither control (e.g. a
  RectangleLabels project) can be exported but not predicted into.
- Method: ``ovss_method`` on any control (the last control that sets it wins), one of
  ``ovss_label.methods.METHODS``; else the caller's default (``serve --method``,
  ``predict --method``).
- Score threshold: ``ovss_min_score`` on any control, a number from 0 to 1: proposals scoring
  below it are not sent. Absent: 0 (all are).

The XML is parsed by one ``label_studio_sdk`` ``LabelInterface`` per config: a 10,000-label
ontology is ~0.3 MB of XML (we have seen 10 MB), and the server sees the config with every
request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ovss_label.methods import METHODS
from ovss_label.ontologies import (
    BRUSH_TAG,
    IMAGE_TAG,
    POLYGON_TAG,
    Vocabulary,
    parse_label_config,
)

from .instance import Instance
from .labelstudio import OutputKind, instances_to_results

__all__ = ["KINDS", "NO_TARGETS", "ProjectConfig", "ResultTargets"]

KINDS: tuple[OutputKind, ...] = ("brush", "polygon", "both")
"""Result kinds: brush RLE, polygons, or both per instance (``predict --format``)."""

NO_TARGETS = "the labeling config has no BrushLabels or PolygonLabels control"
"""Why a config cannot receive predictions."""


@dataclass(frozen=True)
class ResultTargets:
    """The Label Studio controls that predictions target (``from_name``, ``to_name``).

    Attributes:
        kind: ``brush``, ``polygon`` or ``both``: the result types written per instance.
        brush_name: ``from_name`` of the BrushLabels control.
        polygon_name: ``from_name`` of the PolygonLabels control.
        to_name: The Image object's name.
        data_key: Task data field of the image (``$image`` -> ``image``).
    """

    kind: OutputKind = "brush"
    brush_name: str = BRUSH_TAG
    polygon_name: str = POLYGON_TAG
    to_name: str = IMAGE_TAG
    data_key: str = "image"

    def results(self, instances: list[Instance], min_area: float = 0.0) -> list[dict[str, Any]]:
        """Label Studio result items for one image's instances; no polygon part is smaller
        than ``min_area`` (a fraction of the image, as ``PostprocessConfig.min_area``)."""
        return instances_to_results(
            instances,
            self.kind,
            brush_name=self.brush_name,
            polygon_name=self.polygon_name,
            to_name=self.to_name,
            min_area_fraction=min_area,
        )


@dataclass(frozen=True)
class ProjectConfig:
    """What a labeling config tells every reader (see the module docstring).

    Attributes:
        method: The proposal method (``ovss_method``, else the caller's default).
        vocabulary: The labels and their text queries, in config order.
        targets: Where predictions go; None when the config has no BrushLabels or
            PolygonLabels control (:attr:`output` then says so).
        min_score: Proposals scoring below this are dropped (``ovss_min_score``; 0 keeps all).
        data_key: The task data field of the image (``$image`` -> ``image``): the targets'
            image, else the first ``<Image>``; None when unknown (``TaskSource`` then takes
            ``image`` or the task's only string field).
    """

    method: str
    vocabulary: Vocabulary
    targets: ResultTargets | None
    min_score: float = 0.0
    data_key: str | None = None

    @property
    def output(self) -> ResultTargets:
        """The result targets; ValueError when the config has none (nothing to predict into)."""
        if self.targets is None:
            raise ValueError(NO_TARGETS)
        return self.targets

    @classmethod
    def parse(
        cls,
        label_config: str,
        default_method: str,
        *,
        kind: str | None = None,
        predicting: bool = True,
    ) -> ProjectConfig:
        """Reads a labeling config XML, parsing it once.

        Args:
            label_config: The project's ``<View>...</View>``.
            default_method: The method when no control sets ``ovss_method``.
            kind: The result types wanted (``brush``, ``polygon``, ``both``; ``predict
                --format``); None takes what the config has.
            predicting: False for readers that predict nothing (``export``): the backend's
                own attributes and result targets are then not checked (a typo in
                ``ovss_method`` must not stop an export); unusable ones read as absent.

        Raises:
            ValueError: The XML does not parse, has no labels, ``kind`` asks for a control it
                lacks, or ``ovss_method``/``ovss_min_score`` is not valid; the message names it.
        """
        interface = parse_label_config(label_config)
        try:
            targets = _targets(interface, kind)
            method = _control_attribute(interface, "ovss_method") or default_method
            if method not in METHODS:
                raise ValueError(f"ovss_method {method!r} is not one of {', '.join(METHODS)}")
            min_score = _min_score(_control_attribute(interface, "ovss_min_score"))
        except ValueError:
            if predicting:
                raise
            targets, method, min_score = None, default_method, 0.0
        vocabulary = Vocabulary.from_interface(interface)
        data_key = targets.data_key if targets is not None else _first_image_key(interface)
        return cls(method, vocabulary, targets, min_score, data_key)


def _targets(interface: Any, kind: str | None) -> ResultTargets | None:
    """The config's BrushLabels/PolygonLabels controls for ``kind`` (None: what it has)."""
    wanted = None if kind is None else _kind(kind)
    names = {c.tag: c for c in interface.controls}
    brush, polygon = names.get("BrushLabels"), names.get("PolygonLabels")
    available = [k for k, c in (("brush", brush), ("polygon", polygon)) if c is not None]
    if not available:
        if wanted is None:
            return None
        raise ValueError(NO_TARGETS)
    wanted = wanted or _kind("both" if len(available) == 2 else available[0])
    needed = ["brush", "polygon"] if wanted == "both" else [wanted]
    missing = [k for k in needed if k not in available]
    if missing:
        raise ValueError(f"--format {wanted} needs a {missing[0]} control; config has {available}")
    control = brush if brush is not None else polygon
    assert control is not None  # `available` is not empty
    to_name = control.to_name[0]
    image = next((o for o in interface.objects if o.name == to_name), None)
    if image is None or image.tag != "Image":
        raise ValueError(
            f"control {control.name!r} does not point at an <Image> (toName={to_name!r})"
        )
    return ResultTargets(
        wanted,
        brush.name if brush else BRUSH_TAG,
        polygon.name if polygon else POLYGON_TAG,
        to_name,
        image.value.lstrip("$"),
    )


def _kind(kind: str) -> OutputKind:
    """``kind`` as a result kind; ValueError for anything but brush, polygon, both."""
    for known in KINDS:
        if kind == known:
            return known
    raise ValueError(f"unknown result kind {kind!r}; use one of {', '.join(KINDS)}")


def _first_image_key(interface: Any) -> str | None:
    """The data field of the config's first ``<Image>`` (``$image`` -> ``image``), if any."""
    value = next((o.value for o in interface.objects if o.tag == "Image"), None)
    return value[1:] if isinstance(value, str) and value.startswith("$") else None


def _control_attribute(interface: Any, name: str) -> str | None:
    """Attribute ``name`` of the config's controls; the last control that sets it wins."""
    value = None
    for control in interface.controls:
        chosen = control.attr.get(name) if hasattr(control, "attr") else None
        if chosen:
            value = str(chosen)
    return value


def _min_score(value: str | None) -> float:
    """``ovss_min_score`` as a number in [0, 1] (scores are); absent is 0 (keep all)."""
    if value is None:
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:  # also refuses nan
        raise ValueError(f'ovss_min_score="{value}" is not a number from 0 to 1, e.g. "0.3"')
    return number
