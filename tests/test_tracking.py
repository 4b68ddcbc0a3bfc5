"""MLflow tracking (``--track mlflow``, issue 29 §1) against a real MLflow, read back through
MLflow's own client: tiny trainings into the local SQLite store (no server) and into a tracking
server that this module starts on 127.0.0.1, a kill and resume that logs no epoch twice, cache hits
that log nothing new, a member trained untracked that gets its run from its files, a tiny experiment
as one MLflow experiment with a parent run and a nested run per arm × seed, and a tracker that is
down at the start or dies mid-run: one warning line, and the run finishes with its files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from cli_runner import TINY_TRAIN, iumask
from test_store_reliability import killed

from iumask.artifacts import WEIGHTS_FILE
from iumask.config import TrackingConfig
from iumask.errors import IumaskError
from iumask.experiment.spec import parse_spec
from iumask.files import json_digest
from iumask.tracking import FOLDER_TAG, IDENTITY_TAG, MlflowRun, identity_params

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MEMBER_FILES = {"manifest.json", "metrics.csv", "curves.png"}


@pytest.fixture(autouse=True)
def no_tracking_environment(monkeypatch):
    """The user's MLflow settings never reach these tests."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data(make_synthetic):
    return make_synthetic("tracking")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrackingServer:
    """``mlflow server`` on 127.0.0.1 (SQLite backend, artifacts proxied into a folder), started on
    first use of :attr:`uri` (again after :meth:`kill`)."""

    def __init__(self, folder: Path):
        self.folder, self.process, self.port = folder, None, None

    @property
    def uri(self) -> str:
        if self.process is None:
            self.start()
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
                   "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"]
        # No job runner (it starts a dozen consumer processes the tests do not need); its own session,
        # so that a kill takes the server and its uvicorn worker together.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", OMP_NUM_THREADS="1")
        self.log = open(self.folder / f"server-{self.port}.log", "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / f"server-{self.port}.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise AssertionError(f"mlflow server did not answer in 180 s: {(self.folder / 'server.log').read_text()}")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):  # a server that failed to start is gone already
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.log.close()
            self.process = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = TrackingServer(tmp_path_factory.mktemp("mlflow-server"))
    yield started
    started.kill()


def local_uri(out: Path) -> str:
    """The default store of a command writing into ``out``."""
    return f"sqlite:///{(out / 'mlruns' / 'mlflow.db').resolve()}"


