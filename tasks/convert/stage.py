"""convert: write each output format from the quantize stage's codes and the model's float tensors.

Every packed tensor is then read back from the written file, decoded by kernels/ and compared with the
reconstruction of the codes it was packed from; the result goes into the manifest, and package refuses
to publish an output with any mismatch.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from safetensors import safe_open

from quantfab.kernels.backends import current
from quantfab.tasks.convert import FORMATS, differences
from quantfab.tasks.convert.imatrix import importance
from quantfab.tasks.convert.hf_folder import PlannedTensor, model_dtype
from quantfab.tasks.download import materialize
from quantfab.tasks.manifests import (CalibrationManifest, ConvertManifest, FormatFile, Mismatch, ModelManifest, QuantizedOutput,
                                      QuantizeManifest, Verification, weight_bytes)
from quantfab.tasks.parallel import pmap
from quantfab.tasks.quantize.grids import Encoded, Grid, grid_named
from quantfab.tasks.quantize.layer_file import LayerFile, write_layer_file
from quantfab.tasks.store import Blob, Store


def convert(model: ModelManifest, quantized: QuantizeManifest, outputs: list, name: str, store: Store,
            calibration: CalibrationManifest | None = None) -> ConvertManifest:
    """Every output; they are independent, so ``pmap`` spreads them over a Dask cluster when there is one.
    ``calibration`` is read only by an output that ships llama.cpp's importance matrix."""
    jobs = [OutputJob(model, quantized.outputs.get(o.key), o, name, store.url, calibration) for o in outputs]
    return ConvertManifest(files={o.key: f for o, f in zip(outputs, pmap(convert_output, jobs))})


@dataclass(frozen=True)
class OutputJob:
    model: ModelManifest
    quantized: QuantizedOutput | None  # None: the format stores no method's codes (e.g. an F16 GGUF)
    output: Any  # the output's options
    name: str
    store_url: str
    calibration: CalibrationManifest | None = None


def convert_output(job: OutputJob) -> FormatFile:
    """Write one output from the quantize stage's codes and the model's floats, then verify what was written."""
    o, q, store = job.output, job.quantized, Store(job.store_url)
    model_dir = materialize(store, job.model.files)
    config, weights = model_dir.config(), model_dir.weights()
    fmt = FORMATS[o.format]
    grids = {m.name: m.grid for m in q.modules} if q else {}
    planned = fmt.plan(o, config, weights.tensors, grids)
    measured = fmt.measured_scales(o)
    if measured.inputs:  # the static activation scales quantize chose
        scales = {m.name: m.input_scale for m in q.modules} if q else {}
        planned = [replace(t, input_scale=scales.get(t.hf_name.removesuffix(".weight"))) for t in planned]
    layer_files = [LayerFile(store.local_path(b)) for b in q.layers] if q else []
    replaced = {k: i for i, lf in enumerate(layer_files) for k in lf.float_names()}
    if measured.kv:  # the KV-cache scales quantize measured, stored as floats of the model's type beside the rest
        dtype = model_dtype(config)
        planned += [PlannedTensor(name, (1,), None, dtype, dtype.itemsize) for name in sorted(replaced)
                    if name.endswith((".k_scale", ".v_scale"))]

    work = Path(store.scratch()) / f"convert-{uuid.uuid4().hex}"
    own: dict[str, tuple[Grid, Path]] = {}  # tensors the format coded itself, kept in ``work`` for verify_output

    def float_weight(t) -> np.ndarray:
        if t.hf_name in replaced:  # a float the method changed, e.g. an AWQ-scaled norm
            return layer_files[replaced[t.hf_name]].float(t.hf_name)
        return weights.load([t.hf_name])[t.hf_name].numpy()

    def codes(t) -> tuple[Grid, Encoded] | None:
        """The codes a tensor is packed from: the method's, or the format's own (GGUF's llama.cpp rtn)."""
        module = t.hf_name.removesuffix(".weight")
        if grids.get(module):
            return grid_named(grids[module]), layer_files[int(module.split(".")[2])].encoded(module)
        key = f"{t.hf_name}#{getattr(t, 'gguf_name', '')}"  # a GGUF split tensor's parts share the HF name
        if key in own:  # coded once, while writing (a K-quant search of a 128k-row embedding takes a while)
            return own[key][0], LayerFile(own[key][1]).encoded("t")
        found = fmt.float_codes(t, lambda: float_weight(t))
        if found is not None:
            path = work / f"codes-{len(own)}.safetensors"
            write_layer_file(path, {"t": found[1]}, {}, [])
            own[key] = found[0], path
        return found

    def tensor_data(t):
        found = codes(t)
        return fmt.pack(t, found[1]) if found else fmt.float_tensor(t, float_weight(t))

    out_name = fmt.output_name(o, job.name)
    work.mkdir()
    try:
        shipped = _write_importance(work, fmt, o, job, config, weights) if fmt.ships_importance(o) else None
        fmt.write(work / out_name, o, model_dir, planned, tensor_data, job.name,
                  **({"importance": shipped} if shipped else {}))
        verification = verify_output(fmt, fmt.reader(work / out_name, config), planned, codes)
        blobs = _put_tree(work, work / out_name, store)
        if shipped:
            blobs |= _put_tree(work, work / shipped.file, store)
        if getattr(o, "target_bits_per_weight", None) and hasattr(fmt, "type_table"):  # a budget: its table, reusable
            table = work / fmt.type_table_name(o, job.name)
            table.write_text(fmt.type_table(planned))
            blobs |= _put_tree(work, table, store)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    types: dict[str, int] = {}
    for t in planned:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    modules = q.modules if q else []
    added = sum(t.nbytes for t in planned) - differences.nominal_bytes(fmt, o, config, weights.tensors,
                                                                       {m.name: m.asked or m.grid for m in modules})
    return FormatFile(output=o.key, path=out_name, files=blobs, tensor_types=types,
                      fallbacks=differences.fallbacks(fmt, o, config, weights.tensors, {m.name: m.fallback for m in modules}),
                      bits_per_weight=round(weight_bytes(blobs) * 8 / job.model.parameters, 4),
                      nominal_bits_per_weight=round((weight_bytes(blobs) - added) * 8 / job.model.parameters, 4), verification=verification)


