"""``ovss-label tune``: tune PnP-OVSS on your images with a CLIP reward (no pixel labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ovss_label.commands.jobs import job_progress, print_report
from ovss_label.commands.options import label_studio_options, tiny_option
from ovss_label.converters.ls_tasks import labels_by_image


def image_labels(
    labels: Path | None, export: Path | None, tasks: list[dict[str, Any]] | None = None
) -> dict[str, list[str]]:
    """File name -> class names, from a JSON mapping, a Label Studio JSON export file, or the
    tasks of a live project (``converters.ls_tasks.labels_by_image``)."""
    if sum(x is not None for x in (labels, export, tasks)) != 1:
        raise click.UsageError("give exactly one of --labels, --ls-export and --project")
    if labels is not None:
        mapping = json.loads(labels.read_text())
        return {str(k): [str(n) for n in v] for k, v in mapping.items() if v}
    if tasks is None:
        tasks = json.loads(Path(str(export)).read_text())
    return labels_by_image(tasks or [])


def _layer_range(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    """``"6-9"`` or ``"7"`` -> the layer indices; anything else is a usage error (exit 2).
    Whether they exist is checked against the loaded BLIP (``backend.tune.load_models``)."""
    first, dash, last = value.partition("-")
    if not (first.isdigit() and (last.isdigit() if dash else True)):
        raise click.BadParameter(f"{value!r} is not a layer range such as 6-9 or 7")
    if int(last or first) < int(first):
        raise click.BadParameter(f"{value!r} ends before it starts")
    return list(range(int(first), int(last or first) + 1))


@click.command("tune")
@click.argument("images", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON: {"photo.jpg": ["cat", "dog"], ...}.',
)
@click.option(
    "--ls-export",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Label Studio JSON export: the labels present in each annotated task.",
)
@click.option("--project", type=int, help="Or the annotated tasks of a live project.")
@label_studio_options
@click.option("--name", default="tuned", show_default=True, help="Name pnp_ovss loads it by.")
@click.option("--iterations", default=34, show_default=True)
@click.option(
    "--layers",
    default="0-11",
    show_default=True,
    callback=_layer_range,
    help="Layer range, e.g. 6-9 (BLIP ITM large: 0-11; the --tiny twin: 0-7).",
)
@click.option("--seed", default=1164005944, show_default=True)
@click.option("--max-images", default=50, show_default=True)
@tiny_option
def tune(images, labels, ls_export, project, url, api_key, name, iterations, layers, seed,
         max_images, tiny) -> None:  # fmt: skip
    """Search PnP-OVSS's layer, head, threshold and blur for IMAGES (CLIP reward, resumable).

    Writes $OVSS_CACHE_DIR/tuned/NAME.json, which `--method pnp_ovss` uses with
    OVSS_PNP_TUNED=NAME, and prints the best configurations.
    """
    from ovss_label.backend.models.blip import LayerHeadError
    from ovss_label.backend.tune import load_models, run_search

    tasks = None
    if project is not None:
        from ovss_label.lsapi import LabelStudioError, fetch_project_export, make_client

        try:
            tasks, _ = fetch_project_export(make_client(url or "", api_key or ""), project)
        except LabelStudioError as exc:
            raise click.ClickException(str(exc)) from exc
    mapping = image_labels(labels, ls_export, tasks)
    try:  # models first: a missing weight or a layer past the model is one line, no progress
        models = load_models(layers, tiny=tiny)
    except LayerHeadError as exc:
        raise click.ClickException(f"--layers {_shown(layers)}: {exc}") from exc
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    with job_progress("tuning") as progress:
        try:
            report = run_search(
                images, mapping, name, iterations=iterations, seed=seed, max_images=max_images,
                models=models, progress=progress,
            )  # fmt: skip
        except ValueError as exc:  # e.g. none of the labelled images is in the folder
            raise click.ClickException(str(exc)) from exc
    print_report(report, done="candidates scored")
    _table(report.outputs["tuned"], report.result)


def _shown(layers: list[int]) -> str:
    """The layer list as the user typed it (``6-9``)."""
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _table(path: Path, ranked: list[tuple[float, Any]]) -> None:
    table = Table(title=f"best configurations -> {path}")
    for column in ("reward", "layer", "head", "threshold", "blur σ"):
        table.add_column(column, justify="right")
    for reward, c in ranked[:5]:
        table.add_row(
            f"{reward:g}", str(c.layer), str(c.head), f"{c.threshold:g}", f"{c.blur_sigma:g}"
        )
    Console().print(table)
