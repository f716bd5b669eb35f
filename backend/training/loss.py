"""FMbSeg stage 2: the patch–text + patch–patch contrastive loss (docs/algorithms.md §3.4).

The paper's Eq. 1–4 are stripped from the available text; this is the reconstruction of
§3.4 (SupCon, Khosla'20, and ESupCon, Aljundi'23, with text prototypes added to the
contrast set). For the M labelled patches of a batch (all images together), unit patch
embeddings z_i with labels y_i, and K frozen unit text prototypes t_k:

    D(i)     = Σ_{j≠i} exp(z_i·z_j/τ) + Σ_{k'} exp(z_i·t_{k'}/τ)      (every pair of patch i)
    L_pt(k)  = −(1/|P_k|)  Σ_{i∈P_k} log( exp(z_i·t_k/τ) / D(i) ),   P_k = {i : y_i = k}
    L_pp(i)  = −(1/|P(i)|) Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / D(i) ),  P(i) = {p≠i : y_p = y_i}
    L        = w_pt · mean_k L_pt(k) + w_pp · mean_i L_pp(i)

Every prototype is in D(i), whether or not its class occurs in the batch. How the two means
are taken is a [choose] (options of :class:`ContrastiveLossConfig`).

Numerics: all logits are dot products of unit vectors divided by τ, so |logit| ≤ 1/τ; at
τ = 0.01 exp(100) would overflow float32, so nothing is exponentiated directly: log D(i)
comes from ``logsumexp`` (max subtracted), and ``log(exp(a)/D) = a − log D``.

Memory: the (M, M) logit matrix and a few same-sized temporaries (a masked copy, the
positive-pair mask, the masked positives) plus their autograd buffers: about 5 × 4·M² bytes,
≈ 2 GB at M = 10,000 patches in float32 — fine on one GPU for FMbSeg's batches (5 images of
at most ~1,400 patches each), but it grows quadratically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

TextAverage = Literal["present", "all"]
PatchAverage = Literal["with_positives", "all"]


@dataclass(frozen=True)
class ContrastiveLossConfig:
    """Options of :func:`contrastive_loss`.

    Attributes:
        tau: Temperature τ [choose: the paper does not give it]. 0.1 rather than CLIP's 0.07:
            0.07 is the *initial* value of CLIP's learned, image-level logit scale, not a
            fixed patch-level temperature; a softer τ weights hard negatives less, and with
            noisy pseudo-labels the hardest "negatives" are often mislabelled positives;
            0.1 is also the usual fixed SupCon-style value. Tune it on validation data.
        text_average: How ``L_pt(k)`` is averaged [choose]. ``"present"`` (default): over the
            classes with |P_k| > 0 in the batch, so the term's scale does not shrink with the
            vocabulary (171 classes, a handful per 5-image batch). ``"all"``: the paper's
            literal 1/K, absent classes counting 0.
        patch_average: How ``L_pp(i)`` is averaged [choose]. ``"with_positives"`` (default):
            over the patches that have at least one positive (SupCon's convention).
            ``"all"``: divided by M, the paper's 1/(B·N) read over labelled patches.
        w_pt: Weight of the patch–text term (1.0 [reconstructed]: the paper adds the terms).
        w_pp: Weight of the patch–patch term (1.0 [reconstructed]).
    """

    tau: float = 0.1
    text_average: TextAverage = "present"
    patch_average: PatchAverage = "with_positives"
    w_pt: float = 1.0
    w_pp: float = 1.0

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.text_average not in ("present", "all"):
            raise ValueError(f"text_average must be 'present' or 'all': {self.text_average!r}")
        if self.patch_average not in ("with_positives", "all"):
            raise ValueError(
                f"patch_average must be 'with_positives' or 'all': {self.patch_average!r}"
            )


class LossParts(NamedTuple):
    """The loss and its two (unweighted) terms, 0-dim tensors; log the parts, backprop total."""

    total: torch.Tensor
    patch_text: torch.Tensor
    patch_patch: torch.Tensor


def contrastive_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    config: ContrastiveLossConfig | None = None,
) -> LossParts:
    """The FMbSeg alignment loss of one batch (formulas in the module docstring).

    Args:
        z: (M, D) float, unit patch embeddings: every labelled patch of every image of the
            batch (M = Σ over images; unlabelled and padded patches left out).
        labels: (M,) int64, each in 0..K-1.
        prototypes: (K, D) float, unit text embeddings, same dtype as ``z``; frozen by the
            caller (gradients flow into them if they require grad).
        config: Temperature, normalisers and weights; defaults when None.

    Returns:
        :class:`LossParts` (total, mean L_pt, mean L_pp), 0-dim tensors of ``z``'s dtype. The
        patch–patch term is 0 when no patch has a positive.
    """
    cfg = config if config is not None else ContrastiveLossConfig()
    _check_inputs(z, labels, prototypes)
    logits_pp = z @ z.T / cfg.tau  # (M, M), z_i·z_j/τ
    logits_pt = z @ prototypes.T / cfg.tau  # (M, K), z_i·t_k/τ
    log_d = _log_denominator(logits_pp, logits_pt)
    patch_text = _patch_text_term(logits_pt, labels, log_d, cfg.text_average)
    patch_patch = _patch_patch_term(logits_pp, labels, log_d, cfg.patch_average)
    total = cfg.w_pt * patch_text + cfg.w_pp * patch_patch
    return LossParts(total, patch_text, patch_patch)


def _check_inputs(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> None:
    """Shapes, dtypes and label range (a bad label would otherwise index silently or crash)."""
    if z.ndim != 2 or prototypes.ndim != 2 or z.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"z must be (M, D) and prototypes (K, D): {tuple(z.shape)}, {tuple(prototypes.shape)}"
        )
    if z.dtype != prototypes.dtype:
        raise ValueError(f"z is {z.dtype} but prototypes are {prototypes.dtype}")
    if labels.dtype != torch.int64 or labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be int64 ({z.shape[0]},): {labels.dtype} {labels.shape}")
    if z.shape[0] == 0 or prototypes.shape[0] == 0:
        raise ValueError("the loss needs at least one labelled patch and one prototype")
    if int(labels.min()) < 0 or int(labels.max()) >= prototypes.shape[0]:
        raise ValueError(f"labels must lie in 0..{prototypes.shape[0] - 1}")


def _log_denominator(logits_pp: torch.Tensor, logits_pt: torch.Tensor) -> torch.Tensor:
    """log D(i): (M,) from (M, M) patch logits (diagonal excluded) and (M, K) text logits."""
    eye = torch.eye(logits_pp.shape[0], dtype=torch.bool, device=logits_pp.device)
    # -inf on the diagonal removes j = i from the sum (exp(-inf) = 0); logsumexp subtracts the
    # row max, so no exp overflows. Two logsumexps joined by logaddexp avoid an (M, M+K) copy.
    log_pp = torch.logsumexp(logits_pp.masked_fill(eye, float("-inf")), dim=1)
    return torch.logaddexp(log_pp, torch.logsumexp(logits_pt, dim=1))


def _patch_text_term(
    logits_pt: torch.Tensor, labels: torch.Tensor, log_d: torch.Tensor, average: TextAverage
) -> torch.Tensor:
    """mean_k L_pt(k), a 0-dim tensor; L_pt(k) of a class absent from the batch is 0."""
    k = logits_pt.shape[1]
    # −log(exp(z_i·t_{y_i}/τ) / D(i)) per patch, then summed per class.
    per_patch = log_d - logits_pt.gather(1, labels[:, None]).squeeze(1)
    sums = per_patch.new_zeros(k).index_add(0, labels, per_patch)
    counts = torch.bincount(labels, minlength=k)
    per_class = sums / counts.clamp(min=1)  # L_pt(k): absent classes have sum 0 → 0
    n_classes = int((counts > 0).sum()) if average == "present" else k
    return per_class.sum() / n_classes


def _patch_patch_term(
    logits_pp: torch.Tensor, labels: torch.Tensor, log_d: torch.Tensor, average: PatchAverage
) -> torch.Tensor:
    """mean_i L_pp(i), a 0-dim tensor; 0 when no patch has a positive."""
    m = logits_pp.shape[0]
    positive = labels[:, None] == labels[None, :]
    positive.fill_diagonal_(False)
    n_pos = positive.sum(dim=1)
    # −(1/|P(i)|) Σ_p (z_i·z_p/τ − log D(i)) = log D(i) − mean_p z_i·z_p/τ. torch.where, not a
    # product with the mask: 0 · (-inf) would be NaN if a logit were ever infinite.
    pos_sum = torch.where(positive, logits_pp, torch.zeros_like(logits_pp)).sum(dim=1)
    per_patch = log_d - pos_sum / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    total = torch.where(has_pos, per_patch, torch.zeros_like(per_patch)).sum()
    n_patches = int(has_pos.sum()) if average == "with_positives" else m
    return total / max(n_patches, 1)
