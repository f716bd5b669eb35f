"""The server's process-wide state: models, caches, executors, the event store.

Label Studio's protocol facts this honours (label_studio.md §1.3-1.5; Label Studio 1.23.2
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
- models load once per process, on first use, never at import; the feature cache is shared by
  all projects.

Executors (why several): tasks run in the bounded ``tasks`` pool; interactive clicks in their
own one-thread pool, so a click never queues behind a batch; JSON bodies and labeling configs
are parsed in the ``control`` pool, off the event loop. Webhooks are written by the event
store's own thread (``app.py``), so no prediction or parse can starve them, and ``/health``
needs no thread at all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import Any

from ovss_label import __version__
from ovss_label.logs import redact_text
from ovss_label.methods import METHODS
from ovss_label.ontologies import Vocabulary

from ..models.fingerprints import method_fingerprint
from ..models.sam import LoadedSam, build_sam
from ..proposers import (
    FeatureCache,
    PostprocessConfig,
    Proposer,
    create_proposer,
    proposal_to_instances,
    propose,
)
from .events import EventStore
from .interactive import has_prompt, interactive_prediction, label_for_text, text_prompt
from .media import MediaError, MediaFetcher
from .projects import Project, ProjectCache
from .settings import ServerSettings

log = logging.getLogger(__name__)

_SAM_METHODS = tuple(m for m in METHODS if "sam" in m)

Prediction = dict[str, Any]
NOT_NOW: list[Any] = []
"""A task's entry when it failed for now: zero predictions, so Label Studio asks again."""


