"""A model's identity as data: method, settings, the weight files, the artifacts it reads.

timm names a model by ``arch.tag`` and keeps its pretrained config as data; here a model is

- the **method** (``naclip+sam``) and each stage's **revision** (bumped when the numbers a
  stage computes change for the same weights and settings);
- its **settings**: every config field that changes an output, as canonical JSON;
- each **weight** it loads: role, table name (``clip_vit_b16``, also for a tiny twin of it)
  and the file's fingerprint (``fingerprints.py``: sha256, ``hub:<id>``, or ``tiny``);
- each **artifact** it reads (a tuned configuration; next, a trained head): kind, name, digest.

:attr:`ModelIdentity.version` is what Label Studio shows and stores as ``model_version``:
short and readable, ``naclip+sam·b16·samB·3f9c2a`` (method, weight tags, ``tiny`` for random
twins, ``tuned`` when an artifact is read, and 6 hex digits over everything). Anything that
changes an output changes the digest, so Label Studio never takes a new model for the old
one; the package version does not (a release that changes numbers bumps a revision).
:meth:`ModelIdentity.manifest` is the full record (``/versions``, ``models list --manifest``).

The same identity is computed two ways that must agree (``tests/test_identity.py``): from a
method's plan before anything loads (``proposers/base.py`` ``MethodPlan``: the server's
``/setup`` has 3 s) and by a proposer from the files it loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ovss_label import __version__

from .fingerprints import TINY
from .weights import WEIGHTS

SEPARATOR = "·"
"""Between the parts of a version string (readable in Label Studio's narrow columns)."""
DIGEST_LENGTH = 6


@dataclass(frozen=True)
class WeightId:
    """One weight file a model loaded (or will load).

    Attributes:
        role: What the method uses it for (``clip``, ``sam``, ``blip``, ``presence``).
        name: Weight-table name asked for (``clip_vit_b16``); a tiny twin keeps the name.
        fingerprint: The file's (``fingerprints.py``), ``tiny`` for a random twin.
    """

    role: str
    name: str
    fingerprint: str

    @property
    def tag(self) -> str:
        """The table's short tag (``b16``), or the name for a weight outside the table."""
        spec = WEIGHTS.get(self.name)
        return spec.tag if spec is not None and spec.tag else self.name


@dataclass(frozen=True)
class ArtifactId:
    """An artifact a model reads: ``kind`` (``tuned``), ``name``, content ``digest``."""

    kind: str
    name: str
    digest: str


@dataclass(frozen=True)
class ModelIdentity:
    """See the module docstring. Build with :meth:`of`; equal identities are one model."""

    method: str
    settings: str  # canonical JSON, so the identity is hashable and comparable
    weights: tuple[WeightId, ...]
    artifacts: tuple[ArtifactId, ...] = ()

    @classmethod
    def of(
        cls,
        method: str,
        settings: Mapping[str, Any],
        weights: Iterable[WeightId],
        artifacts: Iterable[ArtifactId] = (),
    ) -> ModelIdentity:
        """From plain values; ``settings`` must be JSON-able (:func:`settings_of` makes it)."""
        return cls(method, canonical_json(settings), tuple(weights), tuple(artifacts))

    @property
    def tiny(self) -> bool:
        """True when every weight is a tiny random twin (outputs are meaningless)."""
        return bool(self.weights) and all(w.fingerprint == TINY for w in self.weights)

    @property
    def digest(self) -> str:
        """:data:`DIGEST_LENGTH` hex digits over method, settings, weights and artifacts."""
        text = canonical_json(self._record())
        return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]

    @property
    def version(self) -> str:
        """``method·tags[·tiny][·tuned]·digest`` (module docstring)."""
        parts = [self.method, *dict.fromkeys(w.tag for w in self.weights)]
        if self.tiny:
            parts.append("tiny")
        parts += [a.kind for a in self.artifacts]
        return SEPARATOR.join([*parts, self.digest])

    def manifest(self) -> dict[str, Any]:
        """The full record, JSON-able: what ``/versions`` and ``models list --manifest`` show."""
        return {"model_version": self.version, **self._record(), "package": __version__}

    def _record(self) -> dict[str, Any]:
        """What the digest covers: everything but the package version."""
        return {
            "method": self.method,
            "settings": json.loads(self.settings),
            "weights": [dataclasses.asdict(w) for w in self.weights],
            "artifacts": [dataclasses.asdict(a) for a in self.artifacts],
        }


def is_tiny_version(version: str) -> bool:
    """True when a ``model_version`` names tiny random twins (its ``·tiny·`` part)."""
    return f"{SEPARATOR}tiny{SEPARATOR}" in version


def settings_of(config: Any, runtime: Iterable[str] = ()) -> dict[str, Any]:
    """A config dataclass's fields as JSON-able values, without ``runtime`` fields (those that
    change speed or memory, never an output)."""
    skip = set(runtime)
    return {
        f.name: _plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if f.name not in skip
    }


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: one text per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def loaded_weight(role: str, model: Any) -> WeightId:
    """The :class:`WeightId` of a loaded model (``LoadedClip``, ``LoadedSam``, ``LoadedBlip``)."""
    return WeightId(role, model.weight or model.name, model.file_fingerprint)
