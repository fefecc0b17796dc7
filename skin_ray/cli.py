"""The `skin-ray` command line: train, ensemble, evaluate, predict, serve, classify."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from typing import Literal, get_args, get_origin

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _add_settings(parser, settings: type, positional: tuple[str, ...] = ()) -> None:
    """Arguments for every field of a settings dataclass or pydantic model, with its help text: the CLI
    reaches each setting without repeating its default. Names in `positional` become positional arguments,
    `output` a required option."""
    if hasattr(settings, "model_fields"):  # pydantic
        options = {name: (f.default, f.description, f.annotation) for name, f in settings.model_fields.items()}
    else:
        options = {f.name: (f.default, f.metadata.get("help"), f.type) for f in fields(settings)}
    for name, (default, help_text, annotation) in options.items():
        flag = f"--{name.replace('_', '-')}"
        if name in positional:
            parser.add_argument(name, help=help_text)
        elif name == "output":
            parser.add_argument(flag, required=True, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
        else:
            choices = get_args(annotation) if get_origin(annotation) is Literal else None
            parser.add_argument(
                flag, type=type(default) if default is not None else str, default=default, choices=choices, help=help_text
            )


def _settings_from(args, settings: type):
    names = settings.model_fields if hasattr(settings, "model_fields") else [f.name for f in fields(settings)]
    return settings(**{name: getattr(args, name) for name in names})


def _add_train(commands) -> None:
    from skin_ray.config import TrainConfig

    parser = commands.add_parser("train", help="train a model with Ray Train and write a model bundle")
    _add_settings(parser, TrainConfig, positional=("data",))


def _run_train(args) -> int:
    from skin_ray.config import TrainConfig
    from skin_ray.runtime import init_ray
    from skin_ray.train import train

    config = _settings_from(args, TrainConfig)
    init_ray()
    outcome = train(config)
    print(json.dumps({"bundle": outcome.bundle_uri, **outcome.metrics["validation"]}))
    return 0


def _add_ensemble(commands) -> None:
    from skin_ray.config import TARGET_SENSITIVITY

    parser = commands.add_parser("ensemble", help="combine bundles trained on one split into a bundle averaging them")
    parser.add_argument("members", nargs="+", help="two or more bundles (directories or s3:// prefixes)")
    parser.add_argument("--output", required=True, help="where to write the ensemble bundle")
    parser.add_argument("--data", help="the members' labelled image tree, if it moved since they were trained")
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_SENSITIVITY, help="Cancer sensitivity the threshold must keep")


def _run_ensemble(args) -> int:
    from skin_ray.ensemble import build_ensemble
    from skin_ray.runtime import init_ray

    init_ray()
    metadata = build_ensemble(args.members, args.output, args.data, args.target_sensitivity)
    print(json.dumps({"bundle": args.output, "model_version": metadata.model_version, **metadata.metrics["validation"]}))
    return 0


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="metrics and plots of a bundle on a labelled image tree")
    parser.add_argument("data", help="labelled image tree (directory or s3:// prefix)")
    parser.add_argument("--model", help="bundle directory or s3:// prefix (default: the shipped model)")
    parser.add_argument("--report", help="directory for roc.png, confusion.png and calibration.png")
    parser.add_argument("--subset", help="evaluate only images inside sub-folders of this name, e.g. Testing")


def _run_evaluate(args) -> int:
    from skin_ray.evaluate import evaluate
    from skin_ray.runtime import init_ray

    init_ray()
    print(json.dumps(evaluate(args.data, args.model, args.report, args.subset)))
    return 0


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="classify image files; one JSON line per image")
    parser.add_argument("images", nargs="+", help="image files (local paths or s3:// URIs)")
    parser.add_argument("--model", help="bundle directory or s3:// prefix (default: the shipped model)")


def _run_predict(args) -> int:
    import numpy as np

    from skin_ray.data import load_images
    from skin_ray.predictor import Predictor

    predictor = Predictor.from_bundle(args.model)
    chunk = 32  # bounds memory for long argument lists
    for start in range(0, len(args.images), chunk):
        batch = load_images({"path": np.array(args.images[start : start + chunk], dtype=object)})
        ok = batch["error"] == ""
        rows = iter(predictor.predict_arrays(batch["image"][ok]))
        for path, error in zip(batch["path"], batch["error"]):
            row = {"path": path, "label": None, "cancer_probability": None, "error": error or None}
            if not error:
                prediction = predictor.to_prediction(next(rows))
                row.update(label=prediction.label, cancer_probability=prediction.cancer_probability)
            print(json.dumps({**row, "model_version": predictor.model_version}), flush=True)
    return 0


def _add_classify(commands) -> None:
    from skin_ray.config import ClassifyConfig

    parser = commands.add_parser("classify", help="classify every image below a directory or s3:// prefix (Ray Data)")
    _add_settings(parser, ClassifyConfig, positional=("source",))


def _run_classify(args) -> int:
    from skin_ray.classify import classify
    from skin_ray.config import ClassifyConfig
    from skin_ray.runtime import init_ray

    config = _settings_from(args, ClassifyConfig)
    init_ray()
    print(json.dumps(classify(config)))
    return 0


def _add_serve(commands) -> None:
    from skin_ray.config import ServeSettings

    parser = commands.add_parser("serve", help="run the HTTP service (Ray Serve) until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    _add_settings(parser, ServeSettings)


def _run_serve(args) -> int:
    import signal
    import threading

    from skin_ray.config import ServeSettings
    from skin_ray.runtime import init_ray

    settings = _settings_from(args, ServeSettings)
    # Handlers first: the service answers (through HAProxy) before serve.run returns, and a stop asked for
    # while it starts must still drain rather than kill the process.
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    init_ray()
    from ray import serve

    from skin_ray.serve import app_builder

    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app_builder(settings), name="skin-ray", route_prefix="/")
    print(f"skin-ray is serving on http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops it", flush=True)
    stop.wait()
    print("shutting down: in-flight requests finish first", flush=True)
    serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s) before they stop
    return 0


COMMANDS = {
    "train": (_add_train, _run_train),
    "ensemble": (_add_ensemble, _run_ensemble),
    "evaluate": (_add_evaluate, _run_evaluate),
    "predict": (_add_predict, _run_predict),
    "serve": (_add_serve, _run_serve),
    "classify": (_add_classify, _run_classify),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skin-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from skin_ray.runtime import InsufficientResourcesError, limit_tensorflow_threads

    limit_tensorflow_threads()
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, FileExistsError, InsufficientResourcesError) as exc:
        # Mistakes in the input or the environment: a one-line reason, not a traceback.
        parser.exit(2, f"skin-ray {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
