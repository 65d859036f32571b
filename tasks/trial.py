"""Trials: one method on one grid for every Linear of a model, measured against fp32 on given tokens.

What the tests and benches use to compare methods under a fixed protocol, through the same quantize and
validate code a recipe runs (codes decoded by their grid, which formats store bit for bit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantfab.tasks.activations import MeasuredScales
from quantfab.tasks.calibrate import calibrate_on
from quantfab.tasks.download import download, materialize
from quantfab.tasks.manifests import QuantizedOutput
from quantfab.tasks.model_structure import layout, model_units
from quantfab.tasks.quantize.assign import Assignment
from quantfab.tasks.quantize.grids import grid_named
from quantfab.tasks.quantize.layer_file import LayerFile, QuantizedWeights
from quantfab.tasks.quantize.stage import quantize_model
from quantfab.tasks.store import Store
from quantfab.tasks.validate import compare


class Trial:
    def __init__(self, model_path: Path, store: Store, calibration_ids: np.ndarray, eval_ids: np.ndarray,
                 device: str = "cpu", statistics: bool = True):
        self.store, self.eval_ids, self.device = store, eval_ids, device
        self.model = download(str(model_path), None, ["*.safetensors", "*.json"], False, store)
        self.folder = materialize(store, self.model.files)
        self.config, self.weights = self.folder.config(), self.folder.weights()
        # statistics=False: only the token windows, for trials of sequential methods alone (they measure their inputs)
        self.calibration = calibrate_on(self.model, calibration_ids, device, store, statistics)
        self._metrics: dict[tuple, dict[str, Any]] = {}

    def quantize(self, quant: Any, grid: str, measured: MeasuredScales = MeasuredScales()) -> QuantizedOutput:
        """``quant`` is a QuantizeSpec; every Linear of every layer gets its method on ``grid`` (a per-channel grid
        made one block per row of each Linear), and the ``measured`` scales."""
        shape = layout(self.config)
        units = model_units(self.config, {n: t.shape for n, t in self.weights.tensors.items()})
        plans = [{lin: Assignment(f"{shape.prefix(i)}{lin}", quant.method, self._row_grid(grid, f"{shape.prefix(i)}{lin}"))
                  for lin in linears} for i, linears in enumerate(units)]
        dev = torch.device("cuda" if self.device != "cpu" and torch.cuda.is_available() else "cpu")
        return quantize_model(self.model, self.folder, self.calibration, quant, plans, grid, dev, self.store,
                              measured)

    def _row_grid(self, grid: str, module: str) -> str:
        g = grid_named(grid)
        return g.for_row(self.weights.tensors[f"{module}.weight"].shape[1]).name if g.block == 0 else grid

    def layer_files(self, quant: Any, grid: str, measured: MeasuredScales = MeasuredScales()) -> list[LayerFile]:
        return [LayerFile(self.store.local_path(b)) for b in self.quantize(quant, grid, measured).layers]

    def metrics(self, quant: Any, grid: str) -> dict[str, Any]:
        """PPL of fp32 and of the build, KL(fp32 || build) and top-1 agreement, on the evaluation tokens."""
        key = (quant.model_dump_json(), grid)
        if key not in self._metrics:
            sources = {"fp32": self.weights, "q": QuantizedWeights(self.weights, self.layer_files(quant, grid))}
            m = compare(self.config, sources, self.eval_ids, self.device)
            self._metrics[key] = {**m["outputs"]["q"], "tokens": m["tokens"]}
        return self._metrics[key]


def protocol_windows(text: Path, model_path: Path, eval_windows: int, window: int, calib_samples: int,
                     calib_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, evaluation) windows from one text, each row BOS then text tokens.

    Evaluation takes the first ``eval_windows`` x (window - 1) text tokens; calibration the last
    ``calib_samples`` x (calib_len - 1), so the two never overlap on a long enough text.
    """
    from quantfab.tasks.modelio import ModelDir

    folder = ModelDir(model_path)
    bos = int(folder.config().bos_token_id if folder.config().bos_token_id is not None else 1)
    ids = np.asarray(folder.tokenizer()(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"],
                     dtype=np.int64)
    need = eval_windows * (window - 1) + calib_samples * (calib_len - 1)
    if len(ids) < need:
        raise ValueError(f"{text}: {len(ids)} tokens, the protocol needs {need}")
    calib = ids[len(ids) - calib_samples * (calib_len - 1):].reshape(calib_samples, calib_len - 1)
    evals = ids[:eval_windows * (window - 1)].reshape(eval_windows, window - 1)
    return _with_bos(calib, bos), _with_bos(evals, bos)


def _with_bos(rows: np.ndarray, bos: int) -> np.ndarray:
    return np.concatenate([np.full((rows.shape[0], 1), bos, np.int64), rows], axis=1)
