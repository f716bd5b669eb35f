"""``ovss-label predict --ray`` over files: ``predict_files`` as a Ray Data pipeline.

Stages (``cluster.py``): the driver lists the images that have no record yet
(``records.py``) → CPU tasks decode them → proposer actors propose and score → CPU tasks
post-process each image (instances, its task, COCO annotations, overlay) and write its record
→ the driver assembles the tasks JSON and COCO from all records in input order. The per-image
work is ``predict.ImageOutputs``, the code ``predict_files`` runs, so the files are the same
bytes (given the same torch thread count: a float reduction split over more threads rounds
differently, e.g. the last digits of COCO scores, in one process too; an actor's count is
``cluster.plan_pool``'s); a rerun after a kill computes only the images without a record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ovss_label.converters import CocoWriter, ResultTargets
from ovss_label.ontologies import Vocabulary

from ..jobs import JobReport
from ..predict import (
    ImageOutputs,
    ImageResult,
    coco_options,
    collect,
    overlay_names,
)
from ..proposers import (
    PostprocessConfig,
    Proposer,
    create_proposer,
    method_plan,
    proposal_to_instances,
)
from .cluster import RayOptions, cluster_pool, connected, run_pipeline
from .records import Records
from .stages import Decode, FileErrors, ProposeActor, load_file, proposal_of


@dataclass(frozen=True)
class ProposerSpec:
    """How an actor builds the proposer: ``create_proposer``'s arguments (picklable).

    Attributes:
        method: The method name.
        options: Its options (``tiny``, ``checkpoint``, ``sam_model``, ...).
    """

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    def version(self) -> str:
        """The proposer's ``model_version``, from its plan: nothing is loaded, weight files
        are hashed (a missing file raises ``FileNotFoundError`` here, on the driver)."""
        return method_plan(self.method, **self.options).identity.version

    def __call__(self, device: str) -> Proposer:
        return create_proposer(self.method, device=device, **self.options)


def predict_files_ray(
    spec: ProposerSpec,
    vocabulary: Vocabulary,
    paths: Sequence[Path],
    *,
    output: ResultTargets,
    records_for: Path,
    url_for: Callable[[Path], str],
    name_for: Callable[[Path], str] = lambda path: path.name,
    postprocess: PostprocessConfig | None = None,
    coco: CocoWriter | None = None,
    overlay_dir: Path | None = None,
    options: RayOptions | None = None,
) -> tuple[list[dict[str, Any]], JobReport]:
    """``predict_files`` on Ray (module docstring): the same tasks, COCO writer contents and
    overlays. ``records_for`` is the output file the records sit beside. The report counts
    ``done`` (this run) and ``skipped`` (from records) images, and ``failed`` as
    ``predict_files`` does.

    Raises:
        RayUnavailableError: Ray is not installed.
        RayRunError: The pipeline failed; a rerun resumes.
    """
    version = spec.version()
    outputs = ImageOutputs(vocabulary, output, version, postprocess or PostprocessConfig(),
                           coco_options(coco), overlay_dir)  # fmt: skip
    records = Records(records_for, outputs)
    names = overlay_names(paths)
    keys = [records.key(p, url_for(p), name_for(p), names[p]) for p in paths]
    finished = records.finished()
    items = [
        {"item": str(p), "key": key, "url": url_for(p), "name": name_for(p), "overlay": names[p]}
        for p, key in zip(paths, keys, strict=True)
        if key not in finished
    ]
    retry: dict[str, ImageResult] = {}  # failures that may pass: no record, reported once
    if items:
        with connected() as ray:
            pool = cluster_pool(ray, options or RayOptions())
            errors = FileErrors()
            actor_args = (spec, version, vocabulary, errors, pool, overlay_dir is not None)
            finish = partial(finish_file, outputs=outputs, records=records)
            for row in run_pipeline(items, Decode(load_file, errors), ProposeActor, actor_args,
                                    finish, pool):  # fmt: skip
                if row["transient"]:
                    retry[row["key"]] = ImageResult(row["item"], reason=row["error"])
    tasks, report = _assemble(keys, records, finished, retry, coco, version)
    report.outputs["records"] = records.root
    return tasks, report


def finish_file(row: dict[str, Any], outputs: ImageOutputs, records: Records) -> dict[str, Any]:
    """The post-processing task: instances, task, COCO annotations and overlay of one image
    (``ImageOutputs.result``, as ``predict_files``), stored as its record unless it failed
    for now; returns the small row the driver reads."""
    path, error, transient = Path(row["item"]), row["error"], row["transient"]
    result = ImageResult(str(path), reason=error)
    if not error:
        try:
            instances = proposal_to_instances(proposal_of(row), outputs.post)
        except FileErrors.catches as exc:
            error, transient = FileErrors().describe(exc, row["item"])
            result = ImageResult(str(path), reason=error)
        else:
            result = outputs.result(path, row["image"], instances, row["score"], url=row["url"],
                                    name=row["name"], overlay=row["overlay"])  # fmt: skip
    if not transient:
        records.write(row["key"], result)
    return {"item": row["item"], "key": row["key"], "error": error, "transient": transient}


def _assemble(
    keys: list[str],
    records: Records,
    finished: set[str],
    retry: dict[str, ImageResult],
    coco: CocoWriter | None,
    version: str,
) -> tuple[list[dict[str, Any]], JobReport]:
    """Tasks, COCO and report from every image's record, in input order, as
    ``predict_files`` makes them; images recorded before this run count as ``skipped``."""
    tasks: list[dict[str, Any]] = []
    report = JobReport("predict", version)
    if coco is not None:  # as predict_files: the COCO file names its model
        coco.info.update(description="predicted by ovss-label", model_version=version)
    for key in keys:
        result = retry[key] if key in retry else records.read(key)
        collect(result, tasks, report, coco)
        if key in finished and result.task is not None:
            report.done, report.skipped = report.done - 1, report.skipped + 1
    return tasks, report
