"""``ovss-label eval``: mIoU of methods (or prediction folders) against labelled images, and
``--agreement``: how much annotators changed our proposals. The work is in
``backend/evaluation``; this module reads options and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from ovss_label.backend.evaluation.protocols import PROTOCOLS
from ovss_label.commands.jobs import job_progress, print_report
from ovss_label.commands.options import tiny_option
from ovss_label.commands.truth import FOLDER, ground_truth, ground_truth_options, ls_tasks
from ovss_label.converters import write_json_atomic
from ovss_label.methods import METHODS, SAM_MODELS

OUT_FILE = click.Path(dir_okay=False, path_type=Path)
OUT_FOLDER = click.Path(file_okay=False, path_type=Path)


def _methods(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str]:
    """``--method a,b --method c`` -> ``[a, b, c]``, each checked against METHODS."""
    names = [n.strip() for value in values for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"a method is named twice: {names}")
    return names


@click.command("eval")
@ground_truth_options(split="val", unlabeled="background")
@click.option("--method", "methods", multiple=True, callback=_methods,
              help=f"Method(s) to score, comma-separated: {', '.join(METHODS)}.")  # fmt: skip
@click.option("--predictions", "prediction_dirs", type=FOLDER, multiple=True,
              help="Folder of <image id>.png class maps (255: none); repeatable.")  # fmt: skip
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="naclip", show_default=True,
              help="Per-dataset method settings (README, Evaluate).")  # fmt: skip
@click.option("--save-predictions", type=OUT_FOLDER,
              help="Write each method's label maps here; a rerun reuses them.")  # fmt: skip
@click.option("--json", "json_out", type=OUT_FILE, help="Write the results as JSON.")
@click.option("--report", "report_dir", type=OUT_FOLDER, help="Write charts (PNG) here.")
@click.option("--agreement", is_flag=True,
              help="Compare annotations with the predictions they started from.")  # fmt: skip
@click.option("--sam-model", type=click.Choice(SAM_MODELS), default="sam_vit_b", show_default=True)
@click.option("--head", help="fmbseg: the trained head (a `train` run folder).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@tiny_option
def evaluate(**options: Any) -> None:
    """Score segmentation methods against labelled images (mIoU, mmseg's formula).

    Ground truth is one of: --dataset NAME --root DIR; --ls-export FILE --image-dir DIR;
    --project ID (with --url and --api-key); --coco FILE --image-dir DIR. What is scored:
    --method and/or --predictions folders. With --agreement (and --ls-export or --project),
    compares each annotation with the prediction it started from instead.
    """
    if options["agreement"]:
        _agreement(options)
        return
    from ovss_label.backend.evaluation.run import run_eval

    truth = ground_truth(options)
    predictors = _predictors(options, truth)
    with job_progress(f"eval {truth.name}") as progress:
        report = run_eval(truth, predictors, protocol=_protocol(options, truth),
                          progress=progress)  # fmt: skip
    _print_results(report, truth, options)


def _protocol(options: dict[str, Any], truth: Any) -> str:
    return str(options["protocol"]) if truth.protocol else ""


def _predictors(options: dict[str, Any], truth: Any) -> list[Any]:
    from ovss_label.backend.evaluation.predictions import (
        FolderPredictor,
        SavingPredictor,
        method_predictors,
    )

    if not options["methods"] and not options["prediction_dirs"]:
        raise click.UsageError("what to score: give --method and/or --predictions")
    method_options = {"tiny": options["tiny"], "sam_model": options["sam_model"]}
    if options["head"]:
        method_options["head"] = options["head"]
    try:
        found: list[Any] = [FolderPredictor(d, truth.classes) for d in options["prediction_dirs"]]
        methods = method_predictors(
            options["methods"], truth, protocol=options["protocol"], device=options["device"],
            options=method_options,
        )  # fmt: skip
        saving = options["save_predictions"]
        if saving is not None:
            methods = [SavingPredictor(m, saving / m.name, truth) for m in methods]
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    return _distinct_names([*found, *methods])


def _distinct_names(predictors: list[Any]) -> list[Any]:
    """Folders with one base name (``a/preds``, ``b/preds``) become ``preds``, ``preds-2``."""
    seen: dict[str, int] = {}
    for predictor in predictors:
        seen[predictor.name] = seen.get(predictor.name, 0) + 1
        if seen[predictor.name] > 1:
            predictor.name = f"{predictor.name}-{seen[predictor.name]}"
    return predictors


def _print_results(report: Any, truth: Any, options: dict[str, Any]) -> None:
    from ovss_label.backend.evaluation.report import results_json, results_table, write_charts

    result = report.result
    notes = (*truth.notes, *_dropped(truth))
    result.notes = notes
    console = Console(highlight=False)
    console.print(results_table(result))
    if options["json_out"] is not None:
        write_json_atomic(options["json_out"], results_json(result), indent=1)
        report.outputs["json"] = options["json_out"]
    if options["report_dir"] is not None:
        for i, path in enumerate(write_charts(result, options["report_dir"])):
            report.outputs[f"chart {i + 1}"] = path
    print_report(report, done="scored", notes=tuple(escape(n) for n in notes))


def _dropped(truth: Any) -> list[str]:
    return [
        f"{n} region(s) labelled {label!r} (not a class) were not scored"
        for label, n in sorted(truth.dropped.items())
    ]


def _agreement(options: dict[str, Any]) -> None:
    from ovss_label.backend.evaluation.agreement import agreement, agreement_json
    from ovss_label.backend.evaluation.report import agreement_chart, agreement_table

    if (options["ls_export"] is None) == (options["project"] is None):
        raise click.UsageError("--agreement reads --ls-export FILE or --project ID")
    tasks, _, _ = ls_tasks(options, fetch_images=False, with_predictions=True)
    result = agreement(tasks)
    Console(highlight=False).print(agreement_table(result))
    if options["json_out"] is not None:
        write_json_atomic(options["json_out"], agreement_json(result), indent=1)
    if options["report_dir"] is not None:
        options["report_dir"].mkdir(parents=True, exist_ok=True)
        agreement_chart(result, options["report_dir"] / "agreement.png")
    err = Console(stderr=True, highlight=False)
    for item, reason in result.skipped:
        err.print(f"[yellow]skipped[/] {escape(str(item))}: {escape(reason)}", soft_wrap=True)
