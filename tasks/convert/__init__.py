"""Output formats. Adding one is one module here plus one line in ``FORMATS``."""

from __future__ import annotations

from quantfab.tasks.convert.gguf import GGUFFormat

FORMATS = {
    "gguf": GGUFFormat(),
}
