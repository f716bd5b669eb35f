"""BLIP image-text matching (ITM) large, through ``transformers``, and its cross-attention GradCAM.

PnP-OVSS (docs/algorithms.md §2.1, §2.4, §4.2) needs what ``BlipForImageTextRetrieval.forward``
does not return: the text encoder's cross-attention probabilities of one layer and the gradient
of the ITM *match* logit with respect to them. :func:`itm_gradcam` calls the components
directly (vision model with position-embedding interpolation, text encoder with
``output_attentions=True`` and eager attention, ITM head) and takes the gradient with
``torch.autograd.grad`` on the returned probabilities, which equals LAVIS's
``register_hook`` + ``backward`` (letitiabanana/PnP-OVSS @e439962
``blip_image_text_matching.py`` ``compute_gradcam_ensemble``; tested).

``[ENC]``: LAVIS replaces the first token of the caption by ``[ENC]`` (id 30523 in BLIP's
tokenizer, ``lavis/models/blip_models/blip.py`` ``init_tokenizer``); HF passes ``[CLS]``
through. :func:`encode_caption` applies LAVIS's convention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .weights import WEIGHTS

BLIP_HUB_IDS: dict[str, str] = {n: s.hub_id for n, s in WEIGHTS.items() if s.format == "hf_hub"}
"""Weight-table name -> Hugging Face hub id (safetensors; PnP-OVSS "BLIP_Flickr"/"BLIP_COCO")."""

ENC_TOKEN = "[ENC]"


def tiny_blip_config(vocab_size: int, pad: int = 0, sep: int = 3, bos: int | None = None) -> Any:
    """A BLIP ITM config at toy size with the layer/head PnP-OVSS reads (layer 7, head 9).

    Text: 8 layers of 12 heads (4 wide); vision: 1 layer, 32 px input, 16 px patches. The
    special-token ids must lie in the (tiny) vocabulary, or transformers warns.
    """
    from transformers import BlipConfig

    text = {"vocab_size": vocab_size, "hidden_size": 48, "num_hidden_layers": 8,
            "num_attention_heads": 12, "intermediate_size": 64, "encoder_hidden_size": 32,
            "pad_token_id": pad, "sep_token_id": sep,
            "bos_token_id": vocab_size - 2 if bos is None else bos}  # fmt: skip
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "image_size": 32, "patch_size": 16}  # fmt: skip
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32)


TINY_PNP_SETTINGS: dict[str, int | float] = {"layer": 5, "threshold": 0.0}
"""``PnpConfig`` fields PnP-OVSS runs the tiny twin with (``pnp_ovss.plan_pnp_ovss``; tuned
and explicit options override them), so that ``--tiny`` draws some masks on a photo and every
step runs. The real model's defaults are untouched. Why the reference's do nothing here:

- ``layer`` 7 is the twin's last layer, and the ITM head reads only the ``[ENC]`` token's
  output of that layer, so the caption words' cross-attention there gets a zero gradient.
  Layer 5 sits about as deep in 8 layers as the reference's 7 in 12.
- ``threshold`` 0.15 of a min-max span: random weights give GradCAMs near 1e-14, below the
  1e-12 floor ``pnp.threshold_maps`` puts under a span (a flat map must not divide by 0), so
  nothing reaches 0.15. At 0 every positive value is kept; the background channel is then
  where all classes' GradCAMs are exactly 0 (a negative gradient, clamped).
"""


def build_tiny_blip(vocab_size: int, seed: int = 0, **token_ids: int) -> Any:
    """A random tiny ``BlipForImageTextRetrieval`` built by transformers' own class."""
    from transformers import BlipForImageTextRetrieval

    config = tiny_blip_config(vocab_size, **token_ids)
    config._attn_implementation = "eager"  # attention probabilities are returned, not fused
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: Any = BlipForImageTextRetrieval(config)
    model.eval()
    return model


class LayerHeadError(ValueError):
    """A cross-attention layer or head index the model does not have (the message names the
    allowed ranges)."""


def attention_grid(model: Any) -> tuple[int, int]:
    """(layers, heads) of the text encoder's cross-attention: indices 0..n-1 are valid
    (BLIP ITM large 12 x 12; the tiny twin 8 x 12)."""
    text = model.config.text_config
    return int(text.num_hidden_layers), int(text.num_attention_heads)


def check_layer_head(model: Any, layers: Sequence[int], heads: Sequence[int], name: str) -> None:
    """Raises a one-line :class:`LayerHeadError` naming the allowed ranges when a layer or
    head index is outside ``model`` (an IndexError deep in the text encoder says neither).

    Args:
        model: ``BlipForImageTextRetrieval``.
        layers: Cross-attention layer indices to be read.
        heads: Head indices to be read.
        name: The model's name for the message (``LoadedBlip.name``).
    """
    n_layers, n_heads = attention_grid(model)
    bad = [b for b in (_outside("layer", layers, n_layers), _outside("head", heads, n_heads)) if b]
    if bad:
        raise LayerHeadError(
            f"{' and '.join(bad)} not in {name}: its cross-attention has layers "
            f"0-{n_layers - 1} and heads 0-{n_heads - 1}"
        )


