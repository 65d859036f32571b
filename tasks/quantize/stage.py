"""quantize: per output and decoder layer, codes for every Linear on that output's grid, checkpointed per layer.

Methods that are not sequential fit each layer to the unquantized model's calibration statistics (the
calibrate stage's, shared by every recipe with the same model and calibration set). Sequential methods
(GPTQ) carry the calibration hidden states through the model: layer i is fitted to what layers 0..i-1
produce *as quantized*, holding one decoder layer and the hidden states in memory.

Each finished layer is committed to the store as a checkpoint keyed by its weights' digest, its inputs'
digest and the method settings; a rerun after a crash finds them and redoes no finished layer. For a
sequential method the inputs' digest chains the keys of the layers before it, so the hidden states a
resumed run recomputes (a forward pass through the committed layers) are the ones the first run had.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open

from quantfab.tasks.activations import (KVRecorder, MeasuredScales, attention_of, static_scale,
                                        through_kv_cache)
from quantfab.tasks.calibrate import (InputRecorder, Moments, measure_layer, structure_from_metadata, widths,
                                     with_expert_fallbacks)
from quantfab.tasks.convert import FORMATS
from quantfab.tasks.decoder import Decoder, LayerStructure
from quantfab.tasks.download import materialize
from quantfab.tasks.malloc import freed_memory_kept, hand_back_free_pages
from quantfab.tasks.manifests import AllocationManifest, CalibrationManifest, ModelManifest, ModuleReport, QuantizedOutput, QuantizeManifest
from quantfab.tasks.errors import UserError
from quantfab.tasks.families import Family, family
from quantfab.tasks.modelio import ModelDir, pick_device, relative
from quantfab.tasks.parallel import pmap
from quantfab.tasks.quantize import METHODS
from quantfab.tasks.quantize.assign import Assignment, assign_layers, budget_of, measures_inputs
from quantfab.tasks.quantize.grids import grid_named
from quantfab.tasks.quantize.layer import LayerInput, LayerResult, bind_by_input
from quantfab.tasks.quantize.layer_file import LayerFile, write_layer_file
from quantfab.tasks.quantize.smoothquant import smooth
from quantfab.tasks.quantize.stats import InputStats
from quantfab.tasks.store import Blob, Store

CHECKPOINTS = "quantize-layer"
SOURCES = Path(__file__).resolve().parent


def quantize(model: ModelManifest, calibration: CalibrationManifest, quant: Any, outputs: list, device: str,
             store: Store, allocation: AllocationManifest | None = None) -> QuantizeManifest:
    """Every output's codes, each Linear on the grid ``assign`` gives it (and a budgeted output's ``allocation``)."""
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    out = {}
    for o in outputs:
        fmt = FORMATS[o.format]
        if not fmt.stores_codes(o):
            continue
        chosen = allocation.outputs[o.key].types if allocation and o.key in allocation.outputs else None
        if chosen is None and budget_of(o):
            raise RuntimeError(f"{o.key} has a size budget but no allocation: run the allocate stage first")
        plans = assign_layers(config, weights.tensors, quant, fmt, o, chosen)
        with freed_memory_kept():
            out[o.key] = quantize_model(model, model_dir, calibration, quant, plans, o.key, pick_device(device), store,
                                        fmt.measured_scales(o), fmt.ships_importance(o))
    return QuantizeManifest(method=quant.method, outputs=out)


def quantize_model(model: ModelManifest, model_dir: ModelDir, calibration: CalibrationManifest, quant: Any,
                   plans: list[dict[str, Assignment]], key: str, device: torch.device, store: Store,
                   measured: MeasuredScales = MeasuredScales(), importance: bool = False) -> QuantizedOutput:
    """Quantize every layer by ``plans`` (per layer: Linear -> method and grid) as output ``key``, and choose the
    scales ``measured`` asks for: each quantized Linear's static input scale, each layer's KV-cache scales.
    ``importance``: the output ships an importance matrix, and methods whose grids' rules take one (rtn on GGUF's
    grids) quantize with it, as llama-quantize --imatrix does.

    Layers of non-sequential methods do not depend on each other: they go through ``pmap``, which spreads
    them over the Dask cluster when the stage runs on one. A sequential method, or measured scales (which must
    come from what the built model's layers get), carries the calibration tokens through the layers as
    quantized instead.
    """
    settings = {**_settings(quant, device), "measured": asdict(measured), "importance": importance}
    methods = _methods(quant, device, settings)
    if measures_inputs(plans, measured):
        inputs = HiddenStates(model, model_dir, calibration, device, store, measured)
        layers: list[Blob] = []
        for i, plan in enumerate(plans):
            checkpoint, blob = _layer(model, model_dir, inputs, quant, plan, i, methods, settings, store, device,
                                      measured.inputs)
            layers.append(blob)
            inputs.advance(i, checkpoint, LayerFile(store.local_path(blob)))
    else:
        reading = [a.method for plan in plans for a in plan.values() if a.grid and METHODS[a.method].reads_inputs]
        if reading and len(calibration.stats) != len(plans):
            raise RuntimeError(f"{key}: the calibration holds no statistics for its layers, but {reading[0]} reads "
                               "them: reads_statistics decided otherwise")
        jobs = [IndependentLayer(model, model_dir.path, calibration, quant, plan, i, settings, store.url)
                for i, plan in enumerate(plans)]
        layers = pmap(quantize_independent_layer, jobs)
    reports = [r for blob in layers for r in LayerFile(store.local_path(blob)).reports()]
    return QuantizedOutput(output=key, layers=layers, modules=reports)


def _layer(model: ModelManifest, model_dir: ModelDir, inputs: Any, quant: Any, plan: dict[str, Assignment], i: int,
           methods: dict[str, Any], settings: dict[str, Any], store: Store, device: torch.device,
           static_inputs: str | None = None) -> tuple[str, Blob]:
    """Layer i's checkpoint key and committed result, computed only when the store does not hold it yet."""
    weights = model_dir.weights()
    prefix = weights.prefix(i)
    calibrated = CalibrationStats(inputs.calibration, store)
    smoothing = quant.smoothquant
    checkpoint = _digest({"weights": _layer_weights_digest(model, weights, i), "inputs": inputs.digest(i),
                          "smoothing": calibrated.digest(i) if smoothing else None,
                          "plan": {lin: [a.method, a.grid, a.note] for lin, a in plan.items()}, "settings": settings})
    blob = store.get_ref(CHECKPOINTS, checkpoint)
    if blob is None:
        tensors = {k: v.numpy() for k, v in weights.layer(i).items()}
        name = prefix.rstrip(".")
        kind = family(model.model_type)
        rtn = inputs.calibration.experts.fallback == "rtn"
        smoothed: dict[str, np.ndarray] = {}
        if smoothing:  # before any method, from the unquantized model's input ranges; stats become x / s's
            stats, structure = calibrated.stats(i, tensors)
            grids = {lin: grid_named(a.grid) for lin, a in with_fallbacks(plan, structure, rtn).items() if a.grid}
            tensors, stats, smoothed = smooth(LayerInput(tensors, stats, grids, name, structure, kind), smoothing.alpha)
        if inputs.stepwise and all(methods[a.method].stepwise for a in plan.values() if a.grid):
            result = LayerResult()

            def quantize_group(structure: LayerStructure, key: str, stats: InputStats) -> dict[str, np.ndarray]:
                """The Linears reading input ``key``, fitted to it; their decoded weights, for the rest of the pass."""
                group = {lin: a for lin, a in with_fallbacks(plan, structure, rtn).items() if lin in structure.groups[key]}
                part = _quantize_layer(tensors, {key: stats}, group, methods, name, structure, kind)
                _merge(result, part)
                return {lin: grid_named(group[lin].grid).decode(enc) for lin, enc in part.encoded.items()}

            structure = inputs.quantize_through(i, tensors, quantize_group)
            result.floats.update(inputs.kv_scales.pop(i, {}))
        else:
            if inputs.stepwise or not smoothing:  # hidden states measure the layer as it now is, smoothed or not
                stats, structure = inputs.stats(i, tensors)
            result = _quantize_layer(tensors, stats, with_fallbacks(plan, structure, rtn), methods, name, structure, kind)
        result.floats = {**smoothed, **result.floats}
        blob = _commit(result, with_fallbacks(plan, structure, rtn), tensors, prefix, store, device, static_inputs)
        store.put_ref(CHECKPOINTS, checkpoint, blob)
    return checkpoint, blob


def with_fallbacks(plan: dict[str, Assignment], structure: LayerStructure, rtn: bool) -> dict[str, Assignment]:
    """``plan`` with the experts the calibration routed too few tokens noted, and on RTN if ``rtn`` (the fallback)."""
    out = dict(plan)
    for key, note in structure.fallbacks.items():
        for lin in structure.groups[key]:
            a = plan[lin]
            if a.grid is not None:
                out[lin] = Assignment(a.module, "rtn" if rtn else a.method, a.grid, "; ".join(filter(None, (a.note, note))),
                                      a.asked, "; ".join(filter(None, (a.fallback, note))))
    return out


@dataclass(frozen=True)
class IndependentLayer:
    """What one layer of a non-sequential method needs, small enough to ship to a Dask worker."""

    model: ModelManifest
    model_path: Path
    calibration: CalibrationManifest
    quant: Any
    plan: dict[str, Assignment]
    index: int
    settings: dict[str, Any]
    store_url: str


def quantize_independent_layer(job: IndependentLayer) -> Blob:
    with freed_memory_kept():
        return _independent_layer(job)


def _independent_layer(job: IndependentLayer) -> Blob:
    store = Store(job.store_url)
    device = torch.device(job.settings["device"])
    methods = _methods(job.quant, device, job.settings)
    return _layer(job.model, ModelDir(job.model_path), CalibrationStats(job.calibration, store), job.quant, job.plan,
                  job.index, methods, job.settings, store, device)[1]


def _methods(quant: Any, device: torch.device, settings: dict[str, Any]) -> dict[str, Any]:
    return {name: cls(quant, device, settings["importance"]) for name, cls in METHODS.items()}


def _quantize_layer(tensors: dict[str, np.ndarray], stats: dict[str, InputStats], plan: dict[str, Assignment],
                    methods: dict[str, Any], name: str, structure: LayerStructure, kind: Family) -> LayerResult:
    """Each method quantizes the Linears assigned to it; their results are merged."""
    merged = LayerResult()
    for method in sorted({a.method for a in plan.values() if a.grid}):
        grids = {lin: grid_named(a.grid) for lin, a in plan.items() if a.grid and a.method == method}
        grids = bind_by_input(grids, tensors, structure)
        _merge(merged, methods[method].quantize_layer(LayerInput(tensors, stats, grids, name, structure, kind)))
    return merged


def _merge(into: LayerResult, part: LayerResult) -> None:
    into.encoded.update(part.encoded)
    into.floats.update(part.floats)
    into.stats.update(part.stats)
    into.fitted.update(part.fitted)
    into.notes.update(part.notes)


def _commit(result: LayerResult, plan: dict[str, Assignment], tensors: dict[str, np.ndarray], prefix: str,
            store: Store, device: torch.device, static_inputs: str | None) -> Blob:
    reports = []
    for lin, a in plan.items():
        if a.grid is None:
            reports.append(ModuleReport(name=prefix + lin, grid=None, note=a.note, asked=a.asked, fallback=a.fallback))
            continue
        enc = result.encoded[lin]
        grid = grid_named(a.grid)
        # The error against the float weight the codes stand for, on the inputs they were fitted to
        # (AWQ: the scaled weight and the scaled inputs, whose product is the original's).
        fitted = result.fitted.get(lin, tensors[f"{lin}.weight"])
        stats = result.stats.get(lin)
        error = stats.relative_output_error(fitted, grid.decode(enc), device) if stats and not stats.diagonal_only else None
        scale = None
        if static_inputs:  # measured on the layers as built, so the histogram is there (never a scaled one)
            assert stats is not None and stats.abs_hist is not None, f"{prefix}{lin}: no input histogram"
            scale = static_scale(stats.abs_hist, float(stats.max_abs.max()), static_inputs)
        reports.append(ModuleReport(name=prefix + lin, grid=a.grid, method=a.method,
                                    note="; ".join(filter(None, (a.note, result.notes.get(lin)))), asked=a.asked, fallback=a.fallback,
                                    relative_output_error=error, input_scale=scale))
    with store.scratch_file(".safetensors") as path:
        write_layer_file(path, {prefix + lin: enc for lin, enc in result.encoded.items()},
                         {prefix + k: v for k, v in result.floats.items()}, reports)
        return store.put_file(path)


class CalibrationStats:
    """Inputs of non-sequential methods: the unquantized model's statistics from the calibrate stage."""

    stepwise = False

    def __init__(self, calibration: CalibrationManifest, store: Store):
        self.calibration, self.store = calibration, store

    def digest(self, i: int) -> str:
        return self.calibration.stats[i].digest if self.calibration.stats else "no statistics"

    def stats(self, i: int, tensors: dict[str, np.ndarray]) -> tuple[dict[str, InputStats], LayerStructure]:
        if not self.calibration.stats:  # methods that quantize from the weights alone, without a module report
            return {}, LayerStructure()
        with safe_open(str(self.store.local_path(self.calibration.stats[i])), framework="numpy") as f:
            structure = structure_from_metadata(f.metadata())
            return ({k: InputStats(f.get_tensor(f"{k}.mean_abs"), f.get_tensor(f"{k}.hessian"),
                                   int(f.get_tensor(f"{k}.count")), f.get_tensor(f"{k}.max_abs"), None)
                     for k in structure.groups}, structure)

    def advance(self, i: int, key: str, layer: LayerFile) -> None:
        pass


class HiddenStates:
    """Inputs of sequential methods: the calibration hidden states after the layers before, as quantized.

    A layer whose methods all work one input at a time is quantized *through*: input by input in the order
    the layer reads them (q/k/v, o, gate/up, down in a Llama), each group fitted to what the already
    quantized Linears before it produce (GPTQ's true-sequential order), in one pass over the layer that
    stops at each group's input until every batch has reached it (``Decoder.run_layer_fitting``) and carries
    the hidden states on through the quantized layer. A layer with experts takes a pass to each expert set's
    inputs and one through. Otherwise (AWQ moves scales across groups) the layer's inputs are measured with
    its float weights and, once committed, a second pass carries the states through its quantized weights.
    Passes through committed layers are deferred until needed, so a rerun whose layers are all committed
    runs none. For ``measured`` scales each input's |x| histogram is kept too (static activation scales), and the
    pass through each quantized layer records the keys and values its attention stores (KV-cache scales).
    """

    stepwise = True

    def __init__(self, model: ModelManifest, model_dir: ModelDir, calibration: CalibrationManifest,
                 device: torch.device, store: Store, measured: MeasuredScales = MeasuredScales()):
        self.device, self.store, self.measured = device, store, measured
        self.histogram = measured.inputs is not None
        self.kv_scales: dict[int, dict[str, np.ndarray]] = {}  # layer -> its KV-cache scales, relative names
        self.calibration = calibration
        self.decoder = Decoder(model_dir.config(), device)
        self.weights = model_dir.weights()
        self.hidden: torch.Tensor | None = None
        self.pending: list[tuple[int, LayerFile]] = []
        self.through: int | None = None  # the layer quantize_through last carried the states through
        entry = sorted({(n, self.weights.tensors[n].file.name) for n in self.decoder.entry_names() if n in self.weights.tensors})
        self.chain = _digest({"tokens": calibration.tokens.digest, "experts": calibration.experts.model_dump(),
                              "entry": [[n, model.files[file].digest] for n, file in entry]})

    def digest(self, i: int) -> str:
        return self.chain

    def stats(self, i: int, tensors: dict[str, np.ndarray]) -> tuple[dict[str, InputStats], LayerStructure]:
        self._catch_up()
        layer = self.decoder.layer(i, {k: torch.from_numpy(v) for k, v in tensors.items()})
        structure = self.decoder.structure(i, layer, self.hidden)
        moments, _ = measure_layer(self.decoder, i, layer, self.hidden, structure, widths(tensors, structure),
                                   self.calibration.experts, self.device, self.histogram)
        return {k: _input_stats(m) for k, m in moments.items()}, structure

    def quantize_through(self, i: int, tensors: dict[str, np.ndarray],
                         quantize_group: Callable[[LayerStructure, str, InputStats], dict[str, np.ndarray]]) -> LayerStructure:
        """Fit layer ``i`` input by input; ``quantize_group(structure, key, stats)`` gives the decoded weights of
        the units reading ``key``, which the layer then uses. The states end as the quantized layer's output.

        The groups of one expert set (every expert's gate+up, then every expert's down) do not read each
        other's outputs: one pass measures them all."""
        self._catch_up()
        layer = self.decoder.layer(i, {k: torch.from_numpy(v) for k, v in tensors.items()})
        structure = self.decoder.structure(i, layer, self.hidden)
        width = widths(tensors, structure)
        waves = self._waves(i, structure)

        def fit(key: str, moments: dict[str, Moments]) -> None:
            hand_back_free_pages()  # a solve's factors are the stage's peak: not on top of freed memory
            for unit, weight in quantize_group(structure, key, _input_stats(moments[key])).items():
                self.decoder.set_weight(i, layer, unit, torch.from_numpy(weight))

        if all(len(wave) == 1 for wave in waves):  # no expert set: one pass, stopping at each input in turn
            recorder = InputRecorder(structure.groups, width, self.device, self.histogram)
            with self._recording_kv(i, layer):
                self.hidden = self.decoder.run_layer_fitting(i, layer, self.hidden, [w[0] for w in waves],
                                                             lambda key, x: recorder.add((key,), x),
                                                             lambda key: fit(key, recorder.moments))
        else:  # an expert set's inputs are read in turn with the next set's: a pass to each, then one through
            for wave in waves:
                moments = with_expert_fallbacks(self.decoder, i, layer, self.hidden, structure,
                                                self._measure(i, layer, structure, wave, width), width,
                                                self.calibration.experts, self.device)
                for key in wave:
                    fit(key, moments)
            with self._recording_kv(i, layer):
                self.hidden = self.decoder.run_layer(i, layer, self.hidden)
        self.through = i
        return structure

    @contextlib.contextmanager
    def _recording_kv(self, i: int, layer: torch.nn.Module) -> Iterator[None]:
        """With ``measured.kv``: layer ``i``'s KV-cache scales chosen from the keys and values its attention
        stores while the block runs (set up before the pass enters the attention, read once it has ended)."""
        if not self.measured.kv:
            yield
            return
        attention = attention_of(layer, f"layer {i} of {self.decoder.config.model_type}")
        recorder = KVRecorder()
        cache = through_kv_cache(layer, attention, recorder.add)
        yield
        if not cache.updates:
            raise UserError(f"layer {i}'s {attention} stores no key or value through its cache: "
                            f"{self.decoder.config.model_type} cannot take a quantized KV cache")
        self.kv_scales[i] = {f"{attention}.{name}_scale": np.array([scale], np.float32)
                             for name, scale in recorder.scales(self.measured.kv).items()}

    def _waves(self, i: int, structure: LayerStructure) -> list[list[str]]:
        """The group keys in reading order, an expert set's consecutive groups of one parameter together."""
        waves: list[list[str]] = []
        last = None
        for key in structure.groups:
            param = self.decoder.units[i][key].name if self.decoder.is_expert(i, key) else None
            if param is None or param != last:
                waves.append([])
            waves[-1].append(key)
            last = param
        return waves

    def _measure(self, i: int, layer: torch.nn.Module, structure: LayerStructure, keys: list[str],
                 width: dict[str, int]) -> dict[str, Moments]:
        """The Moments of inputs ``keys``: one pass stopping at the input for a single key, a whole pass otherwise."""
        recorder = InputRecorder({key: structure.groups[key] for key in keys}, width, self.device, self.histogram)
        if len(keys) == 1:
            for x in self.decoder.inputs_of(i, layer, self.hidden, keys[0]):
                recorder.add((keys[0],), x)
        else:
            with self.decoder.reading(i, layer, recorder.add):
                self.decoder.run_layer(i, layer, self.hidden)
        return recorder.moments

    def advance(self, i: int, key: str, layer: LayerFile) -> None:
        self.chain = _digest({"after": key})
        if self.through != i:  # not carried through yet: a committed layer, or one fitted on float weights
            self.pending.append((i, layer))

    def _catch_up(self) -> None:
        if self.hidden is None:
            with safe_open(str(self.store.local_path(self.calibration.tokens)), framework="pt") as f:
                ids = f.get_tensor("input_ids")
            self.decoder.load_outer(self.weights.load(self.weights.checkpoint_names(self.decoder.entry_names())))
            self.hidden = self.decoder.embed(ids)
        for i, layer_file in self.pending:
            prefix = self.weights.prefix(i)
            tensors = self.weights.layer(i)
            tensors.update(relative(layer_file.weights(), prefix))
            self.hidden = self.decoder.run_layer(i, self.decoder.layer(i, tensors), self.hidden)
        self.pending = []


def _input_stats(m: Moments) -> InputStats:
    return InputStats(m.mean_abs(), m.hessian(), m.count, m.max_abs(), m.abs_histogram())


def _settings(quant: Any, device: torch.device) -> dict[str, Any]:
    """What besides weights, inputs and grids decides a layer's codes: method options, the code, the device."""
    code = hashlib.sha256()
    for f in sorted(SOURCES.glob("*.py")) + [SOURCES.parent / n for n in ("modelio.py", "decoder.py", "families.py",
                                                                          "calibrate.py", "gram.py", "checkpoint_map.py",
                                                                          "activations.py")]:
        code.update(f.name.encode() + b"\0" + f.read_bytes())
    return {"quantize": quant.model_dump(mode="json"), "code": code.hexdigest(), "device": device.type}


def _layer_weights_digest(model: ModelManifest, weights: Any, i: int) -> str:
    """Names and shard digests of a layer's tensors: the shards are content-addressed, so this names the bytes."""
    files = {info.file.name: model.files[info.file.name].digest for n in weights.layer_names(i)
             for info in [weights.tensors[n]]}
    return _digest({"tensors": sorted(weights.layer_names(i)), "files": files})


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
