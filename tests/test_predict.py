"""``ovss-label predict`` end to end with tiny models on sample photos (scikit-image ships them)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from click.testing import CliRunner
from helpers import source_mask
from label_studio_sdk.label_interface.interface import LabelInterface
from PIL import Image
from pycocotools.coco import COCO

from ovss_label.backend.models.weights import get_spec
from ovss_label.backend.predict import collect_images, local_files_url
from ovss_label.backend.proposers import method_plan
from ovss_label.cli import cli
from ovss_label.methods import METHODS

SAMPLES = ("chelsea.png", "astronaut.png", "coffee.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three sample photos, one broken file and an EXIF-rotated JPEG (orientation 6)."""
    folder = tmp_path_factory.mktemp("photos")
    data_dir = Path(skimage.data.__file__).parent
    for name in SAMPLES:
        image = Image.open(data_dir / name).convert("RGB")
        image.thumbnail((160, 160))  # small: the test is about plumbing, not pixels
        image.save(folder / name)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: stored 80x48 shows as 48x80
    Image.new("RGB", (80, 48), (200, 30, 30)).save(folder / "rotated.jpg", exif=exif)
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _predict(args):
    return CliRunner().invoke(cli, ["--tiny", "predict", *args], catch_exceptions=False)


@pytest.mark.parametrize("method", ["naclip", "naclip+sam", "clip_sam"])
def test_predict_writes_valid_tasks_coco_and_overlays(photos, tmp_path, method):
    out = tmp_path / "tasks.json"
    args = [str(photos), "--labels", "cat, person, cup", "-o", str(out), "--format", "both",
            "--coco", str(tmp_path / "coco.json"), "--overlays", str(tmp_path / "png"),
            "--background", "none", "--document-root", str(photos), "--method", method]  # fmt: skip
    result = _predict(args)
    assert result.exit_code == 0, result.output
    assert "MEANINGLESS" in result.output and "broken.jpg" in result.output
    tasks = json.loads(out.read_text())
    assert len(tasks) == 4  # broken.jpg skipped, the others predicted
    config = (tmp_path / "tasks.label_config.xml").read_text()
    interface = LabelInterface(config)
    sizes = {}
    for task in tasks:
        assert task["data"]["image"].startswith("/data/local-files/?d=")
        prediction = task["predictions"][0]
        assert prediction["model_version"] == method_plan(method, tiny=True).identity.version
        assert "·tiny·" in prediction["model_version"]  # twins load no file
        assert interface.validate_prediction(prediction)
        assert prediction["result"], task["data"]["image"]
        assert {r["type"] for r in prediction["result"]} == {"brushlabels", "polygonlabels"}
        first = prediction["result"][0]
        sizes[task["data"]["image"].split("=")[-1]] = (
            first["original_width"],
            first["original_height"],
        )
        brushes = [r for r in prediction["result"] if r["type"] == "brushlabels"]
        union = np.zeros((first["original_height"], first["original_width"]), int)
        for region in brushes:
            union += source_mask(region)
        assert union.max() == 1  # dense instances never overlap
    assert sizes["rotated.jpg"] == (48, 80)  # EXIF orientation applied
    coco = COCO(str(tmp_path / "coco.json"))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) > 0
    assert coco.dataset["info"]["model_version"] == prediction["model_version"]  # one identity
    assert sorted(i["file_name"] for i in coco.loadImgs(coco.getImgIds()))[0] == "astronaut.png"
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["cat", "person", "cup"]
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == ["astronaut.png", "chelsea.png", "coffee.png", "rotated.png"]
    with Image.open(tmp_path / "png" / "rotated.png") as overlay:
        assert overlay.height >= 80 and overlay.width > 48  # image + legend


def test_predict_follows_a_label_config(photos, tmp_path):
    config = tmp_path / "project.xml"
    config.write_text(
        '<View><Image name="img" value="$photo"/>'
        '<PolygonLabels name="outline" toName="img">'
        '<Label value="Cat" predicted_values="cat, kitten"/>'
        '<Label value="Mug" predicted_values="cup"/>'
        "</PolygonLabels></View>"
    )
    out = tmp_path / "tasks.json"
    result = _predict([str(photos / "chelsea.png"), "--label-config", str(config), "-o", str(out),
                       "--background", "none", "--document-root", str(photos)])  # fmt: skip
    assert result.exit_code == 0, result.output
    task = json.loads(out.read_text())[0]
    assert list(task["data"]) == ["photo"]
    regions = task["predictions"][0]["result"]
    assert regions and {(r["from_name"], r["to_name"], r["type"]) for r in regions} == {
        ("outline", "img", "polygonlabels")
    }
    assert LabelInterface(config.read_text()).validate_prediction(task["predictions"][0])
    assert not (tmp_path / "tasks.label_config.xml").exists()  # the project has its config


