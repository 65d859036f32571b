"""What llama.cpp's converter does to some architectures beyond naming: tensors it splits and reshapes, and
metadata it computes from several config values. One registry entry per architecture (gguf-py's name).

DeepSeek's multi-head latent attention (DEEPSEEK2): ``kv_b_proj`` (heads x (nope + v) rows, kv_lora_rank
columns) is stored as ``attn_k_b`` (heads x kv_lora_rank x nope: each head's key block, transposed) and
``attn_v_b`` (heads x v x kv_lora_rank), so llama.cpp can absorb them into the attention; the key/value
heads are written as one (MQA over the latent), whose width is kv_lora_rank + the rotary part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import gguf
import numpy as np


@dataclass(frozen=True)
class Split:
    """One checkpoint tensor (``suffix``) that the file holds as ``parts`` (names gguf-py maps), reshaped."""

    suffix: str
    parts: tuple[str, ...]
    dims: Callable[[Any], tuple[int, ...]]  # config -> the sizes the reshapes need
    shapes: Callable[[tuple[int, ...]], list[tuple[int, ...]]]  # dims -> each part's shape
    forward: Callable[[np.ndarray, tuple[int, ...]], list[np.ndarray]]  # (checkpoint tensor, dims) -> the parts
    inverse: Callable[[list[np.ndarray], tuple[int, ...]], np.ndarray]  # (parts, dims) -> the checkpoint tensor


def _mla_dims(config) -> tuple[int, ...]:
    """heads, nope (each head's non-rotary key width), v (its value width), kv_lora_rank."""
    return (int(config.num_attention_heads), int(config.qk_nope_head_dim), int(config.v_head_dim),
            int(config.kv_lora_rank))


def _mla_shapes(dims: tuple[int, ...]) -> list[tuple[int, ...]]:
    heads, nope, v, rank = dims
    return [(heads, rank, nope), (heads, v, rank)]


def _mla_split(kv_b: np.ndarray, dims: tuple[int, ...]) -> list[np.ndarray]:
    heads, nope, v, rank = dims
    per_head = kv_b.reshape(heads, nope + v, rank)
    return [np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(per_head[:, nope:])]


def _mla_join(parts: list[np.ndarray], dims: tuple[int, ...]) -> np.ndarray:
    heads, nope, v, rank = dims
    k_b, v_b = parts
    return np.concatenate([k_b.reshape(heads, rank, nope).transpose(0, 2, 1), v_b.reshape(heads, v, rank)],
                          axis=1).reshape(heads * (nope + v), rank)


def _mla_metadata(config) -> list[tuple[str, Any]]:
    _, nope, v, rank = _mla_dims(config)
    rope = int(config.qk_rope_head_dim)
    out: list[tuple[str, Any]] = [
        ("add_head_count_kv", 1), ("add_kv_lora_rank", rank), ("add_key_length", rank + rope),
        ("add_value_length", rank), ("add_key_length_mla", nope + rope), ("add_value_length_mla", v),
        ("add_rope_dimension_count", rope), ("add_leading_dense_block_count", int(config.first_k_dense_replace or 0)),
        ("add_expert_feed_forward_length", int(config.moe_intermediate_size)),
        ("add_expert_shared_count", int(config.n_shared_experts or 0)),
        # transformers' DeepseekV3TopkRouter scores experts with a sigmoid
        ("add_expert_gating_func", gguf.ExpertGatingFuncType.SIGMOID)]
    if config.q_lora_rank is not None:
        out.append(("add_q_lora_rank", int(config.q_lora_rank)))
    if getattr(config, "norm_topk_prob", False):
        out.append(("add_expert_weights_norm", True))
    if (mscale := (config.rope_parameters or {}).get("mscale_all_dim")) is not None:
        out.append(("add_rope_scaling_yarn_log_mul", 0.1 * mscale))  # as the converter writes it
    return out


SPLITS: dict[str, tuple[Split, ...]] = {
    "DEEPSEEK2": (Split("self_attn.kv_b_proj.weight", ("self_attn.k_b_proj.weight", "self_attn.v_b_proj.weight"),
                        _mla_dims, _mla_shapes, _mla_split, _mla_join),),
}
METADATA: dict[str, Callable[[Any], list[tuple[str, Any]]]] = {
    "DEEPSEEK2": _mla_metadata,
}


def split_of(arch: str, name: str) -> Split | None:
    return next((s for s in SPLITS.get(arch, ()) if name.endswith(s.suffix)), None)
