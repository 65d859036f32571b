"""calibrate: run the model layer by layer on calibration text and record per-Linear input statistics.

(Only the token windows when no output will read the statistics: see ``calibrate_on``.)

Holds one decoder layer's weights plus the hidden states of all samples. For each group of Linears that
read one input (the layer's forward shows which: q/k/v, o, gate/up, down in a Llama) it records the sum of
x x^T (the Hessian GPTQ needs) and the per-channel mean |x| (what AWQ scales by), one safetensors file per
layer in the store, whose metadata holds the layer's structure (groups, and the module producing each input).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from quantfab.tasks.decoder import Decoder, LayerStructure
from quantfab.tasks.download import materialize
from quantfab.tasks.gram import add_gram_upper, mirror_upper
from quantfab.tasks.malloc import keep_freed_memory
from quantfab.tasks.manifests import CalibrationManifest, ModelManifest
from quantfab.tasks.modelio import pick_device, relative
from quantfab.tasks.store import Store
from quantfab.tasks.texts import read_tokens, sampled_windows


def calibration_tokens(model: ModelManifest, source: str, samples: int, seq_len: int, seed: int, text_field: str,
                       store: Store) -> np.ndarray:
    model_dir = materialize(store, model.files)
    config = model_dir.config()
    tokenizer = None if source.startswith("synthetic://") else model_dir.tokenizer()
    # Read four times what is needed so the seed has windows to choose from.
    ids = read_tokens(source, tokenizer, config.vocab_size, samples * (seq_len - 1) * 4, text_field)
    return sampled_windows(ids, seq_len, samples, _bos(config), seed, source)


def _bos(config) -> int:
    return int(config.bos_token_id if config.bos_token_id is not None else 1)


def calibrate(model: ModelManifest, source: str, samples: int, seq_len: int, seed: int, text_field: str,
              device: str, store: Store, statistics: bool = True) -> CalibrationManifest:
    torch.manual_seed(seed)
    ids = calibration_tokens(model, source, samples, seq_len, seed, text_field, store)
    return calibrate_on(model, ids, device, store, statistics)


def calibrate_on(model: ModelManifest, ids: np.ndarray, device: str, store: Store,
                 statistics: bool = True) -> CalibrationManifest:
    """Statistics of the unquantized model on calibration windows ``ids`` (samples, seq_len).

    Without ``statistics`` only the windows are stored: a build whose every output runs a sequential
    method (GPTQ) measures its layers' inputs itself, on the quantized model, and would not read them.
    """
    work = Path(store.scratch())
    tokens_file = work / f"calib-tokens-{uuid.uuid4().hex}.safetensors"
    save_file({"input_ids": ids}, str(tokens_file))
    token_blob = store.put_file(tokens_file)
    tokens_file.unlink()
    if not statistics:
        return CalibrationManifest(tokens=token_blob, stats=[], count=int(ids.size))
    keep_freed_memory()
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    dev = pick_device(device)
    decoder = Decoder(config, dev)
    decoder.load_outer(weights.load(decoder.entry_names()))
    hidden = decoder.embed(torch.from_numpy(ids))
    stats = []
    for i in range(decoder.num_layers):
        layer = decoder.layer(i, relative(weights.load(weights.layer_names(i)), weights.prefix(i)))
        structure = decoder.structure(i, layer, hidden)
        recorder = InputRecorder(layer, structure, dev)
        hidden = decoder.run_layer(i, layer, hidden)
        path = work / f"calib-layer{i}-{uuid.uuid4().hex}.safetensors"
        save_file(recorder.finish(), str(path), metadata=structure_metadata(structure))
        stats.append(store.put_file(path))
        path.unlink()
        del layer
    return CalibrationManifest(tokens=token_blob, stats=stats, count=int(ids.size))


class Moments:
    """Running sum of x^T x (its upper panels) and of |x| over the rows of one Linear's inputs."""

    def __init__(self, width: int, device: torch.device):
        self.upper = torch.zeros(width, width, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(width, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        add_gram_upper(self.upper, x)
        self.abs_sum += x.abs().sum(dim=0)
        self.count += x.shape[0]

    def hessian(self) -> np.ndarray:
        """The full x^T x; call once, when every input is added (the upper blocks are mirrored in place)."""
        return mirror_upper(self.upper).cpu().numpy()

    def mean_abs(self) -> np.ndarray:
        return (self.abs_sum / max(self.count, 1)).cpu().numpy()


def structure_metadata(structure: LayerStructure) -> dict[str, str]:
    return {"groups": json.dumps(structure.groups), "producers": json.dumps(structure.producers)}


def structure_from_metadata(metadata: dict[str, str]) -> LayerStructure:
    groups = {k: tuple(v) for k, v in json.loads(metadata["groups"]).items()}
    return LayerStructure(groups, json.loads(metadata["producers"]))


class InputRecorder:
    """Forward pre-hooks that accumulate the Moments of each distinct Linear input (keyed as ``structure``'s groups)."""

    def __init__(self, layer: torch.nn.Module, structure: LayerStructure, device: torch.device):
        self.moments: dict[str, Moments] = {}
        self.handles = []
        for key in structure.groups:
            module = layer.get_submodule(key)
            self.moments[key] = Moments(module.in_features, device)
            self.handles.append(module.register_forward_pre_hook(lambda _m, args, key=key: self.moments[key].add(args[0])))

    def finish(self) -> dict[str, np.ndarray]:
        for h in self.handles:
            h.remove()
        out: dict[str, np.ndarray] = {}
        for key, moments in self.moments.items():
            out[f"{key}.hessian"] = moments.hessian()
            out[f"{key}.mean_abs"] = moments.mean_abs()
        return out
