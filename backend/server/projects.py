"""What a labeling config tells the server, parsed once per config and kept within a byte budget.

Label Studio sends the whole labeling config with every ``/setup`` and ``/predict`` (and with
every webhook), and ``/setup`` runs before every prediction request. A config can be large (a
10,000-label ontology is ~0.3 MB of XML; we have seen 10 MB), so it is parsed once, by one
``LabelInterface``, and the parse is cached. The cache is bounded by bytes, not by a count of
configs: 64 small configs and 64 ten-megabyte ones are not the same memory.

The method of a project: the ``ovss_method`` attribute of its BrushLabels/PolygonLabels
control (e.g. ``<BrushLabels name="tag" toName="image" ovss_method="naclip+sam">``), else the
server default. Its score threshold: ``ovss_min_score`` on the same control (e.g.
``ovss_min_score="0.3"``: proposals scoring below 0.3 are not sent; default 0, all are). The
vocabulary: the config's labels with their ``predicted_values``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ovss_label.methods import METHODS
from ovss_label.ontologies import Vocabulary

from ..lru import ByteLRU
from ..predict import Output


@dataclass(frozen=True)
class Project:
    """What a labeling config tells the server: method, vocabulary, result controls, and the
    score below which proposals are dropped."""

    method: str
    vocabulary: Vocabulary
    output: Output
    min_score: float = 0.0


def parse_project(label_config: str, default_method: str) -> Project:
    """The project's method, vocabulary and controls (one parse); ValueError names what is
    missing or wrong."""
    from label_studio_sdk.label_interface.interface import LabelInterface

    if not isinstance(label_config, str) or not label_config.strip():
        raise ValueError("the request has no label_config")
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises its own types for XML and schema errors
        raise ValueError(f"cannot parse the labeling config: {exc}") from exc
    output = Output.from_interface(interface, None)
    method = _control_attribute(interface, "ovss_method") or default_method
    if method not in METHODS:
        raise ValueError(f"ovss_method {method!r} is not one of {', '.join(METHODS)}")
    min_score = _min_score(_control_attribute(interface, "ovss_min_score"))
    return Project(method, Vocabulary.from_interface(interface), output, min_score)


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


def _cost(label_config: str, project: Project | ValueError) -> int:
    """Bytes an entry holds, roughly: the config text plus its vocabulary's strings."""
    size = len(label_config)
    if isinstance(project, Project):
        vocabulary = project.vocabulary
        size += sum(len(n) + 64 for n in vocabulary.names)
        size += sum(len(s) + 64 for group in vocabulary.synonyms for s in group)
    return size


class ProjectCache:
    """Parsed configs (and refusals: a bad config is not parsed again per request) in a
    :class:`ByteLRU` of ``max_bytes``; thread-safe."""

    def __init__(self, default_method: str, max_bytes: int = 32 << 20) -> None:
        self.default_method = default_method
        self.parsed: ByteLRU[str, Project | ValueError] = ByteLRU(max_bytes, _cost)

    def get(self, label_config: str) -> Project:
        """The parsed project; raises the config's ValueError (cached too)."""
        parsed = self.parsed.get(label_config)
        if parsed is None:
            try:
                parsed = parse_project(label_config, self.default_method)
            except ValueError as exc:
                parsed = ValueError(str(exc))  # without its traceback: cached, raised again
            self.parsed.put(label_config, parsed)
        if isinstance(parsed, ValueError):
            raise parsed
        return parsed
