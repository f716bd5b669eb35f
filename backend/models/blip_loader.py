"""Loading BLIP ITM large (real or tiny) with its tokenizer, LAVIS's conventions applied.

Resolution (as for every weight, ``weights.py``): an explicit folder; ``$OVSS_WEIGHTS_DIR/<name>``
(a ``save_pretrained`` / hub snapshot folder: ``config.json``, ``model.safetensors``,
tokenizer files); the Hugging Face hub id, downloaded into the hub's own cache unless
``OVSS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set. Only safetensors are accepted
(``use_safetensors=True``): no pickle is ever loaded.

LAVIS conventions the PnP-OVSS reference relies on (docs/algorithms.md §4.2):
- the vision LayerNorm epsilon is 1e-6 in LAVIS; HF's default is 1e-5. The checkpoint config's
  value is logged, and with ``lavis_ln_eps`` every vision LayerNorm is set to 1e-6;
- ``[ENC]`` (id 30523) replaces the first caption token; a tokenizer that lacks it gets it
  added as a special token at that id when the embedding table has the row.
"""

from __future__ import annotations

import logging
import os
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..store import weights_dir
from .blip import BLIP_HUB_IDS, ENC_TOKEN, TINY_PNP_SETTINGS, build_tiny_blip
from .checkpoints import CheckpointError
from .clip import tiny_requested, warn_tiny
from .fingerprints import TINY, file_sha256, published_fingerprint, weight_fingerprint
from .weights import MissingWeightError, find_weight, get_spec, offline

log = logging.getLogger(__name__)

LAVIS_VISION_LN_EPS = 1e-6


@dataclass(frozen=True)
class LoadedBlip:
    """A BLIP ITM model and its tokenizer.

    Attributes:
        model: ``BlipForImageTextRetrieval`` in eval mode with eager attention.
        tokenizer: A BERT tokenizer that knows ``[ENC]``.
        name: Weight name or ``blip_tiny``.
        tiny: True for the random tiny twin.
        file_fingerprint: The snapshot's fingerprint (``fingerprints.py``), ``"tiny"`` for a
            random twin; it goes into model identities.
        weight: The weight-table name asked for (also for its tiny twin): the name model
            identities use.
    """

    model: Any
    tokenizer: Any
    name: str
    tiny: bool
    file_fingerprint: str = TINY
    weight: str = ""


def tiny_tokenizer() -> Any:
    """A BERT word-piece tokenizer over letters: any word splits into ``w ##o ##r ##d`` pieces."""
    from transformers import BertTokenizer

    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", *letters]
    vocab += [f"##{c}" for c in letters] + ["[DEC]", ENC_TOKEN]
    vocab = list(dict.fromkeys(vocab))  # "a" is a word and a letter: one id each token
    folder = Path(tempfile.mkdtemp(prefix="ovss-tiny-bert-"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"), additional_special_tokens=["[DEC]", ENC_TOKEN])


def load_blip(
    name: str = "blip_itm_large_flickr",
    *,
    path: str | os.PathLike[str] | None = None,
    tiny: bool | None = None,
    device: str = "cpu",
    lavis_ln_eps: bool = True,
) -> LoadedBlip:
    """BLIP ITM with its tokenizer (module docstring)."""
    if name not in BLIP_HUB_IDS:
        raise ValueError(f"unknown BLIP {name!r}; known: {', '.join(BLIP_HUB_IDS)}")
    if tiny_requested() if tiny is None else tiny:
        settings = ", ".join(f"{k} {v:g}" for k, v in TINY_PNP_SETTINGS.items())
        warn_tiny(f"BLIP twin of {name}; PnP-OVSS defaults for it: {settings}")
        tokenizer = tiny_tokenizer()
        model = build_tiny_blip(len(tokenizer), pad=0, sep=3, bos=len(tokenizer) - 2)
        return LoadedBlip(model.to(device), tokenizer, "blip_tiny", True, TINY, name)
    source = _source(name, path)
    loaded, processor_tokenizer = _from_pretrained(name, source)
    _lavis_conventions(loaded, processor_tokenizer, lavis_ln_eps)
    loaded.eval()
    loaded.to(device)
    fingerprint = _fingerprint(name, source)
    return LoadedBlip(loaded, processor_tokenizer, name, False, fingerprint, name)


def _from_pretrained(name: str, source: str) -> tuple[Any, Any]:
    """The model and tokenizer of a snapshot folder or hub id. A local folder that cannot be
    read is one line (:class:`CheckpointError`) naming its weight files' sha256 prefixes and
    the fix, not a traceback from safetensors or transformers."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    try:
        model = BlipForImageTextRetrieval.from_pretrained(
            source, attn_implementation="eager", use_safetensors=True
        )
        return model, BlipProcessor.from_pretrained(source).tokenizer
    except Exception as exc:  # safetensors, transformers and tokenizers each have their own
        if not Path(source).is_dir():
            raise  # a hub download: its own errors say what failed
        files = ", ".join(
            f"{f.name} sha256 {file_sha256(f)[:12]}..."
            for f in sorted(Path(source).glob("*.safetensors"))
        )
        reason = " ".join(str(exc).split())[:200]  # one line; safetensors never unpickles
        raise CheckpointError(
            f"cannot read BLIP snapshot {source} ({files or 'no *.safetensors'}): "
            f"{type(exc).__name__}: {reason}; delete the folder and run "
            f"`ovss-label models pull {name}`"
        ) from exc


def _source(name: str, path: str | os.PathLike[str] | None) -> str:
    if path is not None:
        if not Path(path).is_dir():
            raise MissingWeightError(f"BLIP folder {path} does not exist ({name})")
        return str(path)
    local = weights_dir() / name
    if (local / "config.json").is_file():
        return str(local)
    hub_id = BLIP_HUB_IDS[name]
    if offline():
        raise MissingWeightError(
            f"weight {name!r} not found: put a snapshot of {hub_id} (config.json, "
            f"model.safetensors, tokenizer files) in {local}, or allow downloads (unset "
            "OVSS_OFFLINE) so the Hugging Face hub fetches it"
        )
    return hub_id


def _fingerprint(name: str, source: str) -> str:
    """The loaded snapshot's fingerprint: the folder's, or for a hub id the hub cache's
    snapshot that ``from_pretrained`` read (the published one if it cannot be found)."""
    spec = get_spec(name)
    folder = Path(source) if Path(source).is_dir() else find_weight(spec)
    return weight_fingerprint(spec, folder) if folder is not None else published_fingerprint(spec)


def _lavis_conventions(model: Any, tokenizer: Any, lavis_ln_eps: bool) -> None:
    eps = model.config.vision_config.layer_norm_eps
    log.info("BLIP vision LayerNorm eps in the checkpoint config: %g", eps)
    if lavis_ln_eps and eps != LAVIS_VISION_LN_EPS:
        for module in model.vision_model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.eps = LAVIS_VISION_LN_EPS
    if tokenizer.convert_tokens_to_ids(ENC_TOKEN) == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
        enc = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
        rows = model.text_encoder.embeddings.word_embeddings.num_embeddings
        if enc >= rows:
            raise ValueError(f"[ENC] got id {enc} but the text embedding has {rows} rows")
