"""What the engine cannot read off a model's modules, per family, as data.

The decoder engine (tasks/decoder.py) finds the layers, their Linears, which Linears share an input and
which norm produced it by running the model's own code. What is left is algebra a forward pass does not
show: which Linear's output rows an AWQ scale may be divided into (v -> o and up -> down only where the
op between them is linear per channel, i.e. attention over v and the gated product act(gate) * up), and
norms that multiply by ``offset + weight``, and how llama.cpp's converter writes the family into GGUF
(gguf-py's architecture, whose tensor-name map does the names; q/k row order; norm shifts; the metadata
keys llama.cpp reads for it). A family missing here gets the defaults: AWQ folds into norms only, and
GGUF is refused at plan time (the transformers formats work). Adding a family is one entry, or nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

from quantfab.tasks.checkpoint_map import checkpoint_map
from quantfab.tasks.errors import UnsupportedModel, UserError

EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # config keys that count routed experts
LLAMA_PAIRS = {"self_attn.o_proj": "self_attn.v_proj", "mlp.down_proj": "mlp.up_proj"}
EXPERT_PAIRS = {**LLAMA_PAIRS, "mlp.shared_experts.down_proj": "mlp.shared_experts.up_proj",
                "mlp.experts.*.down_proj": "mlp.experts.*.up_proj"}  # checkpoint names: one matrix per expert


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter writes a family (read off its convert_hf_to_gguf model classes)."""

    arch: str  # gguf.MODEL_ARCH member: the file's general.architecture and gguf-py's tensor-name map
    permute_qk: bool = False  # q/k rows in llama.cpp's interleaved rotary order (its Llama-style converters)
    norm_shift: float = 0.0  # added to every norm weight: llama.cpp stores Gemma's (1 + w) as is
    head_dims: bool = True  # key_length / value_length from config.head_dim
    extras: tuple[tuple[str, str], ...] = ()  # (GGUFWriter method, config attribute), written when set
    # (config attribute, or attribute.key of a dict one; the only value llama.cpp computes)
    requires: tuple[tuple[str, object], ...] = ()
    layer_pattern: bool = False  # which layers slide, per layer, from config.layer_types


@dataclass(frozen=True)
class Family:
    # Linear -> the Linear before it whose output rows an AWQ scale of its input divides ('*': an expert's index;
    # 'name:n': the last of n equal row blocks of a fused Linear)
    smooth_pairs: dict[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0  # the family's norms scale by (norm_offset + weight): Gemma's 1 + w
    gguf: GGUFArch | None = None  # None: no GGUF writer for the family yet
    # an expert matrix's name in mlx-lm's stacked switch_mlp, where it differs from the checkpoint's
    mlx_experts: dict[str, str] = field(default_factory=dict)

    def smooth_pair(self, module: str) -> tuple[str, int] | None:
        """The Linear whose rows an AWQ scale of ``module``'s input divides (the last of how many equal row
        blocks), if the table pairs them."""
        for linear, before in self.smooth_pairs.items():
            match = re.fullmatch(re.escape(linear).replace(r"\*", r"(\d+)"), module)
            if match:
                name, _, blocks = before.partition(":")
                return name.replace("*", match.group(1)) if match.groups() else name, int(blocks or 1)
        return None


EXPERT_COUNTS = (("add_expert_count", "num_local_experts"), ("add_expert_count", "num_experts"),
                 ("add_expert_count", "n_routed_experts"), ("add_expert_used_count", "num_experts_per_tok"))
LLAMA_GGUF = GGUFArch("LLAMA", permute_qk=True, head_dims=False)
MIXTRAL_PAIRS = {"self_attn.o_proj": "self_attn.v_proj", "block_sparse_moe.experts.*.w2": "block_sparse_moe.experts.*.w3"}
MIXTRAL_MLX = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
DEFAULT = Family()
FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA_PAIRS, gguf=LLAMA_GGUF),
    "mistral": Family(LLAMA_PAIRS, gguf=LLAMA_GGUF),
    "qwen2": Family(LLAMA_PAIRS, gguf=GGUFArch("QWEN2")),
    "qwen3": Family(LLAMA_PAIRS, gguf=GGUFArch("QWEN3")),
    "granite": Family(LLAMA_PAIRS, gguf=GGUFArch("GRANITE", permute_qk=True, head_dims=False, extras=(
        ("add_attention_scale", "attention_multiplier"), ("add_embedding_scale", "embedding_multiplier"),
        ("add_residual_scale", "residual_multiplier"), ("add_logit_scale", "logits_scaling")))),
    "olmo2": Family(LLAMA_PAIRS, gguf=GGUFArch("OLMO2")),
    "gemma": Family(LLAMA_PAIRS, norm_offset=1.0, gguf=GGUFArch("GEMMA", norm_shift=1.0)),
    # fused projections: v is the last third of qkv_proj (without grouped-query attention), up the second half of
    # gate_up_proj
    "phi3": Family({"self_attn.o_proj": "self_attn.qkv_proj:3", "mlp.down_proj": "mlp.gate_up_proj:2"},
                   gguf=GGUFArch("PHI3", head_dims=False, extras=(
                       ("add_rope_scaling_orig_ctx_len", "original_max_position_embeddings"),
                       ("add_sliding_window", "sliding_window")),
                       # long-context Phi-3 rotary factors are tensors llama.cpp's converter makes from the config
                       requires=(("rope_parameters.long_factor", None),))),
    "gemma2": Family(LLAMA_PAIRS, norm_offset=1.0, gguf=GGUFArch("GEMMA2", norm_shift=1.0, extras=(
        ("add_attn_logit_softcapping", "attn_logit_softcapping"),
        ("add_final_logit_softcapping", "final_logit_softcapping"), ("add_sliding_window", "sliding_window")))),
    "gemma3_text": Family(LLAMA_PAIRS, norm_offset=1.0, gguf=GGUFArch("GEMMA3", norm_shift=1.0, layer_pattern=True, extras=(
        ("add_final_logit_softcapping", "final_logit_softcapping"), ("add_sliding_window", "sliding_window")))),
    "mixtral": Family(MIXTRAL_PAIRS, gguf=GGUFArch("LLAMA", permute_qk=True, head_dims=False, extras=EXPERT_COUNTS),
                      mlx_experts=MIXTRAL_MLX),
    "phimoe": Family(mlx_experts=MIXTRAL_MLX),
    "qwen3_moe": Family(EXPERT_PAIRS, gguf=GGUFArch("QWEN3MOE", extras=(
        *EXPERT_COUNTS, ("add_expert_feed_forward_length", "moe_intermediate_size")),
        requires=(("norm_topk_prob", True),))),  # llama.cpp renormalises the chosen experts' weights
    # multi-head latent attention: kv_b_proj split into attn_k_b / attn_v_b and the rest of the metadata computed
    # in tasks/convert/gguf_layouts.py; llama.cpp rotates interleaved pairs, as transformers does with rope_interleave
    "deepseek_v3": Family(EXPERT_PAIRS, gguf=GGUFArch("DEEPSEEK2", head_dims=False, extras=(
        *EXPERT_COUNTS, ("add_expert_group_count", "n_group"), ("add_expert_group_used_count", "topk_group"),
        ("add_expert_weights_scale", "routed_scaling_factor")), requires=(("rope_interleave", True),))),
}


