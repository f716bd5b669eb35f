"""PnP-OVSS tuning: the CLIP reward on synthetic masks, the search, resume, loading by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import skimage.data
import torch
from click.testing import CliRunner
from helpers import LS_EXPORT
from PIL import Image

from ovss_label.backend import store, tune
from ovss_label.cli import cli


def _mean_colour(batch: torch.Tensor) -> torch.Tensor:
    """A stand-in CLIP image encoder: the mean colour of the (masked) image."""
    return batch.mean(dim=(2, 3))


def test_reward_counts_classes_whose_mask_keeps_the_object():
    image = torch.zeros(3, 20, 20)
    image[0, 5:15, 5:15] = 1.0  # a "red" object
    image[2] = 0.2 * (image[0] == 0)  # a faint "blue" background
    text = torch.eye(3)[[0, 2]]  # classes: red, blue
    on_object = torch.zeros(2, 20, 20)
    on_object[0, 5:15, 5:15] = 1  # red's mask keeps the red object
    on_object[1] = 1 - on_object[0]  # blue's mask keeps the blue background
    assert tune.clip_reward(_mean_colour, image, on_object, text) == 2
    empty = torch.zeros(2, 20, 20)  # a masked image equal to the zero image scores 0
    assert tune.clip_reward(_mean_colour, image, empty, text) == 0
    swapped = on_object.flip(0)  # masks on the wrong class: red's mask keeps only blue
    assert tune.clip_reward(_mean_colour, image, swapped, text) == 0


def test_reward_masks_follow_threshold_and_size():
    cams = torch.zeros(2, 4, 4)
    cams[0, 1:3, 1:3] = 1.0  # a centred blob
    masks = tune.reward_masks(cams, threshold=0.25, blur=0.04, size=32)
    assert masks.shape == (2, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[0, 16, 16] == 1 and masks[0, 0, 0] == 0
    assert masks[1].sum() == 0  # a flat map keeps nothing


def test_search_space_and_seeded_order():
    space = tune.search_space([6, 7], heads=12)
    assert len(space) == 2 * 12 * 5 * 6
    first = tune.random_order(space, 34, seed=1)
    assert first == tune.random_order(space, 34, seed=1) and len(set(first)) == 34


def test_labels_from_a_label_studio_export():
    from ovss_label.commands.tune import image_labels

    mapping = image_labels(None, LS_EXPORT)
    assert mapping and all(isinstance(v, list) and v for v in mapping.values())
    live_tasks = json.loads(LS_EXPORT.read_text())  # what --project fetches through the SDK
    assert image_labels(None, None, live_tasks) == mapping


@pytest.fixture()
def tuning_photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    data = Path(skimage.data.__file__).parent
    for name in ("chelsea.png", "coffee.png"):
        image = Image.open(data / name).convert("RGB")
        image.thumbnail((96, 96))
        image.save(folder / name)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"chelsea.png": ["cat"], "coffee.png": ["cup", "saucer"]}))
    return folder, labels


def test_tune_runs_resumes_and_is_loaded_by_name(tuning_photos, monkeypatch):
    folder, labels = tuning_photos
    args = ["--tiny", "tune", str(folder), "--labels", str(labels), "--iterations", "4",
            "--layers", "7-7", "--name", "mine"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    record = json.loads(store.tuned_path("mine").read_text())
    assert record["layer"] == 7 and record["images"] == 2 and 0 <= record["head"] < 12
    state = json.loads(store.tuned_path("mine").with_suffix(".state.json").read_text())
    assert len(state) == 4

    def no_more(*args, **kwargs):
        raise AssertionError("evaluated candidates must not be evaluated again")

    monkeypatch.setattr(tune, "evaluate", no_more)
    again = CliRunner().invoke(cli, args)  # a resumed run reuses every evaluation
    assert again.exit_code == 0, again.output
    from ovss_label.backend.proposers import create_proposer

    proposer = create_proposer("pnp_ovss", tiny=True, tuned="mine")
    assert (proposer.config.layer, proposer.config.head) == (record["layer"], record["head"])
    assert proposer.config.threshold == record["threshold"]
    with pytest.raises(ValueError, match="run ovss-label tune"):
        create_proposer("pnp_ovss", tiny=True, tuned="missing")
    shutil.rmtree(store.tuned_path("mine").parent)


def _error_lines(result) -> list[str]:
    """The lines click prints for an error (the tiny twins' warnings are on stderr too)."""
    return [line for line in result.output.splitlines() if line.startswith("Error")]


def test_tiny_tune_with_default_layers_is_one_line_naming_the_allowed_range(tuning_photos):
    folder, labels = tuning_photos
    result = CliRunner().invoke(cli, ["--tiny", "tune", str(folder), "--labels", str(labels)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "IndexError" not in result.output
    assert _error_lines(result) == [
        "Error: --layers 0-11: layers 8-11 not in blip_tiny: its cross-attention has layers 0-7 "
        "and heads 0-11"
    ]
    assert not store.tuned_path("tuned").with_suffix(".state.json").exists()  # nothing searched


@pytest.mark.parametrize("layers", ["7-5", "six", "-3"])
def test_a_malformed_layer_range_is_a_usage_error(tuning_photos, layers):
    folder, labels = tuning_photos
    args = ["--tiny", "tune", str(folder), "--labels", str(labels), "--layers", layers]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "Invalid value for '--layers'" in result.output
    assert "Traceback" not in result.output


def test_layer_and_head_checks_name_the_models_ranges():
    from ovss_label.backend.models.blip import LayerHeadError, check_layer_head
    from ovss_label.backend.models.blip_loader import load_blip

    blip = load_blip(tiny=True)
    check_layer_head(blip.model, range(8), range(12), blip.name)  # all inside: no error
    with pytest.raises(LayerHeadError, match=r"^layer 9 and heads 12, 15 not in blip_tiny: its "
                       r"cross-attention has layers 0-7 and heads 0-11$"):  # fmt: skip
        check_layer_head(blip.model, [9], [15, 12], blip.name)
