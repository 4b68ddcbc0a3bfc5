"""Configuration objects: every option of every stage, validated once, when the object is made.

Each group is a frozen dataclass whose ``__post_init__`` normalises and checks its fields and
raises :class:`IumaskError` naming the option (as the CLI spells it) and the fix, so a bad value
stops a command before any work. Stages take these objects; the CLI and a config file only build
them. Choices are :class:`enum.Enum` subclasses of ``str``, so ``--help`` lists them and typer
rejects other values; the objects store the plain string (``value``), which is what manifests
record.

An artifact's identity (what a cache hit compares) is built by :func:`artifact_identity` from the
groups it depends on, through each group's ``identity()``.
One validation path: the command line (typer converts the text), ``--config`` files (checked
against the commands' own options by :mod:`iumask.configfile`) and experiment specs
(:mod:`iumask.experiment.spec`, which reads tables into these objects) all end in these
``__post_init__`` checks, built from :func:`checked_integer`, :func:`checked_flag`,
:func:`checked_split`, :func:`choice` and friends; the TOML readers add only what is theirs
(unknown tables and keys with did-you-mean, and the file and table in front of the message).
pydantic was considered and not adopted: these checks are short, raise the project's one-line
:class:`IumaskError` naming the option as the command line spells it, and reject what the command
line rejects (pydantic's lax mode turns ``"3"`` into 3; its strict mode would still need a
translation of its multi-line errors), and one more dependency would buy no shorter code.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iumask.architectures import ARCHITECTURE, ARCHITECTURES, DEFAULT_ENCODERS, architecture_name
from iumask.artifacts import StoreAdvice
from iumask.core.loss import CLASS_WEIGHTINGS, DEFAULT_EFFECTIVE_NUMBER_BETA, LOSS_METHODS, LossMethod
from iumask.data.formats import FORMATS, format_names, open_dataset
from iumask.data.layout import ACDC_CONDITIONS
from iumask.errors import IumaskError
from iumask.files import json_normal

if TYPE_CHECKING:  # the readers and the augmentation import numpy and OpenCV: not for --help
    from iumask.data.augment import JointAugment
    from iumask.data.folder import PairedDataset

FORMAT_VERSION = 1  # of member manifests and results files


class Choice(str, Enum):
    """A closed set of option values (``str`` so that it compares equal to, and prints as, its value)."""

    def __str__(self) -> str:
        return self.value


Format = Choice("Format", {name: name for name in FORMATS})  # from the dataset-format registry


InstanceSource = Choice("InstanceSource", {"PREDICTION": "prediction", "LABEL": "label"})
Connectivity = Choice("Connectivity", {"FOUR": "4", "EIGHT": "8"})
ClassWeighting = Choice("ClassWeighting", {name.upper().replace("-", "_"): name for name in CLASS_WEIGHTINGS})
# The loss methods registered when the CLI was built (LossConfig checks the registry itself, so a
# method registered later works from Python and config files built in Python).
Architecture = Choice("Architecture", {name.upper(): name for name in ARCHITECTURES})
LossName = Choice("LossName", {name.upper().replace("-", "_"): name for name in LOSS_METHODS})
Amp = Choice("Amp", {"OFF": "off", "BF16": "bf16", "FP16": "fp16"})
Resolution = Choice("Resolution", {"NATIVE": "native", "TRAIN": "train"})
Inference = Choice("Inference", {"RESIZE": "resize", "SLIDE": "slide"})
UncertaintyKind = Choice("UncertaintyKind", {"ENSEMBLE": "ensemble", "MC_DROPOUT": "mc-dropout"})
Track = Choice("Track", {"NONE": "none", "MLFLOW": "mlflow"})


def option(default: Any, help: str, *, cli: str | None = None, parse: Any = None, kw_only: Any = MISSING) -> Any:
    """A configuration field that is also a command-line option, declared once: its default, its
    ``--help`` text, its name on the command line and in ``--config`` files where that differs from
    the field's (``cli``: ``workers`` for ``num_workers``) and the type the command line reads it as
    where that differs from the field's (``parse``: a :class:`Choice` of its values, or ``str`` for a
    value written as text such as ``0.5,2.0``); ``kw_only`` as for :func:`dataclasses.field` (by
    default the class's). :mod:`iumask.cli` builds the commands' options from
    these fields (:func:`option_fields`); the checks stay in ``__post_init__``, the one validation
    path of the command line, ``--config`` files and experiment specs."""
    return field(default=default, kw_only=kw_only, metadata={"help": help, "cli": cli, "parse": parse})


def option_fields(config: type) -> list:
    """The fields of the configuration class ``config`` declared with :func:`option`."""
    return [f for f in fields(config) if "help" in f.metadata]


# Help texts of options that several configurations share (declared with option()).
WORKERS_HELP = ("Data-loader worker processes: auto (the CPUs of this process, per torchrun rank, less 2 for the main "
                "process; at most 8; 0 on 2 CPUs) or a number (0: load in the main process). Does not change results.")
INFERENCE_AMP_HELP = ("Mixed precision of inference: bf16 (CUDA or CPU) or fp16 (CUDA; on a CPU it is ignored with a "
                      "warning).")
CONNECTIVITY_HELP = "Pixel connectivity of instances (authors: 8)."
SOURCE_HELP = "Where p̄ comes from: the ensemble's mean softmax, or one model with MC dropout (--passes passes)."
PASSES_HELP = "MC dropout: stochastic forward passes per image (cost: T × one prediction)."


def choice(enum: type[Choice], value: Any, option: str) -> str:
    """``value`` (an enum member or its string) as a plain string, or an error naming ``option``."""
    text = value.value if isinstance(value, Enum) else str(value)
    allowed = [member.value for member in enum]
    if text not in allowed:
        raise IumaskError(f"{option} must be one of {', '.join(allowed)}, got {value!r}")
    return text


def parse_size(text: str | None, option: str = "--size") -> tuple[int, int] | None:
    """``"768x768"`` → (768, 768); None or "" → None."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise IumaskError(f"{option} {text!r}: write it as HxW, e.g. 768x768") from None
    return _checked_size((h, w), option)


def _checked_size(size, option: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, str):
        return parse_size(size, option)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise IumaskError(f"{option} {size!r}: give (height, width), e.g. 768x768") from None
    if h < 16 or w < 16:
        raise IumaskError(f"{option} {h}x{w}: both sides must be at least 16 pixels")
    return h, w


def checked_workers(value: Any, option: str = "--workers") -> int | str:
    """``auto`` or an integer >= 0 (data-loader worker processes)."""
    if value == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0 or (isinstance(value, float) and value != number):
        raise IumaskError(f"{option} must be auto or an integer >= 0, got {value!r}")
    return number


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _at_least(value, low, option: str, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise IumaskError(f"{option} must be {what or f'a number >= {low}'}, got {value!r}")


# The checks below are the one validation path of every option: the CLI, ``--config`` files and
# experiment specs all end in the configuration objects' ``__post_init__``, which call them.

def checked_integer(value: Any, low: int, option: str, what: str = "") -> int:
    """``value`` if it is an integer (not a bool) >= ``low``, else an error naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise IumaskError(f"{option} must be {what or f'an integer >= {low}'}, got {value!r}")
    return value


def checked_split(value: Any, option: str) -> str:
    """``value`` if it is a split name (a non-empty string without ``/``), else an error naming ``option``."""
    if not isinstance(value, str) or not value or "/" in value:
        raise IumaskError(f"{option} must be a split name such as train or val, got {value!r}")
    return value


def checked_flag(value: Any, option: str) -> bool:
    """``value`` if it is true or false, else an error naming ``option``."""
    if not isinstance(value, bool):
        raise IumaskError(f"{option} must be true or false, got {value!r}")
    return value


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how to read it: ``--data``, ``--format``, ``--conditions``, ``--size``
    and the split names."""

    root: Path
    train_split: str = "train"
    val_split: str = "val"
    size: tuple[int, int] | None = None  # (H, W); None keeps each image's own size
    format: str = "auto"
    conditions: tuple[str, ...] | None = None  # ACDC only

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "size", _checked_size(self.size, "--size"))
        # The registry is read now, not at import: formats registered later are usable by name.
        fmt = self.format.value if isinstance(self.format, Enum) else str(self.format)
        if fmt not in format_names():
            raise IumaskError(f"--format must be one of {', '.join(format_names())}, got {self.format!r}")
        object.__setattr__(self, "format", fmt)
        conditions = self.conditions
        if isinstance(conditions, str):
            conditions = [c.strip() for c in conditions.split(",") if c.strip()]
        conditions = tuple(conditions) if conditions else None
        unknown = [c for c in conditions or () if c not in ACDC_CONDITIONS]
        if unknown:
            raise IumaskError(f"--conditions: unknown ACDC condition(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(ACDC_CONDITIONS)}")
        object.__setattr__(self, "conditions", conditions)
        for name in ("train_split", "val_split"):
            checked_split(getattr(self, name), f"--{name.replace('_', '-')}")

    def open(self, split: str) -> PairedDataset:
        return open_dataset(self.root, split, self.format, self.conditions)

    def with_size(self, size: tuple[int, int] | None) -> DataConfig:
        return replace(self, size=size)

    def source(self, split: str) -> dict:
        """What a manifest records to reopen a split later (e.g. for the PAvPU threshold)."""
        return {"root": str(self.root.resolve()), "split": split, "format": self.format,
                "conditions": list(self.conditions) if self.conditions else None}

    def identity(self) -> dict:
        return {"root": str(self.root.resolve()), "train_split": self.train_split, "val_split": self.val_split,
                "size": list(self.size) if self.size else None, "format": self.format,
                "conditions": list(self.conditions) if self.conditions else None}


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (``--augment/--no-augment``, ``--scale``, ``--crop``, ``--flip``, ``--jitter``)."""

    enabled: bool = option(True, "Augment training samples (scale, crop, flip, colour jitter; label and IU mask "
                                 "move with the image).", cli="augment")
    scale: tuple[float, float] = option((0.5, 2.0), "Random scale range MIN,MAX of the augmentation.", parse=str)
    crop: tuple[int, int] | None = option(None, "Random crop HxW after scaling (padded with the ignore label). "
                                                "Default: the input size.", parse=str)
    flip: bool = option(True, "Random horizontal flip.")
    jitter: float = option(0.2, "Brightness/contrast/saturation jitter (image only); 0 = off.")

    def __post_init__(self) -> None:
        scale = self.scale
        if isinstance(scale, str):
            try:
                scale = tuple(float(v) for v in scale.split(","))
            except ValueError:
                raise IumaskError(f"--scale {self.scale!r}: write it as MIN,MAX, e.g. 0.5,2.0") from None
        if not isinstance(scale, (list, tuple)) or len(scale) != 2 or not all(_is_number(v) for v in scale):
            raise IumaskError(f"--scale {self.scale!r}: write it as MIN,MAX, e.g. 0.5,2.0")
        object.__setattr__(self, "scale", (float(scale[0]), float(scale[1])))
        checked_flag(self.enabled, "--augment")
        object.__setattr__(self, "crop", _checked_size(self.crop, "--crop"))
        if self.enabled:
            from iumask.data.augment import JointAugment

            JointAugment.from_options(self.options())  # its checks, once, before any work

    def options(self) -> dict | None:
        """The :class:`JointAugment` options, or None when augmentation is off."""
        if not self.enabled:
            return None
        return {"scale": list(self.scale), "crop": list(self.crop) if self.crop else None, "flip": self.flip,
                "jitter": self.jitter}

    def transform(self, ignore_index: int) -> JointAugment | None:
        from iumask.data.augment import JointAugment

        options = self.options()
        return None if options is None else JointAugment.from_options(options, ignore_index=ignore_index)


# ----------------------------------------------------------------------------- models and training


def _checked_weights(weights) -> str | None:
    weights = None if weights in (None, "", "none") else str(weights)
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise IumaskError(f"--encoder-weights {weights}: file not found; give an existing file, 'imagenet' "
                          "or 'none'")
    return weights


@dataclass(frozen=True)
class ModelConfig:
    """The members: one DeepLabV3+ per ``--encoder`` and their initialisation (``--encoder-weights``:
    one value for every member, or, from a config or experiment spec, a table giving each encoder
    its own, e.g. a local ImageNet state dict per backbone)."""

    encoders: tuple[str, ...] = DEFAULT_ENCODERS
    # None (random), "imagenet", a local state-dict file, or ((encoder, one of those), ...)
    encoder_weights: str | None | tuple[tuple[str, str | None], ...] = None
    architecture: str = ARCHITECTURE  # smp's class name (--arch unet gives "Unet")

    def __post_init__(self) -> None:
        from iumask.models import check_architecture, check_encoder  # smp's registries: torch is imported here

        encoders = (self.encoders,) if isinstance(self.encoders, str) else tuple(self.encoders or ())
        if not encoders:
            raise IumaskError("--encoder: give at least one encoder")
        for encoder in encoders:
            check_encoder(encoder)
        object.__setattr__(self, "encoders", encoders)
        arch = self.architecture.value if isinstance(self.architecture, Enum) else self.architecture
        object.__setattr__(self, "architecture", architecture_name(arch))
        if self.architecture != ARCHITECTURE:
            for encoder in set(encoders):
                check_architecture(self.architecture, encoder)
        weights = self.encoder_weights
        if isinstance(weights, dict) or (isinstance(weights, tuple) and weights and isinstance(weights[0], tuple)):
            table = dict(weights)
            missing = [e for e in encoders if e not in table]
            if missing:
                raise IumaskError(f"--encoder-weights: no entry for {', '.join(missing)}; give every encoder "
                                  "its weights (none, imagenet or a file)")
            weights = tuple((e, _checked_weights(table[e])) for e in sorted(table))
        else:
            weights = _checked_weights(weights)
        object.__setattr__(self, "encoder_weights", weights)

    def weights_for(self, encoder: str) -> str | None:
        """The initialisation of the member with this encoder."""
        if isinstance(self.encoder_weights, tuple):
            return dict(self.encoder_weights)[encoder]
        return self.encoder_weights

    @property
    def names(self) -> list[str]:
        """Member folder names: the encoder, with ``-2``, ``-3`` for repeats."""
        names, seen = [], {}
        for encoder in self.encoders:
            seen[encoder] = seen.get(encoder, 0) + 1
            names.append(encoder if seen[encoder] == 1 else f"{encoder}-{seen[encoder]}")
        return names


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the authors' (docs/method.md §9) except where noted."""

    epochs: int = option(60, "Training epochs (authors: 60 on ACDC).")
    batch_size: int = option(2, "Batch size (authors: 2).")
    lr: float | None = option(None, "Learning rate of the decoder/head. Default: 1e-3 for MobileNet encoders, 1e-4 "
                                    "otherwise (authors).")
    backbone_lr_factor: float = option(0.1, "Encoder learning rate = lr × this (authors: 0.1).")
    weight_decay: float = option(1e-4, "Adam weight decay.")
    poly_power: float = option(0.9, "Power p of the poly learning-rate schedule lr·(1 − step/steps)^p, stepped every "
                                    "optimizer step (authors: 0.9).")
    seed: int = option(0, "Random seed; member k uses seed + k.")
    # "auto": iumask.overlap.resolve_workers
    num_workers: int | str = option("auto", WORKERS_HELP, cli="workers", parse=str)
    # iumask.device.usable_amp says what runs where
    amp: str = option("off", "Mixed precision: bf16 (CUDA or CPU) or fp16 (CUDA, with gradient scaling when "
                             "training; on a CPU it is ignored with a warning).", parse=Amp)
    # Not part of the result's identity: resuming is exact wherever the checkpoint was taken.
    checkpoint_every: int = option(500, "Write checkpoint.pt every N optimizer steps as well as at each epoch end "
                                        "(0: epoch ends only). A rerun resumes exactly from it; N does not change "
                                        "the result.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_workers", checked_workers(self.num_workers))
        for name, low in (("epochs", 1), ("batch_size", 1), ("checkpoint_every", 0), ("seed", 0)):
            checked_integer(getattr(self, name), low, f"--{name.replace('_', '-')}")
        if self.lr is not None:
            _at_least(self.lr, 0, "--lr", "a positive learning rate")
            if self.lr == 0:
                raise IumaskError("--lr must be a positive learning rate, got 0")
        _at_least(self.backbone_lr_factor, 0, "--backbone-lr-factor")
        _at_least(self.weight_decay, 0, "--weight-decay")
        _at_least(self.poly_power, 0, "--poly-power")
        object.__setattr__(self, "amp", choice(Amp, self.amp, "--amp"))

    def lr_for(self, encoder: str) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if "mobilenet" in encoder else 1e-4

    def identity(self) -> dict:
        """The options the trained weights depend on (recorded in manifests, compared for cache hits)."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_OPTIONS}


# TrainConfig fields that do not change the result: checkpoints resume exactly, and every sample's
# augmentation depends on (seed, epoch, index) only, whichever loader process draws it.
RUNTIME_OPTIONS = ("checkpoint_every", "num_workers")


@dataclass(frozen=True)
class LossConfig:
    """The training loss: a loss method (``--loss``: cross-entropy, the paper's, or a peer method
    from :data:`iumask.core.LOSS_METHODS`) × (1 + IU)^γ (γ = ``--exponent``; 0 or no masks: no IU
    weighting), optionally with class weights (``--class-weights``), and the methods' parameters."""

    exponent: float = option(2.0, "γ in CE·(1+IU)^γ (authors: 2; 0 = plain CE).")
    class_weights: str = option("none", "Class weights in the loss, from the training labels: inverse (inverse "
                                        "class proportion), median (median frequency balancing) or effective-number "
                                        "(Cui et al. 2019, --effective-number-beta); combinable with any loss and "
                                        "with IU weighting (the focal loss's α).", parse=ClassWeighting)
    loss: str = option("cross-entropy", "Loss method: " + "; ".join(
        f"{name}: {method.summary}" for name, method in LOSS_METHODS.items()) + ". IU weighting multiplies any "
        "per-pixel loss; dice and lovasz take no per-pixel weight.", parse=LossName)
    focal_gamma: float = option(2.0, "--loss focal: focusing parameter γ of (1 − p)^γ (0 = CE).")
    ohem_threshold: float = option(0.7, "--loss ohem: keep pixels whose true-class probability is below this "
                                        "(mmsegmentation: 0.7).")
    ohem_min_kept: int = option(100_000, "--loss ohem: keep at least this many pixels per image (the hardest; "
                                         "mmsegmentation: 100000, sized for 512x1024 crops).")
    effective_number_beta: float = option(DEFAULT_EFFECTIVE_NUMBER_BETA, "--class-weights effective-number: β in "
                                                                         "(1 − β)/(1 − β^n) over pixel counts n.")

    def __post_init__(self) -> None:
        _at_least(self.exponent, 0, "--exponent", "a finite γ >= 0")
        object.__setattr__(self, "exponent", float(self.exponent))
        object.__setattr__(self, "class_weights", choice(ClassWeighting, self.class_weights, "--class-weights"))
        loss = self.loss.value if isinstance(self.loss, Enum) else str(self.loss)
        if loss not in LOSS_METHODS:
            raise IumaskError(f"--loss must be one of {', '.join(LOSS_METHODS)}, got {self.loss!r}")
        object.__setattr__(self, "loss", loss)
        _at_least(self.focal_gamma, 0, "--focal-gamma", "a finite γ >= 0")
        object.__setattr__(self, "focal_gamma", float(self.focal_gamma))
        if not _is_number(self.ohem_threshold) or not 0 < self.ohem_threshold <= 1:
            raise IumaskError(f"--ohem-threshold must be a probability in (0, 1], got {self.ohem_threshold!r}")
        object.__setattr__(self, "ohem_threshold", float(self.ohem_threshold))
        checked_integer(self.ohem_min_kept, 0, "--ohem-min-kept")
        if not _is_number(self.effective_number_beta) or not 0 <= self.effective_number_beta < 1:
            raise IumaskError(f"--effective-number-beta must be in [0, 1), got {self.effective_number_beta!r}")
        object.__setattr__(self, "effective_number_beta", float(self.effective_number_beta))

    @property
    def method(self) -> LossMethod:
        return LOSS_METHODS[self.loss]

    def plain(self) -> LossConfig:
        """The same loss and class weighting without IU weighting (the baseline's loss)."""
        return replace(self, exponent=0.0)

    def check_iu_weighting(self, where: str = "--loss") -> None:
        """Refuse IU weighting of a region loss (Dice, Lovász): it has no per-pixel term to weight."""
        if not self.method.takes_pixel_weights and self.exponent != 0:
            raise IumaskError(f"{where} {self.loss}: a region loss takes no per-pixel weight, so it cannot be "
                              "combined with IU weighting; use cross-entropy, focal, ohem or recall with IU masks, "
                              "or train it without masks (train-baseline)")

    def identity(self) -> dict:
        """What a trained model's identity records of its loss: γ and the class weighting, and only
        where they are used, the method and its parameters and β (so models trained before these
        options existed keep their identity)."""
        out: dict[str, Any] = {"exponent": self.exponent, "class_weights": self.class_weights}
        if self.loss != "cross-entropy":
            out["method"] = self.loss
            out.update({name: getattr(self, name) for name in self.method.parameters})
        if self.class_weights == "effective-number":
            out["effective_number_beta"] = self.effective_number_beta
        return out


# ----------------------------------------------------------------------------- masks and evaluation


# What a mask store's messages tell the user to do: make-masks and the commands that read its stores
# (train-weighted, stats) name --store; run and experiment keep the store inside their --out.
MAKE_MASKS_ADVICE = StoreAdvice(other_path="use another --store path", overwrite="pass --overwrite to recompute it",
                                remake="rerun iumask make-masks with --overwrite (or use another --store path)",
                                missing="run iumask make-masks first or fix the --store path")
OUT_FOLDER_ADVICE = StoreAdvice(other_path="use another --out folder", overwrite="pass --overwrite to recompute it",
                                remake="rerun with --overwrite (or use another --out folder)",
                                missing="rerun the command that makes it")


@dataclass(frozen=True, kw_only=True)
class InferenceOptions:
    """How a stage runs models over images, declared once for make-masks (:class:`MaskConfig`),
    predict (:class:`PredictConfig`) and evaluate (:class:`EvalConfig`), which extend it: images
    per forward pass, loader processes and the autocast mode. Keyword-only, so each stage's own
    options keep their positions. Only a precision other than float32 enters a result's identity
    (each stage records the precision actually used, :func:`iumask.device.resolve_amp`)."""

    batch_size: int = option(4, "Images per forward pass (images of one size are batched together).")
    num_workers: int | str = option("auto", WORKERS_HELP, cli="workers", parse=str)
    amp: str = option("off", INFERENCE_AMP_HELP, parse=Amp)

    def __post_init__(self) -> None:
        checked_integer(self.batch_size, 1, "--batch-size")
        object.__setattr__(self, "num_workers", checked_workers(self.num_workers))
        object.__setattr__(self, "amp", choice(Amp, self.amp, "--amp"))


@dataclass(frozen=True, kw_only=True)
class SourceOptions(InferenceOptions):
    """:class:`InferenceOptions` with where p̄ comes from: the ensemble's mean softmax, or one model
    with MC dropout (``passes`` passes): make-masks and predict."""

    source: str = option("ensemble", SOURCE_HELP, parse=UncertaintyKind)
    passes: int = option(8, PASSES_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "source", choice(UncertaintyKind, self.source, "--source"))
        checked_integer(self.passes, 2, "--passes")

    def source_identity(self) -> dict:
        """What a result records of its source and precision: nothing for the defaults (an ensemble
        in float32), so stores of earlier versions keep their identity."""
        out: dict[str, Any] = {}
        if self.source != UncertaintyKind.ENSEMBLE.value:
            out.update(source=self.source, passes=self.passes)
        if self.amp != "off":
            out.update(amp=self.amp)
        return out


@dataclass(frozen=True)
class MaskConfig(SourceOptions):
    """How IU masks are made (make-masks, online training): the uncertainty source and the running
    of the models (:class:`SourceOptions`), the instances (``--instances-from``, ``--connectivity``),
    the entropy (``--normalize``) and the store's shard size."""

    instances_from: str = option("prediction", "Instances from the ensemble's prediction (authors) or the "
                                               "ground-truth label.", parse=InstanceSource)
    connectivity: int = option(8, CONNECTIVITY_HELP, parse=Connectivity)
    normalize: bool = option(False, "Divide entropy by ln C (range 0..1).")
    # Not part of the masks' identity (background threads: $IUMASK_BACKGROUND_THREADS).
    images_per_shard: int | None = option(None, "Images per shard file of a new store (default: about 64 MB of "
                                                "arrays, at most 1024 images; 1: a file per image, unsharded). A "
                                                "resumed store keeps its own; does not change the masks.",
                                          kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "instances_from", choice(InstanceSource, self.instances_from, "--instances-from"))
        object.__setattr__(self, "connectivity", int(choice(Connectivity, self.connectivity, "--connectivity")))
        checked_flag(self.normalize, "--normalize")
        if self.images_per_shard is not None:
            checked_integer(self.images_per_shard, 1, "--images-per-shard")

    def identity(self) -> dict:
        """The mask options a store records (the source and the precision only when they are not
        the defaults: :meth:`SourceOptions.source_identity`)."""
        return {"connectivity": self.connectivity, "instances_from": self.instances_from, "normalize": self.normalize,
                **self.source_identity()}


@dataclass(frozen=True)
class EvalConfig(InferenceOptions):
    """How models are scored: the split, PAvPU's threshold, window and stride, and the resolution,
    with the running of the models (:class:`InferenceOptions`: the results do not depend on the
    batch size or the loader processes)."""

    split: str = option("val", "Split to evaluate.")
    pavpu_threshold: float | None = option(None, "Entropy threshold u_th of PAvPU. Default: the model's "
                                                 "training-set mean entropy.")
    pavpu_window: int = option(4, "PAvPU patch side w.")
    pavpu_stride: int | None = option(None, "PAvPU patch stride (default w: non-overlapping; the authors' code "
                                            "used 1).")
    resolution: str = option("native", "native: score at each label's own size (logits upsampled; the default for "
                                       "reporting); train: resize images and labels to the training size.",
                             parse=Resolution)
    inference: str = option("resize", "With --resolution native and a model trained at a reduced size: resize the "
                                      "image, or slide windows of the training size over the full image.",
                            parse=Inference)
    # Fit a temperature on this split and report calibration after it (the command line's
    # --temperature-scale with --temperature-split).
    temperature_split: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        checked_split(self.split, "--split")
        if self.temperature_split is not None:
            checked_split(self.temperature_split, "--temperature-split")
        for name in ("pavpu_window", "pavpu_stride"):
            value = getattr(self, name)
            if value is None and name == "pavpu_stride":
                continue
            checked_integer(value, 1, f"--{name.replace('_', '-')}", "at least 1 pixel")
        if self.pavpu_threshold is not None:
            _at_least(self.pavpu_threshold, 0, "--pavpu-threshold", "a finite entropy >= 0")
        object.__setattr__(self, "resolution", choice(Resolution, self.resolution, "--resolution"))
        object.__setattr__(self, "inference", choice(Inference, self.inference, "--inference"))

    def identity(self) -> dict:
        """What the results depend on (the precision only when not the default float32, so
        results files of earlier versions stay cache hits)."""
        out = {k: v for k, v in asdict(self).items()
               if k not in ("num_workers", "amp", "temperature_split", "batch_size")}
        if self.amp != "off":
            out["amp"] = self.amp
        if self.temperature_split is not None:
            out["temperature_split"] = self.temperature_split
        return out


@dataclass(frozen=True)
class PredictConfig(SourceOptions):
    """How ``iumask predict`` applies a model to unlabeled images: the uncertainty source and the
    running of the models (:class:`SourceOptions`), ``--inference``, the instances'
    ``--connectivity``, ``--save-arrays`` (a zarr store in the mask store's layout) and ``--overwrite``."""

    inference: str = option("resize", "For a model trained at a reduced size: resize the image and upsample the "
                                      "logits, or slide windows of the training size over the full image.",
                            parse=Inference)
    save_arrays: bool = option(False, "Also write entropy, IU and prediction per image to OUT/arrays.zarr (the mask "
                                      "store's layout).")
    overwrite: bool = option(False, "Predict every image again, also over the outputs of another model or other "
                                    "options, which are refused otherwise (by default a rerun skips images whose "
                                    "outputs exist).")
    connectivity: int = option(8, CONNECTIVITY_HELP, parse=Connectivity)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "inference", choice(Inference, self.inference, "--inference"))
        object.__setattr__(self, "connectivity", int(choice(Connectivity, self.connectivity, "--connectivity")))
        checked_flag(self.save_arrays, "--save-arrays")
        checked_flag(self.overwrite, "--overwrite")

    def identity(self) -> dict:
        """The options the predicted arrays depend on (a ``--save-arrays`` store's ``options``)."""
        return {"connectivity": self.connectivity, "instances_from": "prediction", "normalize": False,
                "inference": self.inference, **self.source_identity()}


