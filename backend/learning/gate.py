"""Gated promotion: a trained candidate head replaces the active version only if it is better.

The evaluation harness scores the candidate, the active version and the zero-shot method on the
same held-out tasks (``split.py``); :func:`decide` reads those scores and says whether to
promote, in one line, with the numbers behind it (a JSON-able dict the job records either way).

**Checks, in order** (the first that fails names the rejection):

1. enough held-out tasks (``min_held_out``), and labelled pixels on them;
2. a baseline: the active version, or with none, the zero-shot method (``compare_zero_shot``);
3. the candidate's mIoU beats the baseline's by at least ``margin`` (absolute);
4. no well-supported class (``min_class_pixels`` labelled held-out pixels) loses more than
   ``max_class_drop`` IoU against the baseline; when several do, the reason names the worst.

Differences within 1e-9 of a threshold count as meeting it (``0.41 - 0.40`` is
``0.00999...`` in floating point, which must not fail a 0.01 margin).

**Undefined classes** (None IoU, ``evaluation/metrics.py``): a class's union holds its labelled
pixels, so a class labelled on the held-out tasks has a defined IoU in every version scored on
them, and the gate checks that the versions saw the same labelled pixels. None therefore only
occurs for a class labelled nowhere on the held-out tasks; such a class is never well-supported,
so it never enters the class-drop check, and it counts in mIoU as mmseg counts it: IoU 0 for a
version that predicts it (a false positive is penalised), absent for a version that doesn't.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..evaluation.metrics import ConfusionMatrix, Scores

TOLERANCE = 1e-9
"""Floating-point slack on the margin and class-drop thresholds (module docstring)."""


@dataclass(frozen=True)
class GateConfig:
    """When a candidate is promoted (per project option; module docstring for the order)."""

    min_held_out: int = 5
    """Held-out tasks needed to decide at all: with fewer, one odd image moves the mIoU by more
    than any margin worth requiring, so the job is rejected rather than promoted on noise (at
    the default held-out fraction 0.2 this asks for about 25 annotated tasks)."""

    margin: float = 0.01
    """Absolute mIoU the candidate must gain over the baseline: one point is above the jitter
    of retraining on nearly the same data, and small enough that steady annotation gains pass;
    a tie keeps the active version (a swap costs a reload and changes what annotators see)."""

    max_class_drop: float = 0.05
    """IoU any well-supported class may lose while the mean improves: five points is a visible
    regression for the annotators correcting that class, and larger than the usual per-class
    jitter between two trainings, so only real trade-offs (one class sacrificed for the
    mean) are rejected."""

    min_class_pixels: int = 1000
    """Labelled held-out pixels a class needs to count as well-supported: about a 32 x 32
    region; below that a class's IoU swings by more than ``max_class_drop`` on a few pixels
    of boundary, so its drops are reported but do not reject."""

    compare_zero_shot: bool = True
    """With no active version, the first trained version must beat the zero-shot method (same
    margin and class-drop rules): a head trained on a handful of annotations can be worse
    than no training, and then the zero-shot proposals should stay."""


@dataclass(frozen=True)
class HeldOutScores:
    """One version's scores on the held-out tasks, and each class's labelled pixels there."""

    scores: Scores
    labelled: tuple[int, ...]

    @classmethod
    def of(cls, matrix: ConfusionMatrix) -> HeldOutScores:
        """From the version's confusion matrix over the held-out tasks."""
        return cls(matrix.scores(), tuple(int(n) for n in matrix.counts.sum(axis=1)))


Scored = ConfusionMatrix | HeldOutScores
"""What :func:`decide` accepts for each version."""


@dataclass(frozen=True)
class Decision:
    """The gate's answer: promote or not, one line why, and the numbers (JSON-able)."""

    promote: bool
    reason: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class _Versions:
    candidate: HeldOutScores
    active: HeldOutScores | None
    zero_shot: HeldOutScores | None
    classes: tuple[str, ...]


def decide(
    candidate: Scored,
    active: Scored | None,
    zero_shot: Scored | None,
    held_out_tasks: int,
    config: GateConfig | None = None,
    *,
    classes: Sequence[str] | None = None,
) -> Decision:
    """Whether ``candidate`` replaces ``active`` (module docstring: checks and their order).

    Args:
        candidate: The trained candidate, scored on the held-out tasks.
        active: The active version on the same tasks; None before the first promotion.
        zero_shot: The zero-shot method on the same tasks; None when it was not scored.
        held_out_tasks: How many held-out tasks the scores cover.
        config: The thresholds; None for :class:`GateConfig`'s defaults.
        classes: Class names in class-index order, for the reason and metrics; None names
            them ``class 0``, ``class 1``, ...

    Raises:
        ValueError: The versions have different class counts or saw different labelled pixels
            (not the same held-out tasks), or ``classes`` has the wrong length.
    """
    config = config or GateConfig()
    versions = _versions(candidate, active, zero_shot, classes)
    baseline = _baseline(versions, config)
    rows = _class_rows(versions, baseline, config)
    reason = _verdict(versions, baseline, rows, held_out_tasks, config)
    metrics = _metrics(versions, baseline, rows, held_out_tasks, config)
    return Decision(reason.startswith("promoted"), reason, metrics)


