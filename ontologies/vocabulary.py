"""``Vocabulary``: the class names a model segments, their text queries and prompt templates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._data import DEFAULT_TEMPLATE_SET, template_problem, template_sets

IMAGE_LABEL_TAGS = (
    "BrushLabels",
    "PolygonLabels",
    "RectangleLabels",
    "BitmaskLabels",
    "KeyPointLabels",
    "EllipseLabels",
)
"""Label Studio control tags whose ``<Label>`` values :meth:`Vocabulary.from_label_config` reads."""

BACKGROUND = "background"
"""The class name that means "no object" (any case): proposers treat it as the hidden background
and never turn it into an instance."""


def is_background(name: str) -> bool:
    """True for the background class, ``"background"`` in any case (``"Background"`` too: label
    values are the annotators' spelling)."""
    return name.lower() == BACKGROUND


def _default_templates() -> tuple[str, ...]:
    return template_sets()[DEFAULT_TEMPLATE_SET]


@dataclass(frozen=True)
class Vocabulary:
    """Class names with their text queries (synonyms) and prompt templates.

    Attributes:
        names: Class names as the annotation tool shows them (Label Studio label values), in
            class-index order; unique after stripping.
        synonyms: Per class, the text queries the text encoder sees, e.g.
            ``("television monitor", "tv monitor", ...)`` for ``"tvmonitor"``. Each class's
            score is the max over its queries (NACLIP). Never empty; same length as ``names``.
        templates: Prompt templates, each with one ``{}`` slot that receives a synonym; a query's
            embedding is the mean over templates. Defaults to the 80 ImageNet templates.
        name: Where the vocabulary comes from, e.g. ``"voc21"`` or ``"custom"``.
    """

    names: tuple[str, ...]
    synonyms: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...] = field(default_factory=_default_templates)
    name: str = "custom"

    def __post_init__(self) -> None:
        # Accept lists from untyped callers, but store tuples so the object stays hashable.
        names = _as_tuple(self.names, "names")
        synonyms = tuple(
            _as_tuple(s, "synonyms entry") for s in _as_tuple(self.synonyms, "synonyms")
        )
        templates = _as_tuple(self.templates, "templates")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "synonyms", synonyms)
        object.__setattr__(self, "templates", templates)
        _check_names(names)
        _check_synonyms(names, synonyms)
        _check_templates(templates)
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Vocabulary name must be a non-empty string, got {self.name!r}")

    def __len__(self) -> int:
        """Returns the number of classes."""
        return len(self.names)

    @classmethod
    def from_labels(
        cls,
        labels: str | Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        name: str = "custom",
    ) -> Vocabulary:
        """Builds a vocabulary from label names, each its own only synonym.

        Args:
            labels: Comma-separated names (``"cat, dog"``) or a sequence of names. Names are
                stripped; empty ones are dropped.
            templates: Prompt templates with one ``{}`` each; None means the 80 ImageNet ones.
            name: The vocabulary's name.

        Returns:
            The vocabulary, classes in the given order.

        Raises:
            ValueError: No names, or a name given twice.
        """
        items = labels.split(",") if isinstance(labels, str) else list(labels)
        names = [str(item).strip() for item in items]
        names = [n for n in names if n]
        if not names:
            raise ValueError(f"no label names in {labels!r}; pass e.g. 'cat, dog, person'")
        duplicates = _repeated(names)
        if duplicates:
            raise ValueError(f"label names given more than once: {duplicates}; list each once")
        return cls._build(names, [[n] for n in names], templates, name)

    @classmethod
    def from_label_config(
        cls,
        config_xml: str,
        control: str | None = None,
        templates: Sequence[str] | None = None,
        *,
        name: str = "custom",
    ) -> Vocabulary:
        """Builds a vocabulary from a Label Studio labeling config.

        Labels come from the image-labelling controls (:data:`IMAGE_LABEL_TAGS`) in config
        order; a label in several controls keeps its first position and merges its synonyms.
        A label's synonyms are its ``predicted_values`` attribute split on ``","`` (stripped,
        empties dropped) when present, else the label value itself.

        Args:
            config_xml: The project's labeling config XML.
            control: Name of one control to read (e.g. ``"brush"``); None reads all of them.
            templates: Prompt templates with one ``{}`` each; None means the 80 ImageNet ones.
            name: The vocabulary's name.

        Returns:
            The vocabulary; names are the ``<Label value>`` strings, verbatim.

        Raises:
            ValueError: The XML does not parse, ``control`` names no image-labelling control,
                or no image-labelling control has labels.
        """
        return cls.from_interface(parse_label_config(config_xml), control, templates, name=name)

    @classmethod
    def from_interface(
        cls,
        interface: Any,
        control: str | None = None,
        templates: Sequence[str] | None = None,
        *,
        name: str = "custom",
    ) -> Vocabulary:
        """:meth:`from_label_config` for a parsed SDK ``LabelInterface`` (a large config is
        parsed once, not once per reader: ``converters.ls_project.ProjectConfig`` does that)."""
        merged: dict[str, list[str]] = {}
        for ctrl in _image_label_controls(interface, control):
            for value in ctrl.labels:
                attrs: dict[str, Any] = ctrl.labels_attrs[value].attr
                queries = merged.setdefault(value, [])
                queries += [q for q in _split_predicted(attrs, value) if q not in queries]
        if not merged:
            where = f"control {control!r}" if control else "the labeling config"
            raise ValueError(
                f"no labels found in {where}; add <Label value=...> children to one of "
                f"{', '.join(IMAGE_LABEL_TAGS)}"
            )
        return cls._build(list(merged), list(merged.values()), templates, name)

    @classmethod
    def _build(
        cls,
        names: Sequence[str],
        synonyms: Iterable[Sequence[str]],
        templates: Sequence[str] | None,
        name: str,
    ) -> Vocabulary:
        chosen = _default_templates() if templates is None else _template_tuple(templates)
        return cls(tuple(names), tuple(tuple(s) for s in synonyms), chosen, name)

    def queries(self) -> tuple[list[str], list[int]]:
        """Flattens the synonyms into text queries, as NACLIP does.

        Returns:
            ``(queries, query_idx)``: every synonym of every class in class order, and for each
            query the index of its class in ``names`` (so per-class scores are a max over
            the queries with that index).
        """
        queries = [q for syns in self.synonyms for q in syns]
        query_idx = [i for i, syns in enumerate(self.synonyms) for _ in syns]
        return queries, query_idx

    def with_templates(self, templates: Sequence[str]) -> Vocabulary:
        """Returns a copy that uses other prompt templates.

        Args:
            templates: Prompt templates with one ``{}`` each, e.g. ``["a photo of a {}."]``.

        Returns:
            The same classes and synonyms with ``templates``.
        """
        return Vocabulary(self.names, self.synonyms, _template_tuple(templates), self.name)