def _write_importance(work: Path, fmt: Any, o: Any, job: OutputJob, config: Any, weights: Any) -> Any:
    """Write the output's importance matrix into ``work``; what the format records of it (ImportanceFile)."""
    cal = job.calibration
    if cal is None or not cal.stats:
        raise RuntimeError(f"{o.key}: ships an importance matrix but the calibration holds no statistics: "
                           "reads_statistics decided otherwise")
    store = Store(job.store_url)
    with safe_open(str(store.local_path(cal.tokens)), framework="np") as f:
        samples, seq_len = f.get_slice("input_ids").get_shape()
    path = work / fmt.importance_name(o, job.name)
    return fmt.write_importance(path, config, weights.tensors, importance(cal, weights, store), cal.source, seq_len,
                                samples)


def verify_output(fmt: Any, written: Any, planned: list, codes: Callable[[Any], tuple[Grid, Encoded] | None]) -> Verification:
    """Decode every packed tensor from the written output and compare it with its codes' reconstruction."""
    tensors = elements = 0
    worst = 0.0
    mismatches = []
    for t in planned:
        found = codes(t)
        if found is None:
            continue
        grid, enc = found
        verdict = fmt.verify(written, t, grid.decode(enc))
        tensors, elements, worst = tensors + 1, elements + verdict.elements, max(worst, verdict.max_abs_error)
        if not verdict.ok:
            mismatches.append(Mismatch(tensor=t.hf_name, count=verdict.mismatches, first_index=verdict.first,
                                       max_abs_error=verdict.max_abs_error))
    return Verification(backend=current().name, tensors=tensors, elements=elements, max_abs_error=worst,
                        mismatches=mismatches)


def _put_tree(root: Path, written: Path, store: Store) -> dict[str, Blob]:
    """Every file a format wrote (one file, or a folder's files), keyed by its path under ``root``."""
    paths = [written] if written.is_file() else sorted(p for p in written.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): store.put_file(p) for p in paths}