def test_predict_uses_real_weights_from_the_weights_dir(
    photos, tmp_path, tiny_checkpoints, monkeypatch
):
    """No --tiny: the weight is resolved in OVSS_WEIGHTS_DIR and read by the real loader.

    The file is a tiny archive in the OpenAI format, so the ViT-B/16 config is swapped for the
    tiny one; everything else (resolution, TorchScript reading, strict loading) is the real path.
    """
    from ovss_label.backend.models import clip

    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_checkpoints["openai"], weights / "ViT-B-16.pt")
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(weights))
    monkeypatch.setattr(clip, "_openai_cfg", lambda arch: clip.TINY_CLIP_CFG)
    out = tmp_path / "tasks.json"
    result = CliRunner().invoke(cli, ["predict", str(photos / "coffee.png"), "--ontology", "voc",
                                      "-o", str(out), "--background", "none",
                                      "--document-root", str(photos)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "MEANINGLESS" not in result.output
    version = json.loads(out.read_text())[0]["predictions"][0]["model_version"]
    assert version.startswith("naclip·b16·") and "tiny" not in version
    # Not the published ViT-B-16.pt: the version must not pass for the published model's.
    identity = method_plan("naclip", tiny=False, background="none").identity
    assert version == identity.version
    (clip_weight,) = identity.weights
    assert clip_weight.fingerprint == _sha256(weights / "ViT-B-16.pt")
    assert clip_weight.fingerprint != get_spec("clip_vit_b16").sha256


def test_predict_without_weights_fails_with_one_clear_line(photos, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["predict", str(photos), "--labels", "cat", "-o", str(tmp_path / "t.json"),
         "--document-root", str(photos)],
    )  # fmt: skip
    assert result.exit_code == 1
    assert (
        "ovss-label models pull clip_vit_b16" in result.output and "Traceback" not in result.output
    )


def test_predict_needs_exactly_one_vocabulary(photos, tmp_path):
    result = _predict([str(photos), "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "exactly one of --labels" in result.output


def test_collect_images_folders_globs_and_errors(photos):
    assert [p.name for p in collect_images([str(photos)])] == sorted(
        ["astronaut.png", "broken.jpg", "chelsea.png", "coffee.png", "rotated.jpg"]
    )
    assert [p.name for p in collect_images([str(photos / "c*.png")])] == [
        "chelsea.png",
        "coffee.png",
    ]
    with pytest.raises(ValueError, match="no such file"):
        collect_images([str(photos / "nothing*.png")])
    assert (
        local_files_url(photos / "a b.png", photos.parent)
        == f"/data/local-files/?d={photos.name}/a b.png"
    )


@pytest.mark.parametrize(
    ("mode", "value"),
    [("L", 7), ("RGBA", (10, 20, 30, 0)), ("P", 3), ("I;16", 65535), ("CMYK", (0, 0, 0, 0))],
)
def test_load_rgb_converts_every_mode_to_rgb_uint8(tmp_path, mode, value):
    from ovss_label.images import load_rgb

    path = tmp_path / ("x.tif" if mode in ("I;16", "CMYK") else "x.png")
    Image.new(mode, (5, 3), value).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (3, 5, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert rgb.max() == 255  # full-range 16-bit maps to full-range 8-bit


def test_load_rgb_refuses_decompression_bombs(tmp_path, monkeypatch):
    from ovss_label.images import load_rgb

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses > 2x this
    with pytest.raises(ValueError, match="cannot read image"):
        load_rgb(tmp_path / "big.png")


def test_no_pamr_option_reaches_the_proposer(photos, tmp_path, monkeypatch):
    from ovss_label.backend import proposers

    seen = {}
    real = proposers.create_proposer

    def spy(name, **options):
        seen.update(options)
        return real(name, **options)

    monkeypatch.setattr(proposers, "create_proposer", spy)
    out = tmp_path / "t.json"
    result = _predict([str(photos / "coffee.png"), "--labels", "cup", "-o", str(out), "--no-pamr",
                       "--document-root", str(photos)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen["pamr_steps"] == 0 and "feature_cache" not in seen  # each file is scored once
    version = json.loads(out.read_text())[0]["predictions"][0]["model_version"]
    assert version == method_plan("naclip", tiny=True, pamr_steps=0).identity.version
    assert version != method_plan("naclip", tiny=True).identity.version


@pytest.mark.parametrize("method", ["pnp_ovss", "pnp_ovss+sam"])
def test_predict_with_pnp_ovss_writes_valid_files(photos, tmp_path, method):
    out = tmp_path / "tasks.json"
    args = [str(photos / "chelsea.png"), str(photos / "broken.jpg"), "--labels", "cat, cup",
            "--method", method, "-o", str(out), "--coco", str(tmp_path / "coco.json"),
            "--overlays", str(tmp_path / "png"), "--document-root", str(photos)]  # fmt: skip
    result = _predict(args)
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())
    assert len(tasks) == 1 and "broken.jpg" in result.output
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"] == method_plan(method, tiny=True).identity.version
    config = (tmp_path / "tasks.label_config.xml").read_text()
    assert LabelInterface(config).validate_prediction(prediction)
    assert (
        COCO(str(tmp_path / "coco.json")).getImgIds()
        and (tmp_path / "png" / "chelsea.png").is_file()
    )


@pytest.mark.parametrize("method", METHODS)
def test_every_tiny_method_draws_regions_on_photos(tmp_path, method):
    """A --tiny demo on the kind of photos the README uses must not look broken: every method
    writes regions (the twins' settings: naclip.TINY_NACLIP_SETTINGS, blip.TINY_PNP_SETTINGS)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "chelsea", "coffee"):
        photo = Image.fromarray(getattr(skimage.data, name)())
        photo.thumbnail((160, 160))  # small: the CRF and SAM are the slow parts at full size
        photo.save(folder / f"{name}.png")
    out = tmp_path / "tasks.json"
    args = ["--tiny", "predict", str(folder), "--labels", "person, cat, cup", "--method",
            method, "-o", str(out), "--document-root", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    regions = [len(t["predictions"][0]["result"]) for t in json.loads(out.read_text())]
    assert len(regions) == 3 and sum(regions) >= 3, regions
    if method.startswith("pnp_ovss"):  # the loud warning says what the twin runs
        assert "PnP-OVSS defaults for it: layer 5, threshold 0" in " ".join(result.output.split())
