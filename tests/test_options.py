"""Every option declared once (issue 28 §5): a configuration field declared with
``iumask.config.option`` carries its default, help, command-line name and type; the CLI's options,
their defaults and the experiment spec's keys are generated from it."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from iumask import cli
from iumask.config import (
    AugmentConfig,
    EvalConfig,
    LossConfig,
    MaskConfig,
    PredictConfig,
    TrackingConfig,
    TrainConfig,
    option_fields,
)
from iumask.errors import IumaskError

# (group, what building it from the command line's defaults must give, commands that take it)
GROUPS = [
    (cli.TRAINING, TrainConfig(), ["train-baseline", "train-weighted"]),
    (cli.AUGMENTATION, AugmentConfig(), ["train-baseline", "train-weighted", "run"]),
    (cli.LOSS, LossConfig(), ["train-weighted", "run"]),
    (cli.PLAIN_LOSS, LossConfig(exponent=0.0), ["train-baseline"]),
    (cli.TRACKING, TrackingConfig(), ["train-baseline", "train-weighted", "run"]),
    (cli.MASKS, MaskConfig(), ["make-masks"]),
    (cli.EVALUATION, EvalConfig(), ["evaluate"]),
    (cli.PREDICTION, PredictConfig(), ["predict"]),
]
COMMANDS = typer.main.get_command(cli.app).commands


@pytest.mark.parametrize("group, expected, _", GROUPS, ids=[f"{g.name}-{type(e).__name__}" for g, e, _ in GROUPS])
def test_the_command_lines_defaults_build_the_configurations_defaults(group, expected, _):
    """The defaults are the dataclass's, converted for typer (a choice, a pair written 0.5,2.0) and back."""
    assert group.build(**{name: default for name, _, default in group.options}) == expected


@pytest.mark.parametrize("group, expected, commands", GROUPS,
                         ids=[f"{g.name}-{type(e).__name__}" for g, e, _ in GROUPS])
def test_each_declared_field_is_an_option_with_its_help_on_every_command_that_takes_it(group, expected, commands):
    fields = option_fields(type(expected))
    if group is cli.PLAIN_LOSS:
        fields = [f for f in fields if f.name != "exponent"]
    for command in commands:
        params = {p.name: p for p in COMMANDS[command].params}
        for field in fields:
            name = field.metadata["cli"] or field.name
            assert name in params, f"{command} lacks --{name.replace('_', '-')}"
            assert params[name].help == field.metadata["help"], f"{command} --{name}"


def test_an_option_reaches_its_configuration_through_the_command_line():
    """poly_power was reachable from specs only; declared as an option it is on the command line."""
    command = COMMANDS["train-baseline"]
    context = command.make_context("train-baseline", ["--data", "somewhere", "--poly-power", "0.5", "--workers", "0",
                                                      "--no-augment", "--scale", "0.75,1.5"])
    train = cli.TRAINING.build(**{name: context.params[name] for name, _, _ in cli.TRAINING.options})
    augment = cli.AUGMENTATION.build(**{name: context.params[name] for name, _, _ in cli.AUGMENTATION.options})
    assert train == dataclasses.replace(TrainConfig(), poly_power=0.5, num_workers=0)
    assert augment == AugmentConfig(enabled=False, scale=(0.75, 1.5))


def test_a_spec_reads_an_option_by_its_field_or_its_command_line_name(make_synthetic, tmp_path):
    from iumask.experiment.spec import parse_spec

    data = make_synthetic("options")

    def spec(train: dict, augment: dict, masks: dict, evaluation: dict | None = None):
        raw = {"name": "t", "encoders": ["mobilenet_v2"], "seeds": [0], "data": {"root": str(data)},
               "train": train, "augment": augment, "masks": {"encoders": ["mobilenet_v2"], **masks},
               "evaluation": evaluation or {}, "arms": [{"name": "regular"}]}
        return parse_spec(raw, tmp_path / "spec.toml")

    by_field = spec({"num_workers": 0}, {"enabled": False}, {"num_workers": 1}, {"num_workers": 2})
    by_option = spec({"workers": 0}, {"augment": False}, {"workers": 1}, {"workers": 2})
    assert by_field.eval == by_option.eval and by_option.eval.num_workers == 2
    assert by_field.train == by_option.train and by_option.train.num_workers == 0
    assert by_field.augment == by_option.augment and by_option.augment.enabled is False
    assert by_field.ensemble.masks == by_option.ensemble.masks and by_option.ensemble.masks.num_workers == 1
    with pytest.raises(IumaskError, match=r"\[train\] num_workers is given twice"):
        spec({"num_workers": 0, "workers": 1}, {}, {})


def test_the_inference_options_are_declared_once_for_make_masks_predict_and_evaluate():
    """batch size, loader processes and precision (and for make-masks and predict the source) are one
    declaration each, inherited, with one check; each stage's own options keep their positions."""
    from iumask.config import InferenceOptions, SourceOptions

    def declared(config) -> dict:
        return {f.name: f for f in dataclasses.fields(config)}

    for name in ("batch_size", "num_workers", "amp"):
        assert declared(MaskConfig)[name] is declared(PredictConfig)[name] is declared(EvalConfig)[name] \
            is declared(InferenceOptions)[name]
    for name in ("source", "passes"):
        assert declared(MaskConfig)[name] is declared(PredictConfig)[name] is declared(SourceOptions)[name]
    for config in (MaskConfig, PredictConfig, EvalConfig):
        with pytest.raises(IumaskError, match="--batch-size must be"):
            config(batch_size=0)
        with pytest.raises(IumaskError, match="--amp must be one of"):
            config(amp="fp8")
    assert MaskConfig("label", 4, True) == MaskConfig(instances_from="label", connectivity=4, normalize=True)
    assert EvalConfig("test").split == "test"
    assert MaskConfig(amp="bf16", source="mc-dropout", passes=3).identity() == {
        "connectivity": 8, "instances_from": "prediction", "normalize": False, "source": "mc-dropout", "passes": 3,
        "amp": "bf16"}


@pytest.mark.parametrize("command, option, shown", [
    ("train-baseline", "epochs", 60), ("train-baseline", "batch_size", 2), ("train-baseline", "lr", None),
    ("train-baseline", "backbone_lr_factor", 0.1), ("train-baseline", "weight_decay", 1e-4),
    ("train-baseline", "poly_power", 0.9), ("train-baseline", "seed", 0), ("train-baseline", "workers", "auto"),
    ("train-baseline", "checkpoint_every", 500), ("train-baseline", "amp", "off"),
    ("train-baseline", "augment", True), ("train-baseline", "scale", "0.5,2.0"), ("train-baseline", "jitter", 0.2),
    ("train-baseline", "loss", "cross-entropy"), ("train-baseline", "class_weights", "none"),
    ("train-weighted", "exponent", 2.0), ("train-weighted", "connectivity", "8"),
    ("train-weighted", "instances_from", "prediction"),
    ("make-masks", "batch_size", 4), ("make-masks", "passes", 8), ("make-masks", "source", "ensemble"),
    ("evaluate", "split", "val"), ("evaluate", "pavpu_window", 4), ("evaluate", "batch_size", 4),
    ("evaluate", "resolution", "native"), ("predict", "inference", "resize"), ("predict", "connectivity", "8"),
])
def test_the_defaults_users_see_are_the_authors_and_the_documented_ones(command, option, shown):
    """What --help shows (docs/method.md's defaults): a default changed by mistake in its one
    declaration fails here."""
    (param,) = [p for p in COMMANDS[command].params if p.name == option]
    default = param.default.value if hasattr(param.default, "value") else param.default
    assert default == shown
