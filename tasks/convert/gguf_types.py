"""Which GGML type each tensor of a GGUF gets: llama-quantize's rules (llama_tensor_get_type in llama.cpp's
src/llama-quant.cpp) for the file types quantfab writes.

A file type names a default type and a mix: Q4_K_M raises attn_v and ffn_down to Q6_K in the layers
``use_more_bits`` picks, the output head (or a tied embedding) goes to Q6_K, and so on. Counters run in
file order, as llama.cpp's do. A tensor whose rows do not divide by its type's block falls back as
llama.cpp falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, ...), and to the float type if even that does not fit.
``pure`` keeps the default type everywhere (llama-quantize --pure), fallbacks aside. With an importance matrix
Q4_0 and Q5_0 raise the first eighth of ffn_down to Q4_1 and Q5_1, as llama-quantize --imatrix does; without one
IQ4_NL and IQ4_XS raise it to Q5_K. The IQ1/IQ2 file types have rules of their own (``_two_bit``), IQ3_XS and
IQ3_XXS lower attn_q/attn_k (and IQ3_XS the middle ffn_gate/ffn_up) a step, MXFP4_MOE puts stacked experts in MXFP4
and everything else in Q8_0.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from quantfab.tasks.errors import UserError
from quantfab.tasks.families import EXPERT_KEYS
from quantfab.tasks.quantize.grids import GRIDS
from quantfab.tasks.quantize.lattice import LatticeGrid

DEFAULT_TYPE = {
    "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_M": "IQ3_S", "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S",
    "IQ3_XXS": "IQ3_XXS", "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS",
    "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S", "MXFP4_MOE": "MXFP4",
}
LATTICE = [name for name, grid in GRIDS.items() if isinstance(grid, LatticeGrid)]
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL",
            **{t: "IQ4_NL" for t in LATTICE}}
TWO_BIT = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M")  # file types llama.cpp mixes by their own rules
EIGHT_EXPERT_Q5_K_OUTPUT = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                            "IQ3_S", "IQ3_M", "IQ4_XS")


def block_of(type_name: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


@dataclass(frozen=True)
class TypeChoice:
    """A tensor's GGML type (None: float), and when a row-length rule moved it off the mix's type, why."""

    type: str | None
    wanted: str | None  # the mix's type for it, before row-length rules
    fallback: str = ""  # e.g. "row 576 not a multiple of 256 (Q4_K) -> Q5_0"


@dataclass(frozen=True)
class ModelFacts:
    """What llama.cpp's rules read from the model besides tensor names and shapes."""

    n_layers: int
    n_head: int
    n_head_kv: int
    n_expert: int = 1

    @classmethod
    def of(cls, config) -> "ModelFacts":
        heads = int(config.num_attention_heads)
        experts = next((int(getattr(config, k)) for k in EXPERT_KEYS if getattr(config, k, None)), 1)
        return cls(int(config.num_hidden_layers), heads, int(config.num_key_value_heads or heads), experts)

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for a Llama: 80 layers with grouped-query attention."""
        return self.n_layers == 80 and self.n_head != self.n_head_kv


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization: 2-D (or stacked experts') weights that are not norms or routers."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name and "ffn_gate_inp.weight" not in name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def choose_types(file_type: str, tensors: list[tuple[str, tuple[int, ...]]], facts: ModelFacts,
                 pure: bool, importance: bool = False) -> dict[str, TypeChoice]:
    """GGUF name -> its GGML type for every tensor (None for those llama-quantize leaves in float), with
    the fallback that moved it off the mix's type, if one did.

    ``tensors`` are (GGUF name, HF shape (rows, cols)) in file order; ``importance``: the file is quantized with an
    importance matrix. A tensor whose type llama.cpp quantizes only with one (IQ1_*, IQ2_*, IQ3_XXS, but the
    embedding and the head) is refused without it, as llama-quantize refuses it.
    """
    default = DEFAULT_TYPE[file_type]
    tied = not any(name == "output.weight" for name, _ in tensors)
    n_attn_v = sum(1 for name, _ in tensors if "attn_v.weight" in name)
    seen = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}  # llama.cpp's counters, in file order
    out: dict[str, TypeChoice] = {}
    for name, shape in tensors:
        if not quantizable(name, shape):
            out[name] = TypeChoice(None, None)
            continue
        cols = shape[-1]
        new = default
        head = name == "output.weight" or (tied and name == "token_embd.weight")
        if not pure:
            if head:
                wanted = _head(file_type, new)
                if cols % block_of(new):  # the head's own rule, then the usual fallback
                    built = _fallback("Q8_0", cols).type
                    out[name] = TypeChoice(built, wanted, _why(cols, wanted, built) if built != wanted else "")
                    continue
                new = wanted
            elif file_type == "MXFP4_MOE":
                new = "MXFP4" if "_exps." in name else "Q8_0"  # stacked experts in MXFP4, the rest in Q8_0
            elif name == "token_embd.weight":
                new = {"IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S"}.get(
                    file_type, "Q2_K" if file_type in TWO_BIT else new)
            elif file_type in TWO_BIT:
                new = _two_bit(file_type, name, new, seen, facts)
            elif "attn_v.weight" in name:
                new = _attn_v(file_type, new, seen["attn_v"], n_attn_v, facts, importance)
                seen["attn_v"] += 1
            elif "attn_k.weight" in name or "attn_q.weight" in name:
                if facts.n_expert == 8 and "attn_k.weight" in name:
                    new = "Q8_0"  # "bumping this to Q8_0 trades just ~128MB" for an 8-expert model
                else:
                    new = {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(file_type, new)
            elif "ffn_up" in name or "ffn_gate" in name:
                kind = "ffn_up" if "ffn_up" in name else "ffn_gate"
                i, n = _layer(name, seen[kind], facts)
                if file_type == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
                    new = "IQ3_XXS"
                seen[kind] += 1
            elif "ffn_down" in name:
                new = _ffn_down(file_type, new, *_layer(name, seen["ffn_down"], facts), importance, facts)
                seen["ffn_down"] += 1
            elif "attn_output.weight" in name:
                if facts.n_expert == 8:
                    new = "Q5_K" if file_type in EIGHT_EXPERT_Q5_K_OUTPUT else new
                else:
                    new = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                           "IQ3_M": "Q4_K"}.get(file_type, new)
        out[name] = _fallback(new, cols)
        needs = getattr(GRIDS.get(out[name].type or ""), "needs_importance", False)  # tensor_requires_imatrix
        if needs and not importance and not head and name != "token_embd.weight":
            raise UserError(f"GGUF {file_type}: {name} gets {out[name].type}, which llama.cpp quantizes only with an "
                            "importance matrix: drop `imatrix: false` from the gguf output (or pick a K or IQ4 type)")
    return out


def _layer(name: str, seen: int, facts: ModelFacts) -> tuple[int, int]:
    """layer_info: an ffn tensor's layer and the layers; with experts, off the name ("experts are not consecutive")."""
    return (int(name.split(".")[1]) if facts.n_expert > 1 else seen), facts.n_layers


