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
from ovss_label.commands.options import label_studio_options, tiny_option
from ovss_label.converters import write_json_atomic
from ovss_label.methods import METHODS, SAM_MODELS

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
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
@click.option("--dataset", help="A standard dataset: voc, voc20, context60, context59, "
              "coco_object, coco_stuff, ade20k, cityscapes.")  # fmt: skip
@click.option("--root", type=FOLDER, help="The dataset's folder (e.g. VOCdevkit/VOC2012).")
@click.option("--split", default="val", show_default=True)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images.")
@click.option("--ls-export", type=FILE, help="A Label Studio JSON export: its accepted labels.")
@click.option("--project", type=int, help="Or a live Label Studio project's accepted labels.")
@label_studio_options
@click.option("--label-config", type=FILE, help="Labeling config XML (class order, data key).")
@click.option("--coco", "coco_file", type=FILE, help="A COCO instances file as ground truth.")
@click.option("--image-dir", type=FOLDER, help="Images of --ls-export / --coco / --project.")
@click.option("--unlabeled", type=click.Choice(["background", "ignore"]), default="background",
              show_default=True, help="Pixels no region covers (Label Studio, COCO): scored "
              "as background, or not scored (only some objects are labelled).")  # fmt: skip
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

    truth = _ground_truth(options)
    predictors = _predictors(options, truth)
    with job_progress(f"eval {truth.name}") as progress:
        report = run_eval(truth, predictors, protocol=_protocol(options, truth),
                          progress=progress)  # fmt: skip
    _print_results(report, truth, options)


def _ground_truth(options: dict[str, Any]) -> Any:
    from ovss_label.backend.evaluation import datasets, sources

    given = [k for k in ("dataset", "ls_export", "project", "coco_file") if options[k]]
    if len(given) != 1:
        raise click.UsageError("give one ground truth: --dataset, --ls-export, --project or --coco")
    try:
        if options["dataset"]:
            if options["root"] is None:
                raise click.UsageError("--dataset needs --root DIR (the dataset's folder)")
            return datasets.dataset_ground_truth(
                options["dataset"], options["root"], options["split"], options["limit"]
            )
        if options["coco_file"]:
            if options["image_dir"] is None:
                raise click.UsageError("--coco needs --image-dir DIR (where its images are)")
            truth = sources.coco_ground_truth(
                options["coco_file"], options["image_dir"], unlabeled=options["unlabeled"]
            )
        else:
            truth = _label_studio_truth(options)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    return _limited(truth, options["limit"])


def _label_studio_truth(options: dict[str, Any]) -> Any:
    from ovss_label.backend.evaluation.sources import label_studio_ground_truth

    tasks, config, fetch = _tasks(options)
    if options["ls_export"] is not None and options["image_dir"] is None:
        raise click.UsageError("--ls-export needs --image-dir DIR (where its images are)")
    name = f"project {options['project']}" if options["project"] else options["ls_export"].name
    return label_studio_ground_truth(
        tasks,
        label_config=config,
        image_dir=options["image_dir"],
        fetch=fetch,
        unlabeled=options["unlabeled"],
        name=name,
    )


def _tasks(
    options: dict[str, Any], fetch_images: bool = True, with_predictions: bool = False
) -> tuple[list[dict[str, Any]], str, Any]:
    """The tasks (a live project's with its predictions: its export lists only their ids),
    the label config and an image fetcher (a live project only)."""
    from ovss_label.commands.export import _load_tasks

    source, project = options["ls_export"], options["project"]
    tasks, config = _load_tasks(
        source, options["url"], options["api_key"], project, with_predictions
    )
    if options["label_config"] is not None:
        config = options["label_config"].read_text(encoding="utf-8")
    return tasks, config, _fetcher(options) if project and fetch_images else None


def _fetcher(options: dict[str, Any]) -> Any:
    """The server's media fetcher (safe downloads, token only to Label Studio)."""
    from dataclasses import replace

    from ovss_label.backend.server import MediaPolicy
    from ovss_label.backend.server.media import MediaFetcher

    policy = replace(MediaPolicy.from_env(), ls_url=options["url"], ls_token=options["api_key"])
    return MediaFetcher(policy).image


def _limited(truth: Any, limit: int | None) -> Any:
    from dataclasses import replace

    return truth if limit is None else replace(truth, samples=list(truth.samples)[:limit])


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
    tasks, _, _ = _tasks(options, fetch_images=False, with_predictions=True)
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
