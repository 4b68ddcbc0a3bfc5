"""The experiment spec (``iumask experiment SPEC.toml``): what is compared, validated once.

A spec names the training data, the arms (loss settings), the encoders, the seeds, the ensemble
that makes the IU masks and the evaluations. Every table is turned into the configuration
objects of :mod:`iumask.config` here, so a bad value stops the experiment before any training,
with the spec file, the table and the key in the message. Relative paths are relative to the
spec file. See docs/experiments.md for the format.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from iumask.config import (
    AugmentConfig,
    ClassWeighting,
    DataConfig,
    EvalConfig,
    LossConfig,
    MaskConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    UncertaintyKind,
    checked_integer,
    choice,
    json_normal,
    option_fields,
)
from iumask.errors import IumaskError

# How an arm uses IU masks: not at all, from the mask store (offline), or computed while training.
IU_MODES = ("none", "offline", "online")
# The loss keys of an arm besides iu and exponent: LossConfig's options (method, weighting, parameters).
LOSS_KEYS = tuple(f.name for f in option_fields(LossConfig) if f.name != "exponent")
# The mask options of [masks] (how masks are made): MaskConfig's options.
MASK_OPTIONS = tuple(f.name for f in option_fields(MaskConfig))
ARM_KEYS = ("name", "iu", "exponent", *LOSS_KEYS, "instances_from", "connectivity", "normalize", "train",
            "augment", "online_encoders")
TOP_KEYS = ("name", "data", "train", "augment", "encoders", "encoder_weights", "arch", "seeds", "masks", "evaluation",
            "evaluations", "arms", "reference", "rare_classes", "device", "bootstrap_resamples", "bootstrap_seed",
            "track", "tracking_uri")
MASK_KEYS = ("encoders", "arch", "seed", "path", *MASK_OPTIONS, "train")
EVALUATION_KEYS = ("name", "root", "format", "conditions", "split")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def seedless(train_options: dict) -> dict:
    """Training options without the seed: what a spec fixes (each run's seed comes from ``seeds``)."""
    return {k: v for k, v in train_options.items() if k != "seed"}


@dataclass(frozen=True)
class Arm:
    """One loss setting: plain CE, class weights, IU weighting (offline or online) or both; with
    its own training and augmentation options where it overrides the experiment's."""

    name: str
    iu: str = "none"
    loss: LossConfig = LossConfig(exponent=0.0)
    masks: MaskConfig = MaskConfig()  # instances of its IU masks (offline: which store; online: on the fly)
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    online_encoders: tuple[str, ...] = ()  # online: the members trained jointly


    def identity(self) -> dict:
        """What this arm's models depend on beyond the experiment's data and model: the loss, the IU
        masks it uses and its training and augmentation options (the seed excluded: it is the run's)."""
        return json_normal({"iu": self.iu, "loss": self.loss.identity(),
                            "masks": self.masks.identity() if self.iu != "none" else None,
                            "train": seedless(self.train.identity()),
                            "augment": asdict(self.augment), "online_encoders": list(self.online_encoders)})


@dataclass(frozen=True)
class Evaluation:
    """One (dataset, split) the models are scored on; ``name`` labels it in the report."""

    name: str
    data: DataConfig
    split: str


@dataclass(frozen=True)
class MaskEnsemble:
    """Where the IU masks' uncertainty comes from: an ensemble trained by the experiment (one
    member per encoder, seed ``seed``), or a trained ensemble or model given by ``path``; with
    ``source = "mc-dropout"`` one model with dropout active."""

    model: ModelConfig | None  # None when ``path`` is given
    train: TrainConfig
    seed: int
    path: Path | None
    masks: MaskConfig


@dataclass(frozen=True)
class ExperimentSpec:
    path: Path
    name: str
    data: DataConfig
    train: TrainConfig  # experiment-wide (arms may override)
    augment: AugmentConfig  # experiment-wide (arms may override); the mask ensemble's
    encoders: tuple[str, ...]
    encoder_weights: str | None | tuple  # as ModelConfig holds it (per encoder: pairs)
    architecture: str  # the arms' models' (smp class name); the mask ensemble has its own
    seeds: tuple[int, ...]
    arms: tuple[Arm, ...]
    ensemble: MaskEnsemble
    evaluations: tuple[Evaluation, ...]
    eval: EvalConfig
    reference: str
    rare_classes: int
    device: str
    raw: dict  # the spec as read (JSON-normal), recorded in summary.json
    bootstrap_resamples: int = 10_000  # the report's bootstrap intervals (iumask.experiment.bootstrap)
    bootstrap_seed: int = 0
    # track, tracking_uri: where the runs are mirrored (the command line's --track and --tracking-uri win)
    tracking: TrackingConfig = TrackingConfig()

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def identity(self) -> dict:
        """What the models and results of an experiment folder depend on, recorded in the folder by the
        first process (see :func:`spec_differences`): the data, the model, the mask ensemble and its
        masks, the evaluation options, and per arm and per evaluation their options. Not the name,
        the seeds, the encoders, which arms there are, the reference, the report's options or the
        device: adding seeds, encoders or arms to a spec keeps its finished runs."""
        e = self.ensemble
        ensemble = {"path": None if e.path is None else str(e.path.resolve()), "seed": e.seed,
                    "masks": e.masks.identity(),
                    "train": seedless(e.train.identity()),
                    "encoders": None if e.model is None else list(e.model.encoders),
                    "architecture": None if e.model is None else e.model.architecture}
        return json_normal({
            "data": self.data.identity(), "architecture": self.architecture, "encoder_weights": self.encoder_weights,
            "ensemble": ensemble if any(a.iu == "offline" for a in self.arms) else None,
            "evaluation": self.eval.identity(),
            "evaluations": {f"{v.name}-{v.split}": v.data.identity() for v in self.evaluations},
            "arms": {a.name: a.identity() for a in self.arms}})

    def model(self, encoders: tuple[str, ...]) -> ModelConfig:
        return ModelConfig(encoders, self.encoder_weights, self.architecture)

    @property
    def training_runs(self) -> int:
        """Models trained by the experiment (the mask ensemble's members included)."""
        runs = 0
        for arm in self.arms:
            per_seed = len(arm.online_encoders) if arm.iu == "online" else len(self.encoders)
            runs += per_seed * len(self.seeds)
        if self.ensemble.model is not None and any(a.iu == "offline" for a in self.arms):
            runs += len(self.ensemble.model.encoders)
        return runs


# Entries of the spec identity that a spec may add or drop: its arms and its evaluations.
OPEN_ENTRIES = ("arms", "evaluations")


def spec_differences(recorded: dict, current: dict) -> list[str]:
    """The keys (dotted) where two :meth:`ExperimentSpec.identity` records differ, with both values;
    an arm or evaluation that only one of them has is no difference (seeds, arms and evaluations
    can be added to a spec)."""
    def flat(value, prefix: str = "") -> dict:
        if isinstance(value, dict) and value:
            out = {}
            for key, inner in value.items():
                out.update(flat(inner, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: value}

    differences = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if key in OPEN_ENTRIES and isinstance(old, dict) and isinstance(new, dict):
            shared = set(old) & set(new)
            old, new = {k: old[k] for k in shared}, {k: new[k] for k in shared}
        old_flat, new_flat = flat(old, f"{key}."), flat(new, f"{key}.")
        for name in sorted(set(old_flat) | set(new_flat)):
            if old_flat.get(name, "absent") != new_flat.get(name, "absent"):
                differences.append(f"{name} ({old_flat.get(name, 'absent')!r} → {new_flat.get(name, 'absent')!r})")
    return differences


# ----------------------------------------------------------------------------- reading


class _Table:
    """A TOML table being read: every error names the file and the table; unknown keys are errors
    with the closest valid key."""

    def __init__(self, file: Path, where: str, values: Any, allowed: tuple[str, ...], aliases: dict | None = None):
        self.file, self.where = file, where
        if not isinstance(values, dict):
            self.fail(f"must be a table, got {values!r}")
        aliases = aliases or {}
        allowed = (*allowed, *aliases)
        self.values = {}
        for key, value in values.items():  # a key's other spelling (the command line's) is read as the key
            name = aliases.get(key, key)
            if name in self.values:
                self.fail(f"{name} is given twice (as {name!r} and {key!r}); keep one")
            self.values[name] = value
        for key in values:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
                self.fail(f"unknown key {key!r}{hint}")

    def child(self, key: str) -> str:
        """The name of a sub-table, e.g. ``train`` or ``arms #2.train``."""
        return key if self.where == "top level" else f"{self.where}.{key}"

    def fail(self, message: str):
        raise IumaskError(f"{self.file}: [{self.where}] {message}")

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def build(self, make, *args, **kwargs):
        """``make(*args, **kwargs)``: a config object's own error, with the file and table in front."""
        try:
            return make(*args, **kwargs)
        except IumaskError as exc:
            self.fail(str(exc))
        except TypeError as exc:  # an unknown field of a config dataclass
            self.fail(str(exc).split(".", 1)[-1].strip())


def _fields_of(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def _cli_names(cls) -> dict[str, str]:
    """The command-line names of ``cls``'s options where they differ from the field's (``workers`` for
    ``num_workers``, ``augment`` for ``enabled``): a spec may use either spelling."""
    return {f.metadata["cli"]: f.name for f in option_fields(cls) if f.metadata["cli"]}


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)


def _weights_path(base: Path, value: Any) -> str | None:
    """none / imagenet as they are; a file path relative to the spec."""
    if value in (None, "", "none", "imagenet"):
        return value
    return str(_resolve(base, str(value)))


def _train(table: _Table, values: dict, base: TrainConfig) -> TrainConfig:
    sub = _Table(table.file, table.child("train"), values, _fields_of(TrainConfig), _cli_names(TrainConfig))
    if "seed" in sub.values:
        sub.fail("seed: each run's seed comes from the top-level seeds list (the mask ensemble's from [masks] seed)")
    return sub.build(replace, base, **sub.values)


def _augment(table: _Table, values: dict, base: AugmentConfig) -> AugmentConfig:
    sub = _Table(table.file, table.child("augment"), values, _fields_of(AugmentConfig), _cli_names(AugmentConfig))
    return sub.build(replace, base, **sub.values)


def _name(table: _Table, value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        table.fail(f"{what} {value!r}: use letters, digits and _ . + - (it names folders)")
    return value


def load_spec(path: str | Path, data_root: str | Path | None = None) -> ExperimentSpec:
    """Read and validate an experiment spec; every error names the file, the table and the key.
    ``data_root`` (``experiment --data``) replaces the spec's ``[data] root``: the training data,
    and the evaluations that name no root of their own."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise IumaskError(f"{path}: experiment spec not found; give the path of a TOML spec "
                          "(see examples/camvid/experiment.toml)") from None
    except tomllib.TOMLDecodeError as exc:
        raise IumaskError(f"{path}: not valid TOML ({exc}); fix the spec") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise IumaskError(f"{path}: cannot read the spec ({exc}); give a readable TOML file") from None
    return parse_spec(raw, path, data_root)


def parse_spec(raw: dict, path: Path, data_root: str | Path | None = None) -> ExperimentSpec:
    base = path.resolve().parent
    top = _Table(path, "top level", raw, TOP_KEYS)

    data_values = dict(top.get("data") or top.fail("needs a [data] table with the training dataset's root"))
    data_table = _Table(path, "data", data_values, _fields_of(DataConfig))
    if data_root is not None:  # --data: a folder on this machine, relative to the working directory
        if not Path(data_root).is_dir():
            raise IumaskError(f"--data {data_root}: no such folder; give the training dataset's folder")
        data_values["root"] = Path(data_root).resolve()
    elif "root" not in data_values:
        data_table.fail("needs root = the training dataset's folder (or pass --data)")
    else:
        data_values["root"] = _resolve(base, data_values["root"])
    data = data_table.build(DataConfig, **data_values)
    if not data.root.is_dir():
        data_table.fail(f"root {data.root}: no such folder; give the dataset's folder (relative to the spec) "
                        "or pass --data DIR")

    train = _train(top, top.get("train", {}), TrainConfig())
    augment = _augment(top, top.get("augment", {}), AugmentConfig())
    encoders = top.get("encoders", ["mobilenet_v2"])
    encoders = (encoders,) if isinstance(encoders, str) else tuple(encoders)
    weights = top.get("encoder_weights")
    if isinstance(weights, dict):  # one initialisation per encoder, e.g. local ImageNet state dicts
        weights = {encoder: _weights_path(base, value) for encoder, value in weights.items()}
    else:
        weights = _weights_path(base, weights)
    model = top.build(ModelConfig, encoders, weights, top.get("arch", "deeplabv3plus"))
    if len(set(model.encoders)) != len(model.encoders):
        top.fail(f"encoders {list(encoders)}: list each encoder once (seeds give the repeats)")

    seeds = top.get("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(top.build(checked_integer, seeds, 1, "seeds", "a number of seeds >= 1 or a list "
                                                                            "such as [0, 1, 2]")))
    if not isinstance(seeds, list) or not seeds or len(set(map(repr, seeds))) != len(seeds):
        top.fail(f"seeds = {seeds!r}: give a number of seeds or a list of distinct integers >= 0")
    for seed in seeds:
        top.build(checked_integer, seed, 0, "seeds", "a number of seeds or a list of distinct integers >= 0")

    mask_table = _Table(path, "masks", top.get("masks", {}), MASK_KEYS, _cli_names(MaskConfig))
    mask_values = mask_table.values
    mask_options = {k: mask_values[k] for k in MASK_OPTIONS if k in mask_values}
    masks = mask_table.build(MaskConfig, **mask_options)
    mask_path = _resolve(base, mask_values.get("path"))
    if mask_path is not None and not mask_path.exists():
        mask_table.fail(f"path {mask_path}: not found; give a trained ensemble.json or model folder, or "
                        "remove path to train the ensemble")
    if mask_path is not None and "encoders" in mask_values:
        mask_table.fail("give either path (a trained ensemble) or encoders (trained by the experiment)")
    if masks.source == UncertaintyKind.MC_DROPOUT.value:
        mask_encoders = mask_values.get("encoders", [model.encoders[0]])
        if mask_path is None and len(mask_encoders) != 1:
            mask_table.fail("source = 'mc-dropout' uses one model: give one encoder or a path")
    else:
        mask_encoders = mask_values.get("encoders", ["mobilenet_v2", "resnet18", "resnet34"])
    mask_seed = mask_table.build(checked_integer, mask_values.get("seed", 0), 0, "seed")
    ensemble = MaskEnsemble(
        model=None if mask_path is not None else mask_table.build(ModelConfig, tuple(mask_encoders),
                                                                   model.encoder_weights,
                                                                   mask_values.get("arch", "deeplabv3plus")),
        train=_train(mask_table, mask_values.get("train", {}), train), seed=mask_seed, path=mask_path, masks=masks)

    arm_values = top.get("arms")
    if not isinstance(arm_values, list) or not arm_values:
        top.fail("needs at least one [[arms]] table, e.g. name = 'regular' and name = 'iu' with iu = 'offline'")
    arms = []
    for i, values in enumerate(arm_values):
        arms.append(_arm(_Table(path, f"arms #{i + 1}", values, ARM_KEYS), train, augment, masks, ensemble, model))
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        top.fail(f"arm names must differ, got {names}")
    reference = top.get("reference", "regular" if "regular" in names else names[0])
    if reference not in names:
        top.fail(f"reference = {reference!r} is not an arm; choose one of {', '.join(names)}")

    eval_table = _Table(path, "evaluation", top.get("evaluation", {}),
                        tuple(f for f in _fields_of(EvalConfig) if f != "split"), _cli_names(EvalConfig))
    eval_config = eval_table.build(EvalConfig, **eval_table.values)
    evaluations = []
    for i, values in enumerate(top.get("evaluations") or [{"split": data.val_split}]):
        evaluations.append(_evaluation(_Table(path, f"evaluations #{i + 1}", values, EVALUATION_KEYS), data, base))
    labels = [(e.name, e.split) for e in evaluations]
    if len(set(labels)) != len(labels):
        top.fail(f"evaluations repeat a (name, split) pair: {labels}")

    rare = top.build(checked_integer, top.get("rare_classes", 5), 1, "rare_classes",
                     "the number of rarest classes to test (>= 1)")
    resamples = top.build(checked_integer, top.get("bootstrap_resamples", 10_000), 100, "bootstrap_resamples",
                          "the bootstrap's resamples (an integer >= 100; 10000 by default)")
    bootstrap_seed = top.build(checked_integer, top.get("bootstrap_seed", 0), 0, "bootstrap_seed",
                               "the bootstrap's random seed (an integer >= 0)")
    tracking = top.build(TrackingConfig, top.get("track", "none"), top.get("tracking_uri"))
    name = top.get("name", path.stem)
    return ExperimentSpec(
        path=path, name=str(name), data=data, train=train, augment=augment, encoders=model.encoders,
        encoder_weights=model.encoder_weights, architecture=model.architecture,
        seeds=tuple(seeds), arms=tuple(arms), ensemble=ensemble, evaluations=tuple(evaluations), eval=eval_config,
        reference=reference, rare_classes=rare, device=str(top.get("device", "auto")), raw=json_normal(raw),
        bootstrap_resamples=resamples, bootstrap_seed=bootstrap_seed, tracking=tracking)


def _arm(table: _Table, train: TrainConfig, augment: AugmentConfig, masks: MaskConfig, ensemble: MaskEnsemble,
         model: ModelConfig) -> Arm:
    name = _name(table, table.get("name"), "name")
    iu = table.get("iu", "none")
    if iu not in IU_MODES:
        table.fail(f"iu = {iu!r}: choose one of {', '.join(IU_MODES)}")
    exponent = table.get("exponent", 2.0 if iu != "none" else 0.0)
    if iu == "none" and exponent:
        table.fail(f"exponent = {exponent} needs IU masks: add iu = 'offline' or 'online'")
    weighting = table.build(choice, ClassWeighting, table.get("class_weights", "none"), "class_weights")
    options = {k: table.get(k) for k in LOSS_KEYS if k in table.values and k != "class_weights"}
    loss = table.build(LossConfig, exponent=exponent, class_weights=weighting, **options)
    if iu != "none":
        table.build(loss.check_iu_weighting, "loss =")
    instance_options = {k: table.get(k) for k in ("instances_from", "connectivity", "normalize") if k in table.values}
    if instance_options and iu == "none":
        table.fail(f"{', '.join(instance_options)} apply to IU masks: add iu = 'offline' or 'online'")
    arm_masks = table.build(replace, masks, **instance_options)
    online_encoders: tuple[str, ...] = ()
    if iu == "online":
        default = ensemble.model.encoders if ensemble.model is not None else model.encoders
        online_encoders = tuple(table.get("online_encoders", default))
        table.build(ModelConfig, online_encoders, model.encoder_weights, model.architecture)
        missing = [e for e in model.encoders if e not in online_encoders]
        if missing:
            table.fail(f"online_encoders {list(online_encoders)} must include the experiment's encoders "
                       f"(missing {', '.join(missing)})")
    elif "online_encoders" in table.values:
        table.fail("online_encoders applies to iu = 'online'")
    return Arm(name=name, iu=iu, loss=loss, masks=arm_masks,
               train=_train(table, table.get("train", {}), train),
               augment=_augment(table, table.get("augment", {}), augment), online_encoders=online_encoders)


def _evaluation(table: _Table, data: DataConfig, base: Path) -> Evaluation:
    split = table.get("split") or table.fail("needs split = the split to evaluate on, e.g. 'val'")
    root = _resolve(base, table.get("root"))
    if root is None:
        evaluation_data = data
        default_name = "train-data"
    else:
        evaluation_data = table.build(DataConfig, root=root, format=table.get("format", "auto"),
                                      conditions=table.get("conditions"))
        if not evaluation_data.root.is_dir():
            table.fail(f"root {root}: no such folder; give the dataset's folder (relative to the spec)")
        default_name = root.name
    if "format" in table.values and root is None:
        table.fail("format applies with root (another dataset); the training data's format is [data] format")
    name = _name(table, table.get("name", default_name), "name")
    return Evaluation(name=name, data=evaluation_data, split=str(split))
