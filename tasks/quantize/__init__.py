"""Quantization methods. Adding one is one module here plus one line in ``METHODS``.

A method is built from the recipe's ``quantize`` section and quantizes one decoder layer at a time
(``quantize_layer(LayerInput) -> LayerResult``); ``sequential`` methods are fitted to the outputs of the
layers before them as quantized, the others to the unquantized model's calibration statistics.
"""

from __future__ import annotations

from quantfab.tasks.quantize.awq import AWQ
from quantfab.tasks.quantize.gptq import GPTQ
from quantfab.tasks.quantize.group import GroupClipSearch
from quantfab.tasks.quantize.rtn import NormalFloat4, RoundToNearest

METHODS = {
    "rtn": RoundToNearest,
    "group": GroupClipSearch,
    "nf4": NormalFloat4,
    "gptq": GPTQ,
    "awq": AWQ,
}
