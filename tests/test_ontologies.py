"""Tests of ``ovss_label.ontologies`` and the ``ovss-label ontology`` commands.

Expected values are written here independently of the packaged YAML files: class counts,
spot checks, and SHA-256 digests of the NACLIP class files (sinahmr/NACLIP ``configs/cls_*.txt``,
trailing newline stripped), which the synonyms must reproduce verbatim and in order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from click.testing import CliRunner
from label_studio_sdk.label_interface.interface import LabelInterface

from ovss_label.cli import cli
from ovss_label.ontologies import (
    BACKGROUND,
    BRUSH_TAG,
    IMAGE_TAG,
    LABEL_CONFIG_KINDS,
    POLYGON_TAG,
    Vocabulary,
    class_colors,
    is_background,
    label_config,
    list_ontologies,
    load,
    templates,
)
from ovss_label.ontologies._data import _dataset

COUNTS = {
    "voc20": 20,
    "voc21": 21,
    "context59": 59,
    "context60": 60,
    "coco_object": 80,
    "coco_object81": 81,
    "coco_stuff": 171,
    "ade20k": 150,
    "cityscapes": 19,
}
ALIASES = {"voc": "voc20", "context": "context59", "coco": "coco_object", "ade": "ade20k"}
# sha256 of the NACLIP class file text, one class per line, synonyms joined by ", ".
NACLIP_DIGESTS = {
    "voc20": "c68f65a2b342397cdfe05ff5289517e1e370b1d574a218ff1a17db27f2576db1",
    "voc21": "80e643a9a143966800cd4a49324fd0be2f94c0d7bac817ea16a5f66ed706bc38",
    "context59": "cd808465f06a16169edc25580073f0eda347e64f06cc1c2e24acd0b237f6497d",
    "context60": "e29ff1a0eaea71eb3e090f0ff6abdbcc592fa17f74b4a17ecc6d33c5a9daea4e",
    "coco_object81": "3475d03d61f85ce03812ce62d019de8f2ea51053885374629d29a17fbd3f02a6",
    "coco_stuff": "fb98709b9ab1baff4fd930bac4a77772a0458c7d534911de545f9a4081e14a3e",
    "ade20k": "e53ded02c488bdb903ef000a2d207e4ac4f2bb4502a72572e4aab7c2504aef3a",
    "cityscapes": "6f6782fc1bf92bfd9f5562192e92045e0e093870e613f387f6c98fc66d4ceba4",
}
IMAGENET80_DIGEST = "4f976686fb651bb5803d4689dcd849f75efe0ef19a3c801355bc9a6f03c8a5af"
# NACLIP lines, verbatim ("a, b" = synonyms a and b), and the official VOC names.
_STUFF26_LINE = (
    "sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, "
    "cloud, lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence"
)
_VOC_PERSON_LINE = (
    "person, person in shirt, person in jeans, person in dress, person in sweater, "
    "person in skirt, person in jacket"
)
_VOC_NAMES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
)
STUFF26 = tuple(_STUFF26_LINE.split(", "))
VOC_PERSON = tuple(_VOC_PERSON_LINE.split(", "))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _synonyms(vocab: Vocabulary, name: str) -> tuple[str, ...]:
    return vocab.synonyms[vocab.names.index(name)]


# ---------------------------------------------------------------- named ontologies


@pytest.mark.parametrize(("name", "count"), COUNTS.items())
def test_class_counts(name: str, count: int) -> None:
    vocab = load(name)
    assert len(vocab) == len(vocab.names) == len(vocab.synonyms) == count
    assert vocab.name == name


def test_list_ontologies_matches_counts_and_aliases() -> None:
    infos = {i.name: i for i in list_ontologies()}
    assert {n: i.num_classes for n, i in infos.items()} == COUNTS
    assert {a: n for n, i in infos.items() for a in i.aliases} == ALIASES
    assert {n for n, i in infos.items() if i.has_background} == {
        "voc21",
        "context60",
        "coco_object81",
    }


@pytest.mark.parametrize(("alias", "name"), ALIASES.items())
def test_aliases_and_case_insensitive_names(alias: str, name: str) -> None:
    assert load(alias.upper()) == load(name)


def test_unknown_name_lists_names_and_suggests() -> None:
    with pytest.raises(ValueError, match=r"available: .*voc21") as info:
        load("vco21")
    assert "Did you mean 'voc21'" in str(info.value)


@pytest.mark.parametrize(("name", "digest"), NACLIP_DIGESTS.items())
def test_synonyms_reproduce_naclip_files_verbatim(name: str, digest: str) -> None:
    text = "\n".join(", ".join(syns) for syns in load(name).synonyms)
    assert _sha256(text) == digest


@pytest.mark.parametrize("name", ["voc21", "context60", "coco_object81"])
def test_background_is_class_zero(name: str) -> None:
    with_bg = load(name)
    without = load({"voc21": "voc20", "context60": "context59"}.get(name, "coco_object"))
    assert with_bg.names[0] == "background"
    assert with_bg.names[1:] == without.names
    assert with_bg.synonyms[1:] == without.synonyms


def test_background_synonyms() -> None:
    assert load("voc21").synonyms[0] == STUFF26
    assert load("coco_object81").synonyms[0] == STUFF26
    assert load("context60").synonyms[0] == ("background",)


def test_voc_official_names_and_synonyms() -> None:
    voc = load("voc")
    assert voc.names == tuple(_VOC_NAMES.split())
    assert _synonyms(voc, "boat") == ("ship",)
    assert _synonyms(voc, "diningtable") == ("table",)
    assert _synonyms(voc, "person") == VOC_PERSON
    assert _synonyms(voc, "tvmonitor") == (
        "television monitor",
        "tv monitor",
        "monitor",
        "television",
        "screen",
    )


def test_coco_names_and_synonyms() -> None:
    coco, stuff = load("coco"), load("coco_stuff")
    assert _synonyms(coco, "person") == (*VOC_PERSON, "body")
    assert {"traffic light", "potted plant", "tv", "hair drier"} <= set(coco.names)
    assert stuff.names[:80] == coco.names
    assert _synonyms(stuff, "traffic light") == ("trafficlight",)
    assert _synonyms(stuff, "dining table") == ("diningtable",)
    assert stuff.names[80:83] == ("banner", "blanket", "branch")
    assert {"building-other", "desk-stuff", "playingfield"} <= set(stuff.names)
    assert stuff.names[-1] == "wood"


def test_ade20k_and_cityscapes_names() -> None:
    ade = load("ade")
    assert _synonyms(ade, "chest of drawers") == ("chestofdrawers",)
    spaced = [n for n in ade.names if " " in n]
    assert len(spaced) == 15
    assert ade.names[7] == "bed"
    assert ade.names[-1] == "flag"
    city = load("cityscapes")
    assert city.names[6:8] == ("traffic light", "traffic sign")
    assert _synonyms(city, "traffic sign") == ("trafficsign",)


def test_templates() -> None:
    imagenet = templates("imagenet80")
    assert len(imagenet) == len(set(imagenet)) == 80
    assert imagenet[0] == "a bad photo of a {}."
    assert imagenet[-1] == "a tattoo of the {}."
    assert _sha256("\n".join(imagenet)) == IMAGENET80_DIGEST
    assert templates("PHOTO") == ("a photo of a {}.",)
    assert all(load(name).templates == imagenet for name in COUNTS)
    with pytest.raises(ValueError, match="imagenet80"):
        templates("imagenet")


# ---------------------------------------------------------------- Vocabulary


def test_queries_flatten_synonyms() -> None:
    vocab = Vocabulary(("cat", "dog"), (("cat", "kitty"), ("dog",)))
    assert vocab.queries() == (["cat", "kitty", "dog"], [0, 0, 1])
    assert vocab.templates == templates("imagenet80")
    assert vocab.name == "custom"


def test_with_templates() -> None:
    vocab = load("voc").with_templates(["a photo of a {}."])
    assert vocab.templates == ("a photo of a {}.",)
    assert vocab.names == load("voc").names


@pytest.mark.parametrize(
    ("names", "synonyms", "tpl", "match"),
    [
        ((), (), ("{}",), "at least one class"),
        (("a", " a"), (("a",), ("b",)), ("{}",), "duplicate"),
        (("a", ""), (("a",), ("b",)), ("{}",), "non-empty"),
        (("a",), (("a",), ("b",)), ("{}",), "one list per name"),
        (("a",), ((),), ("{}",), "no synonyms"),
        (("a",), ((" a",),), ("{}",), "outer spaces"),
        (("a",), (("a",),), (), "at least one template"),
        (("a",), (("a",),), ("a photo",), "exactly once"),
        (("a",), (("a",),), ("{} {}",), "exactly once"),
        (("a",), (("a",),), ("{} {0}",), "str.format"),
    ],
)
def test_vocabulary_validation(
    names: tuple[str, ...], synonyms: Any, tpl: tuple[str, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Vocabulary(names, synonyms, tpl)


def test_from_labels_parses_strings_and_lists() -> None:
    vocab = Vocabulary.from_labels(" cat, dog,, traffic light ,")
    assert vocab.names == ("cat", "dog", "traffic light")
    assert vocab.synonyms == (("cat",), ("dog",), ("traffic light",))
    assert Vocabulary.from_labels(["a, b", "c"], templates=["{}"]).names == ("a, b", "c")


@pytest.mark.parametrize(
    ("labels", "match"),
    [(" , ,", "no label names"), (["cat", "dog", "cat"], "more than once: \\['cat'\\]")],
)
def test_from_labels_errors(labels: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Vocabulary.from_labels(labels)


def test_from_labels_rejects_a_single_template_string() -> None:
    with pytest.raises(ValueError, match="list of strings"):
        Vocabulary.from_labels("cat", templates="a photo of a {}.")


# ---------------------------------------------------------------- from_label_config

TWO_CONTROLS = """
<View>
  <Image name="img" value="$image"/>
  <Choices name="quality" toName="img"><Choice value="blurry"/></Choices>
  <BrushLabels name="masks" toName="img">
    <Label value="Cat" predicted_values="cat, kitty,,"/>
    <Label value="Dog"/>
  </BrushLabels>
  <PolygonLabels name="outlines" toName="img">
    <Label value="Dog" predicted_values="dog,puppy"/>
    <Label value="Bird" predicted_values=""/>
  </PolygonLabels>
