"""Named ontologies (``voc21``, ``coco_stuff``, ...) and template sets from ``ontologies/data``."""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from ._data import DatasetFile, OntologyEntry, dataset_files, template_sets
from .vocabulary import Vocabulary


@dataclass(frozen=True)
class OntologyInfo:
    """What ``list_ontologies`` says about one loadable ontology.

    Attributes:
        name: Canonical name, e.g. ``"voc21"``; pass it (or an alias) to ``load``.
        title: Human-readable title, e.g. ``"Pascal VOC 2012 + background"``.
        num_classes: Number of classes, background included when present.
        has_background: Whether class 0 is the dataset's background class.
        aliases: Other accepted names, e.g. ``("voc",)`` for ``voc20``.
        source: Where the class list and synonyms come from (repository and file).
        templates: Name of the template set the ontology uses by default, e.g. ``"imagenet80"``.
    """

    name: str
    title: str
    num_classes: int
    has_background: bool
    aliases: tuple[str, ...]
    source: str
    templates: str


def _info(dataset: DatasetFile, entry: OntologyEntry) -> OntologyInfo:
    suffix = " + background" if entry.background else ""
    return OntologyInfo(
        name=entry.name,
        title=dataset.title + suffix,
        num_classes=len(dataset.classes) + int(entry.background),
        has_background=entry.background,
        aliases=entry.aliases,
        source=entry.source,
        templates=dataset.templates,
    )


@functools.cache
def _index() -> dict[str, tuple[DatasetFile, OntologyEntry]]:
    # Lower-cased name or alias -> (file, ontology); names are case-insensitive.
    index: dict[str, tuple[DatasetFile, OntologyEntry]] = {}
    for dataset in dataset_files():
        for entry in dataset.ontologies:
            for key in (entry.name, *entry.aliases):
                clash = index.get(key.lower())
                if clash is not None:
                    raise ValueError(
                        f"ontology name {key!r} is declared by both {clash[0].file} and "
                        f"{dataset.file}; rename one of them"
                    )
                index[key.lower()] = (dataset, entry)
    return index


def _unknown(kind: str, name: str, available: list[str]) -> ValueError:
    close = difflib.get_close_matches(name.lower(), available, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; available: {', '.join(available)}.{hint}")


def _lookup(name: str) -> tuple[DatasetFile, OntologyEntry]:
    found = _index().get(name.strip().lower())
    if found is None:
        raise _unknown("ontology", name, sorted(_index()))
    return found


def list_ontologies() -> list[OntologyInfo]:
    """Lists the loadable ontologies.

    Returns:
        One entry per canonical name (aliases are attributes, not entries), grouped by
        dataset file in file-name order, in each file in declaration order.
    """
    return [_info(d, e) for d in dataset_files() for e in d.ontologies]


def ontology_info(name: str) -> OntologyInfo:
    """Describes one ontology.

    Args:
        name: Ontology name or alias, any case, e.g. ``"VOC"``.

    Returns:
        The ontology's description.

    Raises:
        ValueError: Unknown name; the message lists the available names.
    """
    return _info(*_lookup(name))


@functools.cache
def _load(dataset: DatasetFile, entry: OntologyEntry) -> Vocabulary:
    classes = dataset.classes
    if entry.background and dataset.background is not None:
        # Background is class 0, as in NACLIP's cls_voc21.txt / cls_context60.txt.
        classes = (dataset.background, *classes)
    return Vocabulary(
        names=tuple(c.name for c in classes),
        synonyms=tuple(c.synonyms for c in classes),
        templates=template_sets()[dataset.templates],
        name=entry.name,
    )


def load(name: str) -> Vocabulary:
    """Loads a named ontology.

    Args:
        name: Ontology name or alias, any case: ``voc20`` (``voc``), ``voc21``, ``context59``
            (``context``), ``context60``, ``coco_object`` (``coco``), ``coco_object81``,
            ``coco_stuff``, ``ade20k`` (``ade``), ``cityscapes``.

    Returns:
        The vocabulary: official class names, NACLIP synonyms, the dataset's template set;
        its ``name`` is the canonical ontology name.

    Raises:
        ValueError: Unknown name; the message lists the available names.
    """
    return _load(*_lookup(name))


def templates(set_name: str) -> tuple[str, ...]:
    """Returns a named prompt-template set.

    Args:
        set_name: ``"imagenet80"`` (OpenAI's 80 ImageNet templates, NACLIP's default) or
            ``"photo"`` (``"a photo of a {}."``); any case.

    Returns:
        The templates in order, each with one ``{}`` slot.

    Raises:
        ValueError: Unknown set; the message lists the available sets.
    """
    sets = {k.lower(): v for k, v in template_sets().items()}
    found = sets.get(set_name.strip().lower())
    if found is None:
        raise _unknown("template set", set_name, sorted(template_sets()))
    return found
