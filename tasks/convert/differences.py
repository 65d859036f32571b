"""What an output is, against what its recipe asked: every tensor that differs, with the reason, and the
size the output would have had if none did (its nominal bits per weight).

Plan (from the assignments) and convert (from the quantize stage's module reports) both call this, so
the plan's figures are the build's.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from quantfab.tasks.modelio import TensorInfo

OVER_NOMINAL = 1.25  # plan warns when an output is this much larger than asked


def fallbacks(fmt: Any, options: Any, config: Any, tensors: dict[str, TensorInfo], modules: dict[str, str]) -> list[str]:
    """``tensor: why`` for each tensor not as asked: the Linears' (``modules``: name -> fallback, "" when as
    asked) and, for the format's other tensors, its own rules (GGUF's embedding and head)."""
    found = {name: why for name, why in modules.items() if why}
    if hasattr(fmt, "fallbacks"):
        found |= {name: why for name, why in fmt.fallbacks(options, config, tensors).items() if name not in modules}
    return [f"{name}: {why}" for name, why in sorted(found.items())]


def nominal_bytes(fmt: Any, options: Any, config: Any, tensors: dict[str, TensorInfo], asked: dict[str, str | None]) -> int:
    """The output's size had every tensor the type or grid asked for (``asked``: Linear -> grid)."""
    return sum(t.nbytes for t in fmt.plan(options, config, tensors, asked, as_asked=True))


def summary(found: list[str]) -> list[str]:
    """The fallbacks counted by reason, most frequent first: ``166 × row 576 not a multiple of 256 (Q4_K) -> Q5_0``."""
    reasons = Counter(line.split(": ", 1)[1] for line in found)
    return [f"{n} × {why}" for why, n in reasons.most_common()]


def oversize(bits: float, nominal: float) -> str:
    """A warning when an output is over a quarter larger than asked, else ""."""
    if nominal and bits > OVER_NOMINAL * nominal:
        return (f"{bits:.3f} bits/weight is {bits / nominal - 1:.0%} over the nominal {nominal:.3f} "
                "(validate.gates.max_bits_per_weight can fail such a build)")
    return ""
