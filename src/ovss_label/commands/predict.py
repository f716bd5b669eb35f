"""``ovss-label predict``: pre-annotate image files for a Label Studio import."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ovss_label.commands.jobs import job_progress, print_report
from ovss_label.commands.options import label_studio_options, tiny_option
from ovss_label.converters import CocoWriter, ProjectConfig, ResultTargets
from ovss_label.converters.ls_project import KINDS, NO_TARGETS
from ovss_label.methods import METHODS, SAM_MODELS
from ovss_label.ontologies import Vocabulary, label_config, load

if TYPE_CHECKING:  # the backend imports torch: loaded only when a command needs it
    from ovss_label.backend.jobs import JobReport
    from ovss_label.backend.proposers import PostprocessConfig, Proposer
    from ovss_label.backend.scale import RayOptions

FORMATS = KINDS
F = TypeVar("F", bound=Callable[..., Any])


DEFAULT_METHOD = "naclip"


def _project(
    labels: str | None,
    ontology: str | None,
    config_xml: str | None,
    fmt: str | None,
    method: str | None,
    min_score: float | None,
) -> ProjectConfig:
    """What the run predicts and where results go: a labeling config (parsed once; its
    ``ovss_method`` and ``ovss_min_score`` apply as in the server; --method and --min-score
    given on the command line override them), else --labels or --ontology with --format; a
    bad one is a usage error. ``method`` None: not given (the config's, else naclip)."""
    given = [x for x in (labels, ontology, config_xml) if x]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --labels, --ontology, --label-config")
    try:
        if config_xml:
            config = ProjectConfig.parse(config_xml, method or DEFAULT_METHOD, kind=fmt)
            if config.targets is None:  # nowhere to put results (e.g. RectangleLabels only)
                raise ValueError(NO_TARGETS)
            if method is not None:
                config = replace(config, method=method)
            return config if min_score is None else replace(config, min_score=min_score)
        vocab = Vocabulary.from_labels(labels) if labels else load(str(ontology))
    except (ValueError, KeyError) as exc:
        raise click.UsageError(str(exc)) from exc
    targets = ResultTargets(fmt or "brush")
    return ProjectConfig(method or DEFAULT_METHOD, vocab, targets, min_score or 0.0,
                         targets.data_key)  # fmt: skip


def ray_options(command: F) -> F:
    """Adds ``--ray`` and ``--ray-actors`` (parameters ``ray``, ``ray_actors``): ``predict``
    and ``train`` run their model work on Ray (``backend/scale``)."""
    flag = click.option(
        "--ray",
        is_flag=True,
        help="Run on Ray: the cluster at RAY_ADDRESS, else a local Ray (pip install "
        '"ovss-label[ray]"). Resumable: a rerun skips finished images.',
    )
    actors = click.option(
        "--ray-actors",
        type=click.IntRange(min=1),
        help="Model copies on Ray (default: one per GPU with --device cuda, else one per 4 "
        "CPUs, the CPUs split between them as torch threads).",
    )
    return flag(actors(command))


def ray_run(ray: bool, actors: int | None, device: str) -> RayOptions | None:
    """The Ray options of ``--ray`` (None without it); checks now that Ray is installed."""
    if not ray:
        if actors is not None:
            raise click.UsageError("--ray-actors needs --ray")
        return None
    from ovss_label.backend.scale import RayOptions, RayUnavailableError, import_ray

    try:
        import_ray()
    except RayUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
    return RayOptions(actors=actors, gpu=device.startswith("cuda"))


def _given(option: str) -> bool:
    """True when ``option`` was typed on the command line (not a default)."""
    source = click.get_current_context().get_parameter_source(option)
    return source is click.core.ParameterSource.COMMANDLINE


@click.command("predict")
@click.argument("paths", nargs=-1)
@click.option("--labels", help='Comma-separated label names, e.g. "cat, dog".')
@click.option("--ontology", help="A named ontology (ovss-label ontology list), e.g. voc.")
@click.option(
    "--label-config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The project's labeling config XML: labels, synonyms and control names.",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=DEFAULT_METHOD,
    show_default=True,
    help="Without it, a --label-config's ovss_method on a control picks the method (as in "
    "the server).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Label Studio import file to write (files mode).",
)
@click.option("--project", type=int, help="Pre-annotate this Label Studio project instead.")
@label_studio_options
@click.option(
    "--format", "fmt", type=click.Choice(FORMATS), help="Default: brush (or the config's)."
)
@click.option("--coco", type=click.Path(dir_okay=False, path_type=Path), help="Also write COCO.")
@click.option("--overlays", type=click.Path(file_okay=False, path_type=Path), help="PNG folder.")
@click.option("--min-area", default=0.001, show_default=True, help="Smallest part, image fraction.")
@click.option(
    "--min-score",
    type=click.FloatRange(0, 1),
    help="Drop instances scoring below this (0-1; default: a --label-config's ovss_min_score, "
    "else keep all). In the server, a project sets it on its BrushLabels/PolygonLabels "
    'control: ovss_min_score="0.3".',
)
@click.option("--split", type=click.Choice(["components", "class"]), default="components")
@click.option(
    "--document-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=".",
    help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT: task URLs are relative to "
    "it, so every image must be under it. Default: the current folder.",
)
@click.option(
    "-r", "--recursive", is_flag=True, help="Also search the sub-folders of folder arguments."
)
@click.option("--url-prefix", default="/data/local-files/?d=", show_default=True)
@click.option(
    "--background",
    type=click.Choice(["auto", "none"]),
    default=None,
    help="auto (the default): add NACLIP's stuff queries as a hidden background; none: every "
    "pixel gets a label (the default with --tiny, whose random twin would lose every pixel "
    "to the hidden background).",
)
@click.option(
    "--pamr/--no-pamr",
    default=True,
    show_default=True,
    help="NACLIP's PAMR refinement (off: faster, coarser).",
)
@click.option(
    "--sam-model",
    type=click.Choice(SAM_MODELS),
    default="sam_vit_b",
    show_default=True,
    help="SAM for naclip+sam and clip_sam.",
)
@click.option("--sam-checkpoint", type=click.Path(dir_okay=False), help="Explicit SAM weight file.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Explicit weight file.")
@click.option("--head", help="fmbseg: the trained head (a `train` run folder).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="OVSS_DATA_DIR",
              help="With --project: the server's data directory; the project's active trained "
              "version (models activate) is used.")  # fmt: skip
@click.option("--uncertainty-sampling", is_flag=True,
              help="With --project, afterwards: Label Studio serves the task this version is "
              "least sure of first (sets the project's sampling and model version).")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@tiny_option
@ray_options
@click.option("--fail-on-skip", is_flag=True, help="Exit with status 1 if an image was skipped.")
def predict(
    paths,
    labels,
    ontology,
    config_path,
    method,
    output,
    project,
    url,
    api_key,
    fmt,
    coco,
    overlays,
    min_area,
    min_score,
    split,
    document_root,
    recursive,
    url_prefix,
    background,
    pamr,
    sam_model,
    sam_checkpoint,
    checkpoint,
    head,
    data_dir,
    uncertainty_sampling,
    device,
    tiny,
    ray,
    ray_actors,
    fail_on_skip,
) -> None:
    """Pre-annotate images (files, folders, globs) or a whole Label Studio project.

    Files: writes OUTPUT, a Label Studio import file (one task per image, with predictions).
    With --labels or --ontology it also writes OUTPUT's labeling config (*.label_config.xml)
    for a project that accepts the predictions. Images are referenced by local-files URLs
    relative to --document-root.

    --project ID: predicts every task of that project (vocabulary from its labeling config)
    and posts each prediction back through the SDK as it is ready; tasks that already have a
    prediction of this model version are skipped, so a run resumes after an interruption.

    --ray: the same outputs from a Ray Data pipeline (decode and post-processing in CPU
    tasks, the model in --ray-actors actors). Files: per-image records in OUTPUT.parts/ make
    a rerun compute only the images without one.
    """
    on_ray = ray_run(ray, ray_actors, device)
    if project is not None:
        from ovss_label.commands.predict_project import run_project

        if min_score is not None:  # run_project uses the server's engine and the project's config
            raise click.UsageError(
                "--min-score is for files; a project's threshold is the ovss_min_score "
                "attribute of its BrushLabels/PolygonLabels control"
            )
        run_project(project, url, api_key, method=method, tiny=tiny, device=device, head=head,
                    data_dir=data_dir, ray=on_ray, uncertainty=uncertainty_sampling)  # fmt: skip
        return
    if uncertainty_sampling:
        raise click.UsageError("--uncertainty-sampling is for --project (a Label Studio setting)")
    if not paths or output is None:
        raise click.UsageError("give PATHS and -o OUTPUT, or --project ID")
    from ovss_label.backend.predict import collect_images, unsearched_folders
    from ovss_label.backend.proposers import PostprocessConfig
    from ovss_label.converters import write_json_atomic as write_json

    config_xml = config_path.read_text(encoding="utf-8") if config_path else None
    chosen = method if _given("method") else None
    run = _project(labels, ontology, config_xml, fmt, chosen, min_score)
    try:
        images = collect_images(paths, recursive=recursive)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    _check_document_root(images, document_root)
    options = _options(run.method, background, pamr, sam_model, sam_checkpoint)
    if run.method.startswith("fmbseg") and head:
        options["head"] = head
    writer = CocoWriter(run.vocabulary.names) if coco else None
    if overlays:
        overlays.mkdir(parents=True, exist_ok=True)
    post = PostprocessConfig(min_area=min_area, split=split, min_score=run.min_score)
    files = _files(run, post, writer, overlays, (document_root, url_prefix))
    if on_ray is not None:
        from ovss_label.backend.scale import ProposerSpec

        spec = ProposerSpec(run.method, {**options, "tiny": tiny or None, "checkpoint": checkpoint})
        tasks, report = _run_ray(on_ray, spec, run, images, {**files, "records_for": output})
    else:
        proposer = _proposer(run.method, tiny, checkpoint, device, options)
        tasks, report = _run(proposer, run, images, files)
    write_json(output, tasks, indent=1)
    if not config_xml:
        config_path = output.with_name(output.stem + ".label_config.xml")
        config_path.write_text(label_config(run.vocabulary, run.output.kind), encoding="utf-8")
    if writer:
        write_json(coco, writer.to_dict())
    unsearched = 0 if recursive else len(unsearched_folders(paths))
    _summary(report, output, unsearched)
    if report.failed and fail_on_skip:
        raise SystemExit(1)


def _files(
    run: ProjectConfig,
    post: PostprocessConfig,
    writer: CocoWriter | None,
    overlays: Path | None,
    roots: tuple[Path, str],
) -> dict[str, Any]:
    """The keyword arguments of ``predict_files`` (and ``predict_files_ray``)."""
    from ovss_label.backend.predict import local_files_url, relative_name

    document_root, url_prefix = roots
    return {"output": run.output, "postprocess": post, "coco": writer, "overlay_dir": overlays,
            "url_for": lambda p: local_files_url(p, document_root, url_prefix),
            "name_for": lambda p: relative_name(p, document_root)}  # fmt: skip


def _run(proposer: Proposer, run: ProjectConfig, images: list[Path], files: dict[str, Any]) -> Any:
    """``predict_files`` under a progress bar: its tasks and report."""
    from ovss_label.backend.predict import predict_files

    with job_progress("predicting") as progress:
        return predict_files(proposer, run.vocabulary, images, progress=progress, **files)


def _run_ray(
    on_ray: RayOptions, spec: Any, run: ProjectConfig, images: list[Path], files: dict[str, Any]
) -> Any:
    """``predict_files_ray`` (Ray draws its own progress): its tasks and report."""
    from ovss_label.backend.scale import predict_files_ray

    try:
        return predict_files_ray(spec, run.vocabulary, images, options=on_ray, **files)
    except (OSError, ValueError, RuntimeError) as exc:  # weights, the cluster, a failed run
        raise click.ClickException(str(exc)) from exc


def _check_document_root(images: Sequence[Path], root: Path) -> None:
    """Every image must be under ``root``: Label Studio serves nothing else (one-line error
    naming a root that would do)."""
    from ovss_label.backend.predict import relative_name

    outside = []
    for path in images:
        try:
            relative_name(path, root)
        except ValueError:
            outside.append(path)
    if outside:
        common = os.path.commonpath([str(p.parent) for p in images])
        raise click.ClickException(
            f"{len(outside)} of {len(images)} images are outside --document-root {root} "
            f"(e.g. {outside[0]}); Label Studio serves only files under its "
            f"LOCAL_FILES_DOCUMENT_ROOT, which --document-root names: e.g. --document-root "
            f"{common}"
        )


def _options(
    method: str, background: str | None, pamr: bool, sam_model: str, sam_checkpoint: str | None
) -> dict[str, Any]:
    """The method's options from the command line (None: the method's default)."""
    # Each file is scored once: no feature or refined-map caches to fill memory with.
    options: dict[str, Any] = {}
    if method.startswith("naclip"):
        options.update(pamr_steps=10 if pamr else 0)
        if background is not None:
            options.update(background=background)
    if "sam" in method:
        options.update(sam_model=sam_model, sam_checkpoint=sam_checkpoint)
    return options


def _proposer(
    method: str, tiny: bool, checkpoint: str | None, device: str, options: dict[str, Any]
) -> Any:
    """The method's proposer; a missing weight or an unusable device is one error line."""
    from ovss_label.backend.proposers import create_proposer

    try:
        return create_proposer(
            method, tiny=tiny or None, checkpoint=checkpoint, device=device, **options
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # weight, checkpoint, device
        raise click.ClickException(str(exc)) from exc


def _summary(report: JobReport, output: Path, unsearched: int) -> None:
    """The job's report, titled with the output file, and the folders not searched."""
    report.job = f"predict -> {output}"
    notes: tuple[str, ...] = ()
    if unsearched:
        folders = "sub-folder was" if unsearched == 1 else "sub-folders were"
        notes = (f"{unsearched} {folders} not searched (--recursive searches them)",)
    print_report(report, done="images predicted", failure="skipped", notes=notes)