def _versions(
    candidate: Scored,
    active: Scored | None,
    zero_shot: Scored | None,
    classes: Sequence[str] | None,
) -> _Versions:
    """Normalises the inputs and checks they were scored on the same held-out tasks."""
    cand = _held(candidate)
    others = [_held(v) if v is not None else None for v in (active, zero_shot)]
    for other in others:
        if other is not None and other.labelled != cand.labelled:
            raise ValueError(
                "the versions were not scored on the same held-out tasks: labelled pixels per "
                f"class differ ({list(other.labelled)} vs {list(cand.labelled)})"
            )
    k = len(cand.labelled)
    names = tuple(classes) if classes is not None else tuple(f"class {i}" for i in range(k))
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    return _Versions(cand, others[0], others[1], names)


def _held(version: Scored) -> HeldOutScores:
    return HeldOutScores.of(version) if isinstance(version, ConfusionMatrix) else version


def _baseline(versions: _Versions, config: GateConfig) -> tuple[str, HeldOutScores] | None:
    """(label, scores) of what the candidate must beat: the active version, else the
    zero-shot method when ``compare_zero_shot``, else nothing."""
    if versions.active is not None:
        return "active", versions.active
    if config.compare_zero_shot and versions.zero_shot is not None:
        return "zero_shot", versions.zero_shot
    return None


def _class_rows(
    versions: _Versions, baseline: tuple[str, HeldOutScores] | None, config: GateConfig
) -> list[dict[str, Any]]:
    """Per well-supported class: its pixels, each version's IoU and the drop against the
    baseline (None without one), largest drop first."""
    cand = versions.candidate
    rows = []
    for k, pixels in enumerate(cand.labelled):
        if pixels < max(1, config.min_class_pixels):
            continue
        iou = cand.scores.iou[k]
        base = baseline[1].scores.iou[k] if baseline else None
        rows.append({
            "class": versions.classes[k],
            "labelled_pixels": pixels,
            "candidate": iou,
            "active": _iou(versions.active, k),
            "zero_shot": _iou(versions.zero_shot, k),
            # Labelled, so defined in every version (module docstring); None only without a
            # baseline, and a None never counts as a drop.
            "drop": base - iou if base is not None and iou is not None else None,
        })  # fmt: skip
    return sorted(rows, key=lambda r: -r["drop"] if r["drop"] is not None else 0.0)


def _iou(version: HeldOutScores | None, k: int) -> float | None:
    return version.scores.iou[k] if version is not None else None


def _verdict(
    versions: _Versions,
    baseline: tuple[str, HeldOutScores] | None,
    rows: list[dict[str, Any]],
    held_out_tasks: int,
    config: GateConfig,
) -> str:
    """The one-line reason; it starts with "promoted" or "rejected"."""
    if held_out_tasks < config.min_held_out:
        return f"rejected: {held_out_tasks} held-out tasks, need {config.min_held_out}"
    miou = versions.candidate.scores.miou
    if miou is None or not sum(versions.candidate.labelled):
        return f"rejected: the {held_out_tasks} held-out tasks hold no labelled pixels"
    if baseline is None:
        if config.compare_zero_shot:
            return "rejected: no active version and no zero-shot scores to compare with"
        return f"promoted: first version, mIoU {miou:.3f} (compare_zero_shot is off)"
    label, base = baseline[0].replace("_", "-"), baseline[1]
    # Defined: the baseline saw the same labelled pixels as the candidate (``_versions``).
    base_miou = base.scores.miou if base.scores.miou is not None else 0.0
    delta = miou - base_miou
    versus = f"mIoU {miou:.3f} vs {label} {base_miou:.3f}"
    if delta < config.margin - TOLERANCE:
        return f"rejected: {versus} ({delta:+.3f} < margin {config.margin:.3f})"
    limit = config.max_class_drop + TOLERANCE
    dropped = [r for r in rows if r["drop"] is not None and r["drop"] > limit]
    if dropped:
        return _drop_reason(dropped, config)
    return f"promoted: {versus} ({delta:+.3f})"


def _drop_reason(dropped: list[dict[str, Any]], config: GateConfig) -> str:
    """Names the worst drop (``rows`` are sorted largest drop first) and counts the others."""
    worst = dropped[0]
    m = len(dropped) - 1
    more = f" (and {m} more class{'es' if m > 1 else ''})" if m else ""
    return (
        f"rejected: class '{worst['class']}' dropped {worst['drop']:.3f} "
        f"(> {config.max_class_drop:.3f}) with {worst['labelled_pixels']:,} labelled pixels{more}"
    )


def _metrics(
    versions: _Versions,
    baseline: tuple[str, HeldOutScores] | None,
    rows: list[dict[str, Any]],
    held_out_tasks: int,
    config: GateConfig,
) -> dict[str, Any]:
    """The numbers behind the decision (JSON-able: str, int, float, None, lists, dicts)."""
    cand = versions.candidate.scores.miou
    miou = {
        "candidate": cand,
        "active": versions.active.scores.miou if versions.active else None,
        "zero_shot": versions.zero_shot.scores.miou if versions.zero_shot else None,
    }
    delta = {
        name: cand - value if cand is not None and value is not None else None
        for name, value in miou.items()
        if name != "candidate"
    }
    return {
        "held_out_tasks": held_out_tasks,
        "labelled_pixels": sum(versions.candidate.labelled),
        "baseline": baseline[0] if baseline else None,
        "miou": miou,
        "delta": delta,
        "well_supported_classes": rows,
        "config": asdict(config),
    }
