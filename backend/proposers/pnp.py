"""PnP-OVSS pieces as pure functions: word pieces -> classes, Salience DropOut, maps -> masks.

Follows letitiabanana/PnP-OVSS @e439962 (the "updated" code, docs/algorithms.md §2.0 version 3),
``PnP_OVSS_0514_updated_segmentation.py`` (``Mean_over_filtered_label_tokens``,
``Inference_BLIP_filteredcaption``, ``save_img_union_attention``, ``postprocess``/``blurring``),
with the CVPR paper's choices as options where the two differ. Frames: P x P patch grids
(P = S/16 for an S x S BLIP input), flat patch index p = r * P + c.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from scipy.ndimage import gaussian_filter

DROP_RULES = ("topk", "median")


PREFIX = "A picture of "
"""The caption's opening words (3 word pieces): the reference's prompt."""


def caption_words(tokenizer: Any, names: Sequence[str]) -> tuple[str, list[int]]:
    """The caption ``"A picture of c1 c2 ..."`` and each class word's number of word pieces.

    As the reference, each name goes in with its spaces removed (``pottedplant``). The pieces
    are counted per name because BERT's tokenizer also splits at punctuation, into pieces that
    do not start with ``##``: ``t-shirt`` is ``t``, ``-``, ``shirt``, three words by the
    reference's ``##`` rule, which would give the caption more words than classes. For a name
    without punctuation the count is the ``##`` rule's.

    Raises:
        ValueError: A name the tokenizer turns into no word piece (named).
    """
    words = [name.replace(" ", "") for name in names]
    sizes = [len(tokenizer.tokenize(word)) for word in words]
    for name, size in zip(names, sizes, strict=True):
        if size == 0:
            raise ValueError(f"label {name!r} gives BLIP's tokenizer no word piece")
    return PREFIX + " ".join(words), sizes


def class_token_maps(
    tokens: list[str],
    maps: torch.Tensor,
    last_class_sum: bool = False,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-class maps from the per-token maps of a "A picture of c1 c2 ..." caption.

    The rows after the 3 prefix words and before ``[SEP]`` are the class words. With
    ``sizes`` (:func:`caption_words`), class k is the next ``sizes[k]`` rows; without, a word
    piece starting with ``##`` continues the preceding word (the reference's rule). A class
    map is the mean of its pieces. The reference divides by the piece count only when another
    token follows, so the last class keeps the *sum* of its pieces: ``last_class_sum=True``
    reproduces that quirk (off by default: it is a bug).

    Args:
        tokens: The caption's tokens without ``[ENC]`` (``tokenizer.convert_ids_to_tokens``).
        maps: (len(tokens), P, P) per-token maps, same order.
        last_class_sum: Reproduce the reference's last-class quirk.
        sizes: Word pieces per class, caption order; a class cut off by ``[SEP]`` (a caption
            truncated at 500 tokens) is left out.

    Returns:
        (K, P, P), one map per class word, caption order.
    """
    end = tokens.index("[SEP]", 3) if "[SEP]" in tokens[3:] else len(tokens)
    words = _words_by_piece_marks(tokens[:end]) if sizes is None else _words_by_size(sizes, end)
    out = []
    for n, rows in enumerate(words):
        summed = maps[rows].sum(dim=0)
        last = n == len(words) - 1
        out.append(summed if (last and last_class_sum) else summed / len(rows))
    return torch.stack(out)


def _words_by_piece_marks(tokens: list[str]) -> list[list[int]]:
    """Row indices of each word after the prefix: ``##`` pieces join the preceding word."""
    words: list[list[int]] = []
    for i, token in enumerate(tokens[3:], start=3):
        if token.startswith("##") and words:
            words[-1].append(i)
        else:
            words.append([i])
    return words


def _words_by_size(sizes: Sequence[int], end: int) -> list[list[int]]:
    """Row indices of each word after the prefix: consecutive runs of ``sizes`` before ``end``."""
    words, start = [], 3
    for size in sizes:
        if start + size > end:
            break
        words.append(list(range(start, start + size)))
        start += size
    return words


