"""Errors a user meets are one line that names the fix: unreadable weight files, layer or head
indices a BLIP does not have. Never a traceback, never torch's advice to unpickle unsafely."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ovss_label.backend.models import get_spec, weights_dir
from ovss_label.backend.models.checkpoints import CheckpointError, read_state_dict
from ovss_label.cli import cli


def _truncated(path: Path) -> None:
    """A real ``torch.save`` zip cut short, as an interrupted copy leaves it."""
    torch.save({"w": torch.zeros(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:2000])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


CORRUPTIONS = {"garbage": _garbage, "empty": _empty, "truncated": _truncated}


def _official(name: str, corruption: str) -> tuple[Path, str]:
    """A corrupt file under ``name``'s official file name in the weights dir, and its sha256."""
    path = weights_dir() / get_spec(name).file
    path.parent.mkdir(parents=True, exist_ok=True)
    CORRUPTIONS[corruption](path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_one_line_fix(message: str, path: Path, digest: str, name: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message
    assert "weights_only" not in message and "torch.load" not in message  # no unsafe advice
    spec = get_spec(name)
    for part in (
        str(path),
        digest[:12],
        spec.sha256[:12],
        f"ovss-label models pull {name} --force",
    ):
        assert part in message, (part, message)


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_official_file_names_its_sha256_and_the_pull_command(corruption):
    path, digest = _official("sam_vit_b", corruption)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    _assert_one_line_fix(str(err.value), path, digest, "sam_vit_b")
    assert "truncated, corrupt or not a checkpoint" in str(err.value)


def test_predict_on_a_corrupt_clip_file_is_one_line(tmp_path):
    path, digest = _official("clip_vit_b16", "garbage")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    args = ["predict", str(image), "--labels", "cat", "-o", str(tmp_path / "tasks.json"),
            "--document-root", str(tmp_path)]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    _assert_one_line_fix(result.output, path, digest, "clip_vit_b16")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_file_of_pickled_objects_is_refused_in_our_words(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"w": torch.zeros(2), "hook": print}, path)  # a global: weights_only refuses it
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path)
    message = str(err.value)
    assert "could run code; refused" in message and "weights_only" not in message
    assert hashlib.sha256(path.read_bytes()).hexdigest()[:12] in message  # not an official name
    assert "models pull" not in message


def test_an_unreadable_safetensors_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # a header that ends early
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        read_state_dict(path)


def test_a_tuned_head_the_tiny_blip_lacks_is_one_line(tmp_path):
    from ovss_label.backend.proposers import create_proposer

    tuned = tmp_path / "mine.json"
    tuned.write_text(json.dumps({"layer": 5, "head": 20, "threshold": 0.1, "blur_sigma": 0.05}))
    with pytest.raises(ValueError, match=r"^head 20 not in blip_tiny: .* heads 0-11$"):
        create_proposer("pnp_ovss", tiny=True, tuned=str(tuned))


def test_a_corrupt_blip_snapshot_is_one_line_with_its_sha256():
    from ovss_label.backend.models.blip import tiny_blip_config
    from ovss_label.backend.models.blip_loader import load_blip

    folder = weights_dir() / "blip_itm_large_flickr"
    tiny_blip_config(60).save_pretrained(str(folder))  # a readable config.json
    (folder / "model.safetensors").write_bytes(b"not safetensors" * 64)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(CheckpointError) as err:
        load_blip("blip_itm_large_flickr", tiny=False)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and digest[:12] in message
    assert "ovss-label models pull blip_itm_large_flickr" in message
