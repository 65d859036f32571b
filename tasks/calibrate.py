"""calibrate: run the model layer by layer on calibration text and record per-Linear input statistics.

(Only the token windows when no output will read the statistics: see ``calibrate_on``.)

Holds one decoder layer's weights plus the hidden states of all samples. For each group of Linears that
read one input (the layer's forward shows which: q/k/v, o, gate/up, down in a Llama) it records the sum of
x x^T (the Hessian GPTQ needs), the per-channel mean |x| (what AWQ scales by) and the token count, one
safetensors file per layer in the store, whose metadata holds the layer's structure (groups, and the module
producing each input). An expert's statistics are over the tokens routed to it; one routed fewer than
``min_tokens`` gets the recipe's fallback (statistics over every token the experts module saw, as if all were
routed to it, or round to nearest), noted in the structure and, from there, in the build report.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.numpy import save_file

from quantfab.tasks.activations import HIST_BINS, add_abs_histogram
from quantfab.tasks.decoder import Decoder, LayerStructure
from quantfab.tasks.download import materialize
from quantfab.tasks.gram import add_gram_upper, mirror_upper
from quantfab.tasks.malloc import freed_memory_kept
from quantfab.tasks.manifests import EXPERT_FALLBACK, CalibrationManifest, ExpertFallback, ModelManifest
from quantfab.tasks.modelio import pick_device
from quantfab.tasks.redact import redact
from quantfab.tasks.store import Blob, Store
from quantfab.tasks.texts import bos_of, calibration_tokens_read, read_tokens, sampled_windows


def calibration_tokens(model: ModelManifest, source: str, samples: int, seq_len: int, seed: int, text_field: str,
                       store: Store, text_sha256: str | None = None) -> np.ndarray:
    model_dir = materialize(store, model.files)
    config = model_dir.config()
    tokenizer = None if source.startswith("synthetic://") else model_dir.tokenizer()
    ids = read_tokens(source, tokenizer, config.vocab_size, calibration_tokens_read(samples, seq_len), text_field,
                      text_sha256)
    return sampled_windows(ids, seq_len, samples, bos_of(config), seed, source)


def calibrate(model: ModelManifest, source: str, samples: int, seq_len: int, seed: int, text_field: str,
              device: str, store: Store, statistics: bool = True,
              experts: ExpertFallback = ExpertFallback(), diagonal: bool = False,
              text_sha256: str | None = None) -> CalibrationManifest:
    torch.manual_seed(seed)
    ids = calibration_tokens(model, source, samples, seq_len, seed, text_field, store, text_sha256)
    return calibrate_on(model, ids, device, store, statistics, experts, diagonal).model_copy(
        update={"source": redact(source)})


def calibrate_on(model: ModelManifest, ids: np.ndarray, device: str, store: Store, statistics: bool = True,
                 experts: ExpertFallback = ExpertFallback(), diagonal: bool = False) -> CalibrationManifest:
    """Statistics of the unquantized model on calibration windows ``ids`` (samples, seq_len).

    Without ``statistics`` only the windows are stored: a build whose every output runs a sequential
    method (GPTQ) measures its layers' inputs itself, on the quantized model, and would not read them. With
    ``diagonal`` each input's ``hessian`` is the diagonal of XᵀX alone (the sum of each column's squares): all an
    importance matrix reads, when no output fits its layers to XᵀX.
    """
    with store.scratch_file(".safetensors") as tokens_file:
        save_file({"input_ids": ids}, str(tokens_file))
        token_blob = store.put_file(tokens_file)
    if not statistics:
        return CalibrationManifest(tokens=token_blob, stats=[], count=int(ids.size), experts=experts)
    with freed_memory_kept():
        stats = _layer_statistics(model, ids, device, store, experts, diagonal)
    return CalibrationManifest(tokens=token_blob, stats=stats, count=int(ids.size), experts=experts)


def _layer_statistics(model: ModelManifest, ids: np.ndarray, device: str, store: Store,
                      experts: ExpertFallback, diagonal: bool) -> list[Blob]:
    """Per decoder layer, a stored file of its Linear inputs' moments."""
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    dev = pick_device(device)
    decoder = Decoder(config, dev)
    decoder.load_outer(weights.load(weights.checkpoint_names(decoder.entry_names())))
    hidden = decoder.embed(torch.from_numpy(ids))
    stats = []
    for i in range(decoder.num_layers):
        tensors = weights.layer(i)
        layer = decoder.layer(i, tensors)
        structure = decoder.structure(i, layer, hidden)
        moments, hidden = measure_layer(decoder, i, layer, hidden, structure, widths(tensors, structure), experts, dev,
                                        diagonal=diagonal)
        arrays = {}
        for key, m in moments.items():
            arrays |= {f"{key}.hessian": m.hessian(), f"{key}.mean_abs": m.mean_abs(), f"{key}.max_abs": m.max_abs(),
                       f"{key}.count": np.array(m.count)}
        with store.scratch_file(".safetensors") as path:
            save_file(arrays, str(path), metadata=structure_metadata(structure))
            stats.append(store.put_file(path))
        del layer
    return stats


def widths(tensors: dict, structure: LayerStructure) -> dict[str, int]:
    """Each input key's width: its Linears' row length (checkpoint tensors of the layer, relative names)."""
    return {key: int(tensors[f"{key}.weight"].shape[1]) for key in structure.groups}


