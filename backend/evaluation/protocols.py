"""Evaluation protocols as data: per dataset, the settings each method runs with.

``naclip`` is NACLIP's own evaluation (sinahmr/NACLIP @0cac3a6 ``configs/cfg_*.py``,
docs/algorithms.md §1.3): short side 336 (Cityscapes 560; long side at most 2048), sliding
windows 224/112 (VOC: the whole image in one pass), ``prob_thd`` 0.1 where the class list has
a background line (VOC21, Context60, COCO-Object) and 0.0 elsewhere.

``tcl`` is the protocol of TCL (kakaobrain/tcl ``segmentation/configs/_base_/datasets/*.py``,
``configs/tcl.yml``) that FMbSeg reports under: short side 448, sliding windows 448/224 for
every dataset, and its background threshold ``bg_thresh = 0.4`` on datasets with a background
class. TCL thresholds its own mask scores; here the value is applied as NACLIP's ``prob_thd``
(the probability below which a pixel goes to the background) [choose: the nearest equivalent].

Each entry names method options by method family; a ``<dense>+sam`` method runs its dense
method with that method's options. Methods without an entry run with their own defaults
(``clip_sam``'s windows are part of its method, FMbSeg stage 1). PnP-OVSS adds its background
channel always on object datasets and only with fewer than 3 classes on stuff datasets
(letitiabanana/PnP-OVSS, docs/algorithms.md §2.7). A project's own labels (``dataset=""``) get
every method's defaults: the settings a labelling project runs with.
"""

from __future__ import annotations

from typing import Any

PROTOCOLS = ("naclip", "tcl")


def _naclip(short_side: int, crop: int, prob_thd: float, background: bool) -> dict[str, Any]:
    return {
        "short_side": short_side,
        "slide_crop": crop,
        "slide_stride": 112,  # unused when crop is 0 (one window over the image)
        "prob_thd": prob_thd,
        # The dataset's own class list decides: its background line when it has one, else none.
        "background": "auto" if background else "none",
    }


def _tcl(background: bool) -> dict[str, Any]:
    return {
        "short_side": 448,
        "slide_crop": 448,
        "slide_stride": 224,
        "prob_thd": 0.4 if background else 0.0,
        "background": "auto" if background else "none",
    }


def _pnp(objects: bool) -> dict[str, Any]:
    return {"always_background": objects}


# dataset -> (short side, NACLIP slide crop, has a background class, object dataset)
_DATASETS: dict[str, tuple[int, int, bool, bool]] = {
    "voc": (336, 0, True, True),
    "voc20": (336, 0, False, True),
    "context60": (336, 224, True, False),
    "context59": (336, 224, False, False),
    "coco_object": (336, 224, True, True),
    "coco_stuff": (336, 224, False, False),
    "ade20k": (336, 224, False, False),
    "cityscapes": (560, 224, False, False),
}


def protocol_options(protocol: str, dataset: str, method: str) -> dict[str, Any]:
    """Options for ``method_plan(method, **options)`` under ``protocol`` on ``dataset`` ("" for a
    project's own labels: none).

    Raises:
        ValueError: Unknown protocol, or a dataset the protocol has no entry for.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    if not dataset:
        return {}
    if dataset not in _DATASETS:
        raise ValueError(f"protocol {protocol!r} has no settings for dataset {dataset!r}")
    short_side, crop, background, objects = _DATASETS[dataset]
    family = method.split("+", 1)[0]
    if family == "naclip":
        if protocol == "tcl":
            return _tcl(background)
        return _naclip(short_side, crop, 0.1 if background else 0.0, background)
    if family == "pnp_ovss":
        return _pnp(objects)
    return {}


def protocol_table() -> list[dict[str, Any]]:
    """One row per (protocol, dataset): what NACLIP runs with (the README's table)."""
    return [
        {"protocol": p, "dataset": d, **protocol_options(p, d, "naclip")}
        for p in PROTOCOLS
        for d in _DATASETS
    ]
