"""``ovss-label export``: a Label Studio export file or live project to COCO, YOLO, LabelMe."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ovss_label.commands.options import label_studio_options
from ovss_label.converters import (
    PREFER_CHOICES,
    SEGMENTATION_MODES,
    CocoTaskWriter,
    ExportReport,
    ImageWriter,
    LabelmeWriter,
    TaskSource,
    YoloWriter,
    export_images,
    image_path,
)
from ovss_label.converters.ls_project import ProjectConfig
from ovss_label.converters.ls_tasks import ImageSizeLookup
from ovss_label.images import image_size_from_dir, oriented_size
from ovss_label.lsapi import (
    LabelStudioError,
    attach_predictions,
    fetch_project_export,
    make_client,
)
from ovss_label.methods import METHODS
from ovss_label.ontologies import load

DEFAULT_METHOD = METHODS[0]
"""An export predicts nothing: a config without ``ovss_method`` parses with this one."""


@click.command("export")
@click.argument("source", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--coco", "to_coco", is_flag=True, help="Write COCO instance segmentation to -o.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="The COCO file."
)
@click.option(
    "--yolo",
    "yolo_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write Ultralytics YOLO segmentation (labels/*.txt, data.yaml) to this folder.",
)
@click.option(
    "--labelme",
    "labelme_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write one LabelMe JSON file per image to this folder.",
)
@label_studio_options
@click.option("--project", type=int, help="Project id to export live through the API.")
@click.option(
    "--segmentation",
    type=click.Choice(SEGMENTATION_MODES),
    default="auto",
    show_default=True,
    help="COCO and LabelMe. auto: polygons unless a mask has holes (then exact RLE / mask).",
)
@click.option(
    "--prefer",
    type=click.Choice(PREFER_CHOICES),
    default="brush",
    show_default=True,
    help="An object drawn both as a brush and as polygons: which one to export.",
)
@click.option("--include-predictions", is_flag=True, help="Use predictions of unlabelled tasks.")
@click.option(
    "--label-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Labeling config XML: category order and the image data field.",
)
@click.option("--ontology", help="Category order from a named ontology (e.g. voc).")
@click.option(
    "--image-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of the images: sizes of images no result or task meta gives a size for.",
)
@click.option("--tolerance", default=1.0, show_default=True, help="Polygon tolerance in pixels.")
@click.option("--fail-on-skip", is_flag=True, help="Exit with status 1 if any record was skipped.")
def export(
    source: Path | None,
    to_coco: bool,
    output: Path | None,
    yolo_dir: Path | None,
    labelme_dir: Path | None,
    url: str | None,
    api_key: str | None,
    project: int | None,
    segmentation: str,
    prefer: str,
    include_predictions: bool,
    label_config: Path | None,
    ontology: str | None,
    image_dir: Path | None,
    tolerance: float,
    fail_on_skip: bool,
) -> None:
    """Export Label Studio annotations as COCO, YOLO segmentation and/or LabelMe.

    SOURCE is a Label Studio JSON export file (or the tasks `ovss-label predict` wrote); or give
    --project (with --url and --api-key, or LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY) to export
    a live project. Each task's latest non-cancelled annotation is used; an object drawn both as
    a brush and as polygons is exported once. Bad records are reported and skipped.
    """
    _check_outputs(to_coco, output, yolo_dir, labelme_dir)
    tasks, config_xml = _load_tasks(source, url, api_key, project, include_predictions)
    if label_config is not None:
        config_xml = label_config.read_text(encoding="utf-8")
    categories, data_key = _categories(config_xml, ontology)
    try:
        reader = TaskSource(
            tasks,
            include_predictions=include_predictions,
            data_key=data_key,
            image_size=_size_lookup(image_dir),
            prefer=prefer,  # type: ignore[arg-type]
        )
    except ValueError as err:  # not a Label Studio JSON export
        raise click.ClickException(f"{source or 'project export'}: {err}") from err
    names = categories if categories is not None else reader.labels()
    outputs = (output if to_coco else None, yolo_dir, labelme_dir)
    writers = _writers(names, outputs, segmentation, tolerance)
    report = export_images(reader, writers, categories)
    _print_summary(report, outputs, [*names, *report.extra_categories])
    if fail_on_skip and report.skipped:
        raise SystemExit(1)


def _check_outputs(
    to_coco: bool, output: Path | None, yolo_dir: Path | None, labelme_dir: Path | None
) -> None:
    if not (to_coco or yolo_dir or labelme_dir):
        raise click.UsageError(
            "choose the output format: --coco -o FILE, --yolo DIR, --labelme DIR"
        )
    if to_coco != (output is not None):
        raise click.UsageError("--coco writes to -o/--output FILE: give both or neither")


def _writers(
    categories: Sequence[str],
    outputs: tuple[Path | None, Path | None, Path | None],
    segmentation: str,
    tolerance: float,
) -> list[ImageWriter]:
    coco, yolo, labelme = outputs
    writers: list[ImageWriter] = []
    mode: Any = segmentation  # one of SEGMENTATION_MODES (click checked it)
    if coco is not None:
        writers.append(
            CocoTaskWriter(categories, segmentation=mode, tolerance_px=tolerance, path=coco)
        )
    if yolo is not None:
        writers.append(YoloWriter(yolo, categories, tolerance_px=tolerance))
    if labelme is not None:
        writers.append(LabelmeWriter(labelme, segmentation=mode, tolerance_px=tolerance))
    return writers


def _size_lookup(root: Path | None) -> ImageSizeLookup | None:
    """Sizes from the files under ``root``: ``<root>/<image path>``, else ``<root>/<base name>``."""
    if root is None:
        return None
    by_name = image_size_from_dir(root)

    def lookup(task: dict[str, Any], url: str) -> tuple[int, int] | None:
        path = root / image_path(url)
        try:
            return oriented_size(path) if path.is_file() else by_name(task, url)
        except OSError:  # not an image (PIL's UnidentifiedImageError is an OSError)
            return by_name(task, url)

    return lookup


def _load_tasks(
    source: Path | None,
    url: str | None,
    api_key: str | None,
    project: int | None,
    with_predictions: bool = False,
) -> tuple[list[dict[str, Any]], str]:
    """The tasks and label config of an export file or a live project. Label Studio's JSON
    export lists predictions by id only: ``with_predictions`` reads a live project's from its
    predictions API (a file cannot be completed: ``pick_record`` skips bare ids)."""
    if (source is None) == (project is None):
        raise click.UsageError("give either SOURCE (an export file) or --project (a live project)")
    if source is not None:
        return _read_export(source), ""
    if not url:
        raise click.UsageError("--project needs --url (or LABEL_STUDIO_URL)")
    try:
        client = make_client(url, api_key or "")
        tasks, config = fetch_project_export(client, int(project))  # type: ignore[arg-type]
        if with_predictions:
            tasks = attach_predictions(client, int(project), tasks)  # type: ignore[arg-type]
        return tasks, config
    except LabelStudioError as err:
        raise click.ClickException(str(err)) from err


def _read_export(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise click.ClickException(f"{path}: no such file") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise click.ClickException(f"{path}: not a JSON file ({err})") from err
    if isinstance(data, dict):
        data = [data]  # a single task
    if not isinstance(data, list):
        raise click.ClickException(f"{path}: a Label Studio JSON export is a list of tasks")
    return data


def _categories(config_xml: str, ontology: str | None) -> tuple[list[str] | None, str | None]:
    """Category order and image data key from a label config (one parse) or an ontology."""
    try:
        if ontology:
            return list(load(ontology).names), None
        if config_xml:
            config = ProjectConfig.parse(config_xml, DEFAULT_METHOD, predicting=False)
            return list(config.vocabulary.names), config.data_key
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    return None, None


def _print_summary(
    report: ExportReport, outputs: tuple[Path | None, ...], categories: list[str]
) -> None:
    console = Console()
    written = ", ".join(str(p) for p in outputs if p is not None)
    table = Table(title=f"export → {written}", show_header=False)
    table.add_row("tasks", str(report.tasks))
    table.add_row("images", str(report.images))
    table.add_row("unlabelled tasks (not exported)", str(report.unlabelled))
    if report.from_predictions:
        table.add_row("images labelled from predictions", str(report.from_predictions))
    for label in categories:
        table.add_row(f"annotations: {label}", str(report.per_category[label]))
    if report.merged:
        table.add_row("results merged (one object in brush and polygons)", str(report.merged))
    table.add_row("skipped records", str(len(report.skipped)))
    for fmt, count in report.holes_filled.items():
        if count:
            table.add_row(f"masks with holes filled ({fmt})", str(count))
    if report.other_results:
        table.add_row(
            "non-region results ignored",
            ", ".join(f"{k}: {v}" for k, v in report.other_results.items()),
        )
    if report.extra_categories:
        table.add_row("labels not in the config (appended)", ", ".join(report.extra_categories))
    console.print(table)
    for skip in report.skipped:
        region = f" region {skip.region_id}" if skip.region_id else ""
        task = skip.task or f"task {skip.task_id}"
        console.print(f"[yellow]skipped[/] {task}{region}: {skip.reason}", highlight=False)
