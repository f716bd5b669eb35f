"""The server's process-wide state: models, caches, executors, the event store.

Label Studio's protocol facts this honours (docs/label_studio.md §1.3-1.5; Label Studio 1.23.2
``ml/models.py`` ``_get_predictions_from_ml_backend`` and ``predict_tasks``):

- one entry per task, in task order, never an empty list (Label Studio drops a batch whose
  count differs);
- the same ``model_version`` in ``/setup`` and on every prediction (Label Studio skips tasks that
  already have a prediction of the version ``/setup`` reports; a mismatch duplicates them);
- a task that fails for good (not an image, too big, a refused URL) gets an empty ``result`` and
  a logged reason, never a failed batch: Label Studio stores it and does not ask again;
- a task that fails for now (a timeout, a 5xx, a failed token refresh, a model that cannot load,
  an unusable labeling config) gets the entry ``[]``, a list of zero predictions: Label Studio
  stores nothing for it, so the next "Retrieve predictions" asks again;
- models load once per process, on first use, never at import, from one ``ModelPool`` (a SAM
  or a CLIP used by several methods and by clicks is held once); one feature cache, shared by
  all projects and methods, also holds derived maps (one memory budget).

Which model serves a project (``choice.py``): its active trained version (``fmbseg`` with the
version's head, read from SQLite per request, so a CLI ``models activate`` is seen at the next
request), else its config's zero-shot method. ``head`` below is that head file (None: the
method's default), threaded through planning, identities, proposers and every prediction.

A prediction's ``score`` is calibrated where a map exists (``proposers/confidence.py``): a
trained version's own, else the project's zero-shot map for that method and model, measured by
its last training job (``learning/calibrations.py``, re-read when the file changes); else raw.

A method's ``model_version`` is its identity (``models/identity.py``): ``/setup`` computes it
from the method's plan without loading anything (it has 3 s); once the proposer is built, its
own identity (from the files it loaded) is reported everywhere, and tests hold the two equal.

Executors (why several): tasks run in the bounded ``tasks`` pool; interactive clicks in their
own one-thread pool, so a click never queues behind a batch; JSON bodies and labeling configs
are parsed in the ``control`` pool, off the event loop. Webhooks are written by the event
store's own thread (``app.py``), so no prediction or parse can starve them, and ``/health``
needs no thread at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import Any

from ovss_label.logs import redact_text
from ovss_label.ontologies import Vocabulary

from ..learning.calibrations import ZeroShotCalibrations, dense_method
from ..learning.jobs import JobStore
from ..learning.loop import LearningLoop
from ..learning.versions import VersionStore
from ..models.identity import SEPARATOR, ModelIdentity
from ..models.pool import ModelPool, WeightRef
from ..models.sam import LoadedSam
from ..proposers import (
    FeatureCache,
    MethodPlan,
    PostprocessConfig,
    Proposer,
    method_plan,
    proposal_to_instances,
    propose,
)
from ..proposers.confidence import Calibration, task_score
from ..proposers.refine import SamRefined
from ..store import events_path
from .choice import Choice, Chooser, ProposerCache
from .events import EventStore
from .interactive import has_prompt, interactive_prediction, label_for_text, text_prompt
from .media import MediaError, MediaFetcher
from .projects import Project, ProjectCache
from .settings import ServerSettings

log = logging.getLogger(__name__)

Prediction = dict[str, Any]
NOT_NOW: list[Any] = []
"""A task's entry when it failed for now: zero predictions, so Label Studio asks again."""


