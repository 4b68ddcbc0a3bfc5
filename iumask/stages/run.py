"""``iumask run``: the four stages in order into one folder, each a cache hit when its artifact
already matches its inputs and resumed when it was interrupted."""

from __future__ import annotations

from iumask import distributed
from iumask.config import RunConfig
from iumask.data.synthetic import generate_synthetic
from iumask.device import resolve_device
from iumask.files import folder_writer_lock, read_json
from iumask.progress import console
from iumask.stages.evaluate import cached_evaluate
from iumask.stages.masks import make_masks
from iumask.stages.train import train_baseline, train_online, train_weighted
from iumask.store import OUT_FOLDER_ADVICE


def run(config: RunConfig) -> list[dict]:
    """All four stages; returns the evaluation results (empty on torchrun ranks other than 0).
    Every option was validated when ``config`` was built, so nothing fails late for a bad option."""
    out = config.out
    distributed.init(resolve_device(config.device))
    with folder_writer_lock(out, f"run folder {out}", "use another --out", enabled=distributed.is_main()):
        return _run_locked(config)


def _run_locked(config: RunConfig) -> list[dict]:
    out = config.out
    data = config.data
    if config.synthetic is not None:
        make_data = lambda: generate_synthetic(data.root, overwrite=config.overwrite, **config.synthetic)  # noqa: E731
        distributed.main_first(make_data, make_data)  # rank 0 writes, the others reuse it
        console.print(f"data: embedded synthetic dataset in {data.root}")
    common = dict(device=config.device, overwrite=config.overwrite)
    console.rule("1/4 train-baseline")
    baseline = train_baseline(data, config.model, config.train, config.loss, config.augment, out / "baseline",
                              **common)
    if config.online:
        console.rule("2/4 make-masks: skipped (--online computes the masks during training)")
        console.rule("3/4 train-weighted --online")
        weighted = train_online(data, config.model, config.train, config.loss, config.augment, config.masks,
                                out / "online", **common)
    else:
        console.rule("2/4 make-masks")
        store_path = out / "masks.zarr"
        make_masks(baseline, data, config.masks, store_path, advice=OUT_FOLDER_ADVICE, **common)
        console.rule("3/4 train-weighted")
        weighted = train_weighted(data, config.model, config.train, config.loss, config.augment, store_path,
                                  out / "weighted", **common)
    console.rule("4/4 evaluate")
    models = [*(baseline.parent / m for m in read_json(baseline, "ensemble manifest")["members"]), baseline,
              *(weighted.parent / m for m in read_json(weighted, "ensemble manifest")["members"]),
              *([weighted] if config.online else [])]
    # Under torchrun every rank scores its share of the images (none waits in a collective meanwhile).
    results = cached_evaluate(models, data, config.eval, out / "results.json", config.device, across_ranks=True)
    return results if distributed.is_main() else []  # rank 0 reports
