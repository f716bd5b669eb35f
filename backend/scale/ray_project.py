"""``ovss-label predict --project --ray``: ``server/batch.py``'s job as a Ray Data pipeline.

The driver lists the project's tasks and skips those that already carry a prediction of the
model version serving the project (as ``batch.predict_project``: Label Studio's predictions
are the run's state, so a rerun resumes and a repeated run posts nothing) → CPU tasks fetch and
decode each task's image with the server's media rules → proposer actors (the server's engine
builds each one) propose and score → CPU tasks post-process → the driver posts each prediction
through the SDK as its row arrives. Each stage is the code ``Engine.predict_task`` runs, with
its failure rules: a task that fails for now gets nothing (the next run tries it again), one
that fails for good gets an empty prediction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ovss_label.converters import ResultTargets

from ..jobs import JobReport
from ..proposers import PostprocessConfig, Proposer, proposal_to_instances
from ..proposers.confidence import Calibration
from ..server.batch import project_work
from ..server.engine import Engine, task_failure
from ..server.media import MediaError, MediaFetcher
from ..server.settings import MediaPolicy, ServerSettings
from .cluster import RayOptions, cluster_pool, connected, run_pipeline
from .stages import Decode, ProposeActor, proposal_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskErrors:
    """``Engine.predict_task``'s rules: every exception stays its task's; a reason without
    credentials; transient as the engine decides (``engine.task_failure``)."""

    catches: tuple[type[Exception], ...] = (Exception,)

    def describe(self, exc: Exception, item: str) -> tuple[str, bool]:
        """``(reason, transient)``."""
        return task_failure(exc)


@dataclass(frozen=True)
class EngineProposer:
    """Builds the proposer the server would serve (``Engine.proposer``) in an actor; with
    ``calibration`` (the project's zero-shot map, read by the driver: workers need not see
    its data directory), its scores go through it as the server's do."""

    settings: ServerSettings
    method: str
    head: str | None
    calibration: Calibration | None = None

    def __call__(self, device: str) -> Proposer:
        proposer = Engine(replace(self.settings, device=device)).proposer(self.method, self.head)
        if self.calibration is not None:  # the actor's own proposer: the map is private to it
            proposer.calibration = self.calibration
        return proposer


@dataclass(frozen=True)
class TaskImage:
    """The decode task's loader: a task's image as ``Engine._image`` fetches it."""

    media: MediaPolicy
    data_key: str

    def __call__(self, row: dict[str, Any]) -> NDArray[np.uint8]:
        task = json.loads(row["task"])
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise MediaError("the task is not an object with a data object")
        task_id = task.get("id")
        url = task["data"].get(self.data_key)
        image: NDArray[np.uint8] = _fetcher(self.media).image(
            url, task_id if isinstance(task_id, int) else None
        )
        return image


@lru_cache(maxsize=4)
def _fetcher(media: MediaPolicy) -> MediaFetcher:
    """One fetcher per worker process and policy (its HTTP client and decoded-image cache)."""
    return MediaFetcher(media)


def predict_project_ray(
    engine: Engine, client: Any, project_id: int, *, options: RayOptions | None = None
) -> JobReport:
    """``batch.predict_project`` on Ray (module docstring); the same report.

    Raises:
        RayUnavailableError: Ray is not installed.
        RayRunError: The pipeline failed; a rerun resumes (posted predictions stay).
    """
    parsed, head, version, done, tasks = project_work(engine, client, project_id)
    report = JobReport(f"predict --project {project_id}", version)
    report.skipped = sum(1 for task in tasks if task.get("id") in done)
    items = [{"item": f"task {task.get('id')}", "id": task.get("id"), "task": json.dumps(task)}
             for task in tasks if task.get("id") not in done]  # fmt: skip
    if not items:
        return report
    errors = TaskErrors()
    calibration = engine.zero_shot_calibration(project_id, head, parsed.method)
    build = EngineProposer(engine.settings, parsed.method, head, calibration)
    finish = partial(finish_task, output=parsed.output, min_score=parsed.min_score,
                     version=version)  # fmt: skip
    with connected() as ray:
        pool = cluster_pool(ray, options or RayOptions())
        actor_args = (build, version, parsed.vocabulary, errors, pool)
        decode = Decode(TaskImage(engine.settings.media, parsed.output.data_key), errors)
        for row in run_pipeline(items, decode, ProposeActor, actor_args, finish, pool):
            _post(client, row, report)
    return report


def finish_task(
    row: dict[str, Any], output: ResultTargets, min_score: float, version: str
) -> dict[str, Any]:
    """The post-processing task: the prediction ``Engine.predict_task`` returns, as JSON
    ("" when the task failed for now); returns the small row the driver posts."""
    error, transient = row["error"], row["transient"]
    prediction: dict[str, Any] | None = None
    if not error:
        try:
            post = PostprocessConfig(min_score=min_score)  # the project's threshold
            instances = proposal_to_instances(proposal_of(row), post)
            prediction = {"result": output.results(instances, post.min_area),
                          "score": round(row["score"], 4), "model_version": version}  # fmt: skip
        except Exception as exc:  # as the engine: any failure stays this task's
            error, transient = TaskErrors().describe(exc, row["item"])
    if prediction is None and not transient:  # failed for good: an empty prediction
        prediction = {"result": [], "score": 0.0, "model_version": version}
    text = json.dumps(prediction) if prediction is not None else ""
    return {"item": row["item"], "id": row["id"], "prediction": text, "error": error}


def _post(client: Any, row: dict[str, Any], report: JobReport) -> None:
    """Posts one row's prediction (the driver: the SDK client never leaves it)."""
    if not row["prediction"]:
        log.warning("%s: no prediction now, to be retried: %s", row["item"], row["error"])
        report.retry += 1
        return
    if row["error"]:
        log.warning("%s: no prediction: %s", row["item"], row["error"])
    prediction = json.loads(row["prediction"])
    report.count("empty", not prediction["result"])
    client.predictions.create(task=row["id"], result=prediction["result"],
                              score=prediction["score"],
                              model_version=prediction["model_version"])  # fmt: skip
    report.done += 1