class Engine:
    """Models, caches and workers shared by all requests (module docstring)."""

    def __init__(self, settings: ServerSettings, fetcher: MediaFetcher | None = None) -> None:
        self.settings = settings
        self.media = fetcher or MediaFetcher(settings.media)
        self.cache = FeatureCache(settings.cache_mb << 20)
        self.pool = ModelPool(settings.device)
        self.learning: LearningLoop | None = None  # ``serve --learn`` sets it (app.py: webhooks)
        self.projects = ProjectCache(settings.method, settings.config_cache_mb << 20)
        self.tasks = ThreadPoolExecutor(settings.workers, thread_name_prefix="ovss-task")
        self.clicks = ThreadPoolExecutor(1, thread_name_prefix="ovss-click")
        self.control = ThreadPoolExecutor(2, thread_name_prefix="ovss-control")
        self.webhooks = ThreadPoolExecutor(1, thread_name_prefix="ovss-events")
        self._proposers = ProposerCache()
        self._chooser = Chooser(lambda: self.versions)

    @cached_property
    def events(self) -> EventStore:
        """The webhook event store, created on first use (batch jobs never need it)."""
        return EventStore(events_path(self.settings.data_dir))

    @cached_property
    def jobs(self) -> JobStore:
        """The training-job table, in the event store's database (``learning/jobs.py``)."""
        return JobStore(events_path(self.settings.data_dir))

    @cached_property
    def versions(self) -> VersionStore:
        """Each project's trained versions (``learning/versions.py``), same database."""
        return VersionStore(events_path(self.settings.data_dir), self.settings.data_dir)

    @cached_property
    def calibrations(self) -> ZeroShotCalibrations:
        """Each project's zero-shot calibration maps (``learning/calibrations.py``)."""
        return ZeroShotCalibrations(self.settings.data_dir)

    def calibration(
        self, proposer: Proposer, project_id: int | None, head: str | None
    ) -> Calibration | None:
        """The map a prediction's score goes through (module docstring): a trained head's
        own; for a zero-shot method, the project's map measured on the same dense model."""
        dense = proposer.dense if isinstance(proposer, SamRefined) else proposer
        found = self.zero_shot_calibration(project_id, head, dense.name, dense.model_version)
        return found if found is not None else proposer.calibration

    def zero_shot_calibration(
        self, project_id: int | None, head: str | None, method: str, version: str | None = None
    ) -> Calibration | None:
        """The project's map for ``method``'s dense part measured on ``version`` (default: the
        dense method's ``model_version``, planned); None with a trained ``head``, without a
        project, or when no job has measured it."""
        if head is not None or project_id is None:
            return None
        dense = dense_method(method)
        measured = version if version is not None else self.model_version(dense)
        return self.calibrations.get(project_id, dense, measured)

    def choice(self, project_id: int | None, config_method: str) -> Choice:
        """``(method, head)`` serving the project now: ``fmbseg[+sam]`` with its active
        version's head file, else ``(config_method, None)`` (``choice.py``; one SQLite read)."""
        return self._chooser(project_id, config_method)

    def plan(self, method: str, head: str | None = None) -> MethodPlan:
        """The method as this server runs it (its SAM, twins or not; ``fmbseg`` with ``head``,
        else the configured head); loads nothing. Planned anew each call: a weight file
        replaced since is another identity."""
        s = self.settings
        options: dict[str, Any] = {"tiny": s.tiny}
        if "sam" in method:
            options["sam_model"] = s.sam_model
        if method.startswith("fmbseg") and (head or s.fmbseg_head):
            options["head"] = head or s.fmbseg_head
        return method_plan(method, **options)

    def identity(self, method: str, head: str | None = None) -> ModelIdentity:
        """The identity ``method``'s predictions carry: the built proposer's, else the plan's
        (equal; module docstring)."""
        built = self._proposers.peek((method, head))  # never waits behind a model being built
        return built.identity if built is not None else self.plan(method, head).identity

    def warm(self, methods: Iterable[str]) -> dict[str, str]:
        """Every method's ``model_version``, computed now: weight files are hashed here (once
        per machine and file version, logged), not in a ``/setup`` that has 3 s; a method that
        cannot be planned is ``<method>·unavailable`` (:meth:`model_version`)."""
        return {method: self.model_version(method) for method in methods}

    def model_version(self, method: str, head: str | None = None) -> str:
        """What ``/setup`` reports and every prediction of ``method`` carries;
        ``<method>·unavailable`` when the method cannot even be planned (e.g. ``OVSS_PNP_TUNED``
        names no tuned configuration): its tasks then fail for now, with the reason logged,
        and ``/setup`` still answers."""
        try:
            return self.identity(method, head).version
        except (OSError, ValueError) as exc:
            log.warning("%s: no model version: %s", method, _safe(exc))
            return f"{method}{SEPARATOR}unavailable"

    def proposer(self, method: str, head: str | None = None) -> Proposer:
        """The proposer of ``method`` (with ``head``), built once from the pool and kept
        (``choice.ProposerCache``; thread-safe, other keys and /setup do not wait).

        Raises:
            ModelUnavailableError: It cannot be built (missing or unreadable weights, no memory).
        """

        def build() -> Proposer:
            with _unavailable(method):
                return self.plan(method, head).build(self.pool, self.cache)

        return self._proposers.get((method, head), build)

    def sam(self) -> LoadedSam:
        """The SAM for interactive prompts: the pool's, shared with the ``+sam`` methods.

        Raises:
            ModelUnavailableError: It cannot be built.
        """
        s = self.settings
        with _unavailable(s.sam_model):
            sam: LoadedSam = self.pool.load(WeightRef(s.sam_model, None, s.tiny))
        return sam

    def close(self) -> None:
        """Stops the executors (queued work is dropped)."""
        for pool in (self.tasks, self.clicks, self.control, self.webhooks):
            pool.shutdown(wait=False, cancel_futures=True)

    def served(self, label_config: str, project_id: int | None) -> tuple[Project, str | None]:
        """The parsed config with the method serving ``project_id`` now, and its head
        (:meth:`choice`); raises the config's ValueError."""
        project = self.projects.get(label_config)
        method, head = self.choice(project_id, project.method)
        return replace(project, method=method), head

    async def predict(
        self,
        tasks: list[Any],
        label_config: str,
        context: Any = None,
        project_id: int | None = None,
    ) -> list[Prediction | list[Any]]:
        """One entry per task, in order (module docstring), by the model serving
        ``project_id`` (:meth:`choice`); with keypoint or rectangle regions in ``context``, SAM
        answers them instead (``interactive.py``).

        Raises:
            ValueError: ``context`` is malformed (the request's fault: a 400).
        """
        loop = asyncio.get_running_loop()
        interactive, text = has_prompt(context), text_prompt(context)
        # An answer shown to a user in the editor (Label Studio reads results[0] and stores
        # nothing) is always a prediction; only batch answers may be "nothing for now".
        live = interactive or text is not None
        try:
            project, head = await loop.run_in_executor(
                self.control, self.served, label_config, project_id
            )
        except ValueError as exc:
            log.warning("labeling config refused for %d task(s): %s", len(tasks), exc)
            if not live:
                return [NOT_NOW for _ in tasks]
            chosen = await loop.run_in_executor(
                self.control, self.choice, project_id, self.settings.method
            )
            return [self._empty(*chosen) for _ in tasks]
        if interactive:
            return await _each(self.clicks, self._interactive, tasks, project, context, head)
        label = None
        if text:
            try:
                project, label = await loop.run_in_executor(
                    self.tasks, self._text_query, project, text, head
                )
            except Exception as exc:  # e.g. missing weights: a logged reason, not a 500
                log.warning("text prompt: %s: %s", type(exc).__name__, _safe(exc))
                return [self._empty(project.method, head) for _ in tasks]
        entries = await _each(self.tasks, self._entry, tasks, project, label, head, project_id)
        empty = self._empty(project.method, head)
        return [empty if live and e == NOT_NOW else e for e in entries]

    def _text_query(
        self, project: Project, text: str, head: str | None = None
    ) -> tuple[Project, str]:
        """The project with a one-class vocabulary ``text``, and the label its masks get: the
        nearest by the method's own text embedder. The text is the class name and its one
        synonym, so methods that caption with names (PnP-OVSS) read the text too."""
        proposer = self.proposer(project.method, head)
        label = label_for_text(text, project.vocabulary, proposer.text_embedder())
        query = Vocabulary((text,), ((text,),), project.vocabulary.templates)
        return replace(project, vocabulary=query), label

    def _interactive(
        self, task: Any, project: Project, context: Any, head: str | None = None
    ) -> Prediction:
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            image = self._image(task, project)
            result, score = interactive_prediction(
                self.sam(), self.cache, image, context, project.output, project.vocabulary.names
            )
        except Exception as exc:  # the user's click must not become a 500
            log.warning(
                "task %s: no interactive mask: %s: %s", task_id, type(exc).__name__, _safe(exc)
            )
            return self._empty(project.method, head)
        return {
            "result": result,
            "score": round(score, 4),
            "model_version": self.model_version(project.method, head),
        }

    def _entry(
        self, task: Any, project: Project, label: str | None, head: str | None,
        project_id: int | None,
    ) -> Prediction | list[Any]:  # fmt: skip
        prediction = self.predict_task(task, project, label, head, project_id)
        return NOT_NOW if prediction is None else prediction

    def predict_task(
        self, task: Any, project: Project, label: str | None = None, head: str | None = None,
        project_id: int | None = None,
    ) -> Prediction | None:  # fmt: skip
        """One task's prediction by ``project.method`` (with ``head``: see :meth:`served`); a
        permanent failure gives an empty one, a failure that may pass gives None (nothing to
        store now); either way a logged reason. ``label``, when given, names every instance (a
        text prompt's answer is one project label). ``project_id`` picks the project's
        zero-shot calibration (:meth:`calibration`)."""
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            image = self._image(task, project)
            proposer = self.proposer(project.method, head)
            proposal = propose(proposer, image, project.vocabulary, self.cache)
            post = PostprocessConfig(min_score=project.min_score)  # the project's threshold
            instances = proposal_to_instances(proposal, post)
            score = task_score(proposal, self.calibration(proposer, project_id, head))
            for instance in instances if label is not None else []:
                instance.label = label
        except Exception as exc:  # any failure stays this task's: the batch must go on
            reason, transient = task_failure(exc)
            if transient:
                log.warning("task %s: no prediction now, to be retried: %s", task_id, reason)
                return None
            log.warning("task %s: no prediction: %s", task_id, reason)
            return self._empty(project.method, head)
        return {
            "result": project.output.results(instances, post.min_area),
            "score": round(score, 4),
            "model_version": proposer.model_version,
        }

    def _image(self, task: Any, project: Project) -> Any:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise MediaError("the task is not an object with a data object")
        task_id = task.get("id")
        url = task["data"].get(project.output.data_key)
        return self.media.image(url, task_id if isinstance(task_id, int) else None)

    def _empty(self, method: str, head: str | None = None) -> Prediction:
        return {"result": [], "score": 0.0, "model_version": self.model_version(method, head)}


