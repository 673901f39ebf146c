#!/usr/bin/env python3
"""Rewrites a head's safetensors file with its float32 tensors stored as float16.

The loaders (candle's VarBuilder) convert every tensor to float32 when they read it, so a head
stored this way runs exactly as one stored in float32 whose weights were rounded to float16;
the file is half the size. Check the scores after converting (`evaluate themes`).

    python3 scripts/head_to_f16.py models/heads/themes.safetensors

Needs `pip install safetensors numpy` (a development tool, not a run-time dependency).
"""
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def main(path):
    tensors = load_file(path)
    converted = {
        name: (t.astype(np.float16) if t.dtype == np.float32 else t)
        for name, t in tensors.items()
    }
    worst = max(
        float(np.max(np.abs(converted[n].astype(np.float32) - t), initial=0.0))
        for n, t in tensors.items()
    )
    save_file(converted, path)
    print(f"{path}: {len(converted)} tensors stored as float16; largest rounding {worst:.2e}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
