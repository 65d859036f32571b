"""calibrate: run the model layer by layer on calibration text and record per-Linear input statistics.

Holds one decoder layer's weights plus the hidden states of all samples. For each group of Linears that
share an input (q/k/v, o, gate/up, down) it records the sum of x x^T (the Hessian GPTQ needs) and the
per-channel mean |x| (what AWQ scales by), one safetensors file per layer in the store.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from quantfab.tasks.download import materialize
from quantfab.tasks.manifests import CalibrationManifest, ModelManifest
from quantfab.tasks.modelio import INPUT_OF, DecoderStack, layer_prefix, pick_device, relative
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
              device: str, store: Store) -> CalibrationManifest:
    torch.manual_seed(seed)
    ids = calibration_tokens(model, source, samples, seq_len, seed, text_field, store)
    return calibrate_on(model, ids, device, store)


def calibrate_on(model: ModelManifest, ids: np.ndarray, device: str, store: Store) -> CalibrationManifest:
    """Statistics of the unquantized model on calibration windows ``ids`` (samples, seq_len)."""
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    dev = pick_device(device)
    stack = DecoderStack(config, dev)
    embed = weights.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    hidden = torch.nn.functional.embedding(torch.from_numpy(ids), embed)
    del embed
    work = Path(store.scratch())
    tokens_file = work / f"calib-tokens-{uuid.uuid4().hex}.safetensors"
    save_file({"input_ids": ids}, str(tokens_file))
    token_blob = store.put_file(tokens_file)
    tokens_file.unlink()
    stats = []
    for i in range(stack.num_layers):
        layer = stack.layer(i, relative(weights.load(weights.layer_names(i)), layer_prefix(i)))
        recorder = InputRecorder(layer, dev)
        hidden = stack.run_layer(layer, hidden)
        path = work / f"calib-layer{i}-{uuid.uuid4().hex}.safetensors"
        save_file(recorder.finish(), str(path))
        stats.append(store.put_file(path))
        path.unlink()
        del layer
    return CalibrationManifest(tokens=token_blob, stats=stats, count=int(ids.size))


class InputRecorder:
    """Forward pre-hooks that accumulate x^T x and sum |x| for each distinct Linear input."""

    def __init__(self, layer: torch.nn.Module, device: torch.device):
        self.hessian: dict[str, torch.Tensor] = {}
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.handles = []
        for name, key in INPUT_OF.items():
            if key in self.hessian:
                continue
            module = layer.get_submodule(name)
            n = module.in_features
            self.hessian[key] = torch.zeros(n, n, dtype=torch.float32, device=device)
            self.abs_sum[key] = torch.zeros(n, dtype=torch.float32, device=device)
            self.count[key] = 0
            self.handles.append(module.register_forward_pre_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float32)
            self.hessian[key].addmm_(x.T, x)
            self.abs_sum[key] += x.abs().sum(dim=0)
            self.count[key] += x.shape[0]
        return hook

    def finish(self) -> dict[str, np.ndarray]:
        for h in self.handles:
            h.remove()
        out: dict[str, np.ndarray] = {}
        for key in self.hessian:
            out[f"{key}.hessian"] = self.hessian[key].cpu().numpy()
            out[f"{key}.mean_abs"] = (self.abs_sum[key] / max(self.count[key], 1)).cpu().numpy()
        return out
