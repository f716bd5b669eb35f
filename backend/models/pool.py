"""One owner of the loaded models: a pool keyed by (weight, file fingerprint, device, twin).

A server that answers naclip, naclip+sam, clip_sam and interactive clicks needs one SAM and
one CLIP ViT-B/16, not one per method. Proposer factories take models from the pool they are
handed (the engine's, or a CLI job's), so a model is built once per process and file; a file
replaced under the same name has another fingerprint and is another entry.

:class:`WeightRef` is what a method asks for (a table name, an optional explicit file, the
tiny twin); its :meth:`WeightRef.fingerprint` is computed without loading anything and is the
fingerprint the loaded model reports (same resolution: ``weights.find_weight`` /
``resolve_weight``), which is how a server answers ``/setup`` before loading.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fingerprints import TINY, expected_fingerprint, weight_fingerprint
from .identity import WeightId
from .weights import get_spec


@dataclass(frozen=True)
class WeightRef:
    """A weight a method asks for.

    Attributes:
        name: Weight-table name (``clip_vit_b16``, ``sam_vit_b``, ``blip_itm_large_flickr``).
        checkpoint: An explicit file (a snapshot folder for BLIP), or None to resolve it.
        tiny: The tiny random twin (with a ``checkpoint``: the twin's architecture loaded from
            that file, as tests do; a BLIP twin is always random).
    """

    name: str
    checkpoint: str | None = None
    tiny: bool = False

    @property
    def family(self) -> str:
        """``clip``, ``sam`` or ``blip`` (the table's)."""
        return get_spec(self.name).family

    def fingerprint(self) -> str:
        """The fingerprint the loaded model will report, without loading it."""
        if self.tiny:
            if self.checkpoint is None or self.family == "blip":
                return TINY
            return weight_fingerprint(None, Path(self.checkpoint))
        spec = get_spec(self.name)
        if self.checkpoint is not None:
            return weight_fingerprint(spec, Path(self.checkpoint))
        return expected_fingerprint(spec)

    def weight_id(self, role: str) -> WeightId:
        """This weight in a model identity."""
        return WeightId(role, self.name, self.fingerprint())


class ModelPool:
    """Loaded models by (family, name, fingerprint, device, tiny); thread-safe.

    Two threads asking for the same model wait for one build; different models build in
    parallel. ``builds`` counts builds per weight name (tests assert sharing with it).

    Args:
        device: Where every model of this pool lives.
        text_cache: The text encoders' disk cache (``clip_text.TextEncoder``'s ``cache``).
    """

    def __init__(self, device: str = "cpu", text_cache: Any = None) -> None:
        self.device, self.text_cache = device, text_cache
        self.builds: Counter[str] = Counter()
        self._models: dict[tuple[Any, ...], Any] = {}
        self._texts: dict[int, Any] = {}
        self._locks: dict[tuple[Any, ...], threading.Lock] = {}
        self._lock = threading.Lock()

    def load(self, ref: WeightRef) -> Any:
        """The model of ``ref`` (``LoadedClip``, ``LoadedSam`` or ``LoadedBlip``), built on
        first use.

        Raises:
            MissingWeightError, CheckpointError, ValueError: It cannot be built.
        """
        key = (ref.family, ref.name, ref.fingerprint(), self.device, ref.tiny)
        with self._lock:
            if key in self._models:
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one build per key; other keys are not blocked
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = _build(ref, self.device)
            with self._lock:
                self._models[key] = model
                self.builds[ref.name] += 1
            return model

    def add(self, ref: WeightRef, model: Any) -> None:
        """Registers a model built elsewhere as ``ref``'s (benchmarks, stand-ins in tests)."""
        key = (ref.family, ref.name, ref.fingerprint(), self.device, ref.tiny)
        with self._lock:
            self._models[key] = model

    def text_encoder(self, clip: Any) -> Any:
        """The one ``TextEncoder`` of a loaded CLIP (its query memo is shared by methods)."""
        from .clip_text import TextEncoder

        with self._lock:
            if id(clip) not in self._texts:
                self._texts[id(clip)] = TextEncoder(clip, cache=self.text_cache)
            return self._texts[id(clip)]


def _build(ref: WeightRef, device: str) -> Any:
    tiny = ref.tiny  # decided by the plan (OVSS_TINY included), never again here
    if ref.family == "clip":
        from .clip import build_clip

        return build_clip(ref.name, checkpoint=ref.checkpoint, tiny=tiny, device=device)
    if ref.family == "sam":
        from .sam import build_sam

        return build_sam(ref.name, checkpoint=ref.checkpoint, tiny=tiny, device=device)
    if ref.family == "dinov2":
        from .dinov2 import load_dinov2

        return load_dinov2(ref.name, checkpoint=ref.checkpoint, tiny=tiny, device=device)
    from .blip_loader import load_blip

    return load_blip(ref.name, path=ref.checkpoint, tiny=tiny, device=device)
