"""Where everything on disk lives, and the artifacts models read: one owner of every path.

Three roots, each one environment variable:

- **cache** (``$OVSS_CACHE_DIR``, default ``~/.cache/ovss-label``): what can be recomputed
  (text embeddings ``text/<text tower>.sqlite``, weight fingerprints ``fingerprints.sqlite``)
  and the artifacts jobs produce for models (tuned PnP-OVSS configurations ``tuned/<name>.json``
  with the search state beside them ``tuned/<name>.state.json``);
- **weights** (``$OVSS_WEIGHTS_DIR``, default ``<cache>/weights``): checkpoint files under their
  published names (``models/weights.py`` resolves them);
- **data** (``serve --data-dir``, ``$OVSS_DATA_DIR``): the server's own state (the webhook
  event database ``events.sqlite``).

Models read artifacts from here, never from the job that wrote them (a model must not import a
job). An artifact a model reads carries a digest of its content, which goes into the model's
identity (``models/identity.py``): another tuned file under the same name is another model.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TUNED_FIELDS = ("layer", "head", "threshold", "blur_sigma")
"""The PnP-OVSS settings a tuned configuration holds (``ovss-label tune`` searches them)."""


def cache_dir() -> Path:
    """``$OVSS_CACHE_DIR`` or ``~/.cache/ovss-label``: text embeddings, file fingerprints,
    tuned configurations."""
    configured = os.environ.get("OVSS_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "ovss-label"


def weights_dir() -> Path:
    """The weights directory: ``$OVSS_WEIGHTS_DIR`` or ``~/.cache/ovss-label/weights``."""
    configured = os.environ.get("OVSS_WEIGHTS_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "ovss-label" / "weights"


def events_path(data_dir: Path) -> Path:
    """The webhook event database in a server's data directory."""
    return data_dir / "events.sqlite"


# ---- tuned PnP-OVSS configurations ---------------------------------------------------------
def tuned_path(name: str) -> Path:
    """Where the tuned configuration ``name`` lives (a name ending in ``.json`` is a path)."""
    return Path(name) if name.endswith(".json") else cache_dir() / "tuned" / f"{name}.json"


def tuned_state_path(name: str) -> Path:
    """The resumable search state beside the tuned configuration ``name``."""
    return tuned_path(name).with_suffix(".state.json")


@dataclass(frozen=True)
class Tuned:
    """A tuned configuration as a model reads it.

    Attributes:
        name: What the user called it (``--tuned NAME``), or the file path given.
        settings: ``PnpConfig`` fields, the keys of :data:`TUNED_FIELDS`.
        digest: 12 hex digits of sha256 over the settings (canonical JSON): the artifact's
            identity, so a re-tuned file under the same name is another model.
    """

    name: str
    settings: dict[str, Any]
    digest: str


def load_tuned(name: str) -> Tuned:
    """The tuned configuration ``name`` (or a JSON file path).

    Raises:
        ValueError: There is none, or it lacks a field (one line naming the path and the fix).
    """
    path = tuned_path(name)
    if not path.is_file():
        raise ValueError(f"no tuned PnP-OVSS configuration {name!r} at {path}; run ovss-label tune")
    record = json.loads(path.read_text())
    missing = [k for k in TUNED_FIELDS if k not in record]
    if missing:
        raise ValueError(f"tuned configuration {path} lacks {', '.join(missing)}; tune again")
    settings = {k: record[k] for k in TUNED_FIELDS}
    return Tuned(name, settings, content_digest(settings))


def content_digest(value: Any) -> str:
    """12 hex digits of sha256 over ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
