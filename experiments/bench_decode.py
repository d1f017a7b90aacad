"""Image decoding: PIL (what the data pipeline uses) against OpenCV, on Cityscapes- and ADE20K-like files.

tensorflow-datasets decodes with OpenCV when it is installed and warns
otherwise. This measures whether OpenCV would be worth the dependency: a
photo-like 1024x2048 RGB image encoded as PNG (Cityscapes) and as JPEG
(ADE20K), decoded to RGB arrays, milliseconds per image (median of repeats).
OpenCV's row is printed only where `cv2` imports.

    python experiments/bench_decode.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
from PIL import Image


def photo_like(height: int = 1024, width: int = 2048) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([(x / 8) % 256, (y / 4) % 256, ((x + y) / 16) % 256], axis=-1)
    noise = np.random.default_rng(0).integers(-20, 20, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def median_ms(decode, data: bytes, repeats: int) -> float:
    decode(data)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decode(data)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    decoders = {"PIL": lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))}
    try:
        import cv2

        decoders[f"OpenCV {cv2.__version__}"] = lambda data: cv2.cvtColor(
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    except ImportError:
        pass
    image = photo_like()
    print(f"{platform.processor() or platform.machine()}, 1024x2048 RGB, median of {args.repeats}")
    print("| format | size (KiB) | " + " | ".join(f"{name} (ms)" for name in decoders) + " |")
    print("|---|---|" + "---|" * len(decoders))
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format=fmt)
        data = buffer.getvalue()
        row = [f"{median_ms(decode, data, args.repeats):.1f}" for decode in decoders.values()]
        print(f"| {fmt} | {len(data) // 1024} | " + " | ".join(row) + " |")
    if len(decoders) == 1:
        print("OpenCV is not installed here (pip install opencv-python-headless to compare).")


if __name__ == "__main__":
    main()
