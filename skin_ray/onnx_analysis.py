"""The analysis pass (skin_ray.predictor.analysis_function) run by ONNX Runtime: the faster runtime a bundle can
carry, exported and validated against the Keras network by `skin-ray optimize` (skin_ray.optimize, which alone
imports tf2onnx, so this module needs nothing of the predictor it serves).

Measured on the ensemble shipped before the one network (2 threads, batch 32, an AVX2 CPU): 1.45x the images per
second of the traced Keras function, within 2.1e-4 of its Cancer probabilities; OpenVINO was as fast but weighs 180 MB beside ONNX
Runtime's 78 MB (docs/runtimes.md). The ONNX file holds operators and weights, no Python: ONNX Runtime runs
the operators of its own build and refuses a graph naming others. Like model.keras it is trusted as far as the
bundle is: its digest in bundle.json says it is the graph `optimize` validated, not who wrote it. Exporting
needs tf2onnx (the `optimize` extra); running needs only onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RUNTIME = "onnxruntime-float32"  # what bundle.json's `runtime.name` says of a bundle carrying this
OPSET = 17
Forward = Callable[[np.ndarray], list[np.ndarray]]  # images -> the analysis function's outputs, in its order


def onnx_forward(graph: bytes, threads: int) -> Forward:
    """A forward pass of an exported analysis graph on ONNX Runtime's CPU provider, using `threads` threads.

    Its threads do not spin while they wait for work: in a Serve replica the event loop and the decode
    threads share the same cores."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    (input_name,) = (node.name for node in session.get_inputs())
    return lambda images: session.run(None, {input_name: np.ascontiguousarray(images, np.float32)})


def missing_cpu_features(required: list[str]) -> list[str]:
    """Those of `required` (names as in /proc/cpuinfo's flags) this CPU does not report; all of them where
    the flags cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [feature for feature in required if feature not in flags]


