"""The compare view of an experiment's MLflow runs, drawn with matplotlib from what MLflow holds:
every value is read back through ``mlflow.tracking.MlflowClient`` (nothing from iumask's own files),
so the picture shows what a team sees in MLflow's compare view (docs/tracking.md).

Left: each nested run's ``val_miou`` by epoch (its metric history), coloured by its ``arm`` tag.
Middle and right: each run's final evaluation metrics (``<evaluation>-<split>/miou`` and ``/ece``)
by arm, one dot per seed (the ``seed`` tag), the arm's mean as a bar.

Usage::

    python examples/tracking/compare.py --tracking-uri sqlite:///runs/tracking/mlruns/mlflow.db \\
        [--experiment tracking-demo] [--evaluation train-data-val] [--out docs/figures/tracking-compare.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", default="tracking-demo")
    parser.add_argument("--evaluation", default="train-data-val", help="the metrics' prefix: <name>-<split>")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/tracking-compare.png"))
    args = parser.parse_args()

    client = MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"{args.tracking_uri} has no experiment {args.experiment!r}")
    # The nested runs of the arms (the mask ensemble's members are tagged role = "mask ensemble").
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'arm'")
    arms = sorted({r.data.tags["arm"] for r in runs}, key=lambda a: (a != "regular", a))
    colours = dict(zip(arms, plt.get_cmap("tab10").colors))

    figure, (curves, *finals) = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    for run in sorted(runs, key=lambda r: (r.data.tags["arm"], int(r.data.tags["seed"]))):
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_miou"))
        arm = run.data.tags["arm"]
        curves.plot(*zip(*points), color=colours[arm], marker="o", markersize=3, linewidth=1.2,
                    label=arm if run.data.tags["seed"] == "0" else None)
    curves.set(xlabel="epoch (MLflow step)", ylabel="val_miou", title="val_miou of each run (metric history)")
    curves.legend(title="arm tag", fontsize=8)

    for axis, metric in zip(finals, ("miou", "ece")):
        key = f"{args.evaluation}/{metric}"
        for x, arm in enumerate(arms):
            values = [r.data.metrics[key] for r in runs if r.data.tags["arm"] == arm and key in r.data.metrics]
            axis.bar(x, sum(values) / len(values), color=colours[arm], alpha=0.35, width=0.6)
            axis.scatter([x] * len(values), values, color=colours[arm], s=18, zorder=3)
        axis.set_xticks(range(len(arms)), arms)
        axis.set(title=f"{key} by arm (dots: seeds)", ylabel=metric)
    figure.suptitle(f"MLflow experiment '{args.experiment}': {len(runs)} nested runs, read through MlflowClient",
                    fontsize=11)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
