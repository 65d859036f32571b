"""What a method sees and returns for one decoder layer.

Methods work a layer at a time because the calibrated ones need it: GPTQ quantizes the Linears that share an
input together, AWQ moves scales between a norm and the Linears after it. Weight names are relative to the
layer (``self_attn.q_proj.weight``); modules are named without ``.weight`` (``self_attn.q_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfab.tasks.families import DEFAULT, Family
from quantfab.tasks.modelio import CPU
from quantfab.tasks.quantize.grids import Encoded, Grid
from quantfab.tasks.quantize.stats import InputStats
from quantfab.tasks.lazy import lazy

torch = lazy("torch")
if TYPE_CHECKING:
    from quantfab.tasks.decoder import LayerStructure  # the decoder imports torch


@dataclass(frozen=True)
class LayerInput:
    weights: dict[str, np.ndarray]  # every float32 tensor of the layer, by relative name
    stats: dict[str, InputStats]  # by input key (the structure's group keys)
    grids: dict[str, Grid]  # the modules this method quantizes, with their grids
    name: str  # e.g. model.layers.3, for error messages
    structure: LayerStructure  # which Linears share an input, and what produced it
    family: Family = DEFAULT

    def weight(self, module: str) -> np.ndarray:
        return self.weights[f"{module}.weight"]

    def stats_of(self, module: str) -> InputStats | None:
        """The inputs ``module`` reads; None where the calibration gathered none (a method that reads none)."""
        return self.stats[self.structure.group_of(module)] if self.stats else None


@dataclass
class LayerResult:
    encoded: dict[str, Encoded] = field(default_factory=dict)  # module -> codes on its grid
    floats: dict[str, np.ndarray] = field(default_factory=dict)  # relative tensor name -> replaced float values
    stats: dict[str, InputStats] = field(default_factory=dict)  # module -> the inputs its codes were fitted to
    fitted: dict[str, np.ndarray] = field(default_factory=dict)  # module -> the float weight its codes stand for,
    # where a method changed it (AWQ's scaled weights); the original weight otherwise
    notes: dict[str, str] = field(default_factory=dict)  # module -> what the method could not do for it, for the report


def bind_by_input(grids: dict[str, Grid], weights: dict[str, np.ndarray], structure: LayerStructure) -> dict[str, Grid]:
    """Each module's grid bound to the weights of the modules reading its input on the same grid (q/k/v, gate/up:
    what the engine fuses into one matrix, whose NVFP4 global scale must be one)."""
    members: dict[tuple[str, str], list[str]] = {}
    for module, grid in grids.items():
        key = structure.group_of(module) if grid.fused_scale else module
        members.setdefault((key, grid.name), []).append(module)
    bound = {}
    for modules in members.values():
        grid = grids[modules[0]].bind([weights[f"{m}.weight"] for m in modules])
        bound.update({m: grid for m in modules})
    return bound


class PerModule:
    """Adapter for methods that quantize each Linear on its own: ``quantize(w, grid, stats) -> Encoded``."""

    sequential = False  # True: fit each layer to the outputs of the layers before it as quantized
    reads_inputs = True  # False: quantizes from the weights alone (the inputs serve only the module report)
    stepwise = True  # its Linears reading one input depend on nothing else: a layer can be fitted input by input

    def __init__(self, spec: Any = None, device: torch.device = CPU, importance: bool = False):
        self.spec = spec  # the recipe's QuantizeSpec, for methods with options
        self.device = device  # where a method runs its heavy linear algebra (grids' rules stay NumPy, on the CPU)
        self.importance = importance  # the output quantizes with an importance matrix where its grids' rules take one

    def quantize(self, w: np.ndarray, grid: Grid, stats: InputStats) -> Encoded:
        raise NotImplementedError

    def quantize_layer(self, layer: LayerInput) -> LayerResult:
        result = LayerResult()
        for module, grid in layer.grids.items():
            st = layer.stats_of(module)
            result.encoded[module] = grid.finalize(self.quantize(layer.weight(module), grid, st))
            if st is not None:
                result.stats[module] = st
        return result
