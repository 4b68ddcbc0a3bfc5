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
whole seeds of every arm), then the evaluations (rank 0 under torchrun) and the report.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path

from iumask import distributed
from iumask.artifacts import CHECKPOINT_FILE, ENSEMBLE_FILE, resolve_models
from iumask.config import LossConfig, MaskConfig
from iumask.core import top_class
from iumask.data.folder import SegmentationDataset, class_differences
from iumask.dataset_stats import cached_label_statistics
from iumask.device import resolve_device
from iumask.errors import IumaskError
from iumask.experiment.report import write_report
from iumask.experiment.significance import rarest_classes, result_rows, summarize
from iumask.experiment.spec import Arm, ExperimentSpec
from iumask.files import check_writable, folder_writer_lock
from iumask.inference import check_models, load_source
from iumask.progress import console
from iumask.stages.evaluate import cached_evaluate
from iumask.stages.masks import make_masks
from iumask.stages.train import train_baseline, train_online, train_weighted
from iumask.store import MaskStore
from iumask.training_log import METRICS_FILE
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
            check_models(spec.ensemble.path, train_folder)
        if writable:
            check_writable(self.out)
        return classes

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

    def execute(self, overwrite: bool = False) -> dict | None:
        """Train, evaluate and report; returns the summary (None on torchrun ranks other than 0)."""
        spec = self.spec
        start = time.perf_counter()
        distributed.init(resolve_device(spec.device))
        classes = self.validate()
        # One experiment per folder: a second one would train the same models at the same time.
        with folder_writer_lock(self.out, f"experiment folder {self.out}", "use another --out",
                                enabled=distributed.is_main()):
            summary = self._execute(classes, overwrite)
        if summary is not None:
            summary["wall_time_s"] = round(time.perf_counter() - start, 1)
        return summary

    def _execute(self, classes: list[str], overwrite: bool) -> dict | None:
        spec = self.spec
        common = dict(device=spec.device, overwrite=overwrite)
        trainings = self.trainings()
        total = len(trainings) + len(self.stores()) + int(self.trains_ensemble)
        step = 0

        def rule(text: str) -> None:
            nonlocal step
            step += 1
            console.rule(f"[{step}/{total}] {text}")

        if self.trains_ensemble:
            e = spec.ensemble
            rule(f"mask ensemble: {', '.join(e.model.encoders)}")
            train_baseline(spec.data, e.model, replace(e.train, seed=e.seed), LossConfig(exponent=0.0),
                           spec.augment, self.ensemble_path.parent, **common)
        for name, masks in self.stores().items():
            rule(f"make-masks {name}")
            make_masks(self.ensemble_path, spec.data, masks, self.out / "masks" / name, **common)
        for arm, seed, folder, encoders in trainings:
            rule(f"{arm.name} {('online ' if arm.iu == 'online' else '') + ', '.join(encoders)} seed {seed}")
            self._train(arm, seed, folder, encoders, common)
        if not distributed.is_main():
            return None
        rows, results = [], {}
        for run in self.runs:
            for evaluation in spec.evaluations:
                options = replace(spec.eval, split=evaluation.split)
                result = cached_evaluate([run.model_path], evaluation.data, options,
                                         self.evaluation_path(run, evaluation), spec.device)[0]
                results[(run.arm.name, run.encoder, run.seed, evaluation.name, evaluation.split)] = result
                rows += result_rows(run.arm.name, run.encoder, run.seed, evaluation.name, evaluation.split, result)
        return self.report(rows, results, classes)

    def _train(self, arm: Arm, seed: int, folder: Path, encoders: tuple[str, ...], common: dict) -> None:
        spec = self.spec
        train = replace(arm.train, seed=seed)
        if arm.iu == "none":
            train_baseline(spec.data, spec.model(encoders), train, arm.loss, arm.augment, folder,
                           **common)
        elif arm.iu == "offline":
            train_weighted(spec.data, spec.model(encoders), train, arm.loss, arm.augment,
                           self.out / "masks" / store_name(arm.masks), folder, **common)
        else:
            train_online(spec.data, spec.model(encoders), train, arm.loss, arm.augment, arm.masks, folder,
                         **common)

    def cost(self) -> dict:
        """Training seconds per run by arm (its epochs' wall time from metrics.csv), and the mask
        ensemble's (all members, trained once) for the offline IU arms that need it."""
        runs: dict[str, list[float]] = {}
        for arm, _, folder, encoders in self.trainings():
            member = self.spec.model(encoders).names[0]
            runs.setdefault(arm.name, []).append(training_seconds(folder / member))
        ensemble = 0.0
        if self.trains_ensemble:
            ensemble = sum(training_seconds(self.ensemble_path.parent / n) for n in self.spec.ensemble.model.names)
        return {"runs": runs, "ensemble_s": ensemble,
                "uses_ensemble": [a.name for a in self.spec.arms if a.iu == "offline"]}

    def report(self, rows: list[dict], results: dict, classes: list[str]) -> dict:
        spec = self.spec
        train_folder = spec.data.open(spec.data.train_split)
        stats = cached_label_statistics(train_folder, fingerprint=train_folder.fingerprint())
        pixels = dict(zip(classes, stats["per_class"]["pixels"]))
        rare = rarest_classes(pixels, min(spec.rare_classes, len(classes)))
        summary = summarize(rows, [a.name for a in spec.arms], spec.reference, classes, rare)
        summary.update(cost=self.cost())
        summary.update(experiment=spec.name, spec=spec.raw, training_runs=spec.training_runs,
                       evaluations=[{"name": e.name, "split": e.split, "root": str(e.data.root.resolve())}
                                    for e in spec.evaluations])
        store = next(iter(self.stores()), None)
        predictors = member_predictors(self.ensemble_path, train_folder, spec.device) if store else ()
        write_report(self.out, summary, rows, results, stats, train_folder,
                     MaskStore.open(self.out / "masks" / store) if store else None, predictors)
        return summary


def member_predictors(ensemble_path: Path, train_folder, device: str) -> tuple:
    """(title, index → class map) per mask-ensemble member, for the figure of masks: each member's
    prediction at the store's image size."""
    dev = resolve_device(device)
    predictors = []
    for folder in resolve_models(ensemble_path):
        source = load_source(folder, "ensemble", dev)
        dataset = SegmentationDataset(train_folder, source.size)

        def predict(index: int, source=source, dataset=dataset):
            return to_host(top_class(source.probs(to_device(dataset[index]["image"][None], dev)))[0])

        predictors.append((f"{folder.name} prediction", predict))
    return tuple(predictors)


def training_seconds(member: Path) -> float:
    """The summed epoch seconds of a member's metrics.csv (0 when it has none)."""
    path = member / METRICS_FILE
    if not path.is_file():
        return 0.0
    with open(path, newline="") as f:
        return float(sum(float(row.get("seconds") or 0) for row in csv.DictReader(f)))


def _training_status(folder: Path, names: list[str]) -> str:
    if (folder / ENSEMBLE_FILE).is_file():
        return "done"
    if (folder / CHECKPOINT_FILE).is_file() or any((folder / n / CHECKPOINT_FILE).is_file() for n in names):
        return "partial (resumes)"
    done = sum((folder / n / "manifest.json").is_file() for n in names)
    return f"partial ({done}/{len(names)} members)" if done else "to train"


def _store_status(path: Path) -> str:
    if not path.exists():
        return "to do"
    try:
        store = MaskStore.open(path)
    except IumaskError:
        return "partial (resumes)"
    done = int(store.completed().sum())
    return "done" if store.attrs.get("finished") else f"partial ({done}/{store.num_images} images)"