</View>
"""


def test_from_label_config_merges_controls_in_order() -> None:
    vocab = Vocabulary.from_label_config(TWO_CONTROLS)
    assert vocab.names == ("Cat", "Dog", "Bird")
    assert vocab.synonyms == (("cat", "kitty"), ("Dog", "dog", "puppy"), ("Bird",))


def test_from_label_config_control_restricts() -> None:
    vocab = Vocabulary.from_label_config(TWO_CONTROLS, control="outlines", templates=["{}"])
    assert vocab.names == ("Dog", "Bird")
    assert vocab.synonyms == (("dog", "puppy"), ("Bird",))
    assert vocab.templates == ("{}",)


@pytest.mark.parametrize(
    ("config", "control", "match"),
    [
        (TWO_CONTROLS, "quality", "no image-labelling control named 'quality'.*'masks'"),
        ('<View><Image name="i" value="$image"/></View>', None, "BrushLabels"),
        (
            '<View><Image name="i" value="$i"/><BrushLabels name="b" toName="i"/></View>',
            None,
            "no labels",
        ),
        ("<View><Image name='i'", None, "cannot parse"),
        ("", None, "empty"),
    ],
)
def test_from_label_config_errors(config: str, control: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Vocabulary.from_label_config(config, control=control)


# ---------------------------------------------------------------- label_config


@pytest.mark.parametrize("kind", LABEL_CONFIG_KINDS)
@pytest.mark.parametrize("name", COUNTS)
def test_label_config_round_trip(name: str, kind: str) -> None:
    vocab = load(name)
    back = Vocabulary.from_label_config(label_config(vocab, kind))
    assert back.names == vocab.names
    assert back.synonyms == vocab.synonyms


def _prediction(kind: str, label: str) -> dict[str, Any]:
    value: dict[str, Any]
    if kind == "polygonlabels":
        value = {"points": [[1, 1], [5, 1], [5, 5]], "polygonlabels": [label], "closed": True}
    else:
        value = {"format": "rle", "rle": [0, 0, 1, 144, 71, 248, 0], "brushlabels": [label]}
    region = {
        "from_name": POLYGON_TAG if kind == "polygonlabels" else BRUSH_TAG,
        "to_name": IMAGE_TAG,
        "type": kind,
        "original_width": 10,
        "original_height": 10,
        "image_rotation": 0,
        "value": value,
    }
    return {"model_version": "t", "score": 0.5, "result": [region]}


@pytest.mark.parametrize("name", COUNTS)
def test_label_config_accepts_vocab_predictions(name: str) -> None:
    vocab = load(name)
    interface = LabelInterface(label_config(vocab, "both"))
    assert {c.tag for c in interface.controls} == {"BrushLabels", "PolygonLabels"}
    for kind in ("brushlabels", "polygonlabels"):
        assert interface.validate_prediction(_prediction(kind, vocab.names[-1]))
        assert not interface.validate_prediction(_prediction(kind, "not a class"))


def test_label_config_colours_are_distinct_and_shared_between_tags() -> None:
    interface = LabelInterface(label_config(load("coco_stuff"), "both"))
    brush, polygon = (
        {v: t.attr["background"] for v, t in c.labels_attrs.items()} for c in interface.controls
    )
    assert brush == polygon
    assert len(set(brush.values())) == 171
    assert list(brush.values()) == class_colors(171)


def test_label_config_shape_and_predicted_values() -> None:
    config = label_config(load("voc"), "polygon", image_value="$img")
    assert '<Image name="image" value="$img" zoom="true"/>' in config
    assert '<PolygonLabels name="polygon" toName="image">' in config
    assert "<BrushLabels" not in config
    assert 'value="boat" background="#bf4db1" predicted_values="ship"/>' in config
    assert 'value="aeroplane" background="#f22424"/>' in config
    assert '<RectangleLabels name="bbox" toName="image">' in label_config(load("voc"), "rectangle")


def test_label_config_escapes_xml() -> None:
    vocab = Vocabulary(("a & b <c>", 'say "hi"'), (("a & b <c>",), ("hi", "x > y")))
    config = label_config(vocab)
    assert "a &amp; b &lt;c&gt;" in config
    back = Vocabulary.from_label_config(config)
    assert back.names == vocab.names
    assert back.synonyms == vocab.synonyms


def test_label_config_errors() -> None:
    with pytest.raises(ValueError, match="brush, polygon, both, rectangle"):
        label_config(load("voc"), "mask")
    with pytest.raises(ValueError, match="contain ','"):
        label_config(Vocabulary(("a",), (("b, c",),)))


# ---------------------------------------------------------------- YAML schema


def test_yaml_schema_errors_name_file_and_entry() -> None:
    good: dict[str, Any] = {
        "name": "x",
        "title": "X",
        "source": "here",
        "templates": "photo",
        "ontologies": {"x": {"background": False, "source": "here"}},
        "classes": ["a", {"b": ["bee"]}],
    }
    assert [c.synonyms for c in _dataset("x.yaml", good).classes] == [("a",), ("bee",)]
    with pytest.raises(ValueError, match=r"x\.yaml: classes\[1\]"):
        _dataset("x.yaml", {**good, "classes": ["a", {"b": "bee"}]})
    with pytest.raises(ValueError, match=r"x\.yaml: top level: unknown keys \['extra'\]"):
        _dataset("x.yaml", {**good, "extra": 1})
    with pytest.raises(ValueError, match=r"x\.yaml: background"):
        _dataset("x.yaml", {**good, "ontologies": {"x": {"background": True, "source": "s"}}})
    with pytest.raises(ValueError, match="unknown template set 'nope'"):
        _dataset("x.yaml", {**good, "templates": "nope"})


# ---------------------------------------------------------------- CLI


def test_cli_list() -> None:
    result = CliRunner().invoke(cli, ["ontology", "list"])
    assert result.exit_code == 0, result.output
    assert "coco_stuff" in result.output
    assert "171" in result.output


def test_cli_show() -> None:
    result = CliRunner().invoke(cli, ["ontology", "show", "voc"])
    assert result.exit_code == 0, result.output
    assert "boat" in result.output
    assert "ship" in result.output
    assert "imagenet80 (80 templates)" in result.output


def test_cli_show_ls_config_prints_only_xml() -> None:
    result = CliRunner().invoke(cli, ["ontology", "show", "voc", "--ls-config", "both"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("<View>")
    interface = LabelInterface(result.stdout)
    assert {c.name for c in interface.controls} == {BRUSH_TAG, POLYGON_TAG}
    assert Vocabulary.from_label_config(result.stdout).names == load("voc").names


def test_cli_show_unknown_name() -> None:
    result = CliRunner().invoke(cli, ["ontology", "show", "vocc"])
    assert result.exit_code != 0
    assert "voc21" in result.output
    assert "coco_stuff" in result.output


def test_is_background_is_the_one_background_test() -> None:
    assert BACKGROUND == "background" == load("voc21").names[0]
    assert all(is_background(n) for n in ("background", "Background", "BACKGROUND"))
    assert not any(is_background(n) for n in ("backgrounds", "sky", " background", ""))
