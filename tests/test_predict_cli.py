"""``ovss-label predict`` as a user meets it (issue 11): sizes in every task, a score threshold,
sub-folders, file modes, the document root, skipped files and tiny-model overlays."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import half_and_half
from PIL import Image

from ovss_label.backend.predict import collect_images, uses_tiny_models
from ovss_label.cli import cli
from ovss_label.converters.overlay import BANNER_RGB, overlay_image, title_lines
from ovss_label.images import oriented_size

BROKEN = "zz-broken.jpg"  # sorted last: the progress bar would end on it


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Two small images, an EXIF-rotated JPEG, one in a sub-folder and a broken file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / "sub" / "b.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: stored 80x48, shown 48x80
    Image.new("RGB", (80, 48), (200, 30, 30)).save(root / "rotated.jpg", exif=exif)
    (root / BROKEN).write_bytes(b"not a jpeg")
    return root


def _predict(target: Path, out: Path, *args: str):
    """``predict`` with tiny models on ``target`` (a folder or a file in the photos folder);
    the photos folder is the document root unless ``args`` give another."""
    root = target if target.is_dir() else target.parent
    argv = ["--tiny", "predict", str(target), "--labels", "cat, dog", "-o", str(out),
            "--document-root", str(root), "--background", "none", *args]  # fmt: skip
    return CliRunner().invoke(cli, argv, catch_exceptions=False)


def _url_to_path(folder: Path, task: dict) -> Path:
    return folder / task["data"]["image"].split("?d=", 1)[1]


def test_every_task_carries_the_size_label_studio_shows(folder, tmp_path):
    out = tmp_path / "tasks.json"
    result = _predict(folder, out)
    assert result.exit_code == 0, result.output
    tasks = json.loads(out.read_text())
    assert len(tasks) == 2  # a.png, rotated.jpg; the broken file skipped
    for task in tasks:
        width, height = oriented_size(_url_to_path(folder, task))
        assert task["meta"] == {"original_width": width, "original_height": height}
    by_name = {_url_to_path(folder, t).name: t["meta"] for t in tasks}
    assert by_name["rotated.jpg"] == {"original_width": 48, "original_height": 80}


@pytest.fixture()
def known_scores(monkeypatch):
    """Proposals from :func:`half_and_half`: known scores, and no model time in tests about
    the plumbing around the model (the tiny models still load)."""
    import ovss_label.backend.predict as job

    monkeypatch.setattr(job, "propose", half_and_half)


def test_min_score_drops_instances_below_it(folder, tmp_path, known_scores):
    labels = {}
    for threshold in ("0", "0.3"):
        out = tmp_path / f"tasks-{threshold}.json"
        result = _predict(folder / "a.png", out, "--min-score", threshold)
        assert result.exit_code == 0, result.output
        regions = json.loads(out.read_text())[0]["predictions"][0]["result"]
        labels[threshold] = sorted({r["value"]["brushlabels"][0] for r in regions})
    assert labels == {"0": ["cat", "dog"], "0.3": ["cat"]}


def test_min_score_is_checked_and_documented(folder, tmp_path):
    result = _predict(folder, tmp_path / "t.json", "--min-score", "1.5")
    assert result.exit_code == 2 and "--min-score" in result.output
    help_text = CliRunner().invoke(cli, ["predict", "--help"]).output
    assert "--min-score" in help_text and "ovss_min_score" in help_text
    project = CliRunner().invoke(cli, ["predict", "--project", "3", "--min-score", "0.3"])
    assert project.exit_code == 2 and "ovss_min_score attribute" in project.output


def test_recursive_searches_sub_folders_and_the_summary_counts_them_otherwise(
    folder, tmp_path, known_scores
):
    flat = _predict(folder, tmp_path / "flat.json")
    assert flat.exit_code == 0, flat.output
    assert "1 sub-folder was not searched (--recursive searches them)" in flat.output
    urls = [t["data"]["image"] for t in json.loads((tmp_path / "flat.json").read_text())]
    assert not any("sub/" in u for u in urls)
    deep = _predict(folder, tmp_path / "deep.json", "--recursive")
    assert deep.exit_code == 0, deep.output
    assert "not searched" not in deep.output
    urls = [t["data"]["image"] for t in json.loads((tmp_path / "deep.json").read_text())]
    assert "/data/local-files/?d=sub/b.png" in urls
    assert [p.name for p in collect_images([str(folder)], recursive=True)] == [
        "a.png",
        "rotated.jpg",
        "b.png",
        BROKEN,
    ]


@pytest.fixture(params=[0o027, 0o002])
def umask(request):
    """The process umask set to the parameter for one test, then restored."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_outputs_are_written_with_the_users_umask(folder, tmp_path, umask, known_scores):
    out, coco = tmp_path / "out" / "tasks.json", tmp_path / "out" / "coco.json"
    result = _predict(folder / "a.png", out, "--coco", str(coco))
    assert result.exit_code == 0, result.output
    for path in (out, coco, tmp_path / "out" / "tasks.label_config.xml"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    out.chmod(0o600)  # an existing file keeps its mode, as open() would
    assert _predict(folder / "a.png", out).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_a_missing_document_root_is_a_usage_error(folder, tmp_path):
    result = _predict(folder, tmp_path / "t.json", "--document-root", str(tmp_path / "nope"))
    assert result.exit_code == 2
    assert "--document-root" in result.output and "does not exist" in result.output
    help_text = CliRunner().invoke(cli, ["predict", "--help"]).output
    assert "Default: the current folder" in help_text


def test_images_outside_the_document_root_are_one_line_with_the_fix(folder, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    result = _predict(folder, tmp_path / "t.json", "--document-root", str(other))
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "outside --document-root" in errors[0]
    assert errors[0].endswith(f"--document-root {folder}")  # the images' common folder
    assert not (tmp_path / "t.json").exists()


def test_a_skipped_image_is_reported_once(folder, tmp_path, caplog, known_scores):
    with caplog.at_level(logging.WARNING):
        result = _predict(folder, tmp_path / "t.json")
    assert result.exit_code == 0, result.output
    assert result.output.count(BROKEN) == 1, result.output
    assert f"skipped {folder / BROKEN}: cannot read image" in result.output
    assert not [r for r in caplog.records if BROKEN in r.getMessage()]


def test_tiny_overlays_carry_a_banner(folder, tmp_path):
    result = _predict(folder / "a.png", tmp_path / "t.json", "--overlays", str(tmp_path / "png"))
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "png" / "a.png") as png:
        legend = np.asarray(png.convert("RGB"))[:, 40:]  # a.png is 40 px wide
    assert (legend == BANNER_RGB).all(axis=-1).sum() > 500  # a red band, not a stray pixel
    plain = np.asarray(overlay_image(np.zeros((30, 40, 3), np.uint8), [], {}, title="v"))
    assert not (plain == BANNER_RGB).all(axis=-1).any()


@pytest.mark.parametrize(
    "version",
    [
        "naclip·b16·tiny·1dd4af",
        "naclip+sam·b16·samB·0a1b2c",
        "pnp_ovss+sam·blipL-flickr·l14-336·samH·tuned·123456",
        "a-long-title-from-somewhere-else-with+plus signs and spaces",
    ],
)
def test_the_overlay_title_breaks_a_version_between_its_parts(version):
    lines = title_lines(version)
    assert "".join(lines).replace(" ", "") == version.replace(" ", "")
    assert all(len(line) <= 34 for line in lines)
    assert all(line[-1] in "-+·" for line in lines[:-1] if " " not in version)  # between parts
    assert uses_tiny_models(version) == ("·tiny·" in version)


def test_uses_tiny_models_reads_the_version_not_a_name():
    assert uses_tiny_models("naclip+sam·b16·samB·tiny·daed68")
    assert not uses_tiny_models("pnp_ovss·blipL-flickr·tuned·0a1b2c")
    assert not uses_tiny_models("tiny-project·b16·0a1b2c")  # a name that says tiny
