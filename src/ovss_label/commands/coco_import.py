"""``ovss-label import --coco``: COCO annotations to Label Studio tasks with predictions."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ovss_label.converters import CocoError, ImportReport, coco_to_tasks, read_coco
from ovss_label.converters import write_json_atomic as write_json
from ovss_label.ontologies import Vocabulary, label_config


@click.command("import")
@click.option(
    "--coco",
    "coco_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO instances JSON file.",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--image-root",
    help="Prefix for file_name, e.g. '/data/local-files/?d=photos/' or 'https://host/images/'.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "brush", "polygon"]),
    default="auto",
    show_default=True,
    help="auto: COCO polygons stay polygons, RLE masks become brush masks.",
)
@click.option("--model-version", default="coco-import", show_default=True)
@click.option("--tolerance", default=1.0, show_default=True, help="Polygon tolerance in pixels.")
def coco_import(
    coco_path: Path,
    output: Path,
    image_root: str | None,
    fmt: str,
    model_version: str,
    tolerance: float,
) -> None:
    """Turn COCO annotations into Label Studio tasks with predictions.

    Writes OUTPUT (import it in Label Studio) and OUTPUT's labeling config next to it
    (*.label_config.xml), with one label per COCO category, in category-id order.
    """
    try:
        categories, images = read_coco(coco_path)
    except CocoError as err:
        raise click.ClickException(f"{coco_path}: {err}") from err
    tasks, report = coco_to_tasks(
        images,
        image_root=image_root,
        fmt=fmt,  # type: ignore[arg-type]
        model_version=model_version,
        tolerance_px=tolerance,
    )
    try:
        config = label_config(Vocabulary.from_labels(categories), report.config_kind)
    except ValueError as err:  # e.g. two categories with one name
        raise click.ClickException(f"{coco_path}: categories: {err}") from err
    write_json(output, tasks)
    config_path = output.with_suffix(".label_config.xml")
    config_path.write_text(config, encoding="utf-8")
    _print_summary(report, output, config_path, categories)


def _print_summary(
    report: ImportReport, output: Path, config_path: Path, categories: list[str]
) -> None:
    table = Table(title=f"Label Studio tasks → {output}", show_header=False)
    table.add_row("tasks", str(report.images))
    table.add_row("labeling config", str(config_path))
    for label in categories:
        table.add_row(f"regions: {label}", str(report.per_category[label]))
    for kind, count in report.per_type.items():
        table.add_row(f"results: {kind}", str(count))
    if report.holes_dropped:
        table.add_row("masks whose holes polygons cannot keep", str(report.holes_dropped))
    Console().print(table)