async def _each(pool: ThreadPoolExecutor, work: Any, tasks: list[Any], *args: Any) -> list[Any]:
    """``work(task, *args)`` for every task in ``pool``, results in task order."""
    loop = asyncio.get_running_loop()
    return list(await asyncio.gather(*(loop.run_in_executor(pool, work, t, *args) for t in tasks)))


class ModelUnavailableError(RuntimeError):
    """A model could not be built: the server's problem, not the task's (retried later)."""


@contextmanager
def _unavailable(name: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise ModelUnavailableError(f"{name} cannot be loaded: {reason}") from exc


def task_failure(exc: Exception) -> tuple[str, bool]:
    """How a task's failure is told: ``(reason without credentials, transient)``; the one rule
    for the server, ``predict --project`` and its Ray path."""
    return f"{type(exc).__name__}: {_safe(exc)}", _transient(exc)


def _transient(exc: Exception) -> bool:
    """True when the same task may succeed later: media says so for its errors; other value
    errors are about the input (not an image, too elongated); anything else (a model that
    cannot load, out of memory, a bug) is the server's, not the task's."""
    if isinstance(exc, MediaError):
        return exc.transient
    return not isinstance(exc, ValueError)


def _safe(exc: Exception) -> str:
    """An exception message without query strings or credentials."""
    clean: str = redact_text(str(exc))
    return clean
