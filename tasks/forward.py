"""The unquantized model and any number of built outputs run side by side, one decoder layer at a time.

Each source is anything with ``load(names)`` returning checkpoint tensors (the float model's WeightIndex, a
format's reader); the float model names the tensors. Memory is one layer per source plus every source's
hidden states: validate's windows and the task evals (tasks/evals.py) run through here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quantfab.tasks.activations import simulate_inputs, simulate_kv_cache
from quantfab.tasks.decoder import Decoder
from quantfab.tasks.modelio import pick_device, relative


def forward(config, sources: dict[str, Any], fp32: Any, ids: torch.Tensor, dev: torch.device) -> tuple[Decoder, dict]:
    """The final hidden states of every source; ``fp32.layer_names(i)`` lists layer i's tensors, ``fp32.prefix(i)``
    their common prefix."""
    decoder = Decoder(config, dev)
    hidden = {}
    for key, src in sources.items():  # each source's own embedding (a GGUF may quantize it)
        decoder.load_outer(src.load(fp32.checkpoint_names(decoder.entry_names())))
        hidden[key] = decoder.embed(ids)
    for i in range(decoder.num_layers):
        names = fp32.layer_names(i)
        for key, src in sources.items():
            layer = decoder.layer(i, relative(src.load(names), fp32.prefix(i)))
            if hasattr(src, "input_schemes"):  # activations and KV cache quantized as the runtime quantizes them
                schemes = src.input_schemes(fp32.prefix(i))
                simulate_inputs(layer, {m: schemes[c] for m, c in decoder.checkpoint_modules[i].items() if c in schemes})
                for attention, (k_scale, v_scale) in src.kv_cache(fp32.prefix(i)).items():
                    simulate_kv_cache(layer, attention, k_scale, v_scale)
            hidden[key] = decoder.run_layer(i, layer, hidden[key])
            del layer
    return decoder, hidden


@torch.no_grad()
def logits(config, source: Any, fp32: Any, ids: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """float32 logits (windows, tokens, vocab) of ``source`` as validate computes them; ``fp32`` names the tensors."""
    dev = pick_device(device)
    decoder, hidden = forward(config, {"q": source}, fp32, torch.from_numpy(ids), dev)
    decoder.load_outer(source.load(fp32.checkpoint_names(decoder.exit_names())))
    return decoder.logits(hidden["q"]).cpu()
