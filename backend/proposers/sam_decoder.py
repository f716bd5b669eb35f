"""SAM's mask decoder for one prompt on a cached image, its image-only work done once per image.

For every prompt, segment_anything's ``MaskDecoder.predict_masks`` recomputes tensors that depend
on the image embedding alone: the dense positional encoding (``get_dense_pe``), copies of the
embedding and the encoding for the batch (``repeat_interleave``), the embedding plus the no-mask
embedding, and in the first two-way block the token-to-image keys and values and the
image-to-token queries (three (4096, 256) @ (256, 128) projections and their inputs). An
interactive session clicks many times on one image, so :func:`image_context` computes those once
per image, and :func:`decode_one` runs the rest op for op as ``TwoWayTransformer`` and
``MaskDecoder`` do, on tensors of the same values and layout: the logits and predicted IoUs are
bit-identical (tests/test_sam.py compares them with ``MaskDecoder``).

Only one prompt without a mask input takes this path (interactive clicks); batches of prompts
(refinement, CLIP+SAM) go through ``MaskDecoder`` itself. A context (about 14 MB for ViT-B) is
kept in the caller's feature cache (``sam_prompts.decode``), next to the embedding it was made
from, under the same memory budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor


@dataclass(frozen=True)
class ImageContext:
    """The decoder's image-only tensors for one image, one prompt (batch of 1).

    Attributes:
        src: (1, C, h, w) float32: image embedding + no-mask embedding (``predict_masks``' src).
        key_pe: (1, h*w, C) float32, contiguous: the dense positional encoding as
            ``TwoWayTransformer`` flattens it. Stored contiguous: ``keys + key_pe`` then runs on
            two contiguous operands (5 adds per prompt, each several times faster) and gives the
            same values in the same (contiguous) layout as SAM's strided sum.
        t2i_k: (1, h*w, C / 2) float32: first block's token-to-image keys, projected.
        t2i_v: (1, h*w, C / 2) float32: first block's token-to-image values, projected.
        i2t_q: (1, h*w, C / 2) float32: first block's image-to-token queries, projected.
    """

    src: Tensor
    key_pe: Tensor
    t2i_k: Tensor
    t2i_v: Tensor
    i2t_q: Tensor

    def as_tensors(self) -> dict[str, Tensor]:
        """The fields by name (what a ``Features`` entry of the feature cache holds)."""
        return {"src": self.src, "key_pe": self.key_pe, "t2i_k": self.t2i_k,
                "t2i_v": self.t2i_v, "i2t_q": self.i2t_q}  # fmt: skip


@torch.no_grad()
def image_context(model: Sam, embedding: Tensor) -> ImageContext:
    """The image-only tensors of ``model``'s decoder for ``embedding`` (1, C, h, w) float32."""
    prompt_encoder, block = model.prompt_encoder, model.mask_decoder.transformer.layers[0]
    _, dense = prompt_encoder(points=None, boxes=None, masks=None)  # no-mask embedding, batch 1
    # The same expressions as predict_masks and TwoWayTransformer, so values and layouts match.
    src = torch.repeat_interleave(embedding, 1, dim=0) + dense
    pos = torch.repeat_interleave(prompt_encoder.get_dense_pe(), 1, dim=0)
    keys, key_pe = src.flatten(2).permute(0, 2, 1), pos.flatten(2).permute(0, 2, 1)
    t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
    t2i_k, t2i_v = t2i.k_proj(keys + key_pe), t2i.v_proj(keys)
    i2t_q = i2t.q_proj(keys + key_pe)
    return ImageContext(src, key_pe.contiguous(), t2i_k, t2i_v, i2t_q)


@torch.no_grad()
def decode_one(
    model: Sam, context: ImageContext, sparse: Tensor, multimask: bool
) -> tuple[Tensor, Tensor]:
    """``model.mask_decoder`` for one prompt, bit-identical, with ``context``'s work skipped.

    Args:
        model: The SAM whose decoder runs.
        context: :func:`image_context` of the image's embedding.
        sparse: (1, N, C) float32 sparse prompt embeddings (``model.prompt_encoder``'s first
            output; the prompt must have no mask input).
        multimask: As ``MaskDecoder``'s ``multimask_output``.

    Returns:
        ``(low_res, iou)``: (1, 3, 4h, 4w) float32 logits in the padded encoder frame and (1, 3)
        float32 predicted IoU (1 instead of 3 without ``multimask``).
    """
    decoder = model.mask_decoder
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(1, -1, -1), sparse), dim=1)
    hs, keys = _transformer(model, context, tokens)
    b, c, h, w = context.src.shape
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(hs[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou = decoder.iou_prediction_head(hs[:, 0, :])
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen, :, :], iou[:, chosen]


def _transformer(model: Sam, context: ImageContext, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``TwoWayTransformer.forward`` with its first block on ``context``: (queries, keys)."""
    transformer = model.mask_decoder.transformer
    keys, key_pe = context.src.flatten(2).permute(0, 2, 1), context.key_pe
    queries, keys = _first_block(transformer.layers[0], context, tokens, keys)
    for layer in transformer.layers[1:]:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    q, k = queries + tokens, keys + key_pe
    queries = queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys)
    return transformer.norm_final_attn(queries), keys


def _first_block(
    block: TwoWayAttentionBlock, context: ImageContext, tokens: Tensor, keys: Tensor
) -> tuple[Tensor, Tensor]:
    """``TwoWayAttentionBlock.forward`` (``skip_first_layer_pe``) with the image-side
    projections taken from ``context``. ``tokens``: (1, N, C), both queries and query_pe."""
    queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
    t2i = block.cross_attn_token_to_image
    attn_out = _attend(t2i, t2i.q_proj(queries + tokens), context.t2i_k, context.t2i_v)
    queries = block.norm2(queries + attn_out)
    queries = block.norm3(queries + block.mlp(queries))
    i2t, q = block.cross_attn_image_to_token, queries + tokens
    attn_out = _attend(i2t, context.i2t_q, i2t.k_proj(q), i2t.v_proj(queries))
    return queries, block.norm4(keys + attn_out)


def _attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``Attention.forward`` after its input projections: q, k, v are (B, N, C') projected."""
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    _, _, _, c_per_head = q.shape
    weights = q @ k.permute(0, 1, 3, 2)
    weights = weights / math.sqrt(c_per_head)
    weights = torch.softmax(weights, dim=-1)
    out: Tensor = attn.out_proj(attn._recombine_heads(weights @ v))
    return out