# ----------------------------------------------------------------------------- all stages

# ``iumask run``'s members when none are given: small enough for its demo on a CPU.
RUN_ENCODERS = ("mobilenet_v2", "resnet18", "resnet34")


@dataclass(frozen=True)
class TrackingConfig:
    """Where training runs are mirrored for people to compare them (``--track``, ``--tracking-uri``):
    nowhere, or an MLflow tracking store (:mod:`iumask.tracking`). Never part of an identity: a
    tracked and an untracked training make the same model. ``uri`` None: ``$MLFLOW_TRACKING_URI``,
    else a store in the command's output folder."""

    track: str = option("none", "Also mirror each trained member's run in an experiment tracker: mlflow "
                                "(parameters, per-epoch metrics, files; needs pip install 'iumask[mlflow]'; see "
                                "docs/tracking.md). Never changes what is trained; a tracker that fails is a "
                                "warning.", parse=Track)
    uri: str | None = option(None, "With --track mlflow: the tracking URI (http://HOST:PORT, sqlite:///PATH, ...). "
                                   "Default: $MLFLOW_TRACKING_URI, else a SQLite store in OUT/mlruns.",
                             cli="tracking_uri")

    def __post_init__(self) -> None:
        object.__setattr__(self, "track", choice(Track, self.track, "--track"))
        if self.uri is not None and (not isinstance(self.uri, str) or not self.uri.strip()):
            raise IumaskError(f"--tracking-uri must be a URI such as http://HOST:PORT or sqlite:///PATH, "
                              f"got {self.uri!r}")
        if self.uri is not None and not self.enabled:
            raise IumaskError(f"--tracking-uri {self.uri}: tracking is off; add --track mlflow")

    @property
    def enabled(self) -> bool:
        return self.track != Track.NONE.value

    def override(self, track: str | None, uri: str | None) -> TrackingConfig:
        """These settings (an experiment spec's) with the command line's ``--track`` and
        ``--tracking-uri`` where given; ``--track none`` turns off the spec's URI too."""
        track = self.track if track is None else choice(Track, track, "--track")
        if uri is None and track != Track.NONE.value:
            uri = self.uri
        return TrackingConfig(track, uri)


@dataclass(frozen=True)
class RunConfig:
    """Every stage of ``iumask run``. With ``synthetic`` (the generator's arguments, ``{}`` for its
    defaults) the embedded synthetic dataset is written to ``data.root`` first."""

    out: Path
    data: DataConfig
    model: ModelConfig = field(default_factory=lambda: ModelConfig(RUN_ENCODERS))
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: bool = False  # stage 3 trains the members jointly with on-the-fly masks (no stage 2)
    device: str = "auto"
    overwrite: bool = False
    synthetic: dict | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        self.loss.check_iu_weighting()  # the weighted stage would refuse it after the baseline's training


def artifact_identity(stage: str, **parts: Any) -> dict:
    """The inputs an artifact depends on, as compared for a cache hit: ``format_version``,
    ``stage`` and ``parts`` (config objects turned into their ``identity()``), JSON-normal."""
    out: dict[str, Any] = {"format_version": FORMAT_VERSION, "stage": stage}
    for key, value in parts.items():
        out[key] = value.identity() if hasattr(value, "identity") else value
    return json_normal(out)
