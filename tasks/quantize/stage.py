"""quantize: per decoder layer, codes for every Linear on each output's grid.

Writes one safetensors per (output, layer) holding ``{module}.codes`` (int8), ``.d`` and ``.m`` (float32),
and reports each module's relative output error on the calibration inputs.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from quantfab.tasks.convert import FORMATS
from quantfab.tasks.download import materialize
from quantfab.tasks.manifests import CalibrationManifest, ModelManifest, ModuleReport, QuantizedOutput, QuantizeManifest
from quantfab.tasks.modelio import INPUT_OF, LINEARS
from quantfab.tasks.quantize import METHODS
from quantfab.tasks.quantize.assign import assign
from quantfab.tasks.quantize.grids import GRIDS, Encoded
from quantfab.tasks.quantize.stats import InputStats
from quantfab.tasks.store import Blob, Store


def quantize(model: ModelManifest, calibration: CalibrationManifest, quant, outputs: list, store: Store) -> QuantizeManifest:
    weights = materialize(store, model.files).weights()
    targets = [o for o in outputs if FORMATS[o.format].grid_for(o, None, None, None) is not None]
    layers: dict[str, list[Blob]] = {o.key: [] for o in targets}
    reports: dict[str, list[ModuleReport]] = {o.key: [] for o in targets}
    work = Path(store.scratch())
    for i in range(model.num_layers):
        stats = _load_stats(store.local_path(calibration.stats[i]), calibration.count)
        names = [f"model.layers.{i}.{lin}" for lin in LINEARS]
        w = {n: t.numpy() for n, t in weights.load([f"{n}.weight" for n in names]).items()}
        for o in targets:
            fmt = FORMATS[o.format]
            tensors: dict[str, np.ndarray] = {}
            for name, lin in zip(names, LINEARS):
                weight = w[f"{name}.weight"]
                a = assign(name, weight.shape[1], quant, fmt, o)
                if a.grid is None:
                    reports[o.key].append(ModuleReport(name=name, grid=None, note=a.note))
                    continue
                grid = GRIDS[a.grid]
                st = stats[INPUT_OF[lin]]
                enc = METHODS[a.method].quantize(weight, grid, st)
                error = st.relative_output_error(weight, grid.decode(enc))
                reports[o.key].append(ModuleReport(name=name, grid=a.grid, note=a.note, relative_output_error=error))
                tensors.update(_flatten(name, enc))
            path = work / f"quant-{uuid.uuid4().hex}.safetensors"
            save_file(tensors, str(path))
            layers[o.key].append(store.put_file(path))
            path.unlink()
    return QuantizeManifest(method=quant.method, outputs={
        o.key: QuantizedOutput(output=o.key, layers=layers[o.key], modules=reports[o.key]) for o in targets})


def _flatten(name: str, enc: Encoded) -> dict[str, np.ndarray]:
    out = {f"{name}.codes": enc.codes, f"{name}.d": enc.d}
    if enc.m is not None:
        out[f"{name}.m"] = enc.m
    return out


def load_encoded(path: Path, name: str) -> Encoded:
    """The codes of module ``name`` from a quantize layer file."""
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        m = f.get_tensor(f"{name}.m") if f"{name}.m" in keys else None
        return Encoded(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.d"), m)


def _load_stats(path: Path, count: int) -> dict[str, InputStats]:
    with safe_open(str(path), framework="numpy") as f:
        keys = {k.split(".")[0] for k in f.keys()}
        return {k: InputStats(f.get_tensor(f"{k}.mean_abs"), f.get_tensor(f"{k}.hessian"), count) for k in keys}
