"""The quantize stage's per-layer file: codes of every quantized Linear, replaced floats, and the report.

One safetensors per (output, decoder layer), under full HF names: ``{module}.codes`` (int8), ``.d``, ``.m``
and ``.x.{name}`` (grid extras) for each module; ``float:{tensor}`` for a float tensor the method changed
(AWQ's scaled norms); the per-module report as JSON in the header metadata. It is also the checkpoint a
rerun resumes from, so everything later stages and resumes need is in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from quantfab.tasks.manifests import ModuleReport
from quantfab.tasks.quantize.grids import Encoded, grid_named
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

FLOAT = "float:"


def write_layer_file(path: Path, encoded: dict[str, Encoded], floats: dict[str, np.ndarray],
                     reports: list[ModuleReport]) -> None:
    tensors: dict[str, np.ndarray] = {}
    for name, enc in encoded.items():
        tensors[f"{name}.codes"] = enc.codes
        tensors[f"{name}.d"] = enc.d
        if enc.m is not None:
            tensors[f"{name}.m"] = enc.m
        for k, v in enc.extra.items():
            tensors[f"{name}.x.{k}"] = v
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}  # safetensors stores a view's buffer as is
    for name, value in floats.items():
        tensors[FLOAT + name] = np.ascontiguousarray(value, dtype=np.float32)
    save_file(tensors, str(path), metadata={"modules": json.dumps([r.model_dump() for r in reports])})


class LayerFile:
    def __init__(self, path: Path):
        self.path = path
        with safe_open(str(path), framework="numpy") as f:
            self.keys = set(f.keys())
            self.metadata = f.metadata() or {}

    def encoded(self, name: str) -> Encoded:
        with safe_open(str(self.path), framework="numpy") as f:
            m = f.get_tensor(f"{name}.m") if f"{name}.m" in self.keys else None
            prefix = f"{name}.x."
            extra = {k[len(prefix):]: f.get_tensor(k) for k in self.keys if k.startswith(prefix)}
            return Encoded(f.get_tensor(f"{name}.codes"), f.get_tensor(f"{name}.d"), m, extra)

    def float_names(self) -> list[str]:
        return sorted(k[len(FLOAT):] for k in self.keys if k.startswith(FLOAT))

    def float(self, name: str) -> np.ndarray:
        with safe_open(str(self.path), framework="numpy") as f:
            return f.get_tensor(FLOAT + name)

    def reports(self) -> list[ModuleReport]:
        return [ModuleReport(**r) for r in json.loads(self.metadata.get("modules", "[]"))]

    def weights(self) -> dict[str, torch.Tensor]:
        """The float32 tensors this layer now stands for, under full names: decoded codes and replaced floats."""
        out = {f"{r.name}.weight": torch.from_numpy(grid_named(r.grid).decode(self.encoded(r.name)))
               for r in self.reports() if r.grid}
        out.update({k: torch.from_numpy(self.float(k)) for k in self.float_names()})
        return out


class QuantizedWeights:
    """A model's weights with the quantized layers' decoded values in place: loads like a WeightIndex."""

    def __init__(self, base, layer_files: list[LayerFile]):
        self.base = base
        self.replaced: dict[str, torch.Tensor] = {}
        for lf in layer_files:
            self.replaced.update(lf.weights())

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = self.base.load([n for n in names if n not in self.replaced])
        out.update({n: self.replaced[n] for n in names if n in self.replaced})
        return out
