"""Reading and validating the packaged YAML files in ``ontologies/data``.

The YAML files are the source of truth for class names, NACLIP synonyms and prompt templates.
Everything here is parsed once per process (``functools.cache``) and validated on load, so a
hand-edit that breaks the schema fails with the file and the entry named, not later in a model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from types import MappingProxyType
from typing import Any

import yaml

TEMPLATES_FILE = "templates.yaml"
DEFAULT_TEMPLATE_SET = "imagenet80"

_DATASET_KEYS = {"name", "title", "source", "templates", "ontologies", "background", "classes"}
_DATASET_REQUIRED = _DATASET_KEYS - {"background"}
_ONTOLOGY_KEYS = {"background", "aliases", "source"}
_TEMPLATE_SET_KEYS = {"source", "templates"}


@dataclass(frozen=True)
class ClassEntry:
    """One class of a dataset file.

    Attributes:
        name: The dataset's official label, e.g. ``"tvmonitor"``.
        synonyms: The NACLIP text queries for the class, verbatim and in order.
    """

    name: str
    synonyms: tuple[str, ...]


@dataclass(frozen=True)
class OntologyEntry:
    """One loadable ontology declared by a dataset file.

    Attributes:
        name: Canonical ontology name, e.g. ``"voc21"``.
        background: Whether the dataset's background class is prepended at index 0.
        aliases: Other accepted names, e.g. ``("voc",)``.
        source: Where the class list comes from (repository and file).
    """

    name: str
    background: bool
    aliases: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class DatasetFile:
    """A parsed and validated dataset file, e.g. ``voc.yaml``.

    Attributes:
        file: File name inside ``ontologies/data``.
        name: Dataset name, e.g. ``"voc"``.
        title: Human-readable dataset title.
        source: Where the class lists come from.
        templates: Name of the template set in ``templates.yaml``.
        ontologies: The loadable ontologies built from this file, in file order.
        background: The background class, or None when the dataset has no background variant.
        classes: The classes in NACLIP file order (without background).
    """

    file: str
    name: str
    title: str
    source: str
    templates: str
    ontologies: tuple[OntologyEntry, ...]
    background: ClassEntry | None
    classes: tuple[ClassEntry, ...]


def template_problem(template: object) -> str | None:
    """Says what is wrong with a prompt template, if anything.

    Args:
        template: A candidate template; valid ones are strings with exactly one ``{}`` slot.

    Returns:
        A description of the problem, or None when the template is valid.
    """
    if not isinstance(template, str):
        return f"template {template!r} is not a string"
    if template.count("{}") != 1:
        return f"template {template!r} must contain '{{}}' exactly once (the class slot)"
    try:
        filled = template.format("\x00")
    except (IndexError, KeyError, ValueError):
        return f"template {template!r} does not work with str.format; escape braces as '{{{{ }}}}'"
    if "\x00" not in filled:
        return f"template {template!r} has no usable '{{}}' slot"
    return None


def _error(file: str, where: str, problem: str) -> ValueError:
    return ValueError(f"ontologies/data/{file}: {where}: {problem}; fix the YAML file")


def _text(value: object, file: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise _error(
            file, where, f"expected a non-empty string without outer spaces, got {value!r}"
        )
    return value


def _texts(value: object, file: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _error(file, where, f"expected a non-empty list of strings, got {value!r}")
    return tuple(_text(item, file, f"{where}[{i}]") for i, item in enumerate(value))


def _mapping(
    value: object, file: str, where: str, keys: set[str], required: set[str]
) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _error(file, where, f"expected a mapping, got {value!r}")
    unknown = sorted(str(k) for k in set(value) - keys)
    missing = sorted(required - set(value))
    problems = []
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise _error(file, where, ", ".join(problems) + f" (allowed: {sorted(keys)})")
    return value


def _any_mapping(value: object, file: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict) or not value:
        raise _error(file, where, f"expected a non-empty mapping, got {value!r}")
    return value


def _class(value: object, file: str, where: str) -> ClassEntry:
    # A bare string is a class whose only synonym is its name; a one-key mapping gives synonyms.
    if isinstance(value, str):
        name = _text(value, file, where)
        return ClassEntry(name, (name,))
    if isinstance(value, dict) and len(value) == 1:
        ((name, synonyms),) = value.items()
        name = _text(name, file, where)
        return ClassEntry(name, _texts(synonyms, file, f"{where} ({name})"))
    raise _error(file, where, f"expected 'name' or 'name: [synonyms]', got {value!r}")


def _ontology(name: object, value: object, file: str) -> OntologyEntry:
    oname = _text(name, file, "ontologies")
    where = f"ontologies.{oname}"
    entry = _mapping(value, file, where, _ONTOLOGY_KEYS, {"background", "source"})
    if not isinstance(entry["background"], bool):
        raise _error(file, f"{where}.background", "expected true or false")
    aliases = _texts(entry["aliases"], file, f"{where}.aliases") if "aliases" in entry else ()
    source = _text(entry["source"], file, f"{where}.source")
    return OntologyEntry(oname, entry["background"], aliases, source)


def _background(value: object, file: str) -> ClassEntry:
    entry = _mapping(value, file, "background", {"name", "synonyms"}, {"name", "synonyms"})
    name = _text(entry["name"], file, "background.name")
    return ClassEntry(name, _texts(entry["synonyms"], file, "background.synonyms"))


def _dataset(file: str, raw: object) -> DatasetFile:
    data = _mapping(raw, file, "top level", _DATASET_KEYS, _DATASET_REQUIRED)
    ontologies = _any_mapping(data["ontologies"], file, "ontologies")
    raw_classes = data["classes"]
    if not isinstance(raw_classes, list) or not raw_classes:
        raise _error(file, "classes", "expected a non-empty list")
    dataset = DatasetFile(
        file=file,
        name=_text(data["name"], file, "name"),
        title=_text(data["title"], file, "title"),
        source=_text(data["source"], file, "source"),
        templates=_text(data["templates"], file, "templates"),
        ontologies=tuple(_ontology(k, v, file) for k, v in ontologies.items()),
        background=_background(data["background"], file) if "background" in data else None,
        classes=tuple(_class(v, file, f"classes[{i}]") for i, v in enumerate(raw_classes)),
    )
    _check_dataset(dataset)
    return dataset


def _check_dataset(dataset: DatasetFile) -> None:
    file = dataset.file
    if any(o.background for o in dataset.ontologies) and dataset.background is None:
        raise _error(file, "background", "an ontology has 'background: true' but no background")
    names = [c.name for c in dataset.classes]
    if dataset.background is not None:
        names.append(dataset.background.name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _error(file, "classes", f"duplicate class names {duplicates}")
    if dataset.templates not in template_sets():
        raise _error(file, "templates", f"unknown template set {dataset.templates!r}")


def _read(file: str) -> object:
    text = (files("ovss_label.ontologies") / "data" / file).read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _error(file, "syntax", str(exc)) from exc


@functools.cache
def dataset_files() -> tuple[DatasetFile, ...]:
    """Parses every dataset file in ``ontologies/data`` (all ``*.yaml`` but the templates).

    Returns:
        The dataset files sorted by file name.

    Raises:
        ValueError: A file breaks the schema; the message names the file and the entry.
    """
    data_dir = files("ovss_label.ontologies") / "data"
    names = sorted(p.name for p in data_dir.iterdir() if p.name.endswith(".yaml"))
    return tuple(_dataset(name, _read(name)) for name in names if name != TEMPLATES_FILE)


@functools.cache
def template_sets() -> Mapping[str, tuple[str, ...]]:
    """Parses ``templates.yaml``.

    Returns:
        Template set name -> its templates in file order (each holds one ``{}`` slot).

    Raises:
        ValueError: The file breaks the schema; the message names the set and the template.
    """
    sets = _any_mapping(_read(TEMPLATES_FILE), TEMPLATES_FILE, "top level")
    parsed: dict[str, tuple[str, ...]] = {}
    for name, value in sets.items():
        entry = _mapping(value, TEMPLATES_FILE, str(name), _TEMPLATE_SET_KEYS, _TEMPLATE_SET_KEYS)
        _text(entry["source"], TEMPLATES_FILE, f"{name}.source")
        templates = _texts(entry["templates"], TEMPLATES_FILE, f"{name}.templates")
        for i, template in enumerate(templates):
            problem = template_problem(template)
            if problem:
                raise _error(TEMPLATES_FILE, f"{name}.templates[{i}]", problem)
        parsed[_text(name, TEMPLATES_FILE, "top level")] = templates
    # Read-only view: the result is cached and shared by every caller.
    return MappingProxyType(parsed)
