"""Masks, polygons, Label Studio brush RLE, results and labeling configs, COCO, YOLO and
LabelMe; numpy/OpenCV/shapely/pycocotools.

Never imports torch (teams run exports on machines without a GPU stack) nor ``backend``. Each
module opens with its format contract; coordinates are in the COCO pixel-edge frame (pixel
(r, c) covers [c, c+1) x [r, r+1)), Label Studio percent coordinates are that frame scaled to
[0, 100].
"""

from .brush import BrushRLEError, brush_rle_to_mask, mask_to_brush_rle
from .coco import (
    SEGMENTATION_MODES,
    CocoError,
    CocoImage,
    CocoTaskWriter,
    CocoWriter,
    annotation_to_instance,
    export_tasks_to_coco,
    polygon_rings,
    read_coco,
    write_bytes_atomic,
    write_json_atomic,
)
from .instance import Instance, mask_has_holes
from .labelme import LabelmeWriter
from .labelstudio import (
    REGION_TYPES,
    RegionError,
    instance_to_results,
    instances_to_results,
    rectangle_corners,
    rectangle_value,
    result_to_instance,
)
from .ls_import import ImportReport, coco_to_tasks
from .ls_project import ProjectConfig, ResultTargets
from .ls_regions import PREFER_CHOICES, merge_same_instances
from .ls_tasks import (
    ExportReport,
    ImageWriter,
    Skipped,
    TaskImage,
    TaskSource,
    export_images,
    file_name,
    image_path,
    image_url,
    pick_record,
)
from .overlay import overlay_image, write_overlay
from .polygons import mask_to_polygons, polygons_to_mask, ring_to_flat
from .yolo import YoloWriter

__all__ = [
    "PREFER_CHOICES",
    "REGION_TYPES",
    "SEGMENTATION_MODES",
    "BrushRLEError",
    "CocoError",
    "CocoImage",
    "CocoTaskWriter",
    "CocoWriter",
    "ExportReport",
    "ImageWriter",
    "ImportReport",
    "Instance",
    "LabelmeWriter",
    "ProjectConfig",
    "RegionError",
    "ResultTargets",
    "Skipped",
    "TaskImage",
    "TaskSource",
    "YoloWriter",
    "annotation_to_instance",
    "brush_rle_to_mask",
    "coco_to_tasks",
    "export_images",
    "export_tasks_to_coco",
    "file_name",
    "image_path",
    "image_url",
    "instance_to_results",
    "instances_to_results",
    "mask_has_holes",
    "mask_to_brush_rle",
    "mask_to_polygons",
    "merge_same_instances",
    "overlay_image",
    "pick_record",
    "polygon_rings",
    "polygons_to_mask",
    "read_coco",
    "rectangle_corners",
    "rectangle_value",
    "result_to_instance",
    "ring_to_flat",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_overlay",
]
