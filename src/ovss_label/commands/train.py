"""``ovss-label train``: the FMbSeg alignment head on accepted labels, a dataset split or
stage-1 pseudo-labels. The work is in ``backend/training``; this module reads options."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ovss_label.commands.jobs import job_progress, print_report
from ovss_label.commands.options import data_dir_option, server_database, tiny_option
from ovss_label.commands.predict import ray_options, ray_run
from ovss_label.commands.truth import (
    FOLDER,
    given_ground_truths,
    ground_truth,
    ground_truth_options,
)
from ovss_label.methods import SAM_MODELS

if TYPE_CHECKING:  # the backend imports torch: loaded only when the command runs
    from ovss_label.backend.training.distributed import World


@click.command("train")
@ground_truth_options(split="train", unlabeled="background")
@click.option("--pseudo", type=FOLDER, help="A folder of images: train on clip_sam's labels.")
@click.option("--labels", help='The classes of --pseudo, e.g. "cat, dog, person".')
@click.option("--ontology", help="Or a named ontology for --pseudo (ovss-label ontology list).")
@click.option("-o", "--output", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The run folder: checkpoints, metrics, the head; rerun to resume.")  # fmt: skip
@click.option("--queue", is_flag=True,
              help="With --project: queue a job for the server (serve --learn) to run, in "
              "its --data-dir, instead of training here.")  # fmt: skip
@data_dir_option
@click.option("--epochs", default=10, show_default=True, help="Passes over the images [paper].")
@click.option("--batch-size", default=5, show_default=True, help="Images per step [paper].")
@click.option("--lr", default=0.05, show_default=True, help="SGD learning rate.")
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--tau", default=0.1, show_default=True, help="Loss temperature.")
@click.option("--seed", default=0, show_default=True)
@click.option("--held-out", default=0.1, show_default=True, help="Fraction scored at the end.")
@click.option("--checkpoint-every", default=50, show_default=True, help="Steps per checkpoint.")
@click.option("--short-side", default=448, show_default=True, help="DINOv2 input short side.")
@click.option("--backbone", type=click.Choice(["dinov2_vitl14", "dinov2_vitl14_reg4"]),
              default="dinov2_vitl14", show_default=True)  # fmt: skip
@click.option("--features", "features_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Feature store folder (default: the cache; can be shared).")  # fmt: skip
@click.option("--sam-model", type=click.Choice(SAM_MODELS), default="sam_vit_b", show_default=True)
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda (under torchrun: each process's cuda:LOCAL_RANK).")  # fmt: skip
@tiny_option
@ray_options
def train(**options: Any) -> None:
    """Train the FMbSeg alignment head (frozen DINOv2 -> CLIP text space).

    Data: --ls-export FILE --image-dir DIR, --project ID, --dataset NAME --root DIR, or
    --pseudo DIR with --labels/--ontology (stage-1 clip_sam labels, made once). Each image's
    DINOv2 features are computed once. The run resumes from its last checkpoint when rerun;
    the head is RUN_DIR/head.safetensors, used by `--method fmbseg --head RUN_DIR`.

    Multi-GPU: `torchrun --nproc-per-node N -m ovss_label train ...` (DDP).

    For a server (`serve --learn`): `--project ID --queue --data-dir DIR` queues a job it runs
    (snapshot, training, gate), as Label Studio's "Start training" does.
    """
    from ovss_label.backend.models.pool import ModelPool
    from ovss_label.backend.training import distributed
    from ovss_label.backend.training.job import Backbones, run_training

    if options["queue"]:
        _queue(options)
        return
    if options["run_dir"] is None:
        raise click.UsageError("-o RUN_DIR is needed: the run folder (or --project ID --queue)")
    config = _config(options)
    on_ray = ray_run(options["ray"], options["ray_actors"], options["device"])
    models = Backbones(options["backbone"], short_side=options["short_side"], tiny=options["tiny"])
    try:
        with distributed.session(options["device"]) as world:
            pool = ModelPool(world.device)  # one copy of each model for labels and features
            with world.main_first():  # rank 0 first: it downloads weights, makes labels
                truth = _training_truth(options, pool)
                if on_ray is not None and world.is_main:  # training then finds them encoded
                    _fill_on_ray(truth, models, pool, options, on_ray)
            with _bar(world, "features") as prepare, _bar(world, "training") as steps:
                built, trained = run_training(truth, options["run_dir"], config, models=models,
                                              pool=pool, features_dir=options["features_dir"],
                                              progress=(prepare, steps), world=world)  # fmt: skip
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if not world.is_main:
        return  # rank 0 reports for all
    print_report(built, done="encoded", notes=truth.notes)
    result = trained.result
    before, after = result["before"], result["after"]
    notes = [f"head {str(result['head'])[:12]}: --method fmbseg --head {options['run_dir']}"]
    if after is not None:
        notes.append(f"held-out mIoU {_pct(before['mIoU'])} before, {_pct(after['mIoU'])} after")
    print_report(trained, done="steps", notes=tuple(notes))


QUEUE_OPTIONS = {"queue", "project", "data_dir", "url", "api_key", "tiny"}
"""What ``--queue`` reads; training settings are the server's (``serve --train-option``)."""


