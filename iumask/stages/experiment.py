"""``iumask experiment``: arms × encoders × seeds trained and evaluated through the ordinary stages,
then ``results.csv``, ``summary.json``, ``report.md`` and ``figures/`` (docs/experiments.md).

Every model is an artifact of :mod:`iumask.stages.train` under the experiment folder, so a killed
experiment resumes where it stopped (each stage resumes or is a cache hit) and a finished one
reruns as cache hits that only rebuild the report. Layout of ``DIR``:

* ``ensemble/``: the mask ensemble (trained once, unless the spec gives a path);
* ``masks/<instances>.zarr``: one mask store per instance setting the offline arms use;
* ``runs/<arm>/<encoder>/seed-<s>/``: one trained model per arm, encoder and seed
  (``runs/<arm>/seed-<s>/`` for an online arm: its members are trained jointly);
* ``evaluations/<arm>/<encoder>/seed-<s>/<dataset>-<split>.json``: its evaluation results.

Order: the ensemble, the masks, then the runs seed by seed (so an interrupted experiment has
whole seeds of every arm), then the evaluations (under torchrun shared by every rank, so none waits
in a collective while another evaluates) and the report (rank 0).

Workers (``--worker``): any number of processes share ``DIR`` (a shared lock on it, which a plain
experiment takes exclusively, so the two never mix). The ensemble and the stores are built by the
first worker to take their locks while the others wait for them (then cache hits). Each training is
claimed with its folder's writer lock, the one its train stage takes, and trained and evaluated
under it; a worker skips trainings other processes hold and stops when each is done or held. The
kernel drops a killed worker's locks, so the next worker to scan takes its training (resuming its
checkpoint). The worker that finds none held writes the report. Under torchrun the job is one
worker: rank 0 takes the locks and tells the other ranks what it claimed.

Tracking (``--track mlflow``, :mod:`iumask.tracking`): one parent run per experiment folder; every
trained member's run nests under it, tagged with its arm (``role`` "arm"; the mask ensemble's
members: ``role`` "mask ensemble") and seed, and gets its evaluation metrics
(``<evaluation>-<split>/<metric>``); the parent gets the spec, report.md, results.csv, summary.json
and figures/. Whoever writes the report logs the evaluations, so of several workers the last does.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

from iumask import distributed
from iumask.artifacts import ENSEMBLE_FILE, MANIFEST_FILE, State, ensemble_progress
from iumask.config import OUT_FOLDER_ADVICE, LossConfig, MaskConfig
from iumask.core import top_class
from iumask.data.dataset import SegmentationDataset
from iumask.data.folder import class_differences
from iumask.dataset_stats import cached_label_statistics
from iumask.device import resolve_device
from iumask.errors import IumaskError
from iumask.experiment.bootstrap import add_bootstrap
from iumask.experiment.report import FIGURES_DIR, REPORT_FILE, RESULTS_FILE, SUMMARY_FILE, write_report
from iumask.experiment.significance import rarest_classes, result_rows, summarize
from iumask.experiment.spec import Arm, ExperimentSpec, seedless, spec_differences
from iumask.files import LockHeld, check_writable, create_json_once, folder_writer_lock, json_normal, read_json
from iumask.model import Model
from iumask.progress import console
from iumask.stages.evaluate import cached_evaluate, cached_results, evaluation_identity, read_image_counts
from iumask.stages.masks import make_masks
from iumask.stages.train import out_lock, train_baseline, train_online, train_weighted
from iumask.store import MaskStore
from iumask.tracking import NO_TRACKER, Tracker, evaluation_metrics
from iumask.training_log import METRICS_FILE, read_metrics_csv
from iumask.transfer import to_device, to_host


@dataclass(frozen=True)
class Run:
    """One trained model of the experiment: ``folder`` holds its ensemble.json, ``member`` its
    member folder (the model that is evaluated)."""

    arm: Arm
    encoder: str
    seed: int
    folder: Path
    member: str

    @property
    def model_path(self) -> Path:
        return self.folder / self.member


# The folder's spec record: the identity of the spec whose models the folder holds (issue 26).
SPEC_RECORD = "experiment.json"
SPEC_RECORD_VERSION = 1


def check_modes(dry_run: bool, worker: bool, report_only: bool, overwrite: bool) -> None:
    """The experiment command's modes that cannot go together, refused before anything is read."""
    if report_only and (dry_run or worker or overwrite):
        other = "--dry-run" if dry_run else "--worker" if worker else "--overwrite"
        raise IumaskError(f"--report-only only writes the report from the runs already evaluated (nothing is "
                          f"trained); drop {other} or --report-only")


