"""The `skin-ray` command line: train, ensemble, evaluate, predict, serve, classify."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import fields
from typing import Literal, get_args, get_origin

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _result(value) -> None:
    """A command's result: JSON on the process's stdout (see main for why not `sys.stdout`)."""
    print(json.dumps(value), file=sys.__stdout__, flush=True)


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
    init_ray(verbose=args.verbose, address=args.address)
    outcome = train(config)
    _result({"bundle": outcome.bundle_uri, **outcome.metrics["validation"]})
    return 0


def _add_ensemble(commands) -> None:
    from skin_ray.config import TARGET_SENSITIVITY

    parser = commands.add_parser("ensemble", help="combine bundles trained on one split into a bundle averaging them")
    parser.add_argument("members", nargs="+", help="two or more bundles (directories or s3:// prefixes)")
    parser.add_argument("--output", required=True, help="where to write the ensemble bundle")
    parser.add_argument("--data", help="the members' labelled image tree, if it moved since they were trained")
    parser.add_argument(
        "--target-sensitivity", type=float, default=TARGET_SENSITIVITY, help="Cancer sensitivity the threshold must keep"
    )


def _run_ensemble(args) -> int:
    from skin_ray.ensemble import build_ensemble
    from skin_ray.runtime import init_ray

    init_ray(verbose=args.verbose, address=args.address)
    metadata = build_ensemble(args.members, args.output, args.data, args.target_sensitivity)
    _result({"bundle": args.output, "model_version": metadata.model_version, **metadata.metrics["validation"]})
    return 0


def _add_fit_safeguards(commands) -> None:
    parser = commands.add_parser(
        "fit-safeguards", help="fit a bundle's input gate and uncertainty margin on its own split (for older bundles)",
        description="Train and ensemble fit both when they make a bundle; this adds them to a bundle made before.",
    )
    parser.add_argument("bundle", help="bundle directory or s3:// prefix, rewritten in place (bundle.json, input_gate.npz)")
    parser.add_argument("--data", help="the bundle's labelled image tree, if it moved since it was trained")


def _run_fit_safeguards(args) -> int:
    from skin_ray.runtime import init_ray
    from skin_ray.train import add_safeguards

    init_ray(verbose=args.verbose, address=args.address)
    metadata = add_safeguards(args.bundle, args.data)
    _result({"bundle": args.bundle, "input_gate": metadata.input_gate, "uncertainty": metadata.uncertainty})
    return 0


def _add_evaluate(commands) -> None:
    parser = commands.add_parser("evaluate", help="metrics and plots of a bundle on a labelled image tree")
    parser.add_argument("data", help="labelled image tree (directory or s3:// prefix)")
    parser.add_argument("--model", help="bundle directory or s3:// prefix (default: the shipped model)")
    parser.add_argument("--report", help="directory for summary.json, roc.png, confusion.png and calibration.png")
    parser.add_argument("--subset", help="evaluate only images inside sub-folders of this name, e.g. Testing")
    parser.add_argument(
        "--split", choices=("all", "validation"), default="all",
        help="validation: only the images the bundle's content-hash split held out from its training",
    )


def _run_evaluate(args) -> int:
    from skin_ray.evaluate import evaluate
    from skin_ray.runtime import init_ray

    init_ray(verbose=args.verbose, address=args.address)
    _result(evaluate(args.data, args.model, args.report, args.subset, args.split))
    return 0


def _add_predict(commands) -> None:
    parser = commands.add_parser(
        "predict", help="classify image files; one JSON line per image",
        description="Classify image files, one JSON line per image. Exit status: 0 when every image was "
        "classified, 1 when some could not be (their lines say why), 2 when there was nothing to classify.",
    )
    _add_images(parser)


def _add_images(parser) -> None:
    parser.add_argument(
        "images", nargs="+", help="image files or folders (searched recursively); local or s3:// (a prefix ends in /)"
    )
    parser.add_argument("--model", help="bundle directory or s3:// prefix (default: the shipped model)")


def _image_paths(arguments: list[str]) -> list[str]:
    """Files as given; folders (and s3:// prefixes ending in /) replaced by the images below them."""
    from pathlib import Path

    from skin_ray import storage
    from skin_ray.preprocess import IMAGE_SUFFIXES

    paths = []
    for argument in arguments:
        if Path(argument).is_dir() or (storage.is_s3(argument) and argument.endswith("/")):
            found = storage.list_files(argument, IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) below {argument}")
            paths += found
        else:
            paths.append(argument)
    return paths


def _run_predict(args) -> int:
    import numpy as np

    from skin_ray.data import load_images
    from skin_ray.predictor import Predictor

    paths = _image_paths(args.images)
    predictor = Predictor.from_bundle(args.model)
    chunk = 32  # bounds memory for long argument lists
    failed = 0
    for start in range(0, len(paths), chunk):
        batch = load_images({"path": np.array(paths[start : start + chunk], dtype=object)})
        failed += int((batch["error"] != "").sum())  # refused by the input gate is an answer, not a failure
        for path, record in zip(batch["path"], predictor.records(batch["image"], batch["error"]), strict=True):
            _result({"path": path, **record})
    if failed:
        print(f"skin-ray predict: {failed} of {len(paths)} files could not be classified")
    return 1 if failed else 0


def _add_explain(commands) -> None:
    parser = commands.add_parser(
        "explain", help="classify images and write a Grad-CAM overlay for each: what moved the prediction",
        description="One JSON line per image (predict's record plus `explanation`: the map, the box of the photo it "
        "covers, the overlay's path) and one <name>.gradcam.png per image in --output. Exit status as predict.",
    )
    _add_images(parser)
    parser.add_argument("--output", required=True, help="directory for the overlays")


def _run_explain(args) -> int:
    from pathlib import Path

    from skin_ray import storage
    from skin_ray.explain import explanation
    from skin_ray.predictor import Predictor
    from skin_ray.preprocess import ImageDecodeError, preprocess_image

    paths = _image_paths(args.images)
    predictor = Predictor.from_bundle(args.model)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    failed = 0
    for index, path in enumerate(paths):
        try:
            data = storage.read_bytes(path)
            record, heatmap = predictor.explain(preprocess_image(data)[None])
        except ImageDecodeError as exc:
            failed += 1
            _result({"path": path, **predictor.error_record(str(exc)), "explanation": None})
            continue
        except OSError as exc:
            failed += 1
            _result({"path": path, **predictor.error_record(f"unreadable: {exc}"), "explanation": None})
            continue
        overlay = output / f"{index:04d}-{Path(path).stem}.gradcam.png"  # numbered: names may repeat across folders
        described = None if heatmap is None else explanation(data, heatmap, record["label"], overlay)
        _result({"path": path, **record, "explanation": described})
    if failed:
        print(f"skin-ray explain: {failed} of {len(paths)} files could not be explained")
    return 1 if failed else 0


def _add_classify(commands) -> None:
    from skin_ray.config import ClassifyConfig

    parser = commands.add_parser("classify", help="classify every image below a directory or s3:// prefix (Ray Data)")
    _add_settings(parser, ClassifyConfig, positional=("source",))


def _run_classify(args) -> int:
    from skin_ray.classify import check_output, classify
    from skin_ray.config import ClassifyConfig
    from skin_ray.runtime import init_ray

    config = _settings_from(args, ClassifyConfig)
    check_output(config)  # before Ray starts: a mistake in the command costs no start-up
    init_ray(verbose=args.verbose, address=args.address)
    _result(classify(config))
    return 0


def _add_serve(commands) -> None:
    from skin_ray.config import ServeSettings

    parser = commands.add_parser("serve", help="run the HTTP service (Ray Serve) until Ctrl-C")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface, e.g. in a container)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port of the HTTP service")
    _add_settings(parser, ServeSettings)


