"""Overlay guarantees that the converters' mutation run (issue 18) found untested: mask colours
and blending, outlines, the legend's content and layout, and title wrapping.

The legend's text is read by recording ``ImageDraw.text`` calls (what is written, where): the
overlay draws it with PIL's default font, which no test should have to OCR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ovss_label.converters import Instance, overlay_image, write_overlay
from ovss_label.converters.overlay import BANNER_RGB, title_lines

H, W = 30, 30
GREY = np.full((H, W, 3), 100, np.uint8)
CAT = np.zeros((H, W), bool)
CAT[5:15, 5:15] = True
CAT[9:11, 9:11] = False  # a hole: outlined too
DOG = np.zeros((H, W), bool)
DOG[18:28, 18:28] = True
COLORS = {"cat": "#12ab3c"}  # dog has no colour: drawn white


@pytest.fixture
def texts(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, str, Any]]:
    """(x, y, text, fill) of every ``ImageDraw.text`` call, in drawing order."""
    calls: list[tuple[int, int, str, Any]] = []
    draw_text = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        calls.append((int(xy[0]), int(xy[1]), text, kwargs.get("fill")))
        return draw_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return calls


def test_masks_are_blended_in_their_label_colour_with_a_full_colour_outline() -> None:
    cat, dog = Instance(CAT, "cat", score=0.9), Instance(DOG, "dog")
    sheet = np.asarray(overlay_image(GREY, [cat, dog], COLORS, alpha=0.25))
    picture = sheet[:H, :W]
    cat_rgb = [0x12, 0xAB, 0x3C]
    assert picture[6, 6].tolist() == [round(75 + 0.25 * c) for c in cat_rgb]
    assert picture[5, 5].tolist() == cat_rgb  # the 1-px outline, full colour
    assert picture[8, 9].tolist() == cat_rgb  # around the hole too
    assert picture[10, 10].tolist() == [100, 100, 100]  # the hole shows the image
    assert picture[23, 23].tolist() == [139, 139, 139]  # white at 0.25 over grey 100
    assert picture[18, 18].tolist() == [255, 255, 255]
    assert picture[16, 16].tolist() == [100, 100, 100]  # no mask: the image itself
    # The default opacity (what `predict --overlays` draws) is one half.
    half = np.asarray(overlay_image(GREY, [cat], COLORS))[6, 6]
    assert half.tolist() == [round(50 + 0.5 * c) for c in cat_rgb]


def test_the_picture_sits_at_the_top_left_and_the_legend_on_its_right() -> None:
    sheet = overlay_image(GREY, [], {})
    assert sheet.width == W + 220
    assert np.array_equal(np.asarray(sheet)[:H, :W], GREY)  # not shifted by a pixel


def test_legend_lists_each_label_with_count_best_score_and_colour(texts) -> None:
    instances = [
        Instance(CAT, "cat", score=0.4),
        Instance(CAT, "cat", score=0.9),
        Instance(DOG, "dog"),  # a human label counts as sure: 1.00
        Instance(DOG, "a-very-long-category-name"),
    ]
    sheet = overlay_image(GREY, instances, COLORS, title="model-v1")
    assert [t for _, _, t, _ in texts] == [
        "model-v1",
        "4 instances",
        "cat  x2  0.90",
        "dog  x1  1.00",
        "a-very-long-category  x1  1.00",  # cut to 20 characters: the row fits the legend
    ]
    # Rows go down one 18-px line at a time, right of the picture, and all fit in the sheet.
    assert [y for _, y, _, _ in texts] == [6, 24, 42, 60, 78]
    assert all(x >= W for x, _, _, _ in texts)
    swatches = np.asarray(sheet)[42 + 8, W + 8 + 6], np.asarray(sheet)[60 + 8, W + 8 + 6]
    assert [s.tolist() for s in swatches] == [[0x12, 0xAB, 0x3C], [255, 255, 255]]


def test_legend_of_an_image_without_instances(texts) -> None:
    overlay_image(GREY, [], {})
    assert [(y, t) for _, y, t, _ in texts] == [
        (6, "proposals"),
        (24, "0 instances"),
        (42, "(nothing found)"),
    ]


def test_the_sheet_grows_to_fit_a_long_legend(texts) -> None:
    labels = [f"class {i}" for i in range(6)]
    small = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    sheet = overlay_image(small, [Instance(mask, label) for label in labels], {}, title="t")
    last_row = max(y for _, y, _, _ in texts)
    assert last_row + 18 <= sheet.height  # the last row is not cut off


def test_the_banner_is_a_red_band_behind_its_lines(texts) -> None:
    banner = "made by a tiny random model: do not trust it"
    sheet = np.asarray(overlay_image(GREY, [], {}, title="v", banner=banner))
    lines = title_lines(banner)
    assert len(lines) == 2
    assert [(y, t) for _, y, t, _ in texts] == [
        (6, lines[0]),
        (24, lines[1]),
        (42, "v"),
        (60, "0 instances"),
        (78, "(nothing found)"),
    ]
    band = sheet[: 6 + 2 * 18 - 2, W + 1 : W + 6]  # left of the text, over both lines
    assert (band == BANNER_RGB).all()


def test_an_instance_of_another_size_is_an_error_naming_both() -> None:
    with pytest.raises(ValueError, match=r"mask \(4, 4\) does not match image \(30, 30\)$"):
        overlay_image(GREY, [Instance(np.ones((4, 4), bool), "cat")], COLORS)


def test_write_overlay_writes_png_whatever_the_file_is_called(tmp_path: Path) -> None:
    path = tmp_path / "overlay.out"
    write_overlay(path, GREY, [Instance(CAT, "cat")], COLORS)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width == W + 220


@pytest.mark.parametrize(
    ("title", "width", "lines"),
    [
        ("abcd-efgh", 9, ["abcd-efgh"]),  # exactly one line's width: not broken
        ("abc def", 4, ["abc", "def"]),  # the space that breaks is not kept
        ("abcdefghijkl", 5, ["abcde", "fghij", "kl"]),  # longer than a line: cut
        ("naclip+sam·b16·tiny", 10, ["naclip+", "sam·b16·", "tiny"]),
        ("ab cdefghijklm no", 5, ["ab", "cdefg", "hijkl", "m no"]),
    ],
)
def test_title_lines_break_between_parts(title: str, width: int, lines: list[str]) -> None:
    assert title_lines(title, width) == lines


LIGHT, DIM, WHITE, SHEET = (230, 230, 230), (180, 180, 180), (255, 255, 255), (24, 24, 24)
"""The legend's palette: title and rows light grey, counts dimmer, banner text white, all on
the dark sheet (contrast at least 7:1, checked below)."""


def _luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    lin = [c / 255 / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def test_legend_text_is_drawn_in_its_palette_at_fixed_offsets(texts) -> None:
    banner = "tiny random model"
    sheet = np.asarray(
        overlay_image(GREY, [Instance(CAT, "cat", score=0.5)], COLORS, title="v", banner=banner)
    )
    x = W + 8  # 8 px right of the picture
    assert texts == [
        (x, 6, banner, WHITE),
        (x, 24, "v", LIGHT),
        (x, 42, "1 instance", DIM),  # not "1 instances"
        (x + 18, 60, "cat  x1  0.50", LIGHT),  # right of the 12-px swatch
    ]
    assert sheet[-1, -1].tolist() == list(SHEET)  # the legend's background
    for ink in (LIGHT, DIM, WHITE):
        assert (_luminance(ink) + 0.05) / (_luminance(SHEET) + 0.05) >= 7.0
    overlay_image(GREY, [], {})
    assert texts[-1] == (x, 24 + 18, "(nothing found)", DIM)


def test_the_colour_swatch_is_a_13_px_square_left_of_its_row() -> None:
    sheet = np.asarray(overlay_image(GREY, [Instance(CAT, "cat")], COLORS, title="v"))
    x, y = W + 8, 42  # the first row: under the title and the count
    swatch = sheet[y + 2 : y + 15, x : x + 13]
    assert (swatch == [0x12, 0xAB, 0x3C]).all()
    for row, col in ((y + 1, x + 6), (y + 15, x + 6), (y + 8, x - 1), (y + 8, x + 13)):
        assert sheet[row, col].tolist() == list(SHEET)  # just outside it


def test_the_sheet_is_as_tall_as_its_legend_needs_and_no_taller() -> None:
    # 18 px per line plus an 8-px margin: title, count and the rows (or "nothing found").
    small = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[2:5, 2:5] = True
    assert overlay_image(small, [], {}).height == 3 * 18 + 8
    many = [Instance(mask, f"class {i}") for i in range(6)]
    assert overlay_image(small, many, {}, title="t").height == 8 * 18 + 8
    assert overlay_image(GREY, [], {}).height == 3 * 18 + 8  # taller than the 30-px picture
    tall = np.zeros((100, 20, 3), np.uint8)
    assert overlay_image(tall, [], {}).height == 100  # the picture decides


def test_the_banner_band_spans_the_legend_and_stops_under_its_last_line() -> None:
    sheet = np.asarray(overlay_image(GREY, [], {}, title="v", banner="one line"))
    bottom = 6 + 18 - 2  # one line
    right = sheet[:, -1]
    assert (right[: bottom + 1] == BANNER_RGB).all()
    assert right[bottom + 1].tolist() == list(SHEET)
    assert (sheet[: bottom + 1, W] == BANNER_RGB).all()  # from the picture's edge
    assert sheet[0, W - 1].tolist() == [100, 100, 100]  # not over the picture
