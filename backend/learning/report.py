"""A training job's report: what a person reads before trusting (or questioning) a promotion.

Written by every job that trained and was scored, promoted or rejected, into its run folder
(``DATA_DIR/runs/job-<id>/``), and served by ``GET /jobs/<id>/report`` (JSON) and
``GET /jobs/<id>/report.png``:

- ``report.json``: ``{"job", "project", "state", "reason", "loss": [[step, loss], ...],
  "held_out": {"candidate" | "active" | "zero_shot": {"model_version", "mIoU", "mAcc",
  "aAcc", "per_class": {class: IoU}, "images"}}, "calibration": {"ece_raw", "ece_calibrated",
  "knots", "accuracy", "pixels"} | null, "agreement": {model_version: {"annotations",
  "unchanged_fraction", "mean_iou"}} | null, "notes": [...]}``.
- ``report.png``: the loss curve; per-class held-out IoU of the candidate, the active version
  and the zero-shot method side by side (the numbers the gate decided on); the candidate's
  reliability diagram (accuracy per confidence bin, raw and the fitted map); and how much
  annotators changed each model version's proposals (``eval --agreement``).

``ece_calibrated`` is measured on the same held-out pixels the map was fitted on, so it is an
optimistic figure: it shows the fit, not a guarantee.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ovss_label.converters import write_json_atomic

from ..evaluation.calibration import Reliability
from ..evaluation.report import new_figure, save_png
from ..training.report import read_losses

MODELS = ("candidate", "active", "zero_shot")
"""The scored models, in the order the gate compares them (``worker._score_all``)."""


def held_out_block(eval_json: Path, method: str) -> dict[str, Any] | None:
    """One model's held-out scores from ``eval --json``'s file (None when it was not scored)."""
    if not eval_json.is_file():
        return None
    data = json.loads(eval_json.read_text(encoding="utf-8"))["methods"][method]
    per_class = {name: c["IoU"] for name, c in data["per_class"].items()}
    keys = ("model_version", "mIoU", "mAcc", "aAcc", "images")
    return {**{k: data[k] for k in keys}, "per_class": per_class}


def reliability_of(eval_json: Path, method: str) -> Reliability | None:
    """The method's reliability histogram from ``eval --json``'s file, if it has one."""
    if not eval_json.is_file():
        return None
    block = json.loads(eval_json.read_text(encoding="utf-8"))["methods"][method]
    return Reliability.from_json(block["reliability"]) if "reliability" in block else None


def calibration_block(reliability: Reliability | None) -> dict[str, Any] | None:
    """ECE before and after the fitted map, and the map (module docstring); None without
    labelled pixels."""
    if reliability is None or reliability.pixels.sum() == 0:
        return None
    fitted = reliability.fit()
    mean = reliability.mean_confidence()
    used = reliability.pixels > 0
    after = np.abs(fitted(mean[used]) - reliability.accuracy()[used])
    ece_after = float((after * reliability.pixels[used]).sum() / reliability.pixels.sum())
    return {"ece_raw": reliability.ece(), "ece_calibrated": ece_after,
            **fitted.to_json()}  # fmt: skip


def agreement_block(agreement_json: Path) -> dict[str, Any] | None:
    """Per model version: annotations, unchanged fraction, mean IoU (``eval --agreement``)."""
    if not agreement_json.is_file():
        return None
    versions = json.loads(agreement_json.read_text(encoding="utf-8"))["versions"]
    keys = ("annotations", "unchanged_fraction", "mean_iou")
    return {name: {k: v.get(k) for k in keys} for name, v in versions.items()}


def write_job_report(work: Path, report: dict[str, Any], reliability: Reliability | None) -> Path:
    """Writes ``report.json`` and ``report.png`` into ``work``; returns the JSON's path."""
    path = work / "report.json"
    write_json_atomic(path, report, indent=1)
    _chart(work / "report.png", report, reliability)
    return path