def _run_serve(args) -> int:
    import asyncio
    import signal
    import threading

    from skin_ray.config import ServeSettings
    from skin_ray.runtime import StartupError, init_ray

    settings = _settings_from(args, ServeSettings)
    _check_port_free(args.host, args.port)
    # Handlers first: the service answers (through HAProxy) before serve.run returns, and a stop asked for
    # while it starts must still drain rather than kill the process.
    stop = threading.Event()

    def stop_on_signals():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())

    stop_on_signals()
    started_ray = init_ray(verbose=args.verbose, address=args.address)
    stop_on_signals()  # again: Ray's core worker installs a SIGTERM handler of its own that aborts the process
    from ray import serve

    from skin_ray.serve import app_builder

    serve.start(http_options={"host": args.host, "port": args.port})
    try:
        handle = serve.run(app_builder(settings), name="skin-ray", route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start; Serve keeps its traceback in the replica's log
        serve.shutdown()
        raise StartupError(f"{exc} Why is in Ray's Serve logs (a local Ray: /tmp/ray/session_latest/logs/serve/)") from None
    print(f"skin-ray is serving on http://{args.host}:{args.port}/ (API docs at /docs); Ctrl-C stops it", flush=True)
    stop.wait()
    print(f"stopping: new requests get 503, those received finish (up to {settings.drain_timeout_s:g} s)", flush=True)
    # A Ray of this command's own stops with the process, which refuses connections from then on. On a
    # cluster the app is deleted instead (Serve itself stays).
    unfinished = asyncio.run(_stop(handle, settings.drain_timeout_s, delete_app=not started_ray))
    if unfinished:
        print(f"{unfinished} requests did not finish within --drain-timeout-s", flush=True)
    return 0


async def _stop(handle, drain_timeout_s: float, delete_app: bool) -> int:
    """Drain the Ingress, then delete the app if asked; how many requests did not finish. In an event loop:
    under Serve's throughput mode (which `skin-ray serve` turns on) a handle routes calls on the caller's loop."""
    from ray import serve

    unfinished = await handle.drain.remote(drain_timeout_s)
    if delete_app:
        serve.delete("skin-ray")  # blocks this loop, which has nothing else to do
    return unfinished


def _check_port_free(host: str, port: int) -> None:
    """Fail in a second with a reason, rather than after Ray has started with a traceback."""
    import socket

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); stop what uses it or pass --port") from None


