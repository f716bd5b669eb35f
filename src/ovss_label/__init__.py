"""ovss-label: open-vocabulary segmentation pre-annotations for Label Studio.

The import package maps the product's top-level folders:

- ``ovss_label.converters`` (``converters/``): masks, polygons, Label Studio brush RLE, COCO. numpy,
  OpenCV, shapely and pycocotools only; never imports torch.
- ``ovss_label.ontologies`` (``ontologies/``): vocabularies (names, synonyms, prompt templates).
- ``ovss_label.backend`` (``backend/``): models, proposers, training and the Label Studio server.
  Torch lives there and only there.
"""

__version__ = "0.1.0"
