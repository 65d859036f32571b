"""synthetic:// sources: deterministic random-weight models of any family, and random token streams.

``synthetic://llama?layers=2&hidden=256&intermediate=768&heads=4&kv_heads=2&vocab=512&seed=0`` writes a
real HF Llama folder (config, a Llama-style byte-fallback BPE tokenizer, one safetensors shard per
decoder layer) without ever holding more than one layer in memory. Linear weights are N(0, 1/fan_in),
so activations keep unit scale and logits stay peaked enough for KL and top-1 agreement to mean
something on random weights. Any other model type transformers builds works the same way
(``synthetic://qwen3_moe?layers=4&experts=8&experts_per_token=2&expert_intermediate=256``): its config is
transformers' own with these sizes, its tensors those of the model transformers builds from it, written
under the checkpoint names transformers saves (experts one by one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from safetensors.numpy import save_file

from quantfab.tasks.errors import UserError
from quantfab.tasks.modelio import TensorInfo

LLAMA_DEFAULTS = {"layers": 2, "hidden": 256, "intermediate": 768, "heads": 4, "kv_heads": 2, "vocab": 512,
                  "seed": 0, "context": 2048}
SPECIALS = ["<unk>", "<s>", "</s>"]
PRINTABLE = [chr(c) for c in range(33, 127)]


def parse(url: str, defaults: dict[str, int]) -> dict[str, int]:
    parts = urlsplit(url)
    params = dict(defaults)
    for key, value in parse_qsl(parts.query):
        if key not in defaults:
            raise UserError(f"{url}: unknown parameter {key!r} (known: {', '.join(defaults)})")
        try:
            params[key] = int(value)
        except ValueError:
            raise UserError(f"{url}: parameter {key} must be an integer, got {value!r}") from None
    return params


def _checked(url: str) -> dict[str, int]:
    return _checked_sizes(url, parse(url, LLAMA_DEFAULTS))


def _config(p: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"], "num_hidden_layers": p["layers"], "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"], "vocab_size": p["vocab"], "max_position_embeddings": p["context"],
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
    }


def _shards(p: dict[str, int]) -> list[dict[str, tuple[int, ...]]]:
    """Tensor shapes per shard: embeddings, one shard per decoder layer, then norm and head."""
    h, f, v = p["hidden"], p["intermediate"], p["vocab"]
    kv = h // p["heads"] * p["kv_heads"]
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (v, h)}]
    for i in range(p["layers"]):
        pre = f"model.layers.{i}."
        shards.append({f"{pre}self_attn.q_proj.weight": (h, h), f"{pre}self_attn.k_proj.weight": (kv, h),
                       f"{pre}self_attn.v_proj.weight": (kv, h), f"{pre}self_attn.o_proj.weight": (h, h),
                       f"{pre}mlp.gate_proj.weight": (f, h), f"{pre}mlp.up_proj.weight": (f, h),
                       f"{pre}mlp.down_proj.weight": (h, f), f"{pre}input_layernorm.weight": (h,),
                       f"{pre}post_attention_layernorm.weight": (h,)})
    shards.append({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shards


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name == "model.norm.weight":
        return np.ones(shape, np.float32)
    if len(shape) == 1:
        return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name == "model.embed_tokens.weight":
        return rng.standard_normal(shape, dtype=np.float32)
    scale = 2.0 if name == "lm_head.weight" else 1.0
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale / np.sqrt(shape[1]))).astype(np.float32)


FAMILY_DEFAULTS = {**LLAMA_DEFAULTS, "experts": 8, "experts_per_token": 2, "expert_intermediate": 0}


def _family(url: str) -> tuple[dict[str, Any], dict[str, int], list[dict[str, tuple[int, ...]]]]:
    """``url``'s config (as config.json holds it), parameters and tensor shapes per shard (outer tensors, then
    one shard per decoder layer), for a model type other than llama."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from quantfab.tasks.checkpoint_map import checkpoint_map
    from quantfab.tasks.decoder import skeleton
    from quantfab.tasks.model_structure import layout
    from quantfab.tasks.families import EXPERT_KEYS, supported_model_types

    model_type = urlsplit(url).netloc
    if model_type not in supported_model_types():
        raise UserError(f"{url}: synthetic models are of a model type quantfab runs (`quantfab families --all`) or "
                        "synthetic://tokens for text")
    p = _checked_sizes(url, parse(url, FAMILY_DEFAULTS))
    sizes = dict(hidden_size=p["hidden"], intermediate_size=p["intermediate"], num_hidden_layers=p["layers"],
                 num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"], head_dim=p["hidden"] // p["heads"],
                 vocab_size=p["vocab"], max_position_embeddings=p["context"], bos_token_id=1, eos_token_id=2,
                 pad_token_id=0, tie_word_embeddings=False)
    try:
        config = AutoConfig.for_model(model_type, **sizes)
        for key in (k for k in EXPERT_KEYS if getattr(config, k, None)):
            setattr(config, key, p["experts"])
            config.num_experts_per_tok = p["experts_per_token"]
            if hasattr(config, "moe_intermediate_size"):
                config.moe_intermediate_size = p["expert_intermediate"] or p["intermediate"]
            if hasattr(config, "norm_topk_prob"):
                config.norm_topk_prob = True  # as released mixtures of experts (Qwen3-30B-A3B) set it
        memory = {k: tuple(v.shape) for k, v in skeleton(config).state_dict().items()}
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:
        raise UserError(f"{url}: transformers cannot build a {model_type} of these sizes: {exc}") from None
    shapes = checkpoint_map(model_type).checkpoint_shapes(memory)
    inner = layout(config).layers_name + "."
    shards: list[dict[str, tuple[int, ...]]] = [{} for _ in range(p["layers"] + 1)]
    for name, shape in shapes.items():
        shards[int(name[len(inner):].split(".")[0]) + 1 if name.startswith(inner) else 0][name] = shape
    saved = json.loads(config.to_json_string(use_diff=False))
    saved |= {"architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]], "torch_dtype": "float32"}
    return saved, p, shards


def _checked_sizes(url: str, p: dict[str, int]) -> dict[str, int]:
    if p["hidden"] % p["heads"] or p["heads"] % p["kv_heads"] or (p["hidden"] // p["heads"]) % 2:
        raise UserError(f"{url}: hidden must divide by heads into even head dims, and heads by kv_heads")
    if p["vocab"] < len(SPECIALS) + 256 + 1 + len(PRINTABLE):
        raise UserError(f"{url}: vocab must be at least {len(SPECIALS) + 256 + 1 + len(PRINTABLE)}")
    return p


def _spec(url: str) -> tuple[dict[str, Any], dict[str, int], list[dict[str, tuple[int, ...]]]]:
    if urlsplit(url).netloc == "llama":
        p = _checked(url)
        return _config(p), p, _shards(p)
    return _family(url)


def headers(url: str, folder: Path) -> dict[str, TensorInfo]:
    """The config.json (written into ``folder``) and tensor headers of a synthetic model, without generating any
    weights (for plan)."""
    saved, _, shards = _spec(url)
    (folder / "config.json").write_text(json.dumps(saved, indent=2))
    tensors = {}
    for idx, shard in enumerate(shards):
        for name, shape in shard.items():
            tensors[name] = TensorInfo(name, "F32", shape, folder / f"shard{idx}")
    return tensors


def write_model(url: str, out: Path) -> str:
    """Write the model folder for ``url``; returns the revision (a digest of the parameters)."""
    saved, p, shards = _spec(url)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(saved, indent=2))
    write_tokenizer(out, p["vocab"])
    weight_map: dict[str, str] = {}
    for idx, shard in enumerate(shards):
        rng = np.random.default_rng([p["seed"], idx])
        name = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: _init(k, s, rng) for k, s in shard.items()}, str(out / name))
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    kind = "" if urlsplit(url).netloc == "llama" else urlsplit(url).netloc + "-"
    return f"synthetic-{kind}" + "-".join(f"{k}{p[k]}" for k in sorted(p))


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A Llama-style BPE with byte fallback: specials, 256 byte tokens, printable chars, then merges."""
    vocab: dict[str, int] = {}
    for tok in SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + PRINTABLE:
        vocab[tok] = len(vocab)
    merges: list[list[str]] = []
    letters = [c for c in "etaoinshrdlucmfwypvbgkjqxz"]
    for a in ["▁"] + letters:
        for b in letters:
            if len(vocab) >= vocab_size:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append([a, b])
    while len(vocab) < vocab_size:  # ids the merges never produce, so the vocab matches the embedding
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(SPECIALS)],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None,
        "post_processor": None,  # BOS comes from add_bos_token, as in Llama tokenizers
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048, "legacy": False}))


def token_stream(url: str, vocab_size: int, count: int) -> np.ndarray:
    """``synthetic://tokens?seed=N``: ``count`` ids drawn uniformly from the non-special vocabulary."""
    p = parse(url, {"seed": 0})
    return np.random.default_rng([p["seed"], 7]).integers(len(SPECIALS), vocab_size, size=count, dtype=np.int64)
