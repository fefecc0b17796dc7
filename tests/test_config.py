"""The settings models: one per command, each field a flag of that command, one list per choice."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import yaml

from skin_ray import config
from skin_ray.cli import COMMANDS, _settings_from, build_parser

ROOT = Path(__file__).resolve().parents[1]
# The fewest arguments each command accepts: its positional and required values.
REQUIRED = {
    "train": ["DATA", "--output", "OUT"],
    "distill": ["TEACHER", "--output", "OUT"],
    "ensemble": ["A", "B", "--output", "OUT"],
    "fit-safeguards": ["BUNDLE"],
    "optimize": ["BUNDLE"],
    "evaluate": ["DATA"],
    "predict": ["IMAGE"],
    "explain": ["IMAGE", "--output", "OUT"],
    "serve": [],
    "classify": ["SOURCE", "--output", "OUT"],
    "drift": ["SOURCE"],
}
# Values other than the default where one value alone would not do: two versions (the flag repeated), one
# taking all the traffic, the other a shadow.
OTHER_VALUES = {"bundle": ["a=/x", "--bundle", "b=/y"], "traffic": ["a=100"], "shadow": ["b=50"], "metadata": ["DATA=table.csv"]}


def test_every_command_has_settings_and_sample_arguments():
    assert set(REQUIRED) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_flags_reach_every_setting(command):
    settings_type = COMMANDS[command].settings
    defaults = _settings_from(build_parser().parse_args([command, *REQUIRED[command]]), settings_type)
    optional = {name: field for name, field in settings_type.model_fields.items() if not field.is_required()}
    assert {name: getattr(defaults, name) for name in optional} == {name: field.default for name, field in optional.items()}
    flags = []
    for name, field in optional.items():
        flag = f"--{name.replace('_', '-')}"
        value = OTHER_VALUES[name] if name in OTHER_VALUES else [_another_value(field)]
        flags += [flag] if field.default is False else [flag, *value]
    changed = _settings_from(build_parser().parse_args([command, *REQUIRED[command], *flags]), settings_type)
    assert [name for name in optional if getattr(changed, name) == getattr(defaults, name)] == []


def _another_value(field) -> str:
    """A command-line value other than the field's default."""
    if get_origin(field.annotation) is Literal:
        return next(choice for choice in get_args(field.annotation) if choice != field.default)
    if field.default is None and {int, float} & set(get_args(field.annotation)):  # `int | None`, `float | None`
        return "96"
    if field.default is None or isinstance(field.default, str):
        return "another"
    return str(field.default + 1 if isinstance(field.default, int) else field.default / 2)


def test_a_refused_value_is_one_line_naming_its_flag():
    parser = build_parser()
    with pytest.raises(ValueError, match=r"^--workers: Input should be greater than or equal to 1$"):
        _settings_from(parser.parse_args(["train", "DATA", "--output", "OUT", "--workers", "0"]), config.TrainSettings)
    with pytest.raises(ValueError, match=r"^--batch-size 33 must be a multiple of --workers 2$"):
        _settings_from(parser.parse_args(["train", "DATA", "--output", "OUT", "--batch-size", "33"]), config.TrainSettings)


def test_unknown_fields_are_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="max_batch_sise"):
        config.ServeSettings(max_batch_sise=8)


def test_bundle_parameters_accept_their_former_name():
    """`model` named a bundle before 0.2: Serve configs and commands written then keep working."""
    assert config.ServeSettings.model_validate({"model": "s3://b/old"}).bundle == ["s3://b/old"]
    args = build_parser().parse_args(["predict", "x.jpg", "--model", "BUNDLE"])
    assert _settings_from(args, config.PredictSettings).bundle == "BUNDLE"


@pytest.mark.parametrize("manifest", ["deployments/serve_config.yaml", "cluster/rayservice.yaml"])
def test_shipped_serve_configs_are_valid_settings(manifest):
    document = yaml.safe_load((ROOT / manifest).read_text())
    serve_config = yaml.safe_load(document["spec"]["serveConfigV2"]) if "spec" in document else document
    for application in serve_config["applications"]:
        config.ServeSettings.model_validate(application["args"])


def test_each_choice_table_covers_its_literal():
    from skin_ray.classify import READERS
    from skin_ray.record import WRITERS

    assert list(READERS) == list(WRITERS) == list(get_args(config.OutputFormat))
