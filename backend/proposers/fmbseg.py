"""FMbSeg stage 1 as pure functions: class presence, point prompts, labelling SAM masks.

Seifi et al., "Annotation-Free Semantic Segmentation with Vision Foundation Models" (BMVC 2024,
arXiv 2403.09307), §3.1 (docs/algorithms.md §3.2-3.3). No code was published; each function says
what the paper states and what is reconstructed. All are numpy/torch on small arrays, so the
decisions can be checked on hand-made inputs.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray


def present_classes(crop_similarity: torch.Tensor, min_crops: int = 1) -> NDArray[Any]:
    """Classes present in an image from its crops' CLS similarities.

    Paper: each crop is assigned the class whose text feature is closest to the crop's CLS
    embedding; a class is present if it is assigned to "more than a predefined number of crops
    (set to 1)". Read literally: present when assigned to more than ``min_crops`` crops.
    ``min_crops=0`` is the other reading (one crop suffices).

    Args:
        crop_similarity: (C, K) cosine of each crop's CLS embedding with each class.
        min_crops: Presence needs more than this many crops.

    Returns:
        (K,) bool.
    """
    k = crop_similarity.shape[1]
    counts = torch.bincount(crop_similarity.argmax(dim=1), minlength=k)
    result: NDArray[Any] = (counts > min_crops).cpu().numpy()
    return result


def top_patches(similarity: torch.Tensor, n: int = 5) -> NDArray[Any]:
    """The ``n`` patches of highest similarity: (n, 2) float (row, col) patch indices.

    Args:
        similarity: (gh, gw) one class's patch similarities.
    """
    flat = similarity.flatten()
    best = torch.topk(flat, min(n, flat.numel())).indices.cpu().numpy()
    width = similarity.shape[1]
    return np.stack([best // width, best % width], axis=1).astype(np.float64)


def patch_centres_to_pixels(
    patches: NDArray[Any], patch_px: float, scale: tuple[float, float]
) -> NDArray[Any]:
    """(n, 2) (row, col) patch indices -> (n, 2) (x, y) original pixels at patch centres.

    Args:
        patches: From :func:`top_patches`.
        patch_px: Patch size in the over-sampled frame.
        scale: (sy, sx) original size / over-sampled size.
    """
    ys = (patches[:, 0] + 0.5) * patch_px * scale[0]
    xs = (patches[:, 1] + 0.5) * patch_px * scale[1]
    return np.stack([xs, ys], axis=1)


def mask_mean_features(masks: NDArray[Any], features: torch.Tensor) -> torch.Tensor:
    """Mean patch feature inside each mask, weighted by how much of each patch it covers.

    Paper: a SAM mask's feature is the mean of the CLIP patch features inside it. Patches
    straddling the mask border count by the fraction they cover (``cv2.INTER_AREA`` of the
    mask onto the patch grid) [reconstructed].

    Args:
        masks: (M, H, W) bool in the frame the patch grid tiles.
        features: (gh, gw, D) unit patch features.

    Returns:
        (M, D) unit vectors (zero for a mask covering no patch).
    """
    gh, gw, _ = features.shape
    weights = np.stack(
        [cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA) for m in masks]
    )
    w = torch.from_numpy(weights).to(features).flatten(1)  # (M, gh*gw)
    summed = w @ features.flatten(0, 1)
    return F.normalize(summed, dim=-1)


def label_masks(
    mask_features: torch.Tensor,
    text: torch.Tensor,
    present: NDArray[Any],
    logit_scale: float = 100.0,
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Stage 1.2 labels: the present class closest to each mask's mean feature.

    Args:
        mask_features: (M, D) unit vectors.
        text: (K, D) unit class text features.
        present: (K,) bool; only present classes can be chosen.
        logit_scale: Softmax temperature for the confidence (CLIP's trained scale, 100).

    Returns:
        ``(labels, confidence)``: (M,) class indices and (M,) softmax probability of the chosen
        class among the present ones.
    """
    logits = logit_scale * mask_features @ text.T
    logits[:, torch.from_numpy(~present)] = float("-inf")
    probs = torch.softmax(logits, dim=1)
    confidence, labels = probs.max(dim=1)
    return labels.cpu().numpy(), confidence.cpu().numpy()