def drop_step(
    salience: NDArray[Any], dropped: list[int], rule: str = "topk", k: int = 10
) -> list[int]:
    """One Salience DropOut round: the patches to drop from now on.

    ``salience`` U is the sum over the class rows of this round's GradCAM (P, P). Already
    dropped patches are set to 0, then ``topk`` adds the ``k`` largest (the updated code,
    ``np.argsort(U)[-10:]``) and ``median`` adds every remaining patch with U >= the median of
    the remaining ones (the CVPR paper).

    Returns:
        ``dropped`` plus the new flat indices, in ascending salience. Ties: this sorts with
        ``kind="stable"`` (equal values in index order); the reference's ``np.argsort(U)``
        uses numpy's default, unstable sort, whose order among equal values depends on the
        numpy version and CPU (its SIMD sorts). The two pick different patches only among
        exactly equal salience, e.g. the zeros of already dropped patches when fewer than
        ``k`` patches remain above zero.
    """
    if rule not in DROP_RULES:
        raise ValueError(f"rule must be one of {DROP_RULES}, got {rule!r}")
    u = np.asarray(salience, np.float64).flatten().copy()
    u[dropped] = 0
    if rule == "topk":
        new = [int(p) for p in np.argsort(u, kind="stable")[-k:]]
    else:
        remaining = np.setdiff1d(np.arange(u.size), dropped)
        threshold = np.median(u[remaining])
        new = [int(p) for p in remaining if u[p] >= threshold]
    return dropped + [p for p in new if p not in dropped]


def zero_patches(
    pixels: torch.Tensor, dropped: list[int], grid: int, patch: int = 16
) -> torch.Tensor:
    """A copy of (B, 3, S, S) normalised pixels with the dropped 16x16 patches set to 0."""
    out = pixels.clone()
    for p in dropped:
        r, c = divmod(p, grid)
        out[..., r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = 0
    return out


def mask_dropped(maps: torch.Tensor, dropped: list[int]) -> torch.Tensor:
    """(..., P, P) maps with dropped patches zeroed (a dropped patch adds nothing later)."""
    out = maps.clone()
    flat = out.reshape(*out.shape[:-2], -1)
    flat[..., dropped] = 0
    return flat.reshape(out.shape)


def aggregate(rounds: list[torch.Tensor], first_twice: bool = True) -> torch.Tensor:
    """``M = GC_0 + Σ_t GC_t``: the reference counts the first round twice (``first_twice``)."""
    total = torch.stack(rounds).sum(dim=0)
    return total + rounds[0] if first_twice else total


def threshold_maps(maps: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """Per class: keep raw values where the min-max normalised map reaches ``threshold``.

    Args:
        maps: (K, P, P) class maps.
    """
    flat = maps.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).clamp(min=1e-12)  # a constant map normalises to 0, not NaN
    normalised = (maps - low[:, None, None]) / span[:, None, None]
    return maps * (normalised >= threshold)


def with_background(maps: NDArray[Any], always: bool, few: int = 3) -> tuple[NDArray[Any], bool]:
    """Prepends ``bg = (max_k F_k == 0)`` as channel 0 when ``always`` (VOC, COCO-Object) or when
    fewer than ``few`` classes are predicted (Context, ADE, COCO-Stuff); returns (maps, added)."""
    if not (always or maps.shape[0] < few):
        return maps, False
    background = (maps.max(axis=0) == 0).astype(maps.dtype)
    return np.concatenate([background[None], maps]), True


def blur_maps(maps: NDArray[Any], sigma_fraction: float = 0.05) -> NDArray[Any]:
    """Gaussian blur of each (H, W) channel, σ = ``sigma_fraction`` x max(H, W) pixels
    (scipy defaults: reflect, truncate 4), then per-channel min-max to [0, 1] (an all-equal
    channel becomes 0 rather than the reference's NaN)."""
    h, w = maps.shape[1:]
    out = np.empty(maps.shape, np.float64)
    for i, channel in enumerate(maps):
        blurred = gaussian_filter(channel.astype(np.float64), sigma=sigma_fraction * max(h, w))
        low, high = blurred.min(), blurred.max()
        out[i] = (blurred - low) / (high - low) if high > low else 0.0
    return out