def runs_of(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def history(client: MlflowClient, run, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def member_identity(manifest: dict, run) -> dict:
    """The identity the member's run was found by: the manifest's entries that are parameters."""
    return {key: manifest[key] for key in manifest if any(p == key or p.startswith(f"{key}.") for p in run.data.params)}


def check_member_run(client: MlflowClient, run, folder: Path, epochs: int) -> None:
    """The run holds the member's identity as parameters, every epoch of its metrics.csv once
    (step = epoch, the very values), and its files."""
    manifest = json.loads((folder / "manifest.json").read_text())
    identity = member_identity(manifest, run)
    assert run.info.status == "FINISHED"
    assert run.data.tags[IDENTITY_TAG] == json_digest(identity) and run.data.tags[FOLDER_TAG] == str(folder.resolve())
    assert run.data.params == identity_params(identity)
    assert run.data.params["train_options.epochs"] == str(epochs) and run.data.params["encoder"] == "mobilenet_v2"
    assert run.data.params["dataset_fingerprint"] == manifest["dataset_fingerprint"]
    rows = csv_rows(folder / "metrics.csv")
    assert len(rows) == epochs
    for column in ("loss", "val_miou", "lr_decoder", "iou_building"):
        assert history(client, run, column) == [(int(r["epoch"]), float(r[column])) for r in rows], column
    assert history(client, run, "val_miou") == [(h["epoch"], h["val_miou"]) for h in manifest["history"]]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == MEMBER_FILES
    with tempfile.TemporaryDirectory() as scratch:
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json", scratch)).read_text())
    # The manifest as it was saved (an evaluation later caches its PAvPU threshold in the file).
    saved = (*identity, "weights_sha256")
    assert {k: logged[k] for k in saved} == {k: manifest[k] for k in saved}


# ----------------------------------------------------------------------------- local store, no server


def test_training_is_logged_to_the_local_store_once(data, tmp_path, capsys):
    out = tmp_path / "baseline"
    train = ["train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "2"]
    iumask(*train, "--track", "mlflow")
    client = MlflowClient(tracking_uri=local_uri(out))
    (run,) = runs_of(client, "iumask")
    check_member_run(client, run, out / "mobilenet_v2", epochs=2)
    assert run.data.tags["stage"] == "baseline" and run.data.tags["seed"] == "0"

    # A cache hit (here through a config file's keys) logs nothing new: no second run, no second epoch.
    config = tmp_path / "tracking.toml"
    config.write_text('track = "mlflow"\n')
    capsys.readouterr()
    iumask(*train, "--config", config)
    assert "cache hit" in capsys.readouterr().err
    (again,) = runs_of(client, "iumask")
    assert again.info.run_id == run.info.run_id and len(client.get_metric_history(run.info.run_id, "loss")) == 2


def test_member_trained_untracked_gets_its_run_from_its_files(tiny_baseline, tmp_path, monkeypatch):
    """$MLFLOW_TRACKING_URI is honoured; the cache hit of a member trained without tracking creates
    its run from its manifest and metrics.csv, once."""
    data, baseline = tiny_baseline(tmp_path)
    uri = local_uri(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "mlruns").mkdir(parents=True)
    # A store of the user's own keeps MLflow's default artifact place, ./mlruns of the working
    # directory: this test's, not the repository's.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "backfilled")
    for _ in range(2):
        iumask("train-baseline", "--data", data, "--out", baseline, *TINY_TRAIN, "--track", "mlflow")
    client = MlflowClient(tracking_uri=uri)
    (run,) = runs_of(client, "backfilled")
    check_member_run(client, run, baseline / "mobilenet_v2", epochs=1)
    assert not (baseline / "mlruns").exists()  # the environment's store, not the default one
    assert any((tmp_path / "mlruns").rglob("manifest.json"))  # MLflow's default artifact root


def test_killed_training_resumes_its_run_without_logging_an_epoch_twice(data, tmp_path):
    """SIGKILL as epoch 2's checkpoint is written (epoch 2 is logged by then, its checkpoint is not):
    the rerun resumes from epoch 1's checkpoint, trains epoch 2 again and continues the same run,
    which ends with each epoch once."""
    out = tmp_path / "baseline"
    train = ["train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "2", "--checkpoint-every",
             "0", "--track", "mlflow"]
    # A checkpoint is two opens (its temporary file's creation, then its write): the 3rd is epoch 2's.
    killed(train, "open", r"mobilenet_v2/checkpoint", nth=3)
    client = MlflowClient(tracking_uri=local_uri(out))
    (run,) = runs_of(client, "iumask")
    assert run.info.status == "RUNNING" and [s for s, _ in history(client, run, "loss")] == [1, 2]
    assert not (out / "mobilenet_v2" / "manifest.json").exists()
    iumask(*train)
    (resumed,) = runs_of(client, "iumask")
    assert resumed.info.run_id == run.info.run_id
    check_member_run(client, resumed, out / "mobilenet_v2", epochs=2)


def test_track_mlflow_without_the_package_stops_before_any_work(data, tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "mlflow", None)  # import fails: not installed
        iumask("train-baseline", "--data", data, "--out", tmp_path / "out", *TINY_TRAIN, "--track", "mlflow",
               expect=2)
    err = capsys.readouterr().err
    assert "pip install 'iumask[mlflow]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tracking_options_are_checked(data, tmp_path, capsys):
    iumask("train-baseline", "--data", data, "--out", tmp_path / "out", *TINY_TRAIN, "--tracking-uri",
           "http://127.0.0.1:1", expect=2)
    assert "--tracking-uri http://127.0.0.1:1: tracking is off; add --track mlflow" in capsys.readouterr().err
    iumask("train-baseline", "--data", data, "--out", tmp_path / "out", *TINY_TRAIN, "--track", "wandb", expect=2)
    assert "'wandb' is not one of 'none', 'mlflow'" in capsys.readouterr().err
    # A command refused for its inputs leaves no tracking store (the store opens at the first run).
    iumask("train-baseline", "--data", tmp_path / "missing", "--out", tmp_path / "out", *TINY_TRAIN, "--track",
           "mlflow", expect=2)
    assert not (tmp_path / "out").exists()
    spec = {"data": {"root": str(data)}, "arms": [{"name": "regular"}], "track": "mlfow"}
    with pytest.raises(IumaskError, match=r"spec.toml: \[top level\] --track must be one of none, mlflow"):
        parse_spec(spec, tmp_path / "spec.toml")
    spec.update(track="mlflow", tracking_uri="http://tracker:5000")
    tracking = parse_spec(spec, tmp_path / "spec.toml").tracking
    assert tracking == TrackingConfig("mlflow", "http://tracker:5000")
    assert tracking.override(None, None) == tracking  # the command line gives neither: the spec's
    assert tracking.override(None, "sqlite:///x.db") == TrackingConfig("mlflow", "sqlite:///x.db")
    assert tracking.override("none", None) == TrackingConfig()  # --track none drops the spec's URI


def test_a_tracker_down_at_the_start_is_one_warning(data, tmp_path, capsys):
    out = tmp_path / "out"
    iumask("train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--track", "mlflow", "--tracking-uri",
           f"http://127.0.0.1:{free_port()}")  # nothing listens there
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "MLflow tracking at http://127.0.0.1:" in warnings[0], warnings
    assert {p.name for p in (out / "mobilenet_v2").iterdir()} >= MEMBER_FILES | {WEIGHTS_FILE}


NAMES = ("mobilenet_v2", "mobilenet_v2-2")


def test_run_nests_its_members_and_logs_their_evaluations(data, tmp_path):
    """``iumask run --online`` with two members: a parent run with results.json; the baseline's
    members and the online members (trained jointly) nested, each with its evaluation; the
    ensembles' evaluations on the parent."""
    out = tmp_path / "run"
    iumask("run", "--data", data, "--out", out, *TINY_TRAIN, "--encoder", "mobilenet_v2", "--online", "--track",
           "mlflow")
    client = MlflowClient(tracking_uri=local_uri(out))
    runs = runs_of(client, "iumask")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.run_name == "run run" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"results.json", "results.csv"}
    members = {(r.data.tags["stage"], r.data.tags["member"]): r for r in runs if r is not parent}
    assert set(members) == {(stage, name) for stage in ("baseline", "online") for name in NAMES}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in members.values())
    assert [members["online", name].data.tags["seed"] for name in NAMES] == ["0", "1"]  # member k: seed + k
    results = json.loads((out / "results.json").read_text())["results"]
    for (stage, name), run in members.items():
        folder = out / stage / name
        check_member_run(client, run, folder, epochs=1)
        (mine,) = [r for r in results if Path(r["path"]) == folder.resolve()]
        assert run.data.metrics["val/miou"] == mine["miou"] and run.data.metrics["val/ece"] == mine["ece"]
    ensembles = [r for r in results if r["path"].endswith("ensemble.json")]
    assert len(ensembles) == 2
    for entry in ensembles:
        assert parent.data.metrics[f"{entry['model']}/val/miou"] == entry["miou"]


# ----------------------------------------------------------------------------- a tracking server


def test_training_is_logged_to_a_tracking_server(data, server, tmp_path):
    out = tmp_path / "baseline"
    iumask("train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "2", "--track", "mlflow",
           "--tracking-uri", server.uri)
    client = MlflowClient(tracking_uri=server.uri)
    runs = [r for r in runs_of(client, "iumask") if r.data.tags[FOLDER_TAG] == str((out / "mobilenet_v2").resolve())]
    (run,) = runs
    check_member_run(client, run, out / "mobilenet_v2", epochs=2)
    assert not (out / "mlruns").exists()


EXPERIMENT = """
name = "tiny-tracked"
encoders = ["mobilenet_v2"]
seeds = [0, 1]
rare_classes = 3
track = "mlflow"

[data]
root = "{data}"
size = "32x32"

[train]
epochs = 1
batch_size = 2
lr = 1e-3
backbone_lr_factor = 1.0

[augment]
enabled = false

[[arms]]
name = "regular"

[[arms]]
name = "inverse"
class_weights = "inverse"
"""


def check_experiment(client: MlflowClient, out: Path) -> None:
    """One MLflow experiment named after the spec: a parent run with the report's files, and under
    it one run per arm × seed, tagged, with its training curve and its evaluation (results.csv)."""
    runs = runs_of(client, "tiny-tracked")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "experiment tiny-tracked"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {
        "spec.toml", "report.md", "results.csv", "summary.json", "figures"}
    nested = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in nested)
    by_arm_seed = {(r.data.tags["arm"], int(r.data.tags["seed"])): r for r in nested}
    assert len(nested) == 4 and set(by_arm_seed) == {("regular", 0), ("regular", 1), ("inverse", 0), ("inverse", 1)}
    results = csv_rows(out / "results.csv")
    for (arm, seed), run in by_arm_seed.items():
        assert run.data.tags["encoder"] == "mobilenet_v2" and run.info.run_name == f"{arm} seed {seed}: baseline " \
                                                                                    "mobilenet_v2"
        member = out / "runs" / arm / "mobilenet_v2" / f"seed-{seed}" / "mobilenet_v2"
        check_member_run(client, run, member, epochs=1)
        assert run.data.params["loss.class_weights"] == ("inverse" if arm == "inverse" else "none")
        mine = [r for r in results if r["arm"] == arm and int(r["seed"]) == seed and r["value"] != "nan"]
        expected = {f"train-data-val/{r['metric']}" + (f"_{r['class']}" if r["class"] else ""): float(r["value"])
                    for r in mine}
        assert {"train-data-val/miou", "train-data-val/pavpu", "train-data-val/ece"} <= set(expected)
        assert {k: v for k, v in run.data.metrics.items() if k.startswith("train-data-val/")} == expected


