"""CLIP text side: prompt embeddings with a trimmed context, a disk cache, class queries.

Trimmed context: CLIP's text transformer is causal and pools at the end-of-text token (the
highest id, open_clip ``text_global_pool`` "argmax"), so tokens after it never influence the
pooled feature. Running only the first ``L`` positions, ``L`` = the longest prompt of the batch
(its end-of-text index + 1), with the positional embedding and causal mask cut to ``L``, gives
``encode_text``'s result with far less compute (prompts are ~10 of 77 tokens). Prompts are
sorted by length before batching so each batch is cut as short as possible.

Disk cache: one SQLite file per text-tower fingerprint (``LoadedClip.text_fingerprint``) with
one row per prompt, so NACLIP's 80 templates x 171 COCO-Stuff classes are computed once per
machine; ``OVSS_CACHE_DIR`` (default ``~/.cache/ovss-label``) says where.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from ovss_label.ontologies import Vocabulary

from ..store import cache_dir as cache_dir  # re-exported: it lived here first
from .clip import LoadedClip, clip_tokenizer

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)


@torch.no_grad()
def encode_tokens_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the first L positions only (module docstring).

    Args:
        model: An ``open_clip.model.CLIP`` (non-custom text tower, argmax pooling).
        tokens: (B, 77) int64 token ids from the CLIP tokenizer.

    Returns:
        (B, D) float32 unnormalised text features, equal to ``encode_text`` up to float
        rounding.
    """
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    x = model.token_embedding(tokens[:, :length])
    x = x + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0], device=x.device), eot]
    projected: torch.Tensor = pooled @ model.text_projection
    return projected


class PromptCache:
    """Prompt -> embedding rows in one SQLite file; safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS emb (prompt TEXT PRIMARY KEY, vec BLOB)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def get(self, prompts: Sequence[str]) -> dict[str, NDArray[Any]]:
        """The cached (D,) float32 embeddings among ``prompts``."""
        found: dict[str, NDArray[Any]] = {}
        with self._lock, self._connect() as db:
            for start in range(0, len(prompts), 500):  # SQLite caps bound parameters
                chunk = list(prompts[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT prompt, vec FROM emb WHERE prompt IN ({marks})", chunk)
                found.update((p, np.frombuffer(v, dtype=np.float32)) for p, v in rows)
        return found

    def put(self, items: dict[str, NDArray[Any]]) -> None:
        """Stores (D,) float32 embeddings."""
        rows = [(p, np.asarray(v, np.float32).tobytes()) for p, v in items.items()]
        with self._lock, self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)", rows)


class TextEncoder:
    """Prompt embeddings and NACLIP class queries for one CLIP, cached on disk.

    Args:
        clip: The loaded model.
        cache: Where prompt embeddings persist; None uses ``cache_dir()``, False disables it.
        batch_size: Prompts per forward pass.
    """

    def __init__(
        self, clip: LoadedClip, cache: Path | bool | None = None, batch_size: int = 256
    ) -> None:
        self.clip = clip
        self.tokenizer = clip_tokenizer()
        self.batch_size = batch_size
        self.cache: PromptCache | None = None
        if cache is not False:
            root = cache_dir() if cache in (None, True) else Path(cache)  # type: ignore[arg-type]
            try:
                self.cache = PromptCache(root / "text" / f"{clip.text_fingerprint}.sqlite")
            except (OSError, sqlite3.Error) as exc:  # e.g. a read-only home in a container
                log.warning("text-embedding cache disabled (%s): set OVSS_CACHE_DIR", exc)

    def prompt_embeddings(
        self, prompts: Sequence[str], progress: Progress | None = None
    ) -> torch.Tensor:
        """(N, D) float32 unnormalised embeddings of ``prompts``, from cache when possible."""
        unique = list(dict.fromkeys(prompts))
        known = self.cache.get(unique) if self.cache else {}
        todo = [p for p in unique if p not in known]
        if todo:
            fresh = self._encode(todo, progress)
            known.update(fresh)
            if self.cache:
                self.cache.put(fresh)
        return torch.from_numpy(np.stack([known[p] for p in prompts]))

    def _encode(self, prompts: list[str], progress: Progress | None) -> dict[str, NDArray[Any]]:
        tokens = self.tokenizer(prompts)
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # shortest first
        out: dict[str, NDArray[Any]] = {}
        device = self.clip.device
        for start in range(0, len(prompts), self.batch_size):
            idx = order[start : start + self.batch_size]
            feats = encode_tokens_trimmed(self.clip.model, tokens[idx].to(device)).float().cpu()
            out.update((prompts[int(i)], f.numpy().copy()) for i, f in zip(idx, feats, strict=True))
            if progress:
                progress(min(start + self.batch_size, len(prompts)), len(prompts))
        return out

    def query_features(
        self, vocab: Vocabulary, progress: Progress | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """NACLIP text queries (``naclip.py`` ``NACLIP.__init__``, sinahmr/NACLIP @0cac3a6).

        Per synonym: its prompts from every template, each L2-normalised, averaged, and the
        mean L2-normalised again.

        Returns:
            ``(features, query_idx)``: (Q, D) float32 unit rows, one per synonym in class order,
            and each query's class index.
        """
        queries, query_idx = vocab.queries()
        templates = vocab.templates
        prompts = [t.format(q) for q in queries for t in templates]
        emb = F.normalize(self.prompt_embeddings(prompts, progress), dim=-1)
        mean = emb.view(len(queries), len(templates), -1).mean(dim=1)
        return F.normalize(mean, dim=-1), query_idx
