"""A trained alignment head as a file, and how it scores patches against words.

``head.safetensors`` holds the module's weights; its safetensors metadata holds the JSON the
head needs to be used and trusted: the module config, the temperature it was trained with,
the backbone (table name and file fingerprint) and input short side its features came from,
the text model of its prototypes, and the training set's digest. ``digest`` (of the weights
and that JSON) enters the ``fmbseg`` method's ``model_version``.

Scoring (FMbSeg §3.2 inference [paper]): patch tokens → module → cosine with each class's
text prototype → similarities upsampled to the image, bilinear [choose] → ``softmax(sim / τ)``
over classes (the training loss's own temperature) → argmax. No post-refinement.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ovss_label.converters import write_bytes_atomic

from .model import AlignmentModule

FORMAT = "ovss-label/alignment-head/1"


@dataclass
class Head:
    """A loaded head: the module in eval mode and what it was trained with."""

    module: AlignmentModule
    meta: dict[str, Any]
    digest: str

    @property
    def tau(self) -> float:
        return float(self.meta["tau"])

    def similarities(self, tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """:func:`patch_similarities` with this head's module."""
        return patch_similarities(self.module, tokens, prototypes)

    def probabilities(self, similarities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(K, H, W) class probabilities at the image ``size`` (module docstring)."""
        up = F.interpolate(similarities[None], size=size, mode="bilinear", align_corners=False)
        return torch.softmax(up[0] / self.tau, dim=0)


@torch.no_grad()
def patch_similarities(
    module: AlignmentModule, tokens: torch.Tensor, prototypes: torch.Tensor
) -> torch.Tensor:
    """(K, gh, gw) cosine similarities of the aligned patches with unit ``prototypes`` (K, E);
    ``tokens``: (gh, gw, D) backbone patch tokens."""
    gh, gw, d = tokens.shape
    z: torch.Tensor = module(tokens.reshape(1, gh * gw, d).float())[0]
    return (prototypes.to(z) @ z.T).reshape(-1, gh, gw)


def save_head(path: Path, module: AlignmentModule, meta: dict[str, Any]) -> str:
    """Writes ``head.safetensors`` atomically; returns its digest."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    info = {**meta, "config": module.config_dict()}
    text = json.dumps(info, sort_keys=True)
    write_bytes_atomic(path, save(tensors, metadata={"format": FORMAT, "meta": text}))
    return head_digest(tensors, text)


def load_head(path: Path, device: str = "cpu") -> Head:
    """Reads a head written by :func:`save_head` (a run folder or the file itself).

    Raises:
        ValueError: No such file, or not a head (the message says which).
    """
    path = path / "head.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"no trained head at {path}: run `ovss-label train ... -o RUN_DIR`")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an alignment head ({metadata.get('format')!r})")
        meta = json.loads(metadata["meta"])
        tensors = load_file(str(path))
        module = AlignmentModule.from_state(meta["config"], tensors)
    except (OSError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable head ({err})") from err
    module.eval().to(device)
    return Head(module, meta, head_digest(tensors, metadata["meta"]))


def head_digest(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 over the weights (by name, in name order) and the metadata JSON."""
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()
