"""The analysis pass (skin_ray.predictor.analysis_function) exported to ONNX and run by ONNX Runtime: the faster
runtime a bundle can carry, validated against the Keras network by `skin-ray optimize` (skin_ray.optimize).

Measured on the shipped bundle (2 threads, batch 32, an AVX2 CPU): 1.45x the images per second of the traced
Keras function, within 2.1e-4 of its Cancer probabilities; OpenVINO was as fast but weighs 180 MB beside ONNX
Runtime's 78 MB (README, "Runtimes"). The ONNX file holds operators and weights, no Python: ONNX Runtime runs
the operators of its own build and refuses a graph naming others. Like model.keras it is trusted as far as the
bundle is: its digest in bundle.json says it is the graph `optimize` validated, not who wrote it. Exporting
needs tf2onnx (the `optimize` extra); running needs only onnxruntime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

RUNTIME = "onnxruntime-float32"  # what bundle.json's `runtime.name` says of a bundle carrying this
OPSET = 17
Forward = Callable[[np.ndarray], list[np.ndarray]]  # images -> the analysis function's outputs, in its order


def export_analysis(model) -> bytes:
    """The serialised ONNX graph of `model`'s analysis pass, outputs in `analysis_function`'s order."""
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError:
        from skin_ray.runtime import StartupError

        raise StartupError("exporting a runtime needs tf2onnx: pip install 'skin-ray[optimize]'") from None
    from skin_ray.predictor import analysis_function

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)  # its optimiser's INFO lines are not the user's business
    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]  # unnamed, as analysis_function's
    graph, _ = tf2onnx.convert.from_function(analysis_function(model), input_signature=signature, opset=OPSET)
    return graph.SerializeToString()


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


