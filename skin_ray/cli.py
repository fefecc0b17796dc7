"""The `skin-ray` command line: train, distill, ensemble, fit-safeguards, optimize, evaluate, predict, explain, serve,
classify, drift."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from types import UnionType
from typing import Annotated, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import BaseModel

from skin_ray.config import (
    ClassifySettings,
    DistillSettings,
    DriftSettings,
    EnsembleSettings,
    EvaluateSettings,
    ExplainSettings,
    FitSafeguardsSettings,
    OptimizeSettings,
    PredictSettings,
    ServeSettings,
    TrainSettings,
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _result(value) -> None:
    """A command's result: JSON on the process's stdout (see main for why not `sys.stdout`)."""
    print(json.dumps(value), file=sys.__stdout__, flush=True)


def _add_settings(parser, settings: type[BaseModel], positional: tuple[str, ...] = ()) -> None:
    """An argument for every field of a settings model, with its description as help: the CLI reaches each
    setting without repeating its default. Names in `positional` become positional arguments; other fields
    without a default are required options."""
    for name, field in settings.model_fields.items():
        annotation, help_text = field.annotation, field.description
        if get_origin(annotation) in (Union, UnionType):  # `str | None`: the flag takes a str
            annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
        if get_origin(annotation) is Annotated:  # a type with its validators: the flag takes the type
            annotation = get_args(annotation)[0]
        many = get_origin(annotation) is list
        kind = get_args(annotation)[0] if many else str if get_origin(annotation) is dict else annotation  # a dict: its text
        choices = get_args(kind) if get_origin(kind) is Literal else None
        options = {
            "type": None if kind is bool else type(choices[0]) if choices else kind,
            "nargs": "+" if many else None,
            "choices": choices,
            "help": help_text,
        }
        if name in positional:
            parser.add_argument(name, **options)
            continue
        if many:  # the flag may be repeated; given none, the field's default applies (see _settings_from)
            options.update(action="extend", default=None)
        flag = f"--{name.replace('_', '-')}"
        if field.is_required():
            parser.add_argument(flag, dest=name, required=True, **options)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=field.default, help=help_text)
        else:
            parser.add_argument(flag, dest=name, **{"default": field.default, **options})
        for alias in getattr(field.validation_alias, "choices", ()):  # a former name still works, unlisted
            if alias != name:
                parser.add_argument(f"--{alias}", dest=name, **{**options, "help": argparse.SUPPRESS})


def _settings_from(args, settings: type[BaseModel]):
    """The command's settings from its parsed flags (a flag not given: the field's default); a value the model
    refuses is a one-line ValueError."""
    from pydantic import ValidationError

    try:
        given = {name: value for name in settings.model_fields if (value := getattr(args, name)) is not None}
        return settings(**given)
    except ValidationError as exc:
        reasons = [
            (f"--{'-'.join(map(str, error['loc'])).replace('_', '-')}: " if error["loc"] else "")
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        ]
        raise ValueError("; ".join(reasons)) from None


def _run_train(args) -> int:
    from skin_ray.train import train

    return _run_training(args, TrainSettings, train)


def _run_distill(args) -> int:
    from skin_ray.train import distill

    return _run_training(args, DistillSettings, distill)


def _run_training(args, settings_type: type[BaseModel], job: Callable) -> int:
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, settings_type)
    init_ray(verbose=args.verbose, address=args.address)
    outcome = job(settings)
    _result({"bundle": outcome.bundle_uri, **outcome.metrics["validation"]})
    return 0


def _run_ensemble(args) -> int:
    from skin_ray.ensemble import build_ensemble
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, EnsembleSettings)
    init_ray(verbose=args.verbose, address=args.address)
    metadata = build_ensemble(settings)
    _result({"bundle": settings.output, "model_version": metadata.model_version, **metadata.metrics["validation"]})
    return 0


def _run_fit_safeguards(args) -> int:
    from skin_ray.finalize import add_safeguards
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, FitSafeguardsSettings)
    init_ray(verbose=args.verbose, address=args.address)
    metadata = add_safeguards(settings)
    _result({"bundle": settings.bundle, "input_gate": metadata.input_gate, "uncertainty": metadata.uncertainty,
             "drift_reference": metadata.drift_reference})
    return 0


def _run_optimize(args) -> int:
    from skin_ray.optimize import optimize_bundle
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, OptimizeSettings)
    init_ray(verbose=args.verbose, address=args.address)
    _result({"bundle": settings.bundle, "runtime": optimize_bundle(settings)})
    return 0


def _run_evaluate(args) -> int:
    from skin_ray.evaluate import evaluate
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, EvaluateSettings)
    init_ray(verbose=args.verbose, address=args.address)
    _result(evaluate(settings))
    return 0


def _run_predict(args) -> int:
    from skin_ray.predict import predict_files

    return _print_records(predict_files(_settings_from(args, PredictSettings)), "skin-ray predict", "classified")


def _run_explain(args) -> int:
    from skin_ray.predict import explain_files

    return _print_records(explain_files(_settings_from(args, ExplainSettings)), "skin-ray explain", "explained")


def _print_records(records, command: str, done: str) -> int:
    """Print each (record, read) as it comes; exit 1 when a file could not be read."""
    failed = total = 0
    for record, read in records:
        _result(record)
        total, failed = total + 1, failed + (not read)
    if failed:
        print(f"{command}: {failed} of {total} files could not be {done}")
    return 1 if failed else 0


def _run_classify(args) -> int:
    from skin_ray.classify import check_output, classify
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, ClassifySettings)
    check_output(settings)  # before Ray starts: a mistake in the command costs no start-up
    init_ray(verbose=args.verbose, address=args.address)
    _result(classify(settings))
    return 0


def _run_drift(args) -> int:
    from skin_ray.drift_report import drift_report
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, DriftSettings)
    init_ray(verbose=args.verbose, address=args.address)
    _result(drift_report(settings))
    return 0


def _run_serve(args) -> int:
    from skin_ray.serve.lifecycle import serve_until_stopped

    settings = _settings_from(args, ServeSettings)
    serve_until_stopped(settings, args.host, args.port, verbose=args.verbose, address=args.address, say=_progress)
    return 0


def _progress(line: str) -> None:
    print(line, flush=True)


class Command(NamedTuple):
    settings: type[BaseModel]
    run: Callable[[argparse.Namespace], int]
    help: str
    positional: tuple[str, ...] = ()
    description: str | None = None
    uses_ray: bool = True  # accepts --address
    other_flags: tuple = ()  # (option strings, add_argument keywords) of flags that are not settings


_LISTENER_FLAGS = (  # the HTTP listener's, not the app's: a Serve config sets them in http_options
    (("--host",), {"default": "127.0.0.1", "help": "address to listen on (0.0.0.0: every interface, e.g. in a container)"}),
    (("--port",), {"type": int, "default": 8000, "help": "port of the HTTP service"}),
)
_PREDICT_EXIT = (
    "Exit status: 0 when every image was classified, 1 when some could not be (their lines say why), 2 when there "
    "was nothing to classify."
)

COMMANDS = {
    "train": Command(TrainSettings, _run_train, "train a model with Ray Train and write a model bundle", ("data",)),
    "distill": Command(
        DistillSettings, _run_distill, "train one network on a teacher bundle's soft targets (knowledge distillation)",
        ("teacher",),
    ),
    "ensemble": Command(
        EnsembleSettings, _run_ensemble, "combine bundles trained on one split into a bundle averaging them", ("members",)
    ),
    "fit-safeguards": Command(
        FitSafeguardsSettings, _run_fit_safeguards,
        "fit a bundle's input gate, uncertainty margin and drift reference on its own split (for older bundles)",
        ("bundle",), "Train and ensemble fit them when they make a bundle; this adds them to a bundle made before.",
    ),
    "optimize": Command(
        OptimizeSettings, _run_optimize, "give a bundle a faster runtime (ONNX Runtime), checked against its Keras "
        "network on its validation split", ("bundle",),
        "Exports the bundle's forward pass to analysis.onnx and records in bundle.json how far it moves the "
        "probabilities, labels, gate and uncertainty flags on the validation split; refused beyond the bounds. "
        "Needs the `optimize` extra (tf2onnx). Every command then runs it unless given --runtime float32.",
    ),
    "evaluate": Command(EvaluateSettings, _run_evaluate, "metrics and plots of a bundle on a labelled image tree", ("data",)),
    "predict": Command(
        PredictSettings, _run_predict, "classify image files; one JSON line per image", ("images",),
        f"Classify image files, one JSON line per image. {_PREDICT_EXIT}", uses_ray=False,
    ),
    "explain": Command(
        ExplainSettings, _run_explain, "classify images and write a Grad-CAM overlay for each: what moved the prediction",
        ("images",), "One JSON line per image (predict's record plus `explanation`: the map, the box of the photo it "
        f"covers, the overlay's path) and one <name>.gradcam.png per image in --output. {_PREDICT_EXIT}", uses_ray=False,
    ),
    "serve": Command(ServeSettings, _run_serve, "run the HTTP service (Ray Serve) until Ctrl-C", other_flags=_LISTENER_FLAGS),
    "classify": Command(
        ClassifySettings, _run_classify, "classify every image below a directory or s3:// prefix (Ray Data)", ("source",)
    ),
    "drift": Command(
        DriftSettings, _run_drift, "compare each day or hour of an audit trail (or classify results) with the "
        "bundle's validation split (Ray Data)", ("source",),
        "JSON summary on stdout: per period and statistic the distance, its threshold and whether it drifted.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """Every command's flags come from its settings model; each also takes --verbose, and --address when it
    uses Ray; --help shows the defaults."""
    import skin_ray

    parser = argparse.ArgumentParser(prog="skin-ray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"skin-ray {skin_ray.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(
            name, help=command.help, description=command.description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        _add_settings(sub, command.settings, command.positional)
        for flags, options in command.other_flags:
            sub.add_argument(*flags, **options)
        sub.add_argument("--verbose", action="store_true", help="also print Ray's, Ray Data's and TensorFlow's own logs")
        if command.uses_ray:
            sub.add_argument(
                "--address",
                help="Ray cluster to run on (default: RAY_ADDRESS, else the cluster `ray start` made on this "
                "machine, else a Ray of this command's own that stops with it)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Results on stdout, everything else (progress, epoch lines, warnings) on stderr, so stdout pipes into
    # `jq`: Ray prints its raylets' warnings with print() to whatever sys.stdout is, so sys.stdout becomes
    # stderr and results go to the process's own stdout.
    sys.stdout = sys.stderr
    from skin_ray.console import configure_output, quiet_native_stderr
    from skin_ray.runtime import StartupError

    configure_output(args.verbose)
    with contextlib.nullcontext() if args.verbose else quiet_native_stderr():
        from skin_ray.runtime import limit_tensorflow_threads

        limit_tensorflow_threads()  # imports TensorFlow, whose C++ prints notices while it loads
    try:
        return COMMANDS[args.command].run(args)
    except (OSError, ValueError, StartupError) as exc:
        # Mistakes in the input or the environment (FileNotFoundError and FileExistsError are OSErrors): a
        # one-line reason, not a traceback.
        parser.exit(2, f"skin-ray {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
