"""Load quantfab's mlx checkpoints with mlx-lm (Linux CPU wheels; a venv of its own, never our dependency) and
report what it computes: the logits of token windows and a short greedy generation.

    QUANTFAB_MLX_PYTHON=/work/mlx-venv/bin/python pytest -m mlx tests/test_mlx.py    (runs this per folder)
    /work/mlx-venv/bin/python bench/consumers/mlx_logits.py FOLDER IDS.npy OUT.npy

The venv (about 2 minutes here): python3.11 -m venv /work/mlx-venv && /work/mlx-venv/bin/pip install "mlx[cpu]" mlx-lm
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import numpy as np
from mlx_lm import generate, load


def main() -> None:
    folder, ids_file, out_file = sys.argv[1:4]
    model, tokenizer = load(folder)
    logits = model(mx.array(np.load(ids_file)))
    np.save(out_file, np.array(logits.astype(mx.float32)))
    layers = model.model.layers
    bits = {name: getattr(module, "bits", None) for name, module in layers[0].named_modules()}
    text = generate(model, tokenizer, prompt="Once upon a time", max_tokens=16)
    print(json.dumps({"text": text, "layer0_bits": {k: v for k, v in bits.items() if v},
                      "embedding": type(model.model.embed_tokens).__name__}))


if __name__ == "__main__":
    main()