def _template_tuple(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str):
        raise ValueError(f"templates must be a list of strings, e.g. [{templates!r}]")
    return tuple(templates)


def _as_tuple(value: object, what: str) -> tuple[Any, ...]:
    # A bare string is a sequence too; reject it rather than split it into characters.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"Vocabulary {what} must be a tuple or list, not {value!r}")
    return tuple(value)


def _check_names(names: tuple[Any, ...]) -> None:
    if not names:
        raise ValueError("Vocabulary needs at least one class name")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
    duplicates = _repeated(n.strip() for n in names)
    if duplicates:
        raise ValueError(f"duplicate class names {duplicates}; give each class once")


def _repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted (linear: projects have 10,000s of labels)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


def _check_synonyms(names: tuple[str, ...], synonyms: tuple[tuple[Any, ...], ...]) -> None:
    if len(synonyms) != len(names):
        raise ValueError(
            f"got {len(synonyms)} synonym lists for {len(names)} names; give one list per name"
        )
    for name, syns in zip(names, synonyms, strict=True):
        if not syns:
            raise ValueError(f"class {name!r} has no synonyms; use ({name!r},) at least")
        for syn in syns:
            # Outer spaces would change the text query and not survive a label-config round trip.
            if not isinstance(syn, str) or not syn.strip() or syn != syn.strip():
                raise ValueError(
                    f"class {name!r}: synonym {syn!r} must be a non-empty string without "
                    "outer spaces"
                )


def _check_templates(templates: tuple[Any, ...]) -> None:
    if not templates:
        raise ValueError("Vocabulary needs at least one template, e.g. 'a photo of a {}.'")
    for template in templates:
        problem = template_problem(template)
        if problem:
            raise ValueError(problem)


def _split_predicted(attrs: dict[str, Any], value: str) -> list[str]:
    raw = attrs.get("predicted_values")
    parts = [p.strip() for p in str(raw).split(",")] if raw is not None else []
    return [p for p in parts if p] or [value]


def parse_label_config(config_xml: str) -> Any:
    """The SDK's ``LabelInterface`` of a labeling config XML; ValueError says why it cannot be
    parsed. The one place the XML is parsed: every reader goes through it, once per config."""
    # Imported here: the SDK takes a noticeable time to import and most callers never need it.
    from label_studio_sdk.label_interface.interface import LabelInterface

    if not isinstance(config_xml, str) or not config_xml.strip():
        raise ValueError("the labeling config is empty; pass the project's <View>...</View> XML")
    try:
        return LabelInterface(config_xml)
    except Exception as exc:  # the SDK raises its own exception types for XML and schema errors
        raise ValueError(
            f"cannot parse the labeling config: {exc}; pass valid Label Studio XML"
        ) from exc


def _image_label_controls(interface: Any, control: str | None) -> list[Any]:
    controls = [c for c in (interface.controls or ()) if c.tag in IMAGE_LABEL_TAGS]
    if control is None:
        return controls
    chosen = [c for c in controls if c.name == control]
    if not chosen:
        available = ", ".join(repr(c.name) for c in controls) or "none"
        raise ValueError(
            f"no image-labelling control named {control!r}; available controls: {available}"
        )
    return chosen