def family(model_type: str) -> Family:
    return FAMILIES.get(model_type, DEFAULT)


@cache
def _auto_tables() -> tuple[frozenset[str], frozenset[str]]:
    """transformers' causal-LM model types, and its encoders and encoder-decoders (in the causal-LM table
    too, as encoders given an LM head); imported when first asked, as transformers imports torch."""
    from transformers.models.auto import modeling_auto as auto

    encoders = {*auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES, *auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                *auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES}
    return frozenset(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), frozenset(encoders)


def supported_model_types() -> list[str]:
    """Every model_type transformers builds as a causal LM, but encoders, encoder-decoders and the types whose
    checkpoints transformers converts in a way quantfab cannot map back (tasks/checkpoint_map.py)."""
    def mapped(model_type: str) -> bool:
        try:
            checkpoint_map(model_type)
        except UserError:
            return False
        return True
    causal, encoders = _auto_tables()
    return sorted(t for t in causal - encoders if mapped(t))


def check_supported(config, where: str) -> None:
    """Refuse, naming ``model_type`` and ``where``, what the layer-by-layer engine cannot run."""
    model_type = getattr(config, "model_type", None)
    causal, encoders = _auto_tables()
    if getattr(config, "is_encoder_decoder", False) or model_type in encoders:
        raise UnsupportedModel(f"{where}: model_type {model_type!r} is an encoder or encoder-decoder model; quantfab "
                        "builds decoder-only causal LMs (`quantfab families` lists them)")
    if getattr(config, "auto_map", None) and model_type not in causal:
        raise UnsupportedModel(f"{where}: model_type {model_type!r} needs the model's own code (auto_map); quantfab runs "
                        "only models transformers ships, without remote code (`quantfab families` lists them)")
    if model_type not in causal:
        raise UnsupportedModel(f"{where}: model_type {model_type!r} is not a causal LM transformers can build (encoder-only "
                        "and multimodal-only models are not supported; `quantfab families` lists what is)")
    try:
        checkpoint_map(model_type)
    except UserError as exc:
        raise UnsupportedModel(f"{where}: {exc}") from None


def report(every_type: bool = False) -> str:
    """What `quantfab families` prints: the table's families, what works for them, and the rule for the rest."""
    import transformers

    lines = [f"quantfab runs decoder-only causal LMs as transformers {transformers.__version__} builds them, without "
             f"remote code: {len(supported_model_types())} model types, mixtures of experts included (each expert "
             "calibrated on the tokens routed to it; routers kept in float).",
             "For each: methods rtn, group, nf4, gptq, awq (scales folded into the norms and Linears the layer's "
             "forward shows feeding each input group); formats compressed-tensors, gptq, awq, bnb-nf4, and mlx for "
             "those without experts (tested on Llama).",
             "The table in tasks/families.py adds, per family (each tested in tests/test_families.py; other types run "
             "on the same engine, untested here):", "",
             f"{'model_type':<14} {'gguf (llama.cpp architecture)':<31} awq scales also folded into"]
    for name, entry in sorted(FAMILIES.items()):
        gguf = entry.gguf.arch.lower() if entry.gguf else "-"
        pairs = ", ".join(f"{prev.split(':')[0]}{f' (last 1/{prev.split(chr(58))[1]})' if ':' in prev else ''} -> "
                          f"{lin.rsplit('.', 1)[-1]}" for lin, prev in entry.smooth_pairs.items())
        shift = f" (norms as {entry.norm_offset:g} + w)" if entry.norm_offset else ""
        lines.append(f"{name:<14} {gguf:<31} {pairs or '-'}{shift}")
    if every_type:
        lines += ["", "All model types:", *("  " + ", ".join(chunk) for chunk in _chunks(supported_model_types(), 8))]
    else:
        lines += ["", "`quantfab families --all` lists every model type."]
    return "\n".join(lines)


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
