"""llama.cpp's importance matrix from the calibrate stage's statistics, in llama.cpp's own GGUF imatrix format.

An importance matrix holds, per weight matrix the model multiplies its activations by, each input column's
sum of squared activations over the calibration tokens and the token count: ``<name>.in_sum2`` (f32, one row
of n_per_row per matrix, one matrix per expert of a stacked expert tensor) and ``<name>.counts`` (f32, one per
matrix), with ``general.type = imatrix``, the datasets and the chunk count and size as metadata
(tools/imatrix/imatrix.cpp, save_imatrix). The calibrate stage already sums x x^T over every Linear's
inputs: its diagonal is in_sum2, over the same tokens. ``llama-quantize --imatrix`` weighs each column's
rounding error by in_sum2 / count. Like llama-imatrix by default, only the decoder layers' matrices are
listed (the output head is not: llama-imatrix leaves it out unless --process-output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from quantfab.tasks.manifests import CalibrationManifest
from quantfab.tasks.modelio import WeightIndex
from quantfab.tasks.store import Store

Importance = dict[str, tuple[np.ndarray, int]]  # checkpoint matrix name -> (sum of x^2 per input column, tokens)


@dataclass(frozen=True)
class ImportanceFile:
    """What a GGUF file quantized with an importance matrix records of it (llama-quantize's quantize.imatrix.*)."""

    file: str  # its name beside the model file
    dataset: str  # the calibration source, redacted
    entries: int  # tensors it holds rows for
    chunks: int


def importance(calibration: CalibrationManifest, weights: WeightIndex, store: Store) -> Importance:
    """Every calibrated Linear's (in_sum2, count), by checkpoint tensor name: the units reading one input share it."""
    out: Importance = {}
    for i, blob in enumerate(calibration.stats):
        with safe_open(str(store.local_path(blob)), framework="np") as f:
            # the units reading each input, as calibrate.structure_metadata writes them (read here without
            # importing the calibrate stage: the file's digest in the manifest already keys what convert reads)
            groups = json.loads(f.metadata()["structure"])["groups"]
            for key, units in groups.items():
                hessian = f.get_tensor(f"{key}.hessian")  # XᵀX, or its diagonal alone
                sums = (hessian if hessian.ndim == 1 else np.diag(hessian)).astype(np.float32)
                count = int(f.get_tensor(f"{key}.count"))
                for unit in units:
                    out[f"{weights.prefix(i)}{unit}.weight"] = (sums, count)
    return out


def write_imatrix(path: Path, arch: str, entries: dict[str, list[tuple[np.ndarray, int]]], dataset: str,
                  chunk_size: int, chunks: int) -> None:
    """``entries``: GGUF tensor name -> per matrix (one, or one per expert in order), its (in_sum2, count).
    gguf-py's writer adds the model's ``general.architecture`` too (llama-imatrix writes none; readers ignore it)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])  # redacted by calibrate
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunks)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    for name in sorted(entries):  # llama-imatrix's order
        mats = entries[name]
        sums, counts = np.stack([s for s, _ in mats]).astype(np.float32), np.array([[c] for _, c in mats], np.float32)
        if len(mats) == 1:  # ggml stores [n, 1] and [1, 1] as 1-D tensors (ggml_n_dims)
            sums, counts = sums[0], counts[0]
        writer.add_tensor(f"{name}.in_sum2", sums)
        writer.add_tensor(f"{name}.counts", counts)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