class Engine:
    """Models, caches and workers shared by all requests (module docstring)."""

    def __init__(self, settings: ServerSettings, fetcher: MediaFetcher | None = None) -> None:
        self.settings = settings
        self.media = fetcher or MediaFetcher(settings.media)
        self.cache = FeatureCache(settings.cache_mb << 20)
        self.projects = ProjectCache(settings.method, settings.config_cache_mb << 20)
        self.tasks = ThreadPoolExecutor(settings.workers, thread_name_prefix="ovss-task")
        self.clicks = ThreadPoolExecutor(1, thread_name_prefix="ovss-click")
        self.control = ThreadPoolExecutor(2, thread_name_prefix="ovss-control")
        self.webhooks = ThreadPoolExecutor(1, thread_name_prefix="ovss-events")
        self._proposers: dict[str, Proposer] = {}
        self._sam: LoadedSam | None = None
        self._lock = threading.Lock()

    @cached_property
    def events(self) -> EventStore:
        """The webhook event store, created on first use (batch jobs never need it)."""
        return EventStore(self.settings.data_dir / "events.sqlite")

    def model_version(self, method: str) -> str:
        """What ``/setup`` reports and every prediction of ``method`` carries: the method and
        a fingerprint of the weight files it loads (another file under an official name is
        another version), computed without loading a model (``/setup`` has 3 s)."""
        s = self.settings
        fingerprint = method_fingerprint(method, sam_model=s.sam_model, tiny=s.tiny)
        return f"ovss-label-{__version__}-{method}-{fingerprint}"

    def proposer(self, method: str) -> Proposer:
        """The method's proposer, built once per process (thread-safe).

        Raises:
            ModelUnavailableError: It cannot be built (missing or unreadable weights, no memory).
        """
        with self._lock:
            if method not in self._proposers:
                options: dict[str, Any] = {"tiny": self.settings.tiny or None}
                options["device"] = self.settings.device
                if method in _SAM_METHODS:
                    options["feature_cache"] = self.cache
                    options["sam_model"] = self.settings.sam_model
                with _unavailable(method):
                    self._proposers[method] = create_proposer(method, **options)
            return self._proposers[method]

    def sam(self) -> LoadedSam:
        """The SAM for interactive prompts, built once per process.

        Raises:
            ModelUnavailableError: It cannot be built.
        """
        with self._lock:
            if self._sam is None:
                s = self.settings
                with _unavailable(s.sam_model):
                    self._sam = build_sam(s.sam_model, tiny=s.tiny or None, device=s.device)
            return self._sam

    def close(self) -> None:
        """Stops the executors (queued work is dropped)."""
        for pool in (self.tasks, self.clicks, self.control, self.webhooks):
            pool.shutdown(wait=False, cancel_futures=True)

    async def predict(
        self, tasks: list[Any], label_config: str, context: Any = None
    ) -> list[Prediction | list[Any]]:
        """One entry per task, in order (module docstring); with keypoint or rectangle regions
        in ``context``, SAM answers them instead (``interactive.py``).

        Raises:
            ValueError: ``context`` is malformed (the request's fault: a 400).
        """
        loop = asyncio.get_running_loop()
        interactive, text = has_prompt(context), text_prompt(context)
        # An answer shown to a user in the editor (Label Studio reads results[0] and stores
        # nothing) is always a prediction; only batch answers may be "nothing for now".
        live = interactive or text is not None
        try:
            project = await loop.run_in_executor(self.control, self.projects.get, label_config)
        except ValueError as exc:
            log.warning("labeling config refused for %d task(s): %s", len(tasks), exc)
            empty = self._empty(self.settings.method)
            return [empty if live else NOT_NOW for _ in tasks]
        if interactive:
            return await _each(self.clicks, self._interactive, tasks, project, context)
        if text:
            try:
                project = await loop.run_in_executor(self.tasks, self._text_query, project, text)
            except Exception as exc:  # e.g. missing weights: a logged reason, not a 500
                log.warning("text prompt: %s: %s", type(exc).__name__, _safe(exc))
                return [self._empty(project.method) for _ in tasks]
        entries = await _each(self.tasks, self._entry, tasks, project)
        return [self._empty(project.method) if live and e == NOT_NOW else e for e in entries]

    def _text_query(self, project: Project, text: str) -> Project:
        """The project with a one-query vocabulary: ``text``, named by the nearest label."""
        proposer = self.proposer(project.method)
        label = label_for_text(text, project.vocabulary, getattr(proposer, "text", None))
        query = Vocabulary((label,), ((text,),), project.vocabulary.templates)
        return replace(project, vocabulary=query)

    def _interactive(self, task: Any, project: Project, context: Any) -> Prediction:
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
            return self._empty(project.method)
        return {
            "result": result,
            "score": round(score, 4),
            "model_version": self.model_version(project.method),
        }

    def _entry(self, task: Any, project: Project) -> Prediction | list[Any]:
        prediction = self.predict_task(task, project)
        return NOT_NOW if prediction is None else prediction

    def predict_task(self, task: Any, project: Project) -> Prediction | None:
        """One task's prediction; a permanent failure gives an empty one, a failure that may
        pass gives None (nothing to store now); either way a logged reason."""
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            image = self._image(task, project)
            proposal = propose(self.proposer(project.method), image, project.vocabulary, self.cache)
            post = PostprocessConfig(min_score=project.min_score)  # the project's threshold
            instances = proposal_to_instances(proposal, post)
        except Exception as exc:  # any failure stays this task's: the batch must go on
            reason = f"{type(exc).__name__}: {_safe(exc)}"
            if _transient(exc):
                log.warning("task %s: no prediction now, to be retried: %s", task_id, reason)
                return None
            log.warning("task %s: no prediction: %s", task_id, reason)
            return self._empty(project.method)
        scores = [i.score for i in instances if i.score is not None]
        return {
            "result": project.output.results(instances, post.min_area),
            "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
            "model_version": self.model_version(project.method),
        }

    def _image(self, task: Any, project: Project) -> Any:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise MediaError("the task is not an object with a data object")
        task_id = task.get("id")
        url = task["data"].get(project.output.data_key)
        return self.media.image(url, task_id if isinstance(task_id, int) else None)

    def _empty(self, method: str) -> Prediction:
        return {"result": [], "score": 0.0, "model_version": self.model_version(method)}


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
