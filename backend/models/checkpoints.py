"""Safe checkpoint reading and named filters for foreign layouts.

Formats read (open_clip ``factory.py`` ``load_state_dict``, timm ``_helpers.py`` style):

- ``*.safetensors``: ``safetensors.torch.load_file`` (no code can run).
- TorchScript archives (the OpenAI CLIP ``.pt`` files are these): ``torch.jit.load`` on CPU and
  only the archive's ``state_dict()`` is kept; none of its methods is ever called. This is the
  same read as ``open_clip.load_openai_model``. ``weights_only=True`` is no guard for such
  archives (torch 2.6 raises, newer torch silently dispatches to ``torch.jit.load``), so they
  are recognised by their zip layout first and handled explicitly.
- anything else: ``torch.load(map_location="cpu", weights_only=True)``; a file that needs full
  unpickling is refused with the reason, never loaded unsafely.

Filters turn other layouts into the builder's key names and are applied by name, so a log says
which conversion ran. Loading is strict: a missing or unexpected key is an error that lists
the keys.
"""

from __future__ import annotations

import logging
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model."""


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript zip archive (it holds ``<root>/constants.pkl`` and ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def read_state_dict(path: Path) -> StateDict:
    """Reads tensors from a checkpoint file on CPU (module docstring: formats)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated, files are not
                archive = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
            return {k: v.detach() for k, v in archive.state_dict().items()}
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(loaded).__name__}, not tensors")
    return dict(loaded)


def unwrap(sd: StateDict) -> StateDict:
    """Training checkpoints nest the weights under ``state_dict`` or ``model``."""
    for key in ("state_dict", "model"):
        inner = sd.get(key)
        if isinstance(inner, Mapping):
            return dict(inner)
    return sd


def strip_module_prefix(sd: StateDict) -> StateDict:
    """DistributedDataParallel saves keys as ``module.<key>``."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def drop_openai_metadata(sd: StateDict) -> StateDict:
    """OpenAI archives carry three integer tensors that are not parameters (open_clip drops them
    too, ``factory.py`` ``load_state_dict``)."""
    meta = ("input_resolution", "context_length", "vocab_size")
    return {k: v for k, v in sd.items() if k not in meta}


FILTERS: dict[str, Callable[[StateDict], StateDict]] = {
    "unwrap": unwrap,
    "strip_module_prefix": strip_module_prefix,
    "drop_openai_metadata": drop_openai_metadata,
}


def apply_filters(sd: StateDict, names: tuple[str, ...]) -> StateDict:
    """Applies the named filters in order, logging each one that changed the keys."""
    for name in names:
        before = set(sd)
        sd = FILTERS[name](sd)
        if set(sd) != before:
            log.info("checkpoint filter %s converted %d keys", name, len(before ^ set(sd)))
    return sd


def load_into(
    model: nn.Module, sd: StateDict, *, skip_buffers: tuple[str, ...] = (), source: str = ""
) -> None:
    """Strictly loads ``sd`` into ``model``; shapes and key sets must match exactly.

    Args:
        model: The module built by the builder.
        sd: Filtered state dict.
        skip_buffers: Non-persistent-in-practice buffers the builder recomputes (e.g. the CLIP
            causal ``attn_mask``), allowed to be absent from ``sd``.
        source: File name for error messages.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd) - set(skip_buffers))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: {tuple(sd[k].shape)} != {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {source or '(in memory)'} does not fit {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shapes {wrong[:5]}"
        )
    full = dict(expected)
    full.update({k: v.to(expected[k].dtype) for k, v in sd.items()})
    model.load_state_dict(full, strict=True)


def save_torchscript_state(sd: StateDict, path: Path) -> None:
    """Writes tensors as a TorchScript archive with no methods (the OpenAI file layout).

    Floating tensors become parameters, others buffers, under their dotted key paths. Used to
    write tiny checkpoints in the real OpenAI format.
    """
    root = nn.Module()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(root).save(str(path))  # type: ignore[no-untyped-call]
