"""CLIP builders: OpenAI ViT-B/16, ViT-L/14, ViT-L/14-336 and their tiny twin.

Each entry of :data:`CLIP_ARCHS` is an open_clip model config (the JSON that ships with
open_clip, forced to QuickGELU as the OpenAI weights need); one private builder,
:func:`_create_clip`, turns any of them into an ``open_clip.model.CLIP``, so the tiny twin is
the production code at toy size (timm ``test_vit``, segment_anything ``_build_sam``).

Weights come from :mod:`.weights` (where the file is) and :mod:`.checkpoints` (how it is read).
Reading an OpenAI TorchScript archive's state dict and loading it strictly into the built model
gives the same weights as ``open_clip.load_openai_model`` (tested), whose fp16 storage the
fp32 model keeps exactly, as NACLIP's ``clip.load`` does on CPU.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip import get_model_config, get_tokenizer
from open_clip.model import CLIP

from .checkpoints import apply_filters, load_into, read_state_dict
from .fingerprints import TINY, weight_fingerprint
from .weights import OPENAI_MEAN, OPENAI_STD, get_spec, resolve_weight

log = logging.getLogger(__name__)

TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "quick_gelu": True,
    # Width 64 = one 64-wide head, the head size OpenAI archives imply (width // 64 heads).
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}


def _openai_cfg(arch: str) -> dict[str, Any]:
    cfg: dict[str, Any] = copy.deepcopy(get_model_config(arch))
    cfg["quick_gelu"] = True  # OpenAI weights were trained with QuickGELU
    return cfg


CLIP_ARCHS: dict[str, str] = {
    "clip_vit_b16": "ViT-B-16",
    "clip_vit_l14": "ViT-L-14",
    "clip_vit_l14_336": "ViT-L-14-336",
}
"""Weight-table name -> open_clip architecture name."""

TINY_NAME = "clip_tiny"
_CHECKPOINT_FILTERS = ("unwrap", "strip_module_prefix", "drop_openai_metadata")


def tiny_requested() -> bool:
    """True when ``OVSS_TINY=1`` asks every command to use tiny random models."""
    return os.environ.get("OVSS_TINY", "") not in ("", "0")


def warn_tiny(what: str) -> None:
    """Says loudly, on stderr and in the log, that outputs are meaningless."""
    message = (
        f"*** TINY RANDOM MODEL ({what}): outputs are MEANINGLESS; for testing the plumbing only "
        "(unset OVSS_TINY / drop --tiny for real predictions) ***"
    )
    log.info(message)
    try:
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]{message}[/]")
    except ImportError:  # rich is a dependency; this only guards odd embedded uses
        print(message, file=__import__("sys").stderr)


@dataclass(frozen=True)
class LoadedClip:
    """A CLIP model ready for inference, with what callers need to use it correctly.

    Attributes:
        model: ``open_clip.model.CLIP`` in eval mode, fp32, on ``device``.
        name: Weight-table name (``clip_vit_b16``) or ``clip_tiny``.
        tiny: True for the random tiny twin.
        mean: RGB normalisation mean in [0, 1] units.
        std: RGB normalisation std in [0, 1] units.
        patch_size: Vision patch size in pixels.
        text_fingerprint: Hash of the text tower's weights; keys the text-embedding disk cache.
        file_fingerprint: The weight file's fingerprint (``fingerprints.py``), ``"tiny"`` for
            a random twin; it goes into model identities.
        weight: The weight-table name asked for (``clip_vit_b16`` also for its tiny twin): the
            name model identities use.
    """

    model: CLIP
    name: str
    tiny: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    text_fingerprint: str
    file_fingerprint: str = TINY
    weight: str = ""

    @property
    def device(self) -> torch.device:
        """The device of the weights."""
        device: torch.device = self.model.visual.conv1.weight.device
        return device


def _create_clip(cfg: dict[str, Any], seed: int = 0) -> CLIP:
    """Builds a randomly initialised CLIP from an open_clip config (deterministic per seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**copy.deepcopy(cfg))
    return model.eval()


def build_clip(
    name: str = "clip_vit_b16",
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    tiny: bool | None = None,
    device: str | torch.device = "cpu",
) -> LoadedClip:
    """Builds a CLIP and loads its weights.

    Args:
        name: A key of :data:`CLIP_ARCHS`.
        checkpoint: Explicit weight file; None resolves it (``weights.resolve_weight``).
        tiny: Use the tiny random twin instead; None follows ``OVSS_TINY``. With a
            ``checkpoint`` the tiny architecture is loaded from that file (tests do this).
        device: Where to put the model.

    Returns:
        The loaded model and its preprocessing facts.

    Raises:
        MissingWeightError: The weight file is not found (one-line message).
        CheckpointError: The file cannot be read or does not fit the architecture.
    """
    if name not in CLIP_ARCHS and name != TINY_NAME:
        raise ValueError(f"unknown CLIP {name!r}; known: {', '.join([*CLIP_ARCHS, TINY_NAME])}")
    tiny = tiny_requested() if tiny is None else tiny
    fingerprint, weight = TINY, name
    if tiny or name == TINY_NAME:
        model = _create_clip(TINY_CLIP_CFG)
        if checkpoint is not None:
            _load_weights(model, Path(checkpoint))
            fingerprint = weight_fingerprint(None, Path(checkpoint))
        else:
            warn_tiny(f"CLIP twin of {name}")
        name, mean, std = TINY_NAME, OPENAI_MEAN, OPENAI_STD
    else:
        spec = get_spec(name)
        model = _create_clip(_openai_cfg(CLIP_ARCHS[name]))
        path = resolve_weight(spec, checkpoint)
        _load_weights(model, path)
        fingerprint = weight_fingerprint(spec, path)
        mean, std = spec.mean, spec.std
    model = model.to(device)
    patch = model.visual.conv1.kernel_size[0]
    text = text_fingerprint(model)
    return LoadedClip(model, name, tiny, mean, std, patch, text, fingerprint, weight)


def _load_weights(model: CLIP, path: Path) -> None:
    sd = apply_filters(read_state_dict(path), _CHECKPOINT_FILTERS)
    # open_clip keeps the causal text mask as a buffer; OpenAI archives do not store it.
    load_into(model, sd, skip_buffers=("attn_mask",), source=str(path))
    log.info("loaded CLIP weights from %s", path)


def text_fingerprint(model: CLIP) -> str:
    """A 16-hex-digit hash of the text tower's weights (same weights, same embeddings)."""
    digest = hashlib.blake2b(digest_size=8)
    text_parts = (
        "token_embedding",
        "positional_embedding",
        "transformer.",
        "ln_final",
        "text_proj",
    )
    for key, value in sorted(model.state_dict().items()):
        if key.startswith(text_parts):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def clip_tokenizer() -> Any:
    """The OpenAI BPE tokenizer that ships inside open_clip (no download)."""
    return get_tokenizer("ViT-B-16")


def openai_archive_state(model: CLIP) -> dict[str, torch.Tensor]:
    """``model``'s weights in the OpenAI archive layout: fp16, metadata tensors, no text mask.

    Used to write checkpoints in the real OpenAI format (tests, tiny checkpoints).
    """
    sd = {k: v.detach().half() for k, v in model.state_dict().items() if k != "attn_mask"}
    visual = model.visual
    sd["input_resolution"] = torch.tensor(visual.image_size[0])
    sd["context_length"] = torch.tensor(model.context_length)
    sd["vocab_size"] = torch.tensor(model.vocab_size)
    return sd
