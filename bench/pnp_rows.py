"""PnP-OVSS rows of ``bench/proposers.py``: BLIP ITM large (random weights) on a 480x640 photo.

Each Salience-DropOut round is one BLIP forward (ViT-L/16 at 336 px and the BERT text encoder
with cross-attention) and one backward to the chosen cross-attention layer; the tokenizer is the
tiny letter-level one (word pieces cost nothing next to the model).
"""

from __future__ import annotations

import time
from typing import Any

from ovss_label.backend.models.blip_loader import LoadedBlip, tiny_tokenizer
from ovss_label.backend.proposers.pnp_ovss import PnpConfig, PnpOvssProposer
from ovss_label.ontologies import load

Row = tuple[str, ...]


def blip_itm_large(vocab_size: int) -> Any:
    """``BlipForImageTextRetrieval`` at BLIP ITM large's size (ViT-L/16, BERT-base)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    text = {"vocab_size": vocab_size, "encoder_hidden_size": 1024, "hidden_size": 768,
            "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072,
            "pad_token_id": 0,
            "sep_token_id": 3, "bos_token_id": vocab_size - 2}  # fmt: skip
    vision = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "image_size": 384, "patch_size": 16}  # fmt: skip
    config = BlipConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    return BlipForImageTextRetrieval(config).eval()


def pnp_rows(image: Any, rounds: int) -> list[Row]:
    """Per-image latency of ``pnp_ovss`` with VOC's 20 classes and ``rounds`` dropout rounds."""
    tokenizer = tiny_tokenizer()
    blip = LoadedBlip(blip_itm_large(len(tokenizer)), tokenizer, "blip_itm_large", False)
    proposer = PnpOvssProposer(blip, PnpConfig(rounds=rounds, crf=False))
    vocab = load("voc20")
    proposer.score(proposer.encode(image[:64, :64]), vocab)  # warm-up
    start = time.perf_counter()
    proposer.score(proposer.encode(image), vocab)
    seconds = time.perf_counter() - start
    return [
        (f"pnp_ovss, BLIP ITM large, {rounds} rounds, 20 classes", f"{rounds} x (fwd + bwd)",
         _s(seconds), f"{seconds / rounds:.1f} s per round; blur-only (no CRF)"),
    ]  # fmt: skip


def _s(seconds: float) -> str:
    return f"{seconds:,.1f} s"
