"""The ground-truth options ``eval`` and ``train`` share, declared once (datasette style), and
the ground truth they name (``backend/evaluation``: datasets, Label Studio, COCO)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ovss_label.commands.options import label_studio_options

F = TypeVar("F", bound=Callable[..., Any])
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
DATASETS = "voc, voc20, context60, context59, coco_object, coco_stuff, ade20k, cityscapes"


def ground_truth_options(*, split: str, unlabeled: str) -> Callable[[F], F]:
    """Adds ``--dataset/--root/--split/--limit``, ``--ls-export``, ``--project`` (with ``--url``
    and ``--api-key``), ``--label-config``, ``--coco``, ``--image-dir`` and ``--unlabeled``
    (``split`` and ``unlabeled`` are the command's defaults)."""
    decorators = [
        click.option("--dataset", help=f"A standard dataset: {DATASETS}."),
        click.option("--root", type=FOLDER, help="The dataset's folder (VOCdevkit/VOC2012, ...)."),
        click.option("--split", default=split, show_default=True),
        click.option("--limit", type=click.IntRange(min=1), help="Only the first N images."),
        click.option("--ls-export", type=FILE, help="A Label Studio JSON export: its labels."),
        click.option("--project", type=int, help="Or a live Label Studio project's labels."),
        label_studio_options,
        click.option("--label-config", type=FILE, help="Labeling config XML (class order)."),
        click.option("--coco", "coco_file", type=FILE, help="A COCO instances file."),
        click.option("--image-dir", type=FOLDER, help="Images of --ls-export/--coco/--project."),
        click.option(
            "--unlabeled",
            type=click.Choice(["background", "ignore"]),
            default=unlabeled,
            show_default=True,
            help="Pixels no region covers (Label Studio, COCO): background, or not used "
            "(only some objects are labelled).",
        ),
    ]

    def add(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return add


def given_ground_truths(options: dict[str, Any]) -> list[str]:
    """The ground-truth options given (``dataset``, ``ls_export``, ``project``, ``coco_file``)."""
    return [k for k in ("dataset", "ls_export", "project", "coco_file") if options.get(k)]


def ground_truth(options: dict[str, Any]) -> Any:
    """The ``GroundTruth`` the options name; usage and read errors as click exceptions."""
    from ovss_label.backend.evaluation import datasets, sources

    if len(given_ground_truths(options)) != 1:
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

    tasks, config, fetch = ls_tasks(options)
    if options["ls_export"] is not None and options["image_dir"] is None and fetch is None:
        raise click.UsageError(
            "--ls-export needs --image-dir DIR (where its images are), or --url and --api-key "
            "to read them from Label Studio"
        )
    name = f"project {options['project']}" if options["project"] else options["ls_export"].name
    return label_studio_ground_truth(
        tasks,
        label_config=config,
        image_dir=options["image_dir"],
        fetch=fetch,
        unlabeled=options["unlabeled"],
        name=name,
    )


def ls_tasks(
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
    # A live project's images come from Label Studio; an export's too when its URL is given.
    from_label_studio = project is not None or (options["url"] and not options["image_dir"])
    return tasks, config, _fetcher(options) if from_label_studio and fetch_images else None


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
