"""Test environment: offline, CPU, a private cache; tiny CLIP checkpoints in the real formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports torch or a hub client: tests never download and never use a GPU.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OVSS_OFFLINE"] = "1"
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.pop("OVSS_TINY", None)


@pytest.fixture(autouse=True)
def _private_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets the session's cache dir, an empty weights dir and an empty home (so a
    developer's ~/.cache/clip is never picked up)."""
    cache = tmp_path_factory.getbasetemp() / "ovss-cache"
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))
    monkeypatch.setenv("OVSS_CACHE_DIR", str(cache))
    monkeypatch.setenv("OVSS_WEIGHTS_DIR", str(tmp_path_factory.mktemp("weights")))
    monkeypatch.delenv("OVSS_TINY", raising=False)


@pytest.fixture(scope="session")
def tiny_model():
    """A random tiny open_clip CLIP built by the production builder."""
    from ovss_label.backend.models.clip import TINY_CLIP_CFG, _create_clip

    return _create_clip(TINY_CLIP_CFG, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``tiny_model`` written as an OpenAI TorchScript archive, safetensors and a DDP checkpoint."""
    import torch
    from safetensors.torch import save_file

    from ovss_label.backend.models.checkpoints import save_torchscript_state
    from ovss_label.backend.models.clip import openai_archive_state

    root = tmp_path_factory.mktemp("tiny-ckpt")
    paths = {
        "openai": root / "ViT-B-16.pt",
        "safetensors": root / "open_clip_model.safetensors",
        "ddp": root / "epoch_1.pt",
    }
    save_torchscript_state(openai_archive_state(tiny_model), paths["openai"])
    sd = {k: v for k, v in tiny_model.state_dict().items() if k != "attn_mask"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["safetensors"]))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, paths["ddp"])
    return paths


@pytest.fixture(scope="session")
def tiny_clip(tiny_checkpoints):
    """The tiny CLIP loaded through the real loader from its OpenAI-format archive."""
    from ovss_label.backend.models.clip import build_clip

    return build_clip("clip_tiny", checkpoint=tiny_checkpoints["openai"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip without CUDA, so any -m selection (e.g. -m "not e2e") stays safe here."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
