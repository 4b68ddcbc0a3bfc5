"""Experiment tracking: iumask's trainings mirrored in MLflow (``--track mlflow``), where a team
already compares runs. Tracking never decides anything; the output folders stay the record.

* **Runs.** Each trained member is one tracked run (:meth:`Tracker.member`): its parameters are its
  identity (the manifest's inputs, nested keys joined with dots), its per-epoch metrics are the
  columns of its ``metrics.csv`` with step = epoch, its artifacts ``manifest.json``,
  ``metrics.csv`` and ``curves.png``. ``iumask run`` and ``iumask experiment`` open a parent run
  (:meth:`Tracker.parent`) that their members' runs nest under; the experiment tags each nested run
  with its arm and seed, adds its evaluation metrics, and logs the report to the parent.
* **Never deciding.** Without the package, ``--track mlflow`` stops before any work with the
  install command (:func:`require_mlflow`). A tracker that is unreachable or refuses a request,
  at the start or mid-run, is one warning line; from then on this process logs nothing more to
  it and the pipeline goes on (:class:`Connection`). MLflow's own patience for a dead server
  (about 4 minutes of retries per request) is shortened unless set (:data:`HTTP_PATIENCE`).
* **No double logging.** A member's run carries the digest of its identity and its folder as tags
  (:data:`IDENTITY_TAG`, :data:`FOLDER_TAG`). A training continues the unfinished run with both
  (a resumed checkpoint, a killed process), logging only the epochs after the last one logged; a
  finished run is never logged to again: a cache hit logs nothing, a retraining (``--overwrite``)
  opens a new run. A cached member that has no run (trained untracked) gets one from its files.
  Parent runs are found by their folder and continued.
* **Where.** ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the output
  folder (``<out>/mlruns/mlflow.db``, artifacts in ``<out>/mlruns/artifacts``): no server needed,
  and ``mlflow ui --backend-store-uri sqlite:///<out>/mlruns/mlflow.db`` shows it. SQLite rather
  than MLflow's file store, which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE`` is set.
* **Ranks.** Under torchrun only rank 0 tracks (:func:`open_tracker` gives the others
  :data:`NO_TRACKER`).

``mlflow`` is imported here only, and only when tracking is on: the CLI's start never imports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from iumask.config import TrackingConfig
from iumask.distributed import env_rank
from iumask.errors import IumaskError
from iumask.experiment.significance import SPLIT_METRICS
from iumask.files import json_digest
from iumask.progress import console, warn

MLFLOW_FIX = "pip install 'iumask[mlflow]'"
# The MLflow experiment of the train commands and ``run`` ($MLFLOW_EXPERIMENT_NAME wins); an
# experiment spec's runs go to an experiment named after the spec.
DEFAULT_EXPERIMENT = "iumask"
STORE_FOLDER = "mlruns"  # the default store, in the output folder
IDENTITY_TAG = "iumask.identity"  # a member run: json_digest of its identity
FOLDER_TAG = "iumask.folder"  # a member run: its folder; a parent run: the command's output folder
WEIGHTS_TAG = "iumask.weights_sha256"  # a finished member run: its weights (what evaluations name)
PARENT_TAG = "iumask.parent"  # a parent run: digest of (command, folder), by which a rerun finds it
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the run nests under that one in the UI
# MLflow retries a failed HTTP request 7 times with exponential backoff (about 4 minutes); tracking
# gives up after one failure anyway, so a dead server should cost seconds of training, not minutes.
# Set only where the environment does not say otherwise.
HTTP_PATIENCE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 # MLflow's client prints two "View run" lines on stdout per finished run of a server.
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
REASON_LENGTH = 200  # of an MLflow error in the warning (a refused connection's message is a paragraph)
# MLflow's limits on one request and one value.
MAX_PARAMS_PER_REQUEST, MAX_METRICS_PER_REQUEST, MAX_PARAM_LENGTH = 100, 1000, 6000
# MLflow's characters of metric and parameter names (on every platform): others become "_".
_UNSAFE_NAME = re.compile(r"[^\w.\- /]")


# ----------------------------------------------------------------------------- the interface


class RunLog(Protocol):
    """One tracked run. As a context manager: on exit the run ends FINISHED, or FAILED (KILLED on
    Ctrl-C) when an exception leaves the block."""

    def log_epochs(self, rows: list[dict]) -> None:
        """Per-epoch rows (:func:`iumask.training_log.epoch_rows`); those up to the last epoch this
        run has are skipped."""

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Final values (step 0); a metric the run already has is skipped."""

    def log_files(self, paths: Iterable[Path]) -> None:
        """Artifacts (files or folders), at the root of the run's artifacts; missing ones skipped."""

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def __enter__(self) -> RunLog: ...

    def __exit__(self, kind, value, traceback) -> None: ...