def job_report(
    job: Any, state: str, reason: str, work: Path, methods: dict[str, str],
    reliability: Reliability | None,
) -> dict[str, Any]:  # fmt: skip
    """The report's content (module docstring) from the files a job left in ``work``;
    ``methods`` names each scored model's method in its ``eval-<model>.json``."""
    held_out = {m: held_out_block(work / f"eval-{m}.json", methods.get(m, "")) for m in MODELS}
    notes = [] if (work / "agreement.json").is_file() else ["agreement could not be measured"]
    return {
        "job": job.id,
        "project": job.project,
        "state": state,
        "reason": reason,
        "loss": [[step, loss] for step, loss in read_losses(work / "run" / "metrics.jsonl")],
        "held_out": {m: block for m, block in held_out.items() if block is not None},
        "calibration": calibration_block(reliability),
        "agreement": agreement_block(work / "agreement.json"),
        "notes": notes,
    }


def _chart(path: Path, report: dict[str, Any], reliability: Reliability | None) -> None:
    held = report["held_out"]
    classes = list(held["candidate"]["per_class"]) if "candidate" in held else []
    figure = new_figure(13, 7.5 + 0.1 * len(classes))
    (loss, ious), (diagram, agreed) = figure.subplots(2, 2)
    steps = report["loss"]
    if steps:
        loss.plot([s for s, _ in steps], [v for _, v in steps], linewidth=1)
    loss.set(xlabel="step", ylabel="training loss", title=f"job {report['job']}: loss")
    _iou_bars(ious, held, classes)
    _reliability_diagram(diagram, reliability, report["calibration"])
    _agreement_bars(agreed, report["agreement"])
    figure.suptitle(f"project {report['project']}: {report['state']}: {report['reason']}",
                    fontsize=9)  # fmt: skip
    save_png(figure, path)


def _iou_bars(axes: Any, held: dict[str, Any], classes: list[str]) -> None:
    rows = np.arange(len(classes))
    shown = [m for m in MODELS if m in held]
    width = 0.8 / max(1, len(shown))
    for shift, model in enumerate(shown):
        scores = held[model]
        values = [100 * (scores["per_class"].get(c) or 0.0) for c in classes]
        label = f"{model} (mIoU {100 * (scores['mIoU'] or 0.0):.1f})"
        axes.barh(rows + width * shift, values, width, label=label)
    axes.set_yticks(rows + 0.4 - width / 2, classes, fontsize=8)
    axes.invert_yaxis()
    axes.set(xlim=(0, 100), xlabel="held-out IoU (%)", title="the gate's comparison")
    if shown:
        axes.legend(fontsize=8)


def _reliability_diagram(
    axes: Any, reliability: Reliability | None, calibration: dict[str, Any] | None
) -> None:
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="fraction of pixels right")
    if reliability is None or calibration is None:
        axes.set_title("candidate calibration: no labelled pixels")
        return
    used = reliability.pixels > 0
    axes.scatter(reliability.mean_confidence()[used], reliability.accuracy()[used],
                 s=12, label=f"raw (ECE {calibration['ece_raw']:.3f})")  # fmt: skip
    axes.plot(calibration["knots"], calibration["accuracy"], linewidth=1.2,
              label=f"fitted map (ECE {calibration['ece_calibrated']:.3f})")  # fmt: skip
    axes.set_title("candidate calibration (held-out pixels)")
    axes.legend(fontsize=8)


def _agreement_bars(axes: Any, agreement: dict[str, Any] | None) -> None:
    axes.set(ylim=(0, 100), ylabel="%", title="annotators vs each version's proposals")
    if not agreement:
        said = "not measured (see agreement.log)" if agreement is None else (
            "no annotation started from a prediction")  # fmt: skip
        axes.text(0.5, 0.5, said, ha="center", transform=axes.transAxes)
        return
    names = list(agreement)
    rows = np.arange(len(names))
    for shift, (key, label) in enumerate((("unchanged_fraction", "kept unchanged"),
                                          ("mean_iou", "mean IoU"))):  # fmt: skip
        values = [100 * (agreement[n][key] or 0.0) for n in names]
        axes.bar(rows + 0.4 * shift, values, 0.4, label=label)
    counts = [agreement[n]["annotations"] for n in names]
    axes.set_xticks(rows + 0.2, [f"{_short(n)}\n({c} ann.)" for n, c in zip(names, counts,
                    strict=True)], fontsize=7)  # fmt: skip
    axes.legend(fontsize=8)


def _short(version: str, width: int = 28) -> str:
    return version if len(version) <= width else version[: width - 1] + "…"
