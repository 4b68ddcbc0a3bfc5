"""``iumask run``: the four stages in order into one folder, each a cache hit when its artifact
already matches its inputs and resumed when it was interrupted.

Tracking (``--track mlflow``, :mod:`iumask.tracking`): one parent run per run folder, the members'
runs nested under it; each member's run gets its evaluation metrics (``<split>/<metric>``), the
parent the ensembles' (``<model>/<split>/<metric>``) and results.json and results.csv."""

from __future__ import annotations

from pathlib import Path

from iumask import distributed
from iumask.artifacts import ENSEMBLE_FILE
from iumask.config import OUT_FOLDER_ADVICE, RunConfig
from iumask.data.synthetic import generate_synthetic
from iumask.device import resolve_device
from iumask.files import folder_writer_lock
from iumask.model import Model
from iumask.progress import console
from iumask.stages.evaluate import cached_evaluate
from iumask.stages.masks import make_masks
from iumask.stages.train import train_baseline, train_online, train_weighted
from iumask.tracking import NO_TRACKER, Tracker, evaluation_metrics


def run(config: RunConfig, tracker: Tracker = NO_TRACKER) -> list[dict]:
    """All four stages; returns the evaluation results (empty on torchrun ranks other than 0).
    Every option was validated when ``config`` was built, so nothing fails late for a bad option.
    ``tracker``: where the runs are mirrored (see the module docstring)."""
    out = config.out
    distributed.init(resolve_device(config.device))
    with folder_writer_lock(out, f"run folder {out}", "use another --out", enabled=distributed.is_main()):
        tracked = tracker.parent(f"run {out.name}", "run", out, {})
        with tracked.run:
            return _run_locked(config, tracked)


def _run_locked(config: RunConfig, tracker: Tracker) -> list[dict]:
    out = config.out
    data = config.data
    if config.synthetic is not None:
        make_data = lambda: generate_synthetic(data.root, overwrite=config.overwrite, **config.synthetic)  # noqa: E731
        distributed.main_first(make_data, make_data)  # rank 0 writes, the others reuse it
        console.print(f"data: embedded synthetic dataset in {data.root}")
    common = dict(device=config.device, overwrite=config.overwrite)
    training = dict(common, tracker=tracker)
    console.rule("1/4 train-baseline")
    baseline = train_baseline(data, config.model, config.train, config.loss, config.augment, out / "baseline",
                              **training)
    if config.online:
        console.rule("2/4 make-masks: skipped (--online computes the masks during training)")
        console.rule("3/4 train-weighted --online")
        weighted = train_online(data, config.model, config.train, config.loss, config.augment, config.masks,
                                out / "online", **training)
    else:
        console.rule("2/4 make-masks")
        store_path = out / "masks.zarr"
        make_masks(Model.resolve(baseline), data, config.masks, store_path, advice=OUT_FOLDER_ADVICE, **common)
        console.rule("3/4 train-weighted")
        weighted = train_weighted(data, config.model, config.train, config.loss, config.augment, store_path,
                                  out / "weighted", **training)
    console.rule("4/4 evaluate")
    baseline_model, weighted_model = Model.resolve(baseline), Model.resolve(weighted)
    models = [*baseline_model.member_models(), baseline_model, *weighted_model.member_models(),
              *([weighted_model] if config.online else [])]
    # Under torchrun every rank scores its share of the images (none waits in a collective meanwhile).
    results = cached_evaluate(models, data, config.eval, out / "results.json", config.device, across_ranks=True)
    track_results(tracker, models, results)
    tracker.run.log_files([out / "results.json", out / "results.csv"])
    return results if distributed.is_main() else []  # rank 0 reports


def track_results(tracker: Tracker, models: list[Model], results: list[dict]) -> None:
    """Each member's evaluation on its own tracked run; an ensemble's on the parent run, by its name."""
    for model, result in zip(models, results):
        if Path(model.key).name != ENSEMBLE_FILE:  # one member: its key is its folder
            tracker.model_run(Path(model.key), model.weights_sha256[0]).log_metrics(
                evaluation_metrics(result, result["split"]))
        else:
            tracker.run.log_metrics(evaluation_metrics(result, f"{result['model']}/{result['split']}"))
