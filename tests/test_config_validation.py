"""One validation path: the command line, ``--config`` files and experiment specs all end in the
configuration objects of ``iumask.config``, whose checks reject a value of the wrong kind with one
line naming the option, so a spec says exactly what the Python API says (with the file and table
in front)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from iumask.config import AugmentConfig, EvalConfig, LossConfig, MaskConfig, PredictConfig, TrainConfig
from iumask.errors import IumaskError
from iumask.experiment.spec import parse_spec

CONFIGS = (TrainConfig, AugmentConfig, LossConfig, MaskConfig, EvalConfig, PredictConfig)
# Fields whose option has another name on the command line.
OPTION = {"num_workers": "--workers", "enabled": "--augment", "loss": "--loss"}
# A value of the wrong kind for each kind of field: a string where a number, a flag or a size is
# expected; a number where a choice or a split name is expected; a list everywhere.
# Worker counts take "auto" or a number, as a string too (the command line's --workers is text).
WRONG = {"int | str": "many", "int": "3", "float": "fast", "bool": "yes", "str": 3, "tuple": "big"}


def _kind(annotation: str) -> str:
    for kind in ("int | str", "tuple", "bool", "float", "int", "str"):
        if annotation.startswith(kind):
            return kind
    raise AssertionError(f"no wrong value for a field of type {annotation}")


def _cases():
    for cls in CONFIGS:
        for f in dataclasses.fields(cls):
            for bad in (WRONG[_kind(f.type)], ["a", "list"]):
                yield pytest.param(cls, f.name, bad, id=f"{cls.__name__}.{f.name}={bad!r}")


@pytest.mark.parametrize("cls, name, bad", list(_cases()))
def test_every_option_rejects_a_value_of_the_wrong_kind_naming_the_option(cls, name, bad):
    option = OPTION.get(name, f"--{name.replace('_', '-')}")
    with pytest.raises(IumaskError) as error:
        cls(**{name: bad})
    message = str(error.value)
    assert "\n" not in message and repr(bad) in message
    assert option in message or name in message, message


@pytest.mark.parametrize("table, key, bad", [
    ("train", "epochs", "3"), ("train", "weight_decay", "x"), ("augment", "scale", [1, "a"]),
    ("augment", "flip", "yes"), ("masks", "normalize", "yes"), ("masks", "batch_size", 1.5),
    ("evaluation", "pavpu_window", "x"), ("evaluation", "temperature_split", 3), ("masks", "images_per_shard", 0),
])
def test_a_spec_reports_what_the_configuration_object_reports(tmp_path, table, key, bad):
    """The spec's message is the configuration object's, with the file and the table in front."""
    configs = {"train": TrainConfig, "augment": AugmentConfig, "masks": MaskConfig, "evaluation": EvalConfig}
    with pytest.raises(IumaskError) as direct:
        configs[table](**{key: bad})
    raw = {"data": {"root": str(tmp_path)}, "arms": [{"name": "regular"}], table: {key: bad}}
    spec = tmp_path / "spec.toml"
    with pytest.raises(IumaskError) as through_spec:
        parse_spec(raw, spec)
    assert str(through_spec.value) == f"{spec}: [{table}] {direct.value}"


@pytest.mark.parametrize("key, bad, needle", [
    ("seeds", 0, "seeds must be a number of seeds >= 1"),
    ("seeds", [0, -1], "seeds must be a number of seeds or a list of distinct integers >= 0, got -1"),
    ("seeds", [0, True], "got True"),
    ("rare_classes", "5", "rare_classes must be the number of rarest classes to test (>= 1), got '5'"),
])
def test_spec_integers_use_the_same_integer_check(tmp_path, key, bad, needle):
    raw = {"data": {"root": str(tmp_path)}, "arms": [{"name": "regular"}], key: bad}
    with pytest.raises(IumaskError) as error:
        parse_spec(raw, Path(tmp_path / "spec.toml"))
    assert needle in str(error.value) and "[top level]" in str(error.value)