def test_experiment_is_one_mlflow_experiment_with_nested_runs(data, server, tmp_path, capsys):
    """The local store (the spec's track key, no server); then, cached, the same experiment into a
    server (its runs made from the files); a rerun adds nothing to either."""
    spec = tmp_path / "spec.toml"
    spec.write_text(EXPERIMENT.format(data=data))
    out = tmp_path / "out"
    iumask("experiment", spec, "--out", out, "--device", "cpu")
    local = MlflowClient(tracking_uri=local_uri(out))
    check_experiment(local, out)
    iumask("experiment", spec, "--out", out, "--device", "cpu", "--tracking-uri", server.uri)
    remote = MlflowClient(tracking_uri=server.uri)
    check_experiment(remote, out)
    capsys.readouterr()
    for uri in (None, server.uri):
        iumask("experiment", spec, "--out", out, "--device", "cpu", *(["--tracking-uri", uri] if uri else []))
    assert "warning" not in capsys.readouterr().err
    for client in (local, remote):
        check_experiment(client, out)


def test_a_server_killed_mid_run_is_one_warning_and_the_run_finishes(data, server, tmp_path, monkeypatch, capsys):
    """The server is killed right after epoch 1 is logged: epoch 2's logging fails, which is one
    warning line; nothing more is tried, and the member is saved with all its files. (Kills the
    module's server: a later test would start another.)"""
    log_epochs = MlflowRun.log_epochs

    def log_then_kill_the_server(run, rows):
        log_epochs(run, rows)
        if rows and rows[-1]["epoch"] == 1:
            server.kill()

    monkeypatch.setattr(MlflowRun, "log_epochs", log_then_kill_the_server)
    out = tmp_path / "baseline"
    capsys.readouterr()
    iumask("train-baseline", "--data", data, "--out", out, *TINY_TRAIN, "--epochs", "2", "--track", "mlflow",
           "--tracking-uri", server.uri)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "failed while logging epoch 2 of baseline mobilenet_v2" in warnings[0], err
    member = out / "mobilenet_v2"
    assert json.loads((member / "manifest.json").read_text())["complete"]
    assert len(csv_rows(member / "metrics.csv")) == 2 and (member / "curves.png").is_file()
    assert (out / "ensemble.json").is_file()