def _head(file_type: str, new: str) -> str:
    if file_type == "MXFP4_MOE" or new == "Q8_0":
        return "Q8_0"
    return "Q5_K" if file_type in TWO_BIT or file_type == "IQ3_XXS" else "Q6_K"


def _two_bit(file_type: str, name: str, new: str, seen: dict[str, int], facts: ModelFacts) -> str:
    """The IQ1/IQ2 file types' own rules: attn_v, the first eighth of ffn_down and attn_output get more bits."""
    iq2_s = file_type in ("IQ2_S", "IQ2_M")
    if "attn_v.weight" in name:
        seen["attn_v"] += 1
        return "Q4_K" if facts.n_gqa >= 4 or facts.n_expert >= 4 else "IQ3_S" if iq2_s else "Q2_K"
    if "attn_k.weight" in name and facts.n_expert == 8:
        return "Q4_K"
    if "ffn_down" in name:
        seen["ffn_down"] += 1
        return ("IQ3_S" if iq2_s else "Q2_K") if seen["ffn_down"] - 1 < facts.n_layers // 8 else new
    if "attn_output.weight" in name:
        if facts.n_expert == 8:
            return "Q5_K"
        return "IQ2_XXS" if file_type in ("IQ1_S", "IQ1_M") else "IQ3_S" if iq2_s else new
    return new


def _attn_v(file_type: str, new: str, i: int, n: int, facts: ModelFacts, importance: bool) -> str:
    if file_type == "Q2_K":
        new = "Q4_K" if facts.n_gqa >= 4 else "Q3_K"
    elif file_type == "IQ3_XXS":
        new = "Q4_K" if facts.n_gqa >= 4 else "IQ3_XXS" if importance else "IQ3_S"
    elif file_type in ("IQ3_XS", "IQ3_S") and facts.n_gqa >= 4 or file_type == "IQ3_M":
        new = "Q4_K"
    elif file_type == "Q3_K_M":
        new = "Q5_K" if i < 2 else "Q4_K"
    elif file_type == "Q3_K_L":
        new = "Q5_K"
    elif file_type in ("IQ4_NL", "IQ4_XS") and facts.n_gqa >= 4:
        new = "Q5_K"
    elif file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        new = "Q6_K"
    elif file_type == "Q4_K_S" and i < 4:
        new = "Q5_K"
    if facts.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"  # attn_v is 8x smaller than attn_q there, so more bits cost little
    if facts.n_expert == 8:
        new = "Q8_0"  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    return new


def _ffn_down(file_type: str, new: str, i: int, n: int, importance: bool, facts: ModelFacts) -> str:
    if file_type == "Q2_K":
        return "Q3_K"
    if file_type == "IQ3_XXS" and not importance:
        return "Q4_K" if i < n // 8 else "Q3_K"
    if file_type == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    if file_type == "IQ3_M" and (i < n // 8 or (facts.n_expert == 8 and use_more_bits(i, n))):
        return "Q4_K"
    if file_type == "Q3_K_L":
        return "Q5_K"
    if file_type in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return "Q6_K"
    if file_type == "Q4_K_S" and i < n // 8:
        return "Q5_K"
    if file_type in ("IQ4_NL", "IQ4_XS") and not importance and i < n // 8:
        return "Q5_K"
    if file_type in ("Q4_0", "Q5_0") and importance and i < n // 8:
        return {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[file_type]  # "guard against craziness in the first few ffn_down"
    return new


def _fallback(wanted: str, cols: int) -> TypeChoice:
    """tensor_type_fallback: a type whose block does not divide the row, then the float type."""
    new = FALLBACK.get(wanted, wanted) if cols % block_of(wanted) else wanted
    new = None if cols % block_of(new) else new
    return TypeChoice(new, wanted, _why(cols, wanted, new) if new != wanted else "")


def _why(cols: int, wanted: str, new: str | None) -> str:
    return f"row {cols} not a multiple of {block_of(wanted)} ({wanted}) -> {new or 'float'}"