class Tracker(Protocol):
    """Opens tracked runs in one tracking store and experiment. ``run`` is the parent run the
    member runs nest under (:data:`NO_RUN` at the top)."""

    run: RunLog

    def member(self, folder: Path, identity: dict, title: str, tags: dict[str, Any],
               cached: bool = False) -> RunLog:
        """The run of the member trained into ``folder`` with ``identity``: the unfinished run to
        continue, or a new one; ``cached`` (a cache hit, nothing trained): :data:`NO_RUN` when a
        finished run exists, else the run to complete from the member's files."""

    def model_run(self, folder: Path, weights_sha256: str) -> RunLog:
        """The member run of the model in ``folder`` with these weights (to add its evaluation), or
        :data:`NO_RUN`."""

    def parent(self, title: str, command: str, folder: Path, tags: dict[str, Any]) -> Tracker:
        """A tracker whose member runs nest under the parent run of ``command`` in ``folder``
        (continued when a run of them exists); that run is its ``run``."""

    def tagged(self, prefix: str | None = None, **tags: Any) -> Tracker:
        """A tracker whose member runs also get ``tags`` (e.g. an experiment's arm and seed), and
        ``prefix`` in front of their names (``"<prefix>: <title>"``)."""


class NoRun:
    """A run that logs nothing (tracking off, or nothing to log)."""

    def log_epochs(self, rows: list[dict]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float]) -> None:
        pass

    def log_files(self, paths: Iterable[Path]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> NoRun:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        pass


NO_RUN = NoRun()


class NoTracker:
    """Tracking off: every run is :data:`NO_RUN`."""

    run: RunLog = NO_RUN

    def member(self, folder: Path, identity: dict, title: str, tags: dict[str, Any],
               cached: bool = False) -> RunLog:
        return NO_RUN

    def model_run(self, folder: Path, weights_sha256: str) -> RunLog:
        return NO_RUN

    def parent(self, title: str, command: str, folder: Path, tags: dict[str, Any]) -> Tracker:
        return self

    def tagged(self, prefix: str | None = None, **tags: Any) -> Tracker:
        return self


NO_TRACKER = NoTracker()


def require_mlflow():
    """The ``mlflow`` module, or the one-line error with the install command (before any work)."""
    try:
        import mlflow
    except ImportError as exc:
        raise IumaskError(f"--track mlflow needs the mlflow package ({exc}): {MLFLOW_FIX}") from None
    return mlflow


def open_tracker(config: TrackingConfig, out: Path, experiment: str | None = None) -> Tracker:
    """The tracker ``config`` asks for, for a command writing into ``out``; MLflow runs go to the
    experiment ``experiment`` (default ``$MLFLOW_EXPERIMENT_NAME``, else :data:`DEFAULT_EXPERIMENT`),
    created if needed. Only the package is checked here (before any work); the store is opened at
    the first run, so a command refused for its inputs leaves no store behind."""
    if not config.enabled or env_rank() != 0:
        return NO_TRACKER
    mlflow = require_mlflow()
    for key, value in HTTP_PATIENCE.items():
        os.environ.setdefault(key, value)
    uri, store = tracking_location(config.uri, Path(out))
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    return MlflowTracker(Connection(mlflow, uri, name, store))


def tracking_location(uri: str | None, out: Path) -> tuple[str, Path | None]:
    """(tracking URI, the folder of iumask's own store or None): ``uri``, else
    ``$MLFLOW_TRACKING_URI``, else the SQLite store in ``out``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = (Path(out) / STORE_FOLDER).resolve()
    return f"sqlite:///{store / 'mlflow.db'}", store


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ----------------------------------------------------------------------------- values


def metric_name(name: str) -> str:
    """``name`` in the characters MLflow accepts in metric and parameter names."""
    return _UNSAFE_NAME.sub("_", name)[:250]


def identity_params(identity: dict) -> dict[str, str]:
    """An identity as MLflow parameters: nested keys joined with dots, values as text (JSON for
    anything but a string), cut to MLflow's length limit (the manifest artifact has them whole)."""
    params: dict[str, str] = {}

    def add(value: Any, key: str) -> None:
        if isinstance(value, dict) and value:
            for inner_key, inner in value.items():
                add(inner, f"{key}.{inner_key}" if key else str(inner_key))
            return
        text = value if isinstance(value, str) else json.dumps(value)
        params[metric_name(key)] = text if len(text) <= MAX_PARAM_LENGTH else text[:MAX_PARAM_LENGTH - 1] + "…"

    add(identity, "")
    return params


def evaluation_metrics(result: dict, prefix: str) -> dict[str, float]:
    """An evaluation result (``iumask.stages.evaluate`` format) as metrics ``<prefix>/<metric>``:
    the split metrics of results.csv and ``<prefix>/iou_<class>``; undefined values left out."""
    values = {key: result.get(key) for key, _ in SPLIT_METRICS}
    values.update({f"iou_{name}": iou for name, iou in zip(result["classes"], result["iou"])})
    return {metric_name(f"{prefix}/{key}"): float(value) for key, value in values.items() if _defined(value)}


def _defined(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _tag_values(tags: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in tags.items() if value is not None}


# ----------------------------------------------------------------------------- MLflow


class Connection:
    """One tracking store and experiment, shared by a tracker, the trackers derived from it and their
    runs; opened by the first request (the experiment created if missing, in iumask's own store
    ``store`` with its artifacts beside the database). Every request goes through :meth:`call`: the
    first failure is one warning line and turns tracking off for the rest of the process (the
    pipeline never stops for its tracker, and waits for a dead one once, for MLflow's retries:
    :data:`HTTP_PATIENCE`)."""

    def __init__(self, mlflow, uri: str, experiment: str, store: Path | None):
        self.mlflow, self.uri, self.experiment, self.store = mlflow, uri, experiment, store
        self.client = self.experiment_id = None
        self.entities = mlflow.entities
        self.failed = False

    def call(self, what: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``, or None once tracking has failed."""
        if self.client is None:
            self._guarded(f"opening experiment {self.experiment!r}", self._open)
        return self._guarded(what, function, *args, **kwargs)

    def _open(self) -> None:
        artifact_root = None  # in another store: where MLflow puts them
        if self.store is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            # Beside the database (MLflow's default for a SQLite URI is ./mlruns of the working directory).
            artifact_root = (self.store / "artifacts").as_uri()
        with _quiet("mlflow.store.db.utils", "alembic"):  # a new SQLite store logs its table creation
            client = self.mlflow.tracking.MlflowClient(tracking_uri=self.uri)
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                self.experiment_id = client.create_experiment(self.experiment, artifact_location=artifact_root)
            elif experiment.lifecycle_stage != "active":
                raise IumaskError(f"the experiment is deleted; restore it (mlflow experiments restore "
                                  f"--experiment-id {experiment.experiment_id}) or name another")
            else:
                self.experiment_id = experiment.experiment_id
        self.client = client
        console.print(f"tracking: MLflow experiment {self.experiment!r} at {self.uri}", highlight=False,
                      soft_wrap=True)

    def _guarded(self, what: str, function, *args, **kwargs):
        if self.failed:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as exc:  # whatever the tracker raises (HTTP, database, refusal): never the pipeline's
            self.failed = True
            reason = " ".join(str(exc).split()) or type(exc).__name__
            reason = reason if len(reason) <= REASON_LENGTH else reason[:REASON_LENGTH - 1] + "…"
            warn(f"MLflow tracking at {self.uri} failed while {what} ({reason}); tracking is off for the rest of "
                 "this run, whose own files are complete")
            return None

    def find_runs(self, tag: str, value: str) -> list:
        """The active runs of the experiment with tag ``tag`` = ``value`` (a hex digest), newest first."""
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                                       order_by=["attributes.start_time DESC"])


class MlflowTracker:
    """The :class:`Tracker` of an MLflow store: member runs in one experiment, nested under
    ``parent_id`` (a parent run's) when set, with ``tags`` and the name ``prefix`` of :meth:`tagged`."""

    def __init__(self, connection: Connection, parent_id: str | None = None, tags: dict[str, Any] | None = None,
                 run: RunLog = NO_RUN, prefix: str | None = None):
        self.connection, self.parent_id, self.tags, self.run = connection, parent_id, dict(tags or {}), run
        self.prefix = prefix

    def member(self, folder: Path, identity: dict, title: str, tags: dict[str, Any],
               cached: bool = False) -> RunLog:
        digest = json_digest(identity)
        folder = str(Path(folder).resolve())
        title = f"{self.prefix}: {title}" if self.prefix else title
        found = self.connection.call(f"finding the run of {title}", self._member_run, digest, folder, identity, title,
                                     {**tags, **self.tags}, cached)
        return NO_RUN if found is None else found

    def _member_run(self, digest: str, folder: str, identity: dict, title: str, tags: dict, cached: bool) -> RunLog:
        runs = [r for r in self.connection.find_runs(IDENTITY_TAG, digest) if r.data.tags.get(FOLDER_TAG) == folder]
        if cached and any(r.info.status == "FINISHED" for r in runs):
            return NO_RUN  # logged when it was trained: nothing new
        unfinished = [r for r in runs if r.info.status != "FINISHED"]
        tags = _tag_values({**tags, IDENTITY_TAG: digest, FOLDER_TAG: folder, PARENT_RUN_TAG: self.parent_id})
        if unfinished:
            run = MlflowRun.continued(self.connection, unfinished[0], title)
            run.set_tags(tags)  # the continuing command's tags (e.g. a parent run of its own)
            return run
        return MlflowRun.created(self.connection, title, tags, identity_params(identity))

    def model_run(self, folder: Path, weights_sha256: str) -> RunLog:
        folder = str(Path(folder).resolve())

        def find() -> RunLog:
            # Equal weights in two folders (a deterministic training repeated) are two runs.
            runs = [r for r in self.connection.find_runs(WEIGHTS_TAG, weights_sha256)
                    if r.data.tags.get(FOLDER_TAG) == folder]
            return MlflowRun.continued(self.connection, runs[0], runs[0].info.run_name, keep_status=True) if runs \
                else NO_RUN

        found = self.connection.call(f"finding the run of {folder}", find)
        return NO_RUN if found is None else found

    def parent(self, title: str, command: str, folder: Path, tags: dict[str, Any]) -> Tracker:
        folder = str(Path(folder).resolve())
        key = json_digest({"command": command, "folder": folder})
        all_tags = _tag_values({**tags, PARENT_TAG: key, FOLDER_TAG: folder, "iumask.command": command})

        def open_parent() -> RunLog:
            runs = self.connection.find_runs(PARENT_TAG, key)
            if runs:
                return MlflowRun.continued(self.connection, runs[0], title)
            return MlflowRun.created(self.connection, title, all_tags, {})

        run = self.connection.call(f"opening the run of {title}", open_parent)
        if run is None:
            return self
        return MlflowTracker(self.connection, run.run_id, self.tags, run, self.prefix)

    def tagged(self, prefix: str | None = None, **tags: Any) -> Tracker:
        return MlflowTracker(self.connection, self.parent_id, {**self.tags, **tags}, self.run, prefix or self.prefix)


class MlflowRun:
    """A run in an MLflow store (through the tracker's :class:`Connection`), which knows what it
    already holds: its last epoch logged and its metric names."""

    def __init__(self, connection: Connection, run_id: str, title: str, last_epoch: int, metrics: set[str],
                 keep_status: bool = False):
        self.connection, self.run_id, self.title = connection, run_id, title
        self.last_epoch, self.metrics, self.keep_status = last_epoch, metrics, keep_status

    @classmethod
    def created(cls, connection: Connection, title: str, tags: dict[str, str], params: dict[str, str]) -> MlflowRun:
        client, entities = connection.client, connection.entities
        run = client.create_run(connection.experiment_id, tags=tags, run_name=title)
        items = [entities.Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_REQUEST):
            client.log_batch(run.info.run_id, params=items[start:start + MAX_PARAMS_PER_REQUEST])
        return cls(connection, run.info.run_id, title, 0, set())

    @classmethod
    def continued(cls, connection: Connection, run, title: str, keep_status: bool = False) -> MlflowRun:
        """A run found in the store (status set back to RUNNING unless ``keep_status``: adding
        evaluation metrics to a finished run leaves it finished)."""
        client = connection.client
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        if not keep_status and run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return cls(connection, run.info.run_id, title, max(steps, default=0), set(run.data.metrics), keep_status)

    def _log(self, metrics: list) -> bool:
        client = self.connection.client
        for start in range(0, len(metrics), MAX_METRICS_PER_REQUEST):
            client.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_REQUEST])
        return True

    def log_epochs(self, rows: list[dict]) -> None:
        new = [row for row in rows if row["epoch"] > self.last_epoch]
        if not new or self.connection.failed:
            return
        now = int(time.time() * 1000)
        metric = self.connection.entities.Metric
        items = [metric(metric_name(key), float(value), now, row["epoch"]) for row in new
                 for key, value in row.items() if key not in ("epoch", "step") and _defined(value)]
        if self.connection.call(f"logging epoch {new[-1]['epoch']} of {self.title}", self._log, items):
            self.last_epoch = new[-1]["epoch"]

    def log_metrics(self, metrics: dict[str, float]) -> None:
        new = {key: value for key, value in metrics.items() if key not in self.metrics}
        if not new or self.connection.failed:
            return
        now = int(time.time() * 1000)
        items = [self.connection.entities.Metric(key, value, now, 0) for key, value in new.items()]
        if self.connection.call(f"logging the metrics of {self.title}", self._log, items):
            self.metrics |= set(new)

    def log_files(self, paths: Iterable[Path]) -> None:
        for path in map(Path, paths):
            if not path.exists():
                continue
            client = self.connection.client
            if path.is_dir():
                self.connection.call(f"logging {path.name} of {self.title}", client.log_artifacts, self.run_id,
                                     str(path), path.name)
            else:
                self.connection.call(f"logging {path.name} of {self.title}", client.log_artifact, self.run_id,
                                     str(path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [self.connection.entities.RunTag(k, v) for k, v in _tag_values(tags).items()]
        if items:
            self.connection.call(f"tagging {self.title}", self.connection.client.log_batch, self.run_id, tags=items)

    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if self.keep_status:
            return
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        self.connection.call(f"ending the run of {self.title}", self.connection.client.set_terminated, self.run_id,
                             status)