def store_name(masks: MaskConfig) -> str:
    """The mask store of an instance setting, e.g. ``prediction-c8.zarr``."""
    return f"{masks.instances_from}-c{masks.connectivity}{'-normalized' if masks.normalize else ''}.zarr"


class Experiment:
    """The plan of one spec in one folder, and its execution."""

    def __init__(self, spec: ExperimentSpec, out: Path):
        self.spec, self.out = spec, Path(out)
        self.runs: list[Run] = []
        for seed in spec.seeds:
            for arm in spec.arms:
                if arm.iu == "online":
                    folder = self.out / "runs" / arm.name / f"seed-{seed}"
                    names = spec.model(arm.online_encoders).names
                    self.runs += [Run(arm, e, seed, folder, names[arm.online_encoders.index(e)]) for e in spec.encoders]
                else:
                    self.runs += [Run(arm, e, seed, self.out / "runs" / arm.name / e / f"seed-{seed}", e)
                                  for e in spec.encoders]

    # ------------------------------------------------------------------------- paths

    @property
    def ensemble_path(self) -> Path:
        if self.spec.ensemble.path is not None:
            return self.spec.ensemble.path
        return self.out / "ensemble" / ENSEMBLE_FILE

    @property
    def needs_masks(self) -> bool:
        """Whether an offline arm reads a mask store (the ensemble matters only then)."""
        return any(a.iu == "offline" for a in self.spec.arms)

    @property
    def trains_ensemble(self) -> bool:
        return self.spec.ensemble.model is not None and self.needs_masks

    def stores(self) -> dict[str, MaskConfig]:
        """The mask stores the offline arms need, by file name."""
        return {store_name(a.masks): a.masks for a in self.spec.arms if a.iu == "offline"}

    def evaluation_path(self, run: Run, evaluation) -> Path:
        return (self.out / "evaluations" / run.arm.name / run.encoder / f"seed-{run.seed}"
                / f"{evaluation.name}-{evaluation.split}.json")

    def trainings(self) -> list[tuple[Arm, int, Path, tuple[str, ...]]]:
        """(arm, seed, folder, encoders) of each training, in order: one encoder, or an online
        arm's members (trained once per seed for all of the experiment's encoders)."""
        seen, out = set(), []
        for run in self.runs:
            if run.folder not in seen:
                seen.add(run.folder)
                encoders = run.arm.online_encoders if run.arm.iu == "online" else (run.encoder,)
                out.append((run.arm, run.seed, run.folder, encoders))
        return out

    # ------------------------------------------------------------------------- checks

    def validate(self, writable: bool = True) -> list[str]:
        """Everything that can fail cheaply, before the first training: the device, the data (every
        header), the evaluations' classes, a given ensemble, and with ``writable`` the output folder
        (created; ``--dry-run`` creates nothing). Returns the class names."""
        spec = self.spec
        resolve_device(spec.device)
        train_folder = spec.data.open(spec.data.train_split)
        train_folder.check_headers()
        spec.data.open(spec.data.val_split).check_headers()
        classes = list(train_folder.classes.names)
        for evaluation in spec.evaluations:
            folder = evaluation.data.open(evaluation.split)
            if list(folder.classes.names) != classes:
                raise IumaskError(
                    f"{spec.path}: evaluation {evaluation.name} ({folder.root}, {evaluation.split}) has other classes "
                    f"than the training data ({class_differences(list(folder.classes.names), classes)}); evaluate "
                    "on data with the same class names (in the same order)")
            folder.check_headers()
        if spec.ensemble.path is not None and self.needs_masks:
            Model.resolve(spec.ensemble.path).check_classes(train_folder)
        if writable:
            check_writable(self.out)
        return classes

    # ------------------------------------------------------------------------- the folder's spec

    def claim_folder(self, record: bool = True) -> None:
        """Make sure ``out`` holds the models of this spec only: the first process records the spec's
        identity in ``out/experiment.json`` (created once, atomically, so of two workers starting
        together one records and the other compares); any later process whose spec differs in an
        option its models or results depend on is refused, naming the keys, before it trains
        anything. Seeds, encoders, arms and evaluations may be added. ``record`` False (``--dry-run``,
        ``--report-only``) only compares."""
        path = self.out / SPEC_RECORD
        current = {"format_version": SPEC_RECORD_VERSION, "spec": str(self.spec.path), "identity": self.spec.identity()}
        if not path.exists() and record:
            path.parent.mkdir(parents=True, exist_ok=True)
            create_json_once(path, current)
        if not path.exists():
            return
        recorded = read_json(path, "experiment spec record")
        if not isinstance(recorded, dict) or not isinstance(recorded.get("identity"), dict):
            raise IumaskError(f"{path}: not an iumask experiment record (it says which spec the folder's models "
                              "were made with); use another --out, or delete it if you know the folder holds only "
                              "this spec's models")
        differences = spec_differences(recorded["identity"], current["identity"])
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            raise IumaskError(f"{self.out} holds the models of another spec ({recorded.get('spec')}), which differs "
                              f"in {shown}: use another --out for this spec, or run the spec the folder was made with")

    def model_differences(self, run: Run) -> list[str]:
        """How the model of ``run`` now in the folder differs from what the spec trains there (its
        manifest's data, architecture, encoder, training options and loss), e.g. a model another
        spec's worker trained; empty when it matches or is not trained."""
        manifest_path = run.model_path / MANIFEST_FILE
        if not manifest_path.is_file():
            return []
        manifest = read_json(manifest_path, "model manifest")
        loss = run.arm.loss.identity()
        expected = {"data": self.spec.data.identity(), "architecture": self.spec.architecture, "encoder": run.encoder,
                    "train_options": run.arm.identity()["train"], "loss": loss}
        found = {"data": manifest.get("data"), "architecture": manifest.get("architecture"),
                 "encoder": manifest.get("encoder"), "train_options": seedless(manifest.get("train_options") or {}),
                 "loss": {k: (manifest.get("loss") or {}).get(k, "absent") for k in loss}}
        return spec_differences(json_normal(found), json_normal(expected))

    # ------------------------------------------------------------------------- plan

    def plan(self) -> list[tuple[str, str, str]]:
        """(step, what, status) of every step, from the files alone (``iumask experiment`` itself
        verifies each artifact's inputs, so "done" here can still be retrained on a mismatch)."""
        steps = []
        if self.trains_ensemble:
            e = self.spec.ensemble.model
            steps.append(("train", f"mask ensemble {', '.join(e.encoders)} (seed {self.spec.ensemble.seed})",
                          _training_status(self.ensemble_path.parent, e.names)))
        for name in self.stores():
            steps.append(("make-masks", f"masks/{name}", _store_status(self.out / "masks" / name)))
        for arm, seed, folder, encoders in self.trainings():
            names = self.spec.model(encoders).names
            what = f"{arm.name} {'online ' + ', '.join(encoders) if arm.iu == 'online' else encoders[0]} seed {seed}"
            steps.append(("train", what, _training_status(folder, names)))
        for run in self.runs:
            for evaluation in self.spec.evaluations:
                path = self.evaluation_path(run, evaluation)
                steps.append(("evaluate", f"{run.arm.name} {run.encoder} seed {run.seed} on {evaluation.name} "
                              f"{evaluation.split}", "done" if path.is_file() else "to do"))
        return steps

    # ------------------------------------------------------------------------- execution

    def execute(self, overwrite: bool = False, worker: bool = False, tracker: Tracker = NO_TRACKER) -> dict | None:
        """Train, evaluate and report; returns the summary (None on torchrun ranks other than 0, and
        for a ``worker`` that leaves the report to another worker: see :meth:`_work`). ``tracker``:
        where the runs are mirrored (see the module docstring)."""
        spec = self.spec
        start = time.perf_counter()
        distributed.init(resolve_device(spec.device))
        classes = self.validate()
        if distributed.is_main():
            self.claim_folder()
        # One experiment per folder, or any number of workers: a plain experiment beside workers would
        # train the models they train. Shared by the workers, exclusive otherwise.
        fix = "use another --out" if worker else "use another --out (processes share one folder with --worker)"
        with folder_writer_lock(self.out, f"experiment folder {self.out}", fix, enabled=distributed.is_main(),
                                shared=worker):
            tracked = self.tracked(tracker)
            with tracked.run:
                summary = self._execute(classes, overwrite, worker, tracked)
        if summary is not None:
            summary["wall_time_s"] = round(time.perf_counter() - start, 1)
        return summary

    def tracked(self, tracker: Tracker) -> Tracker:
        """``tracker`` with the experiment's parent run open (continued when the folder has one)."""
        spec = self.spec
        return tracker.parent(f"experiment {spec.name}", "experiment", self.out, {"spec": spec.path.resolve()})

    def _execute(self, classes: list[str], overwrite: bool, worker: bool, tracker: Tracker) -> dict | None:
        spec = self.spec
        common = dict(device=spec.device, overwrite=overwrite)
        # The ensemble and the stores: built once, by the first worker to take their locks; a worker
        # that finds them taken waits, then finds a cache hit. A plain experiment owns the folder.
        waiting = _waiting if worker else lambda take: contextlib.nullcontext()
        if self.trains_ensemble:
            e = spec.ensemble
            with waiting(lambda: out_lock(self.ensemble_path.parent)):
                self._rule(1, f"mask ensemble: {', '.join(e.model.encoders)}")
                train_baseline(spec.data, e.model, replace(e.train, seed=e.seed), LossConfig(exponent=0.0),
                               spec.augment, self.ensemble_path.parent, **common,
                               tracker=tracker.tagged("mask ensemble", role="mask ensemble"))
        if self.stores():
            # One lock for every store, on the folder that holds them: a store being created has no
            # folder of its own yet (it is staged beside it).
            masks_lock = functools.partial(folder_writer_lock, self.out / "masks", f"mask stores of {self.out}",
                                           "use another --out")
            with waiting(masks_lock):
                for step, (name, masks) in enumerate(self.stores().items(), int(self.trains_ensemble) + 1):
                    self._rule(step, f"make-masks {name}")
                    make_masks(Model.resolve(self.ensemble_path), spec.data, masks, self.out / "masks" / name,
                               advice=OUT_FOLDER_ADVICE, **common)
        if worker:
            if not self._work(common, tracker):
                return None
        else:
            for index in range(len(self.trainings())):
                self._train(index, common, tracker)
        rows, results = self._results(self.runs, _evaluate_trained, tracker)
        if not distributed.is_main():
            return None
        return self.report(rows, results, classes, tracker)

    def _rule(self, step: int, text: str) -> None:
        total = len(self.trainings()) + len(self.stores()) + int(self.trains_ensemble)
        console.rule(f"[{step}/{total}] {text}")

    def _work(self, common: dict, tracker: Tracker) -> bool:
        """A worker's loop: claim the first training no process holds (its folder's writer lock, the
        lock its train stage takes), train it (or find it done, or resume a killed worker's
        checkpoint) and evaluate its runs under that lock, and again, until every training is
        either done by this worker or held by another. Returns True when none is held by another:
        then every run is done and this worker writes the report (of several finishing together,
        each writes the same files). Under torchrun rank 0 claims for the job."""
        trainings, done = self.trainings(), set()
        while True:
            claimed, lock, held = None, None, 0
            if distributed.is_main():
                for index, (_, _, folder, _) in enumerate(trainings):
                    if index in done:
                        continue
                    try:
                        claimed, lock = index, out_lock(folder)
                        break
                    except LockHeld:
                        held += 1
            claimed, held = distributed.all_gather_object((claimed, held))[0]
            if claimed is None:
                if held:
                    console.print(f"{held} of {len(trainings)} trainings are being run by other workers; the last "
                                  "worker to finish writes the report (iumask experiment --report-only writes one "
                                  "from what is done)")
                return not held
            with lock or contextlib.nullcontext():
                self._train(claimed, common, tracker)
                # Every rank evaluates its share: none waits in a collective while rank 0 evaluates.
                self._results([r for r in self.runs if r.folder == trainings[claimed][2]], _evaluate_trained)
            done.add(claimed)

    def _results(self, runs: list[Run], results_of, tracker: Tracker = NO_TRACKER) -> tuple[list[dict], dict]:
        """The rows of results.csv and the results by (arm, encoder, seed, dataset, split) of ``runs``
        on every evaluation; ``results_of`` (as :func:`cached_evaluate`) gives an evaluation's
        results, or None to leave it out. Each result is added to its model's tracked run."""
        rows, results = [], {}
        for run in runs:
            differences = self.model_differences(run)
            if differences:
                console.print(f"left out of the report: {run.model_path} was not trained with this spec's options "
                              f"({'; '.join(differences[:3])})")
                continue
            for evaluation in self.spec.evaluations:
                options = replace(self.spec.eval, split=evaluation.split)
                found = results_of([run.model_path], evaluation.data, options, self.evaluation_path(run, evaluation),
                                   self.spec.device)
                if found is None:
                    continue
                results[(run.arm.name, run.encoder, run.seed, evaluation.name, evaluation.split)] = found[0]
                rows += result_rows(run.arm.name, run.encoder, run.seed, evaluation.name, evaluation.split, found[0])
                weights = read_json(run.model_path / MANIFEST_FILE, "model manifest").get("weights_sha256", "")
                tracker.model_run(run.model_path, weights).log_metrics(
                    evaluation_metrics(found[0], f"{evaluation.name}-{evaluation.split}"))
        return rows, results

    def report_finished(self, tracker: Tracker = NO_TRACKER) -> dict:
        """``--report-only``: the report from the evaluations already written for the models now in
        the folder; nothing is trained or evaluated, no lock is taken (workers may be running)."""
        classes = self.validate(writable=False)
        self.claim_folder(record=False)
        tracker = self.tracked(tracker)
        with tracker.run:
            return self._report_finished(classes, tracker)

    def _report_finished(self, classes: list[str], tracker: Tracker) -> dict:
        rows, results = self._results(self.runs, _finished_results, tracker)
        total = len(self.runs) * len(self.spec.evaluations)
        if not results:
            raise IumaskError(f"--report-only: no run in {self.out} is evaluated yet; run iumask experiment (with "
                              "--worker to share the folder) first, or check --out")
        console.print(f"report from {len(results)} of {total} evaluations (the others are not done yet)"
                      if len(results) < total else f"report from all {total} evaluations")
        return self.report(rows, results, classes, tracker)

    def _train(self, index: int, common: dict, tracker: Tracker) -> None:
        """The training ``index`` of :meth:`trainings`."""
        spec = self.spec
        arm, seed, folder, encoders = self.trainings()[index]
        step = index + len(self.stores()) + int(self.trains_ensemble) + 1
        self._rule(step, f"{arm.name} {('online ' if arm.iu == 'online' else '') + ', '.join(encoders)} seed {seed}")
        train = replace(arm.train, seed=seed)
        # The run's seed, not a member's (an online arm's member k starts from seed + k).
        tracker = tracker.tagged(f"{arm.name} seed {seed}", role="arm", arm=arm.name, seed=seed)
        if arm.iu == "none":
            train_baseline(spec.data, spec.model(encoders), train, arm.loss, arm.augment, folder,
                           **common, tracker=tracker)
        elif arm.iu == "offline":
            train_weighted(spec.data, spec.model(encoders), train, arm.loss, arm.augment,
                           self.out / "masks" / store_name(arm.masks), folder, **common, tracker=tracker)
        else:
            train_online(spec.data, spec.model(encoders), train, arm.loss, arm.augment, arm.masks, folder,
                         **common, tracker=tracker)

    def cost(self) -> dict:
        """Training seconds per finished run by arm (its epochs' wall time from metrics.csv), and the
        mask ensemble's (all members, trained once) for the offline IU arms that need it."""
        runs: dict[str, list[float]] = {}
        for arm, _, folder, encoders in self.trainings():
            if (folder / ENSEMBLE_FILE).is_file():  # --report-only: runs to come or in progress do not count
                member = self.spec.model(encoders).names[0]
                runs.setdefault(arm.name, []).append(training_seconds(folder / member))
        ensemble = 0.0
        if self.trains_ensemble:
            ensemble = sum(training_seconds(self.ensemble_path.parent / n) for n in self.spec.ensemble.model.names)
        return {"runs": runs, "ensemble_s": ensemble,
                "uses_ensemble": [a.name for a in self.spec.arms if a.iu == "offline"]}

    def report(self, rows: list[dict], results: dict, classes: list[str], tracker: Tracker = NO_TRACKER) -> dict:
        spec = self.spec
        train_folder = spec.data.open(spec.data.train_split)
        stats = cached_label_statistics(train_folder, fingerprint=train_folder.fingerprint())
        pixels = dict(zip(classes, stats["per_class"]["pixels"]))
        rare = rarest_classes(pixels, min(spec.rare_classes, len(classes)))
        summary = summarize(rows, [a.name for a in spec.arms], spec.reference, classes, rare)
        add_bootstrap(summary, self.image_counts(results), spec.bootstrap_resamples, spec.bootstrap_seed)
        summary.update(cost=self.cost())
        summary.update(experiment=spec.name, spec=spec.raw, training_runs=spec.training_runs,
                       evaluations=[{"name": e.name, "split": e.split, "root": str(e.data.root.resolve())}
                                    for e in spec.evaluations])
        store = self._finished_store()
        predictors = member_predictors(self.ensemble_path, train_folder, spec.device) if store else ()
        write_report(self.out, summary, rows, results, stats, train_folder, store, predictors)
        tracker.run.log_files([spec.path, *(self.out / name for name in (REPORT_FILE, RESULTS_FILE, SUMMARY_FILE,
                                                                         FIGURES_DIR))])
        return summary

    def image_counts(self, results: dict) -> dict:
        """The per-image counts (:func:`read_image_counts`) of the evaluations in ``results``, by the
        same (arm, encoder, seed, dataset, split) keys; an evaluation without them is left out."""
        counts = {}
        for run in self.runs:
            for evaluation in self.spec.evaluations:
                key = (run.arm.name, run.encoder, run.seed, evaluation.name, evaluation.split)
                found = read_image_counts(self.evaluation_path(run, evaluation)) if key in results else None
                if found:
                    counts[key] = found[0]
        return counts

    def _finished_store(self) -> MaskStore | None:
        """The first mask store, for the figure of masks, once it is finished (``--report-only`` may
        come before it is)."""
        name = next(iter(self.stores()), None)
        if name is None or _store_status(self.out / "masks" / name) != "done":
            return None
        return MaskStore.open(self.out / "masks" / name, advice=OUT_FOLDER_ADVICE)


