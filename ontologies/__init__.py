"""Vocabularies: class names, their NACLIP text queries (synonyms) and prompt templates.

Named ontologies (``voc21``, ``coco_stuff``, ``ade20k``, ...) come from the YAML files in
``ontologies/data``, which are the source of truth; custom vocabularies come from label names
or from a Label Studio labeling config, and :func:`label_config` goes the other way.

Example:
    >>> from ovss_label.ontologies import load
    >>> vocab = load("voc21")
    >>> vocab.names[:2]
    ('background', 'aeroplane')
"""

from .label_config import (
    BRUSH_TAG,
    IMAGE_TAG,
    LABEL_CONFIG_KINDS,
    POLYGON_TAG,
    RECTANGLE_TAG,
    class_colors,
    label_config,
)
from .registry import OntologyInfo, list_ontologies, load, ontology_info, templates
from .vocabulary import (
    BACKGROUND,
    IMAGE_LABEL_TAGS,
    Vocabulary,
    is_background,
    parse_label_config,
)

__all__ = [
    "BACKGROUND",
    "BRUSH_TAG",
    "IMAGE_LABEL_TAGS",
    "IMAGE_TAG",
    "LABEL_CONFIG_KINDS",
    "POLYGON_TAG",
    "RECTANGLE_TAG",
    "OntologyInfo",
    "Vocabulary",
    "class_colors",
    "is_background",
    "label_config",
    "list_ontologies",
    "load",
    "ontology_info",
    "parse_label_config",
    "templates",
]
