"""Protocols as data (backend/evaluation/protocols.py): each dataset's method settings, pinned
to the reference configs, and applied to the methods ``eval`` builds."""

from __future__ import annotations

import pytest

from ovss_label.backend.evaluation.groundtruth import GroundTruth
from ovss_label.backend.evaluation.predictions import method_predictors
from ovss_label.backend.evaluation.protocols import protocol_options
from ovss_label.ontologies import load


def test_naclip_protocol_is_naclips_cfg_files():
    # sinahmr/NACLIP configs/cfg_voc21.py: Resize (2048, 336), slide_crop 0, prob_thd 0.1.
    assert protocol_options("naclip", "voc", "naclip") == {
        "short_side": 336, "slide_crop": 0, "slide_stride": 112, "prob_thd": 0.1,
        "background": "auto",
    }  # fmt: skip
    assert protocol_options("naclip", "voc20", "naclip")["background"] == "none"
    assert protocol_options("naclip", "context60", "naclip")["slide_crop"] == 224
    assert protocol_options("naclip", "coco_object", "naclip")["prob_thd"] == 0.1
    assert protocol_options("naclip", "ade20k", "naclip")["prob_thd"] == 0.0
    assert protocol_options("naclip", "cityscapes", "naclip+sam")["short_side"] == 560


def test_tcl_protocol_and_other_methods():
    # kakaobrain/tcl segmentation/configs/_base_/datasets/*.py: (2048, 448), slide 448/224.
    tcl = protocol_options("tcl", "cityscapes", "naclip")
    assert (tcl["short_side"], tcl["slide_crop"], tcl["slide_stride"]) == (448, 448, 224)
    assert protocol_options("tcl", "voc", "naclip")["prob_thd"] == 0.4  # TCL's bg_thresh
    assert protocol_options("naclip", "voc", "pnp_ovss") == {"always_background": True}
    assert protocol_options("naclip", "coco_stuff", "pnp_ovss+sam") == {"always_background": False}
    assert protocol_options("naclip", "voc", "clip_sam") == {}
    assert protocol_options("naclip", "", "naclip") == {}  # a project: each method's defaults
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol_options("mine", "voc", "naclip")


def _truth(ontology: str, key: str) -> GroundTruth:
    vocabulary = load(ontology)
    return GroundTruth(key, vocabulary.names, vocabulary, [], protocol=key)


def test_eval_builds_each_method_with_its_protocol_settings():
    (voc,) = method_predictors(["naclip"], _truth("voc21", "voc"), options={"tiny": True})
    config = voc.proposer.config
    assert (config.slide_crop, config.prob_thd, config.background) == (0, 0.1, "auto")
    (tcl,) = method_predictors(
        ["naclip"], _truth("voc21", "voc"), protocol="tcl", options={"tiny": True}
    )
    assert (tcl.proposer.config.short_side, tcl.proposer.config.slide_crop) == (448, 448)
    assert tcl.model_version != voc.model_version  # the settings are part of the identity
    (stuff,) = method_predictors(["naclip"], _truth("ade20k", "ade20k"), options={"tiny": True})
    assert stuff.proposer.config.background == "none"  # no hidden background on ADE20K
