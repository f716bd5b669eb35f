"""``ovss-label export --coco``: a Label Studio export file or live project to COCO."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ovss_label.converters import SEGMENTATION_MODES, ExportReport, export_tasks_to_coco
from ovss_label.converters import write_json_atomic as write_json
from ovss_label.images import image_size_from_dir
from ovss_label.lsapi import LabelStudioError, fetch_project_export, make_client
from ovss_label.ontologies import Vocabulary, load


@click.command("export")
@click.option("--coco", "to_coco", is_flag=True, help="Write COCO instance segmentation.")
@click.argument("source", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--url", envvar="LABEL_STUDIO_URL", help="Label Studio URL (live export).")
@click.option(
    "--api-key", envvar="LABEL_STUDIO_API_KEY", help="Legacy token or personal access token."
)
@click.option("--project", type=int, help="Project id to export live through the API.")
@click.option(
    "--segmentation",
    type=click.Choice(SEGMENTATION_MODES),
    default="auto",
    show_default=True,
    help="auto: polygons unless a mask has holes (then exact RLE).",
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
    help="Folder of the images: sizes for tasks whose annotation has no regions.",
)
@click.option("--tolerance", default=1.0, show_default=True, help="Polygon tolerance in pixels.")
@click.option("--fail-on-skip", is_flag=True, help="Exit with status 1 if any record was skipped.")
def export(
    to_coco: bool,
    source: Path | None,
    output: Path,
    url: str | None,
    api_key: str | None,
    project: int | None,
    segmentation: str,
    include_predictions: bool,
    label_config: Path | None,
    ontology: str | None,
    image_dir: Path | None,
    tolerance: float,
    fail_on_skip: bool,
) -> None:
    """Export Label Studio annotations as COCO.

    SOURCE is a Label Studio JSON export file; or give --project (with --url and --api-key, or
    LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY) to export a live project. Each task's latest
    non-cancelled annotation is used. Bad records are reported with their task id and skipped.
    """
    if not to_coco:
        raise click.UsageError("choose the output format: --coco")
    tasks, config_xml = _load_tasks(source, url, api_key, project)
    if label_config is not None:
        config_xml = label_config.read_text(encoding="utf-8")
    categories, data_key = _categories(config_xml, ontology)
    try:
        coco, report = export_tasks_to_coco(
            tasks,
            categories=categories,
            segmentation=segmentation,  # type: ignore[arg-type]
            include_predictions=include_predictions,
            data_key=data_key,
            image_size=image_size_from_dir(image_dir) if image_dir else None,
            tolerance_px=tolerance,
        )
    except ValueError as err:  # not a Label Studio JSON export
        raise click.ClickException(f"{source or 'project export'}: {err}") from err
    write_json(output, coco)
    _print_summary(report, output, [c["name"] for c in coco["categories"]])
    if fail_on_skip and report.skipped:
        raise SystemExit(1)


def _load_tasks(
    source: Path | None, url: str | None, api_key: str | None, project: int | None
) -> tuple[list[dict[str, Any]], str]:
    if (source is None) == (project is None):
        raise click.UsageError("give either SOURCE (an export file) or --project (a live project)")
    if source is not None:
        return _read_export(source), ""
    if not url:
        raise click.UsageError("--project needs --url (or LABEL_STUDIO_URL)")
    try:
        client = make_client(url, api_key or "")
        return fetch_project_export(client, int(project))  # type: ignore[arg-type]
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
    """Category order and image data key from a label config or an ontology."""
    try:
        if ontology:
            return list(load(ontology).names), None
        if config_xml:
            return list(Vocabulary.from_label_config(config_xml).names), _image_key(config_xml)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    return None, None


def _image_key(config_xml: str) -> str | None:
    from label_studio_sdk.label_interface import LabelInterface

    images = [o for o in LabelInterface(config_xml).objects if o.tag == "Image"]
    value = images[0].value if images else None
    return value.lstrip("$") if value and value.startswith("$") else None


def _print_summary(report: ExportReport, output: Path, categories: list[str]) -> None:
    console = Console()
    table = Table(title=f"COCO export → {output}", show_header=False)
    table.add_row("tasks", str(report.tasks))
    table.add_row("images", str(report.images))
    table.add_row("unlabelled tasks (not exported)", str(report.unlabelled))
    if report.from_predictions:
        table.add_row("images labelled from predictions", str(report.from_predictions))
    for label in categories:
        table.add_row(f"annotations: {label}", str(report.per_category[label]))
    table.add_row("skipped records", str(len(report.skipped)))
    if report.holes_filled:
        table.add_row(
            "masks with holes filled (use --segmentation auto/rle)", str(report.holes_filled)
        )
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
        console.print(
            f"[yellow]skipped[/] task {skip.task_id}{region}: {skip.reason}", highlight=False
        )