def _outside(kind: str, indices: Sequence[int], n: int) -> str:
    """``"layers 8-11"`` / ``"head 12"`` for the indices not in ``0..n-1``, ``""`` if none."""
    values = sorted({i for i in indices if not 0 <= i < n})
    if not values:
        return ""
    run = len(values) > 1 and values == list(range(values[0], values[-1] + 1))
    listed = f"{values[0]}-{values[-1]}" if run else ", ".join(str(v) for v in values)
    return f"{kind}{'s' if len(values) > 1 else ''} {listed}"


CAPTION_TOKENS = 500
"""A caption is cut after this many tokens, ``[CLS]`` and ``[SEP]`` included (the reference)."""


def encode_caption(tokenizer: Any, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T) input ids with the first token replaced by ``[ENC]`` (LAVIS), and the mask."""
    # As the reference (BlipITM.forward): longest padding, truncation at 500 tokens.
    batch = tokenizer(
        [caption], return_tensors="pt", padding="longest", truncation=True,
        max_length=CAPTION_TOKENS,
    )  # fmt: skip
    ids = batch["input_ids"].clone()
    ids[:, 0] = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    return ids, batch["attention_mask"]


@dataclass(frozen=True)
class GradCam:
    """ITM GradCAM of one cross-attention layer.

    Attributes:
        match_logit: (B,) the ITM head's match logit (index 1).
        maps: (B, heads, T, P, P) float32 ``A · clamp(∂s/∂A, 0)`` over image patches (the image
            CLS column dropped), padded rows zeroed, negatives clamped to 0.
    """

    match_logit: torch.Tensor
    maps: torch.Tensor


def itm_gradcam(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int,
) -> GradCam:
    """Cross-attention GradCAM of ``layer`` for captions against images (module docstring).

    Args:
        model: ``BlipForImageTextRetrieval`` with eager attention.
        pixel_values: (B, 3, S, S) normalised images; S/16 patches per side.
        input_ids: (B, T) caption ids, ``[ENC]`` first.
        attention_mask: (B, T) 1 for real tokens.
        layer: Text-encoder layer index (0-based; PnP-OVSS uses 7).
    """
    logit, maps = _gradcams(model, pixel_values, input_ids, attention_mask, [layer])
    return GradCam(logit, maps[layer])


def itm_gradcam_layers(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: list[int],
) -> dict[int, torch.Tensor]:
    """:func:`itm_gradcam` maps of several layers from one forward and one backward pass.

    Returns:
        Layer index -> (B, heads, T, P, P) maps.
    """
    return _gradcams(model, pixel_values, input_ids, attention_mask, layers)[1]


def _gradcams(
    model: Any,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: list[int],
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(B,) match logits and layer -> GradCAM maps, from one forward and one backward pass."""
    with torch.enable_grad():
        pixel_values = pixel_values.detach().requires_grad_(True)  # frozen weights still get A.grad
        image = model.vision_model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        out = model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            output_attentions=True,
            return_dict=True,
        )
        logits = model.itm_head(out.last_hidden_state[:, 0])
        probs = [out.cross_attentions[layer] for layer in layers]  # (B, heads, T, 1 + P²) each
        grads = torch.autograd.grad(logits[:, 1].sum(), probs)
    maps = {
        layer: _cam(p.detach(), g, attention_mask)
        for layer, p, g in zip(layers, probs, grads, strict=True)
    }
    return logits[:, 1].detach(), maps


def _cam(probs: torch.Tensor, grad: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    side = round((probs.shape[-1] - 1) ** 0.5)
    cam = probs[..., 1:] * grad[..., 1:].clamp(min=0)
    cam = cam * attention_mask[:, None, :, None].to(cam.dtype)
    return cam.reshape(*cam.shape[:3], side, side).clamp(min=0)


class BlipTextEmbedder:
    """BLIP's image-text contrastive (ITC) text embedding: ``text_proj`` of the text encoder's
    first token, text-only mode (no cross-attention), L2-normalised, as
    ``BlipForImageTextRetrieval.forward(use_itm_head=False)`` computes it. Lets a PnP-OVSS
    project match free text to its labels without a CLIP. Thread-safe (no state)."""

    def __init__(self, blip: Any) -> None:
        self.blip = blip

    @torch.no_grad()
    def query_features(self, vocabulary: Any) -> tuple[torch.Tensor, list[int]]:
        """(Q, D) unit rows, one per synonym in class order (templates are CLIP's idea and
        not used), and each query's class index."""
        queries, query_idx = vocabulary.queries()
        model = self.blip.model
        device = next(model.parameters()).device
        batch = self.blip.tokenizer(queries, return_tensors="pt", padding="longest")
        out = model.text_encoder(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            return_dict=True,
        )
        features = model.text_proj(out.last_hidden_state[:, 0, :]).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu(), list(query_idx)
