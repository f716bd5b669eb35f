"""``ProjectConfig``: a labeling config parsed once, read alike by the server, ``predict`` and
``export`` (vocabulary with synonyms, result targets, method, score threshold)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import half_and_half
from PIL import Image

from ovss_label.cli import cli
from ovss_label.commands import export as export_cmd
from ovss_label.converters import ProjectConfig, ResultTargets
from ovss_label.converters.ls_project import NO_TARGETS
from ovss_label.methods import METHODS

BOTH = """
<View>
  <Image name="img" value="$photo"/>
  <BrushLabels name="mask" toName="img" ovss_min_score="0.1">
    <Label value="Cat" predicted_values="cat, kitten"/>
    <Label value="Mug" predicted_values="cup,mug"/>
  </BrushLabels>
  <PolygonLabels name="outline" toName="img" ovss_method="clip_sam">
    <Label value="Mug"/>
    <Label value="Dog"/>
  </PolygonLabels>
</View>
"""
"""Both controls, synonyms, a data field that is not ``image``, and both ovss_ attributes."""

RECTANGLES = """
<View>
  <Image name="img" value="$picture"/>
  <RectangleLabels name="box" toName="img"><Label value="car"/></RectangleLabels>
</View>
"""


@pytest.fixture()
def parses(monkeypatch) -> list[int]:
    """One entry per ``LabelInterface`` built, wherever it is built."""
    import label_studio_sdk.label_interface.interface as sdk

    counted: list[int] = []
    real = sdk.LabelInterface.__init__

    def counting(self, *args, **kwargs):
        counted.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(sdk.LabelInterface, "__init__", counting)
    return counted


def test_the_fields_of_a_config_with_both_controls():
    config = ProjectConfig.parse(BOTH, "naclip")
    assert config.vocabulary.names == ("Cat", "Mug", "Dog")
    assert config.vocabulary.synonyms == (("cat", "kitten"), ("cup", "mug", "Mug"), ("Dog",))
    assert config.output == ResultTargets("both", "mask", "outline", "img", "photo")
    assert config.method == "clip_sam" and config.min_score == 0.1
    assert config.data_key == "photo"


def test_kind_picks_controls_and_the_caller_gives_the_default_method():
    one = BOTH.replace(' ovss_method="clip_sam"', "")
    config = ProjectConfig.parse(one, "pnp_ovss", kind="polygon")
    assert config.method == "pnp_ovss" and config.output.kind == "polygon"
    assert config.output.polygon_name == "outline"


def test_the_last_control_that_sets_the_method_wins():
    config = BOTH.replace('ovss_min_score="0.1"', 'ovss_method="naclip+sam"')
    assert ProjectConfig.parse(config, "naclip").method == "clip_sam"


def test_a_config_without_brush_or_polygon_is_read_but_has_no_targets():
    config = ProjectConfig.parse(RECTANGLES, "naclip")
    assert config.vocabulary.names == ("car",) and config.data_key == "picture"
    assert config.targets is None
    with pytest.raises(ValueError, match=NO_TARGETS):
        config.output  # noqa: B018


def test_export_reads_a_config_without_an_image():
    # e.g. text spans: nothing to export, but reading the config must not crash.
    text = """<View><Text name="t" value="$text"/>
    <RectangleLabels name="l" toName="t"><Label value="cat"/></RectangleLabels></View>"""
    config = ProjectConfig.parse(text, "naclip", predicting=False)
    assert config.data_key is None and config.vocabulary.names == ("cat",)


@pytest.mark.parametrize(
    ("config", "kind", "match"),
    [
        ("", None, "the labeling config is empty"),
        ("<View><Image name='i'", None, "cannot parse the labeling config"),
        (RECTANGLES, "brush", NO_TARGETS),
        (BOTH.replace("<PolygonLabels", "<X").replace("</PolygonLabels", "</X"), "polygon",
         r"--format polygon needs a polygon control; config has \['brush'\]"),
        (BOTH.replace('toName="img"', 'toName="nothing"', 1), None,
         "control 'mask' does not point at an <Image> \\(toName='nothing'\\)"),
        (BOTH.replace("clip_sam", "sam3"), None,
         re.escape(f"ovss_method 'sam3' is not one of {', '.join(METHODS)}")),
        (BOTH.replace('"0.1"', '"high"'), None,
         'ovss_min_score="high" is not a number from 0 to 1, e.g. "0.3"'),
        (BOTH.replace('"0.1"', '"1.5"'), None, "is not a number from 0 to 1"),
        ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"/></View>', None,
         "no labels found in the labeling config"),
    ],
)  # fmt: skip
def test_errors_name_what_is_wrong(config, kind, match):
    with pytest.raises(ValueError, match=match):
        ProjectConfig.parse(config, "naclip", kind=kind)


def test_one_parse_per_config(parses):
    from ovss_label.backend.server.projects import ProjectCache

    ProjectConfig.parse(BOTH, "naclip")
    assert len(parses) == 1
    cache = ProjectCache("naclip")
    for _ in range(3):
        assert cache.get(BOTH).vocabulary.names == ("Cat", "Mug", "Dog")
    with pytest.raises(ValueError, match=NO_TARGETS):  # refused once, the refusal cached
        cache.get(RECTANGLES)
    with pytest.raises(ValueError, match=NO_TARGETS):
        cache.get(RECTANGLES)
    assert len(parses) == 3


def test_the_server_refuses_an_empty_request_config():
    from ovss_label.backend.server.projects import parse_project

    for missing in (" ", "", None, 5):
        with pytest.raises(ValueError) as refused:
            parse_project(missing, "naclip")
        assert str(refused.value) == "the request has no label_config"


def test_a_parsed_config_is_weighed_by_its_text_and_vocabulary():
    """The config cache is bounded in bytes: an entry weighs its config text and each label and
    synonym with 64 bytes for the string object; a refusal weighs its text."""
    from ovss_label.backend.server.projects import _cost, parse_project

    project = parse_project(BOTH, "naclip")
    strings = [*project.vocabulary.names, *(s for g in project.vocabulary.synonyms for s in g)]
    assert _cost(BOTH, project) == len(BOTH) + sum(len(s) + 64 for s in strings)
    assert _cost(BOTH, ValueError("refused")) == len(BOTH)


def test_export_parses_the_config_once(parses, tmp_path):
    from helpers import LABEL_CONFIG, LS_EXPORT

    out = tmp_path / "coco.json"
    args = ["export", "--coco", str(LS_EXPORT), "-o", str(out), "--label-config", str(LABEL_CONFIG)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(parses) == 1


def test_export_reads_a_config_without_brush_or_polygon():
    assert export_cmd._categories(RECTANGLES, None) == (["car"], "picture")


@pytest.fixture()
def photo_dir(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)
    Image.fromarray(pixels).save(folder / "a.png")
    return folder


def test_predict_export_and_server_agree(photo_dir, tmp_path, monkeypatch, parses):
    """One config with both controls and synonyms: ``predict`` proposes with the server's
    vocabulary and writes to the server's controls and data field, and ``export`` reads the
    predictions back with the same categories."""
    import ovss_label.backend.predict as job
    from ovss_label.backend.server.projects import ProjectCache

    config = tmp_path / "project.xml"
    config.write_text(BOTH.replace(' ovss_method="clip_sam"', ""))
    server = ProjectCache("naclip").get(config.read_text())
    seen = {}
    real = job.predict_files

    def spy(proposer, vocabulary, paths, *, output, **options):
        seen.update(vocabulary=vocabulary, output=output, post=options["postprocess"])
        return real(proposer, vocabulary, paths, output=output, **options)

    monkeypatch.setattr(job, "predict_files", spy)
    monkeypatch.setattr(job, "propose", half_and_half)  # labels 0 and 1 at known scores
    tasks_file, coco = tmp_path / "tasks.json", tmp_path / "predicted-coco.json"
    parses.clear()
    result = CliRunner().invoke(cli, [
        "--tiny", "predict", str(photo_dir), "--label-config", str(config), "-o", str(tasks_file),
        "--coco", str(coco), "--document-root", str(photo_dir), "--background", "none",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(parses) == 1
    assert seen["vocabulary"] == server.vocabulary and seen["output"] == server.output
    assert seen["post"].min_score == server.min_score == 0.1
    (task,) = json.loads(tasks_file.read_text())
    assert list(task["data"]) == [server.output.data_key]
    regions = task["predictions"][0]["result"]
    assert {(r["from_name"], r["to_name"], r["type"]) for r in regions} == {
        ("mask", "img", "brushlabels"),
        ("outline", "img", "polygonlabels"),
    }
    names = list(server.vocabulary.names)
    assert [c["name"] for c in json.loads(coco.read_text())["categories"]] == names
    exported = tmp_path / "exported-coco.json"
    result = CliRunner().invoke(cli, [
        "export", "--coco", str(tasks_file), "-o", str(exported), "--include-predictions",
        "--label-config", str(config),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    back = json.loads(exported.read_text())
    assert [c["name"] for c in back["categories"]] == names
    assert {names[a["category_id"] - 1] for a in back["annotations"]} == {"Cat", "Mug"}
    assert export_cmd._categories(config.read_text(), None) == (names, server.output.data_key)


def test_predict_takes_the_configs_method_and_threshold_unless_told(photo_dir, tmp_path):
    from ovss_label.commands.predict import _project

    run = _project(None, None, BOTH, None, None, None)
    assert (run.method, run.min_score, run.output.kind) == ("clip_sam", 0.1, "both")
    assert _project(None, None, BOTH, None, "naclip", None).method == "naclip"  # told
    told = _project(None, None, BOTH, "brush", "naclip", 0.5)
    assert (told.min_score, told.output.kind) == (0.5, "brush")
    plain = _project("cat, dog", None, None, None, "pnp_ovss", None)
    assert (plain.method, plain.min_score, plain.output) == ("pnp_ovss", 0.0, ResultTargets())
    config = tmp_path / "boxes.xml"
    config.write_text(RECTANGLES)
    args = ["predict", str(photo_dir), "--label-config", str(config), "-o", "t.json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and NO_TARGETS in result.output
