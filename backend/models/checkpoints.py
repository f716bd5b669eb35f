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

A file that cannot be read is one line (:class:`CheckpointError`) naming the file, what is
wrong with it in our words and, for a file under an official name (``weights.WEIGHTS``), its
sha256 prefix against the table's and ``ovss-label models pull NAME --force``. The readers' own
text is left out: torch's advises re-running ``torch.load`` with ``weights_only=False``, which
would run whatever code the file holds.

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

from ..store import weights_dir
from .fingerprints import file_sha256
from .weights import WEIGHTS, WeightSpec

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
    """Reads tensors from a checkpoint file on CPU (module docstring: formats).

    Raises:
        CheckpointError: The file cannot be read, or holds no tensors (one line).
    """
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
    # Every reader fails in its own types (EOFError, KeyError, SafetensorError, zipfile errors,
    # UnpicklingError...): all of them mean "not a checkpoint we can read".
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {_reason(exc)}{file_hint(path)}"
        ) from exc
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not tensors{file_hint(path)}"
        )
    return dict(loaded)


def _reason(exc: Exception) -> str:
    """What is wrong with an unreadable file, without the reader's text (module docstring)."""
    if isinstance(exc, pickle.UnpicklingError) and "Unsupported global" in str(exc):
        return "it pickles Python objects besides tensors, which could run code; refused"
    if isinstance(exc, PermissionError):
        return "permission denied"
    # EOFError, EINVAL on a cut zip, a bad opcode, a short safetensors header: the bytes are not
    # a checkpoint, whatever the reader calls it.
    return "truncated, corrupt or not a checkpoint"


def official_spec(path: Path) -> WeightSpec | None:
    """The table row whose file name ``path`` has (a file weight, not a hub snapshot), or None."""
    for spec in WEIGHTS.values():
        if spec.format != "hf_hub" and spec.file == path.name:
            return spec
    return None


def file_hint(path: Path) -> str:
    """``"; sha256 <prefix>..."`` for an error about ``path``: against the table's and with the
    ``models pull`` fix for a file under an official name, else alone; "" if unreadable."""
    try:
        digest = file_sha256(path)
    except OSError:
        return ""
    spec = official_spec(path)
    if spec is None:
        return f" (sha256 {digest[:12]}...)"
    if digest == spec.sha256:  # the published bytes: the reader, not the file, is at fault
        return (
            f"; it is the published {spec.name} file, so torch {torch.__version__} may be too old"
        )
    # Outside the weights dir (an explicit path, open_clip's cache) the pull cannot overwrite
    # the file; it puts the published one where resolution looks first.
    where = "replace it" if path.parent.resolve() == weights_dir().resolve() else (
        f"get the published one into {weights_dir()}")  # fmt: skip
    return (
        f"; its sha256 is {digest[:12]}..., the published {spec.name}'s {spec.sha256[:12]}...; "
        f"{where}: `ovss-label models pull {spec.name} --force`"
    )


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
            f"wrong shapes {wrong[:5]}{file_hint(Path(source)) if source else ''}"
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
