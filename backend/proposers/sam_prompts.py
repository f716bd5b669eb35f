"""SAM without hidden state: one cached image embedding, batched prompts, the best mask each.

``SamPredictor`` keeps the embedding of the last ``set_image`` in the predictor, so one predictor
cannot serve two threads. Here the embedding is a :class:`Features` (cached like any image
features, so refinement, CLIP+SAM and interactive prompts on one image share one encoder pass)
and decoding is a function of (model, features, prompts). The numbers are
segment_anything ``predictor.py``'s (``set_torch_image``, ``predict``, ``predict_torch``),
with one change of order: with ``multimask`` the best of the 3 candidates (highest predicted
IoU) is chosen on the 256x256 low-resolution logits and only that one is upsampled to the
original size. Upsampling every candidate dominates the decoder's cost; the chosen mask is
identical. Two more shortcuts give the same bits: one prompt (an interactive click) runs the
decoder with its image-only work cached per image (``sam_decoder.py``; in the ``cache`` given,
beside the embedding), and upsampling starts
from the low-resolution rows and columns that cover the image, not its padding
(:func:`upscale_masks`).

Frames: prompts are in original-image pixels (x, y), the COCO pixel-edge frame (the centre of
pixel (r, c) is (c + 0.5, r + 0.5)); ``ResizeLongestSide`` maps them to the encoder input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from segment_anything.utils.transforms import ResizeLongestSide

from ..models.sam import LoadedSam
from .base import Features
from .sam_decoder import ImageContext, decode_one, image_context

if TYPE_CHECKING:
    from .cache import FeatureCache


class SamEncoder:
    """SAM's image encoder as a cacheable encoder (``FeatureCache.features`` accepts it)."""

    def __init__(self, sam: LoadedSam) -> None:
        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_size)
        self.cache_key = f"sam-{sam.name}-{sam.fingerprint}"

    @torch.no_grad()
    def encode(self, image: NDArray[Any]) -> Features:
        """Features: ``embedding`` (1, C, h, w); meta: ``input_size`` (resized (H, W) before
        padding) and ``original_size``. ``image``: (H, W, 3) uint8 RGB."""
        from .cache import image_key

        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.sam.device).permute(2, 0, 1)[None].float()
        embedding = self.sam.model.image_encoder(self.sam.model.preprocess(x))
        original = (int(image.shape[0]), int(image.shape[1]))
        meta = {"input_size": tuple(x.shape[-2:]), "original_size": original}
        return Features(original, {"embedding": embedding}, meta, image_key(image))


@torch.no_grad()
def decode(
    sam: LoadedSam,
    features: Features,
    *,
    points: NDArray[Any] | None = None,
    labels: NDArray[Any] | None = None,
    boxes: NDArray[Any] | None = None,
    multimask: bool = True,
    cache: FeatureCache | None = None,
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Masks for B prompts in one decoder pass.

    Args:
        sam: The model whose encoder made ``features``.
        features: From :class:`SamEncoder`.
        points: (B, N, 2) float (x, y) original pixels, or None.
        labels: (B, N) int, 1 foreground / 0 background, with ``points``.
        boxes: (B, 4) float xyxy original pixels, or None.
        multimask: Let SAM propose 3 masks per prompt and keep the highest predicted IoU (SAM's
            advice for ambiguous prompts such as one point); False asks for one mask.
        cache: Where one prompt's decoder context for this image is kept (interactive clicks
            on one image reuse it); None computes it each time.

    Returns:
        ``(masks, iou)``: (B, H, W) bool in the original frame and (B,) float32 predicted IoU.
    """
    model, transform = sam.model, ResizeLongestSide(sam.image_size)
    original, input_size = features.meta["original_size"], features.meta["input_size"]
    point_pair = None
    if points is not None:
        coords = transform.apply_coords(np.asarray(points, np.float64), original)
        point_pair = (
            torch.as_tensor(coords, dtype=torch.float, device=sam.device),
            torch.as_tensor(labels, dtype=torch.int, device=sam.device),
        )
    box_torch = None
    if boxes is not None:
        scaled = transform.apply_boxes(np.asarray(boxes, np.float64), original)
        box_torch = torch.as_tensor(scaled, dtype=torch.float, device=sam.device)
    sparse, dense = model.prompt_encoder(points=point_pair, boxes=box_torch, masks=None)
    embedding = features.tensors["embedding"]
    if len(sparse) == 1:  # one prompt: the image-only half of the decoder is cached
        context = _context(sam, features, cache)
        low_res, iou = decode_one(model, context, sparse, multimask)
    else:
        low_res, iou = model.mask_decoder(
            image_embeddings=embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
    best = iou.argmax(dim=1)  # choose before upsampling: 1 of 3 candidates is upsampled
    rows = torch.arange(len(best), device=best.device)
    chosen, chosen_iou = low_res[rows, best][:, None], iou[rows, best]
    masks = upscale_masks(chosen, input_size, original, sam.image_size) > model.mask_threshold
    return masks[:, 0].cpu().numpy(), chosen_iou.float().cpu().numpy()


def _context(sam: LoadedSam, features: Features, cache: FeatureCache | None) -> ImageContext:
    """The decoder's image-only tensors for ``features``, from ``cache`` when it has them."""
    embedding = features.tensors["embedding"]
    if cache is None or not features.key:
        return image_context(sam.model, embedding)
    key = (features.key, f"sam-{sam.name}-{sam.fingerprint}|decoder-context")
    hit = cache.get(key)
    if hit is not None:
        return ImageContext(**hit.tensors)
    context = image_context(sam.model, embedding)
    cache.put(key, Features(features.image_hw, context.as_tensors()))
    return context


def upscale_masks(
    low_res: torch.Tensor, input_size: tuple[int, int], original: tuple[int, int], image_size: int
) -> torch.Tensor:
    """``Sam.postprocess_masks``, bit-identical, without upsampling the padding.

    SAM upsamples the (S/4, S/4) logits to the padded (S, S) encoder frame, crops the resized
    image (``input_size``) and resizes that to ``original``, all bilinear without corner
    alignment. Here the crop comes first, on the logits: the rows and columns that cover
    ``input_size`` plus one (the bilinear neighbour of the last pixel kept), upsampled by the
    same factor, so every kept pixel has the same source positions, neighbours and weights as
    in SAM's full-frame pass. A 480x640 photo upsamples 75% of the frame, a 200x1000 one 20%.

    Args:
        low_res: (B, C, S/4, S/4) float32 logits in the padded encoder frame.
        input_size: (h, w) of the resized image inside the S x S frame.
        original: (H, W) of the image.
        image_size: S, the encoder's input side (1024).

    Returns:
        (B, C, H, W) float32 logits in the original frame.
    """
    scale = image_size // low_res.shape[-1]
    # A kept row y < h reads logit rows up to floor((h - 0.5) / scale - 0.5) + 1 <= ceil(h /
    # scale): keeping rows 0..ceil(h / scale), the edge clamp never reaches a kept pixel.
    rows = min(low_res.shape[-2], -(-input_size[0] // scale) + 1)
    cols = min(low_res.shape[-1], -(-input_size[1] // scale) + 1)
    size = (rows * scale, cols * scale)  # the same factor as SAM's full pass: same weights
    masks = F.interpolate(low_res[..., :rows, :cols], size, mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, original, mode="bilinear", align_corners=False)
