"""An evaluation's results as a person reads them: a table, a JSON file, two pictures.

- :func:`results_table`: rich table, one column per method; rows mIoU, mAcc, aAcc, then each
  class's IoU (percent with two decimals, as the papers print them; "-" where undefined).
- :func:`results_json`: ``{"dataset", "protocol", "classes", "images", "notes", "methods":
  {"<method>": {"model_version", "mIoU", "aAcc", "mAcc", "per_class": {"<class>": {"IoU",
  "Acc", "pixels"}}, "images", "failed"}}}``; fractions in [0, 1], null where undefined;
  ``pixels`` is the class's labelled (scored) pixel count. A method (not a folder of PNGs)
  also has ``"reliability"``: its confidence histogram and ECE (``calibration.py``).
- :func:`write_charts`: ``per_class_iou.png`` (per-class IoU, methods side by side) and
  ``confusion_<method>.png`` (rows: true class, normalised to 1; columns: predicted class and
  "none"), drawn with matplotlib's Agg backend, each written whole or not at all.
- :func:`agreement_table` / :func:`agreement_chart`: ``--agreement``'s table (one row per
  model version) and its chart (per class, one bar per version of its pooled IoU).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Column, Table

from .agreement import AgreementReport
from .run import EvalResult, MethodResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def results_json(result: EvalResult) -> dict[str, Any]:
    """The JSON document of ``--json`` (module docstring)."""
    methods = {}
    for name, method in result.methods.items():
        scores = method.matrix.scores()
        labelled = method.matrix.counts.sum(axis=1).tolist()
        per_class = {
            cls: {"IoU": iou, "Acc": acc, "pixels": int(pixels)}
            for cls, iou, acc, pixels in zip(
                result.classes, scores.iou, scores.acc, labelled, strict=True
            )
        }
        methods[name] = {
            "model_version": method.model_version,
            "mIoU": scores.miou,
            "aAcc": scores.aacc,
            "mAcc": scores.macc,
            "per_class": per_class,
            "images": method.images,
            "failed": method.failed,
        }
        if method.reliability is not None:
            methods[name]["reliability"] = method.reliability.to_json()
    return {
        "dataset": result.dataset,
        "protocol": result.protocol or None,
        "classes": list(result.classes),
        "images": result.images,
        "notes": list(result.notes),
        "methods": methods,
    }


def results_table(result: EvalResult) -> Table:
    """mIoU, mAcc, aAcc and per-class IoU, one column per method (module docstring)."""
    title = f"{result.dataset}: {result.images} images"
    if result.protocol:
        title += f", protocol {result.protocol}"
    table = Table(title=title)
    table.add_column("", style="bold")
    scored = {name: m.matrix.scores() for name, m in result.methods.items()}
    for name in result.methods:
        table.add_column(name, justify="right")
    for label, field in (("mIoU", "miou"), ("mAcc", "macc"), ("aAcc", "aacc")):
        table.add_row(label, *(_percent(getattr(s, field)) for s in scored.values()))
    table.add_section()
    for k, cls in enumerate(result.classes):
        table.add_row(cls, *(_percent(s.iou[k]) for s in scored.values()), style="dim")
    return table


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def write_charts(result: EvalResult, folder: Path) -> list[Path]:
    """Writes the per-class IoU chart and one confusion matrix per method; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [_per_class_chart(result, folder / "per_class_iou.png")]
    for name, method in result.methods.items():
        path = folder / f"confusion_{_file_safe(name)}.png"
        written.append(_confusion_chart(result.classes, method, path))
    return written


def _per_class_chart(result: EvalResult, path: Path) -> Path:
    import numpy as np

    classes, methods = result.classes, list(result.methods.values())
    height = 0.8 / max(len(methods), 1)
    fig = new_figure(8, 1.5 + 0.22 * len(classes) * max(1, len(methods) / 2))
    ax = fig.add_subplot()
    rows = np.arange(len(classes))
    for i, method in enumerate(methods):
        scores = method.matrix.scores()
        values = [100 * v if v is not None else 0.0 for v in scores.iou]
        miou = _percent(scores.miou)
        bars = ax.barh(rows + i * height, values, height, label=f"{method.name} (mIoU {miou})")
        if len(classes) * len(methods) <= 60:  # room for the numbers
            ax.bar_label(bars, [_percent(v) for v in scores.iou], fontsize=7, padding=2)
    ax.set_yticks(rows + height * (len(methods) - 1) / 2, classes, fontsize=8)
    ax.invert_yaxis()  # class 0 on top, as in the table
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.set_title(f"{result.dataset}: per-class IoU ({result.images} images)")
    ax.legend(loc="lower right", fontsize=8)
    save_png(fig, path)
    return path


