"""What one upload can cost a replica to decode: CPU time and peak memory of `decode_pixels` on files made to be
costly (many pixels in few bytes), each under the service's upload limit, each decoded in a fresh process.

    python benchmarks/decode_budget.py [--megapixels 30]

Prints a table (file kind, file size, pixels, CPU ms, peak MB above the process's baseline, answer) and, as the
ratio this benchmark is about, the worst accepted file's CPU and memory against a 6000x4500 dermoscopy-sized
JPEG decoded the same way.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

UPLOAD_LIMIT = 10 * 2**20  # the service's default max_upload_mb

# Peak memory of the decode alone: Linux resets a process's peak resident size (VmHWM) when "5" is written to
# its clear_refs, so the peak after decoding less the resident size before is what decoding took.
MEASURE = """
import json, sys, time
from skin_ray.preprocess import ImageDecodeError, decode_pixels

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
started = time.process_time()
try:
    decode_pixels(data, 170)
    answer = "200"
except ImageDecodeError as exc:
    answer = f"400 {exc.reason}"
cpu_ms = (time.process_time() - started) * 1000
print(json.dumps({"cpu_ms": cpu_ms, "peak_mb": (status("VmHWM") - before) / 1024, "answer": answer}))
"""


def _gradient(width: int, height: int, channels: int, dtype=np.uint8) -> np.ndarray:
    """Smooth content: compresses to almost nothing, so many pixels fit under the upload limit."""
    top = np.iinfo(dtype).max
    x = np.linspace(0, top, width, dtype=np.float64)[None, :]
    y = np.linspace(0, top, height, dtype=np.float64)[:, None]
    plane = ((x + y) / 2).astype(dtype)
    return np.repeat(plane[..., None], channels, axis=2) if channels > 1 else plane


def corpus(megapixels: float) -> dict[str, bytes]:
    side = int((megapixels * 1e6) ** 0.5)
    width, height = int(side * 1.15), int(side / 1.15)  # a photo's aspect, about `megapixels`
    files = {}

    def save(name, image, fmt, **params):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        files[name] = buffer.getvalue()

    save("JPEG, RGB, 6000x4500 (dermoscopy-sized, the reference)", Image.fromarray(_gradient(6000, 4500, 3)), "JPEG", quality=90)
    save("JPEG, CMYK", Image.fromarray(_gradient(width, height, 3)).convert("CMYK"), "JPEG", quality=90)
    save("PNG, 16-bit grey", Image.fromarray(_gradient(width, height, 1, np.uint16)), "PNG")
    save("PNG, RGBA", Image.fromarray(_gradient(width, height, 4)), "PNG")
    save("PNG, palette with transparency", Image.fromarray(_gradient(width, height, 3)).quantize(64), "PNG", transparency=0)
    save("PNG, RGB", Image.fromarray(_gradient(width, height, 3)), "PNG")
    save("WebP, lossless", Image.fromarray(_gradient(width // 2, height // 2, 3)), "WEBP", lossless=True)
    frames = [Image.fromarray(_gradient(2000, 1500, 3)).quantize(32) for _ in range(50)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    files["GIF, 50 frames of 2000x1500"] = buffer.getvalue()
    save("TIFF, RGB, deflate", Image.fromarray(_gradient(width, height, 3)), "TIFF", compression="tiff_adobe_deflate")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=30.0, help="pixels of the costly files")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind, data in corpus(args.megapixels).items():
            path = Path(folder, "file")
            path.write_bytes(data)
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.size[0] * image.size[1]
            measured = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                                                 text=True, check=True).stdout)
            over = " (over the upload limit)" if len(data) > UPLOAD_LIMIT else ""
            rows.append({"kind": kind, "bytes": len(data), "megapixels": pixels / 1e6, **measured, "over": over})
    print("| file | size | megapixels | CPU ms | peak MB | answer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['kind']} | {row['bytes'] / 2**20:.2f} MiB{row['over']} | {row['megapixels']:.1f} | "
              f"{row['cpu_ms']:.0f} | {row['peak_mb']:.0f} | {row['answer']} |")
    reference, accepted = rows[0], [row for row in rows if row["answer"] == "200" and not row["over"]]
    worst_cpu, worst_memory = max(accepted, key=lambda r: r["cpu_ms"]), max(accepted, key=lambda r: r["peak_mb"])
    print(f"worst accepted CPU: {worst_cpu['kind']}, {worst_cpu['cpu_ms']:.0f} ms "
          f"({worst_cpu['cpu_ms'] / reference['cpu_ms']:.1f}x the dermoscopy-sized JPEG)")
    print(f"worst accepted memory: {worst_memory['kind']}, {worst_memory['peak_mb']:.0f} MB "
          f"({worst_memory['peak_mb'] / max(reference['peak_mb'], 1):.1f}x the dermoscopy-sized JPEG)")


if __name__ == "__main__":
    main()
