"""Output formats. Adding one is one module here plus one line in ``FORMATS``."""

from __future__ import annotations

from quantfab.tasks.convert.awq import AWQFormat
from quantfab.tasks.convert.bnb_nf4 import BnbNF4Format
from quantfab.tasks.convert.compressed_tensors import CompressedTensorsFormat
from quantfab.tasks.convert.gguf import GGUFFormat
from quantfab.tasks.convert.gptq import GPTQFormat
from quantfab.tasks.convert.mlx import MLXFormat

FORMATS = {
    "gguf": GGUFFormat(),
    "compressed-tensors": CompressedTensorsFormat(),
    "gptq": GPTQFormat(),
    "awq": AWQFormat(),
    "bnb-nf4": BnbNF4Format(),
    "mlx": MLXFormat(),
}