COMMANDS = {
    "train": (_add_train, _run_train),
    "ensemble": (_add_ensemble, _run_ensemble),
    "fit-safeguards": (_add_fit_safeguards, _run_fit_safeguards),
    "evaluate": (_add_evaluate, _run_evaluate),
    "predict": (_add_predict, _run_predict),
    "explain": (_add_explain, _run_explain),
    "serve": (_add_serve, _run_serve),
    "classify": (_add_classify, _run_classify),
}


LOCAL_COMMANDS = ("predict", "explain")  # run in this process, without Ray


class _Commands(argparse._SubParsersAction):
    """Sub-commands that show their defaults in --help and accept --verbose (and --address when they use Ray)."""

    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)
        parser.add_argument(
            "--verbose", action="store_true", help="also print Ray's, Ray Data's and TensorFlow's own logs"
        )
        if name not in LOCAL_COMMANDS:
            parser.add_argument(
                "--address",
                help="Ray cluster to run on (default: RAY_ADDRESS, else the cluster `ray start` made on this "
                "machine, else a Ray of this command's own that stops with it)",
            )
        return parser


def build_parser() -> argparse.ArgumentParser:
    import skin_ray

    parser = argparse.ArgumentParser(prog="skin-ray", description=__doc__)
    parser.add_argument("--version", action="version", version=f"skin-ray {skin_ray.__version__}")
    parser.register("action", "commands", _Commands)
    commands = parser.add_subparsers(dest="command", required=True, action="commands")
    for add, _ in COMMANDS.values():
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Results on stdout, everything else (progress, epoch lines, warnings) on stderr, so stdout pipes into
    # `jq`: Ray prints its raylets' warnings with print() to whatever sys.stdout is, so sys.stdout becomes
    # stderr and results go to the process's own stdout.
    sys.stdout = sys.stderr
    from skin_ray.runtime import StartupError, configure_output, quiet_native_stderr

    configure_output(args.verbose)
    with contextlib.nullcontext() if args.verbose else quiet_native_stderr():
        from skin_ray.runtime import limit_tensorflow_threads

        limit_tensorflow_threads()  # imports TensorFlow, whose C++ prints notices while it loads
    try:
        return COMMANDS[args.command][1](args)
    except (OSError, ValueError, StartupError) as exc:
        # Mistakes in the input or the environment (FileNotFoundError and FileExistsError are OSErrors): a
        # one-line reason, not a traceback.
        parser.exit(2, f"skin-ray {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