def _queue(options: dict[str, Any]) -> None:
    """Queues a training job in the server's data directory (``learning/loop.py``)."""
    from click.core import ParameterSource

    from ovss_label.backend.learning.loop import queue_training

    ctx = click.get_current_context()
    if not options["project"]:
        raise click.UsageError("--queue needs --project ID: the server trains on a project")
    given = [name for name in options if name not in QUEUE_OPTIONS
             and ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]  # fmt: skip
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(
            f"--queue takes --project and --data-dir; the server's --train-option settings "
            f"apply, not {flags}"
        )
    project, data_dir = options["project"], options["data_dir"]
    job, created = queue_training(server_database(data_dir), project, "command line")
    if not created:
        click.echo(f"project {project} already has training job {job.id} ({job.state.value}):"
                   " nothing queued")  # fmt: skip
        return
    click.echo(f"queued training job {job.id} for project {project} in {data_dir}: a server "
               f"started with `serve --learn --data-dir {data_dir}` runs it; "
               f"`ovss-label jobs --project {project}` follows it")  # fmt: skip


def _bar(world: World, description: str) -> AbstractContextManager[Any]:
    """A progress bar on rank 0; nothing on the other torchrun processes."""
    from ovss_label.backend.jobs import NoProgress

    return job_progress(description) if world.is_main else nullcontext(NoProgress())


def _fill_on_ray(truth: Any, models: Any, pool: Any, options: dict[str, Any], on_ray: Any) -> None:
    """``--ray``: Ray actors fill the feature store first (``backend/scale/ray_features.py``)."""
    from ovss_label.backend.scale.ray_features import fill_feature_store
    from ovss_label.backend.training.job import features_root

    try:
        report = fill_feature_store(truth, features_root(options["features_dir"]), models, pool,
                                    options=on_ray)  # fmt: skip
    except RuntimeError as err:  # the cluster, a failed run (ValueError: the caller's)
        raise click.ClickException(str(err)) from err
    print_report(report, done="encoded on Ray")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _config(options: dict[str, Any]) -> Any:
    from ovss_label.backend.training.loss import ContrastiveLossConfig
    from ovss_label.backend.training.train import TrainConfig

    keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "seed", "held_out",
            "checkpoint_every")  # fmt: skip
    try:
        return TrainConfig(**{k: options[k] for k in keys},
                           loss=ContrastiveLossConfig(tau=options["tau"]))  # fmt: skip
    except ValueError as err:
        raise click.UsageError(str(err)) from err


def _training_truth(options: dict[str, Any], pool: Any) -> Any:
    if options["pseudo"] is None:
        if not given_ground_truths(options):
            raise click.UsageError(
                "what to train on: --ls-export, --project, --dataset, --coco or --pseudo"
            )
        return ground_truth(options)
    if given_ground_truths(options):
        raise click.UsageError("give --pseudo or labelled data, not both")
    from ovss_label.backend.predict import collect_images
    from ovss_label.backend.training.job import pseudo_ground_truth
    from ovss_label.ontologies import Vocabulary, load

    if bool(options["labels"]) == bool(options["ontology"]):
        raise click.UsageError("--pseudo needs the classes: --labels or --ontology")
    try:
        vocabulary = load(options["ontology"]) if options["ontology"] else (
            Vocabulary.from_labels(options["labels"]))  # fmt: skip
        images = collect_images([str(options["pseudo"])])
        folder = options["run_dir"] / "pseudo"
        return pseudo_ground_truth(images, vocabulary, folder, pool=pool, tiny=options["tiny"],
                                   sam_model=options["sam_model"])  # fmt: skip
    except ValueError as err:
        raise click.ClickException(str(err)) from err
