"""The end of a training run: the head scored on held-out images before and after training
(the evaluation harness's metric), ``report.json`` and ``report.png``.

Held-out images are scored at their full resolution, as ``eval`` scores a method: patch
similarities upsampled bilinearly to the image, argmax over the dataset's classes, against the
stored label map (255 not scored). "Before" is the module as initialised from the seed, so
the difference is what training did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ovss_label.converters import write_json_atomic

from ..evaluation.metrics import ConfusionMatrix
from ..evaluation.report import new_figure, save_png
from .data import TrainItem
from .head import patch_similarities
from .model import AlignmentModule

if TYPE_CHECKING:
    from .train import RunInputs, TrainConfig


@torch.no_grad()
def held_out_scores(
    module: AlignmentModule, inputs: RunInputs, items: list[TrainItem]
) -> dict[str, Any] | None:
    """``{"mIoU", "aAcc", "per_class": {class: IoU | None}, "images"}`` of ``module`` on
    ``items``; None without held-out images."""
    if not items:
        return None
    module.eval()
    classes = inputs.dataset.classes
    matrix = ConfusionMatrix(len(classes))
    for item in items:
        sim = patch_similarities(module, inputs.tokens(item), inputs.prototypes)
        up = F.interpolate(sim[None], size=item.image_hw, mode="bilinear", align_corners=False)
        prediction = up[0].argmax(dim=0).to(torch.uint8).numpy()
        matrix.update(inputs.dataset.truth(item), prediction)
    scores = matrix.scores()
    per_class = dict(zip(classes, scores.iou, strict=True))
    return {"mIoU": scores.miou, "aAcc": scores.aacc, "per_class": per_class, "images": len(items)}


def write_training_report(
    run_dir: Path,
    inputs: RunInputs,
    held_items: list[TrainItem],
    untrained: AlignmentModule,
    trained: AlignmentModule,
    config: TrainConfig,
    digest: str,
) -> dict[str, Any]:
    """Scores both modules, writes ``report.json`` and ``report.png``; returns the report."""
    losses = read_losses(run_dir / "metrics.jsonl")
    report = {
        "head": digest,
        "dataset": inputs.dataset.digest,
        "steps": len(losses),
        "final_loss": losses[-1][1] if losses else None,
        "held_out_images": [i.id for i in held_items],
        "before": held_out_scores(untrained, inputs, held_items),
        "after": held_out_scores(trained, inputs, held_items),
        "settings": config.as_dict(),
    }
    write_json_atomic(run_dir / "report.json", report, indent=1)
    _chart(run_dir / "report.png", losses, report)
    return report


def read_losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) per line of a run's ``metrics.jsonl``; [] when there is none."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        record = json.loads(line)
        out.append((int(record["step"]), float(record["loss"])))
    return out


def _chart(path: Path, losses: list[tuple[int, float]], report: dict[str, Any]) -> None:
    import numpy as np

    before, after = report["before"], report["after"]
    classes = list(after["per_class"]) if after else []
    figure = new_figure(11, 4 + 0.12 * len(classes))
    curve, bars = figure.subplots(1, 2, width_ratios=(1, 1.3))
    if losses:
        curve.plot([s for s, _ in losses], [v for _, v in losses], linewidth=1)
    curve.set_xlabel("step")
    curve.set_ylabel("training loss")
    curve.set_title("loss")
    if after:
        rows = np.arange(len(classes))
        for shift, (name, scores) in enumerate((("before", before), ("after", after))):
            values = [100 * (scores["per_class"][c] or 0.0) for c in classes]
            label = f"{name} (mIoU {100 * (scores['mIoU'] or 0.0):.1f})"
            bars.barh(rows + 0.4 * shift, values, 0.4, label=label)
        bars.set_yticks(rows + 0.2, classes, fontsize=8)
        bars.invert_yaxis()
        bars.set_xlim(0, 100)
        bars.legend(fontsize=8)
    bars.set_xlabel("held-out IoU (%)")
    bars.set_title(f"held-out images: {len(report['held_out_images'])}")
    save_png(figure, path)