# An evaluation under torchrun: the ranks share its images (alone: the plain evaluation).
def _evaluate_trained(paths: list[Path], data, options, json_path: Path, device: str) -> list[dict]:
    """The results of the models trained at ``paths`` (:func:`cached_evaluate`), every rank scoring its share."""
    return cached_evaluate([Model.resolve(p) for p in paths], data, options, json_path, device, across_ranks=True)


# How often a worker tries again a lock that another worker holds (the mask ensemble's, the stores').
POLL_S = 1.0


def _waiting(take):
    """The lock ``take()`` returns, taken on rank 0 (the other ranks get a no-op context), trying again
    every POLL_S seconds while another process holds it (``take`` raises :class:`LockHeld`). Polling
    rather than a blocking ``flock`` so that under torchrun the ranks meet every POLL_S seconds and
    no collective waits longer than NCCL's timeout."""
    waiting = False
    while True:
        lock = None
        if distributed.is_main():
            try:
                lock = take()
            except LockHeld as exc:
                if not waiting:
                    console.print(f"waiting for {exc.what}: another process is writing it ({exc.holder})")
                    waiting = True
        if distributed.all_gather_object(lock is not None)[0]:
            return lock if lock is not None else contextlib.nullcontext()
        time.sleep(POLL_S)


def _finished_results(models: list[Path], data, options, json_path: Path, device: str) -> list[dict] | None:
    """The results in ``json_path`` if they belong to the trained ``models`` as they are now, else None
    (not trained, not evaluated, or evaluated before a retraining): ``--report-only``'s results."""
    if not all((Path(m) / MANIFEST_FILE).is_file() for m in models):
        return None
    try:
        resolved = [Model.resolve(m) for m in models]
    except IumaskError:  # e.g. weights that no longer match their manifest: not the model that was evaluated
        return None
    return cached_results(json_path, evaluation_identity(resolved, data, options))


