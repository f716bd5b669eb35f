"""What a labeling config tells the server, parsed once per config and kept within a byte budget.

Label Studio sends the whole labeling config with every ``/setup`` and ``/predict`` (and with
every webhook), and ``/setup`` runs before every prediction request. A config can be large (a
10,000-label ontology is ~0.3 MB of XML; we have seen 10 MB), so it is parsed once
(``converters.ls_project.ProjectConfig``: method, vocabulary, result controls, score threshold)
and the parse is cached. The cache is bounded by bytes, not by a count of configs: 64 small
configs and 64 ten-megabyte ones are not the same memory.

The method of a project: the ``ovss_method`` attribute of its BrushLabels/PolygonLabels
control (e.g. ``<BrushLabels name="tag" toName="image" ovss_method="naclip+sam">``), else the
server default. Its score threshold: ``ovss_min_score`` on the same control (e.g.
``ovss_min_score="0.3"``: proposals scoring below 0.3 are not sent; default 0, all are). The
vocabulary: the config's labels with their ``predicted_values``.
"""

from __future__ import annotations

# Project: what the server reads of a project (.method, .vocabulary, .output, .min_score).
from ovss_label.converters.ls_project import NO_TARGETS, ProjectConfig
from ovss_label.converters.ls_project import ProjectConfig as Project

from ..lru import ByteLRU

__all__ = ["Project", "ProjectCache", "ProjectConfig", "parse_project"]


def parse_project(label_config: str, default_method: str) -> Project:
    """The project's method, vocabulary and controls (one parse); ValueError names what is
    missing or wrong, including a config with no BrushLabels or PolygonLabels control."""
    if not isinstance(label_config, str) or not label_config.strip():
        raise ValueError("the request has no label_config")
    project = ProjectConfig.parse(label_config, default_method)
    if project.targets is None:  # refused now (and cached), not at every prediction
        raise ValueError(NO_TARGETS)
    return project


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