def _confusion_chart(classes: tuple[str, ...], method: MethodResult, path: Path) -> Path:
    import numpy as np

    matrix = method.matrix.normalised()
    k = len(classes)
    side = min(4 + 0.25 * k, 40)
    fig = new_figure(side + 1.5, side)
    ax = fig.add_subplot()
    shown = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if k <= 60:  # beyond that, names would overlap: the axes are read by index
        ax.set_yticks(range(k), classes, fontsize=7)
        ax.set_xticks(range(k + 1), [*classes, "none"], fontsize=7, rotation=90)
    ax.set_ylabel("true class")
    ax.set_xlabel("predicted class")
    if k <= 20:  # small enough to print each cell's share
        for (row, col), share in np.ndenumerate(matrix):
            if share >= 0.005:
                color = "white" if share > 0.6 else "black"
                ax.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title(f"{method.name}\nrows: true class (each sums to 1)", fontsize=10)
    fig.colorbar(shown, ax=ax, fraction=0.04)
    save_png(fig, path)
    return path


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas: no pyplot state, no display, thread-safe."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: Path) -> None:
    """Writes ``figure`` as a PNG whole or not at all (a temp file beside ``path``, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def agreement_table(report: AgreementReport) -> Table:
    """A rich table, one row per model version: pairs, unchanged %, mean IoU %, and the most
    corrected classes with their pooled IoU %."""
    numbers = [Column(name, justify="right") for name in ("annotations", "unchanged", "mean IoU")]
    table = Table("model version", *numbers, "most corrected (pooled IoU)")
    table.title = "Agreement with the proposals (annotations started from a prediction)"
    for v in report.versions:
        worst = ", ".join(f"{c} {_share(v.per_class_iou[c])}" for c in v.most_corrected)
        rates = _share(v.unchanged_fraction), _share(v.mean_iou)
        table.add_row(v.model_version, str(v.annotations), *rates, worst or "-")
    table.caption = (
        f"{report.without_parent} without a parent prediction, {report.missing_parent} with a"
        f" parent not in the task, {len(report.skipped)} skipped"
    )
    if report.prediction_ids_only:
        table.caption += (
            f"; {report.prediction_ids_only} predictions given as ids only (Label Studio's "
            "JSON export): read the project with --project to compare them"
        )
    return table


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def agreement_chart(report: AgreementReport, path: Path) -> None:
    """Writes a PNG: per class, one bar per model version of its pooled IoU; the legend gives
    each version's unchanged fraction. Written to a temp file next to ``path``, then renamed.

    Args:
        report: The agreement to draw (an empty one gives a chart that says so).
        path: The PNG to write; its folder is created.
    """
    import numpy as np

    classes = sorted(set().union(*(v.per_class_iou for v in report.versions)))
    count = max(1, len(report.versions))
    width = min(40.0, max(6.4, 1.5 + len(classes) * (0.25 + 0.12 * count)))
    figure = new_figure(width, 4.8)
    axes = figure.add_subplot()
    positions = np.arange(len(classes), dtype=np.float64)
    bar = 0.8 / count
    for index, v in enumerate(report.versions):
        heights = [v.per_class_iou.get(c, np.nan) for c in classes]
        label = f"{v.model_version}: {_share(v.unchanged_fraction)} unchanged"
        offset = (index - (count - 1) / 2) * bar
        bars = axes.bar(positions + offset, heights, bar, label=f"{label} ({v.annotations} ann.)")
        axes.bar_label(bars, ["0" if h == 0 else "" for h in heights])  # tell 0 from absent
    rotate = len(classes) > 6  # long rows of names overlap
    axes.set_xticks(positions, classes, rotation=60 * rotate, ha="right" if rotate else "center")
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("pooled IoU")
    figure.suptitle("Agreement of submitted annotations with the proposals, per class")
    if report.versions:
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        note = "no annotation started from a prediction"
        axes.text(0.5, 0.5, note, ha="center", transform=axes.transAxes)
    save_png(figure, Path(path))