def member_predictors(ensemble_path: Path, train_folder, device: str) -> tuple:
    """(title, index → class map) per mask-ensemble member, for the figure of masks: each member's
    prediction at the store's image size."""
    dev = resolve_device(device)
    predictors = []
    for member in Model.resolve(ensemble_path).member_models():
        source = member.source("ensemble", dev)
        dataset = SegmentationDataset(train_folder, source.size)

        def predict(index: int, source=source, dataset=dataset):
            return to_host(top_class(source.probs(to_device(dataset[index]["image"][None], dev)))[0])

        predictors.append((f"{member.members[0].folder.name} prediction", predict))
    return tuple(predictors)


def training_seconds(member: Path) -> float:
    """The summed epoch seconds of a member's metrics.csv (0 when it has none)."""
    return float(sum(row.get("seconds") or 0 for row in read_metrics_csv(member / METRICS_FILE)))


def _training_status(folder: Path, names: list[str]) -> str:
    """The plan's words for a training's :func:`~iumask.artifacts.ensemble_progress`."""
    state, done, total = ensemble_progress(folder, names)
    if state is State.PARTIAL:
        return f"partial ({done}/{total} members)" if done else "partial (resumes)"
    return "done" if state is State.DONE else "to train"


def _store_status(path: Path) -> str:
    """The plan's words for a mask store's :meth:`~iumask.store.MaskStore.progress`."""
    state, done, total = MaskStore.progress(path)
    if state is State.PARTIAL:
        return f"partial ({done}/{total} images)" if total else "partial (resumes)"
    return "done" if state is State.DONE else "to do"
