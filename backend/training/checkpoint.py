"""Training checkpoints: one safetensors file, replaced atomically.

``RUN_DIR/checkpoint.safetensors`` holds every tensor a resumed run needs (the module's
weights ``module.*``, SGD's momentum buffers ``optim.<i>.momentum_buffer``, torch's CPU random
state ``rng.torch``) and, in its metadata, one JSON document: the step, epoch and batch reached,
the run's settings, the scheduler's and optimiser's non-tensor state, and the fingerprints of
what the run depends on (training set digest, backbone, text prototypes). One file written
through a temporary file, fsync and rename: a ``kill -9`` at any moment leaves the previous
checkpoint or the new one, both loadable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ovss_label.converters import write_bytes_atomic

FORMAT = "ovss-label/alignment-checkpoint/1"
FILE = "checkpoint.safetensors"


def save_checkpoint(
    run_dir: Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> None:
    """Writes the checkpoint (module docstring); ``state`` is JSON-able."""
    tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    optim = optimizer.state_dict()
    for index, slot in optim["state"].items():
        for name, value in slot.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    document = {**state, "scheduler": scheduler.state_dict(),
                "param_groups": optim["param_groups"]}  # fmt: skip
    data = save(tensors, metadata={"format": FORMAT, "state": json.dumps(document)})
    write_bytes_atomic(run_dir / FILE, data)


def read_checkpoint(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state, tensors) of the run's checkpoint, or None when there is none.

    Raises:
        ValueError: A file that is not a checkpoint of ours (never half-written: see above).
    """
    path = run_dir / FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        if metadata.get("format") != FORMAT:
            raise ValueError(f"not a training checkpoint ({metadata.get('format')!r})")
        return json.loads(metadata["state"]), tensors
    except (OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"{path}: unreadable checkpoint ({err})") from err


def restore(
    state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Loads a checkpoint into freshly built objects (the module strictly)."""
    weights = {k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")}
    module.load_state_dict(weights, strict=True)
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