def measure_layer(decoder: Decoder, i: int, layer: torch.nn.Module, hidden: torch.Tensor, structure: LayerStructure,
                  width: dict[str, int], experts: ExpertFallback, device: torch.device,
                  histogram: bool = False, diagonal: bool = False) -> tuple[dict[str, Moments], torch.Tensor]:
    """The Moments of every input of layer ``i`` on ``hidden`` (experts' fallbacks applied), and its output."""
    recorder = InputRecorder(structure.groups, width, device, histogram, diagonal)
    with decoder.reading(i, layer, recorder.add):
        out = decoder.run_layer(i, layer, hidden)
    return with_expert_fallbacks(decoder, i, layer, hidden, structure, recorder.moments, width, experts, device), out


def with_expert_fallbacks(decoder: Decoder, i: int, layer: torch.nn.Module, hidden: torch.Tensor,
                          structure: LayerStructure, moments: dict[str, Moments], width: dict[str, int],
                          experts: ExpertFallback, device: torch.device) -> dict[str, Moments]:
    """``moments`` with the expert inputs routed fewer than ``experts.min_tokens`` tokens given the fallback: the
    note in ``structure.fallbacks`` and, with all_tokens, their Moments over every token of the calibration
    set (``hidden``: the layer's input)."""
    routed = {k: m for k, m in moments.items() if decoder.is_expert(i, k) and m.count < experts.min_tokens}
    if not routed:
        return moments
    total = int(hidden.shape[0] * hidden.shape[1])
    for key, m in routed.items():
        what = f"calibrated on all {total} tokens" if experts.fallback == "all_tokens" else "rounded to nearest"
        structure.fallbacks[key] = f"{EXPERT_FALLBACK} {m.count} calibration tokens (< min_tokens {experts.min_tokens}): {what}"
    if experts.fallback != "all_tokens":
        return moments
    histogram = any(m.abs_hist is not None for m in moments.values())
    diagonal = any(m.upper is None for m in moments.values())
    recorder = InputRecorder({k: structure.groups[k] for k in routed}, width, device, histogram, diagonal)
    with decoder.reading_all_tokens(i, layer, {structure.groups[k] for k in routed}, recorder.add):
        decoder.run_layer(i, layer, hidden)
    return moments | recorder.moments


class Moments:
    """Running sum of x^T x (its upper panels; with ``diagonal`` only its diagonal, each column's sum of squares),
    sum and max of |x| per channel, and with ``histogram`` a histogram of |x| (for static activation scales: it
    costs a fifth to a third of the rest), over the rows of one Linear's inputs."""

    def __init__(self, width: int, device: torch.device, histogram: bool = False, diagonal: bool = False):
        self.upper = None if diagonal else torch.zeros(width, width, dtype=torch.float32, device=device)
        self.squares = torch.zeros(width, dtype=torch.float32, device=device) if diagonal else None
        self.abs_sum = torch.zeros(width, dtype=torch.float32, device=device)
        self.abs_max = torch.zeros(width, dtype=torch.float32, device=device)
        self.abs_hist = torch.zeros(HIST_BINS, dtype=torch.float64, device=device) if histogram else None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.upper is None:
            self.squares += x.square().sum(dim=0)
        else:
            add_gram_upper(self.upper, x)
        a = x.abs()
        self.abs_sum += a.sum(dim=0)
        if len(a):  # an expert may be routed no token of a batch
            torch.maximum(self.abs_max, a.amax(dim=0), out=self.abs_max)
            if self.abs_hist is not None:
                add_abs_histogram(self.abs_hist, a)
        self.count += x.shape[0]

    def hessian(self) -> np.ndarray:
        """The full x^T x, or its diagonal (1-D) where only that is gathered; call once, when every input is added
        (the upper blocks are mirrored in place)."""
        if self.upper is None:
            return self.squares.cpu().numpy()
        return mirror_upper(self.upper).cpu().numpy()

    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.count, 1)).cpu().numpy()

    def max_abs(self) -> np.ndarray:
        return self.abs_max.cpu().numpy()

    def abs_histogram(self) -> np.ndarray | None:
        return None if self.abs_hist is None else self.abs_hist.cpu().numpy()


def structure_metadata(structure: LayerStructure) -> dict[str, str]:
    """One metadata key: safetensors writes several in a random order (a Rust HashMap), and the stats
    file's bytes, hence its digest and every cache key downstream, must not depend on it."""
    return {"structure": json.dumps({"groups": structure.groups, "producers": structure.producers,
                                     "fallbacks": structure.fallbacks})}


def structure_from_metadata(metadata: dict[str, str]) -> LayerStructure:
    structure = json.loads(metadata["structure"])
    groups = {k: tuple(v) for k, v in structure["groups"].items()}
    return LayerStructure(groups, structure["producers"], structure["fallbacks"])


class InputRecorder:
    """The Moments of each input key of ``groups``, fed by ``Decoder.reading`` (only the key unit's reads count,
    so a tensor read by q, k and v is added once)."""

    def __init__(self, groups: dict[str, tuple[str, ...]], width: dict[str, int], device: torch.device,
                 histogram: bool = False, diagonal: bool = False):
        self.moments = {key: Moments(width[key], device, histogram, diagonal) for key in groups}

    def add(self, units: tuple[str, ...], x: torch.Tensor) -> None:
        if units[0] in self.moments:
            self.moments[units[0]].add(x)
