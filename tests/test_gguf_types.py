"""GGUF file types choose per-tensor types the way llama-quantize does (src/llama-quant.cpp).

The expected layer sets are written out by hand from llama.cpp's rules (use_more_bits: the first and
last eighth of the layers, and every third one between); tests/test_llama_cpp.py checks the same
choices against llama.cpp itself where llama-cpp-python is installed.
"""

from __future__ import annotations

from quantfab.tasks.convert.gguf_types import ModelFacts, choose_types

def types_of(*args, **kwargs) -> dict[str, str | None]:
    return {name: choice.type for name, choice in choose_types(*args, **kwargs).items()}


LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def llama(n_layers: int, hidden: int, ffn: int, tied: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF names and HF shapes in file order (embedding, layers in order, then the head)."""
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (32000, hidden))]
    for i in range(n_layers):
        out.append((f"blk.{i}.attn_norm.weight", (hidden,)))
        for lin in LINEARS:
            out.append((f"blk.{i}.{lin}.weight", (hidden, ffn) if lin == "ffn_down" else (hidden, hidden)))
    out.append(("output_norm.weight", (hidden,)))
    if not tied:
        out.append(("output.weight", (32000, hidden)))
    return out


def layers_of(types: dict[str, str | None], linear: str, wanted: str) -> set[int]:
    return {int(n.split(".")[1]) for n, t in types.items() if n.endswith(f".{linear}.weight") and t == wanted}


MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def test_q4_k_m_raises_attn_v_and_ffn_down_in_the_use_more_bits_layers() -> None:
    types = types_of("Q4_K_M", llama(32, 4096, 11008), ModelFacts(32, 32, 8), pure=False)
    assert layers_of(types, "attn_v", "Q6_K") == MORE_BITS_32
    assert layers_of(types, "attn_v", "Q4_K") == set(range(32)) - MORE_BITS_32
    assert layers_of(types, "ffn_down", "Q6_K") == MORE_BITS_32
    for lin in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert layers_of(types, lin, "Q4_K") == set(range(32))
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] is None and types["output_norm.weight"] is None


def test_q3_k_m_q5_k_m_and_q4_k_s_mixes() -> None:
    shapes, facts = llama(32, 4096, 11008), ModelFacts(32, 32, 8)
    q3 = types_of("Q3_K_M", shapes, facts, pure=False)
    assert layers_of(q3, "attn_v", "Q5_K") == {0, 1} and layers_of(q3, "attn_v", "Q4_K") == set(range(2, 32))
    assert layers_of(q3, "ffn_down", "Q5_K") == {0, 1} and layers_of(q3, "ffn_down", "Q4_K") == set(range(2, 32))
    assert layers_of(q3, "attn_output", "Q4_K") == set(range(32)) and layers_of(q3, "attn_q", "Q3_K") == set(range(32))
    q5 = types_of("Q5_K_M", shapes, facts, pure=False)
    assert layers_of(q5, "attn_v", "Q6_K") == MORE_BITS_32 and layers_of(q5, "ffn_down", "Q6_K") == MORE_BITS_32
    assert layers_of(q5, "attn_q", "Q5_K") == set(range(32))
    q4s = types_of("Q4_K_S", shapes, facts, pure=False)
    assert layers_of(q4s, "attn_v", "Q5_K") == {0, 1, 2, 3} and layers_of(q4s, "ffn_down", "Q5_K") == {0, 1, 2, 3}
    assert layers_of(q4s, "ffn_down", "Q4_K") == set(range(4, 32))
    q2 = types_of("Q2_K", shapes, facts, pure=False)
    assert layers_of(q2, "attn_v", "Q4_K") == set(range(32))  # 4 query heads per KV head
    assert layers_of(q2, "ffn_down", "Q3_K") == set(range(32)) and layers_of(q2, "attn_output", "Q3_K") == set(range(32))


def test_70b_gives_attn_v_q5_k_and_q2_k_without_gqa_gives_q3_k() -> None:
    seventy = types_of("Q4_K_S", llama(80, 8192, 28672), ModelFacts(80, 64, 8), pure=False)
    assert layers_of(seventy, "attn_v", "Q5_K") == set(range(80))
    no_gqa = types_of("Q2_K", llama(16, 2048, 5632), ModelFacts(16, 16, 16), pure=False)
    assert layers_of(no_gqa, "attn_v", "Q3_K") == set(range(16))


def test_rows_that_do_not_divide_fall_back_as_llama_cpp_does() -> None:
    """TinyStories-656K: rows of 128 (and 384 for ffn_down) fit no 256-block; a tied embedding is the head."""
    shapes, facts = llama(2, 128, 384, tied=True), ModelFacts(2, 8, 4)
    q4km = types_of("Q4_K_M", shapes, facts, pure=False)
    assert q4km["token_embd.weight"] == "Q8_0"  # the head's rule: 128 % 256 != 0 -> Q8_0
    assert q4km["blk.0.attn_q.weight"] == "Q5_0" and q4km["blk.0.attn_v.weight"] == "Q5_0"
    assert q4km["blk.1.attn_v.weight"] == "Q8_0" and q4km["blk.1.ffn_down.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert types_of("Q5_K_S", shapes, facts, pure=True)["blk.0.ffn_up.weight"] == "Q5_1"
    assert types_of("Q3_K_S", shapes, facts, pure=True)["blk.0.ffn_up.weight"] == "Q4_0"
    assert types_of("Q4_0", shapes, facts, pure=False)["token_embd.weight"] == "Q8_0"
    odd = types_of("Q4_0", llama(1, 48, 96), ModelFacts(1, 4, 4), pure=False)
    assert odd["blk.0.attn_q.weight"] is None  # 48 % 32 != 0: F16, as llama.cpp
    assert odd["blk.0.ffn_down.weight"] == "Q4_0"


def test_each_fallback_says_what_the_mix_wanted_and_why() -> None:
    """A 576-wide Llama (SmolLM-135M's shape): rows of 576 fit no 256-block, ffn_down's 1536 do."""
    choices = choose_types("Q4_K_M", llama(2, 576, 1536), ModelFacts(2, 9, 3), pure=False)
    assert choices["blk.0.attn_q.weight"].fallback == "row 576 not a multiple of 256 (Q4_K) -> Q5_0"
    assert choices["blk.1.attn_v.weight"].fallback == "row 576 not a multiple of 256 (Q6_K) -> Q8_0"
    assert choices["output.weight"].fallback == "row 576 not a multiple of 256 (Q6_K) -> Q8_0"
    assert choices["blk.1.ffn_down.weight"].fallback == "" and choices["blk.1.ffn_down.weight"].type == "Q6_K"
    assert choose_types("Q4_0", llama(1, 48, 96), ModelFacts(1, 4, 4), pure=False)["blk.0.attn_q.weight"].fallback \
        == "row 48 not a multiple of 32 (Q4_0) -> float"


def test_pure_keeps_the_default_type_everywhere() -> None:
    types = types_of("Q4_K_M", llama(8, 512, 1024), ModelFacts(8, 8, 2), pure=True)
    assert {t for t in types.values() if t} == {"Q4_K"}


def test_an_importance_matrix_raises_q4_0_and_q5_0_ffn_down_in_the_first_eighth() -> None:
    """llama-quantize --imatrix guards the first ffn_down layers of Q4_0 and Q5_0 with Q4_1 and Q5_1 ("Q4_1/Q5_1 do
    go crazy on ffn_down without an imatrix", so only with one); nothing else moves, and --pure keeps the type."""
    facts = ModelFacts(32, 32, 8)
    for file_type, raised in (("Q4_0", "Q4_1"), ("Q5_0", "Q5_1")):
        plain = types_of(file_type, llama(32, 4096, 11008), facts, pure=False)
        weighted = types_of(file_type, llama(32, 4096, 11008), facts, pure=False, importance=True)
        assert layers_of(weighted, "ffn_down", raised) == {0, 1, 2, 3}
        assert {n for n in plain if plain[n] != weighted[n]} == {f"blk.{i}.ffn_down.weight" for i in range(4)}
        pure = types_of(file_type, llama(32, 4096, 11008), facts, pure=True, importance=True)
        assert layers_of(pure, "ffn_down", file_type) == set(range(32))
    q4_k_m = dict(pure=False)
    assert types_of("Q4_K_M", llama(32, 4096, 11008), facts, **q4_k_m) == \
        types_of("Q4_K_M", llama(32, 4096, 11008), facts, importance=True, **q4_k_m)


def test_iq4_mixes_follow_llama_quantize() -> None:
    """IQ4_NL and IQ4_XS: attn_v in Q5_K where 4 or more heads share a KV head, the first eighth of ffn_down in Q5_K
    unless an importance matrix is given, the head in Q6_K; IQ4_XS rows that fit no 256-block fall back to IQ4_NL."""
    for file_type in ("IQ4_NL", "IQ4_XS"):
        plain = types_of(file_type, llama(16, 4096, 11008), ModelFacts(16, 32, 8), pure=False)
        weighted = types_of(file_type, llama(16, 4096, 11008), ModelFacts(16, 32, 8), pure=False, importance=True)
        assert layers_of(plain, "attn_v", "Q5_K") == layers_of(weighted, "attn_v", "Q5_K") == set(range(16))
        assert layers_of(plain, "ffn_down", "Q5_K") == {0, 1} and layers_of(weighted, "ffn_down", file_type) == set(range(16))
        assert plain["output.weight"] == "Q6_K" and plain["blk.3.attn_q.weight"] == file_type
        no_gqa = types_of(file_type, llama(16, 4096, 11008), ModelFacts(16, 32, 16), pure=False)
        assert layers_of(no_gqa, "attn_v", file_type) == set(range(16))
    narrow = choose_types("IQ4_XS", llama(2, 576, 1536), ModelFacts(2, 9, 3), pure=False)
    assert narrow["blk.0.attn_q.weight"].type == "IQ4_NL"
    assert narrow["blk.0.attn_q.weight"].fallback == "row 576 not a multiple of 256 (IQ4_XS) -> IQ4_NL"


def test_two_bit_mixes_follow_llama_quantize() -> None:
    """IQ2_XXS/XS and IQ1_S/M: attn_v in Q4_K with 4+ heads per KV head (Q2_K without), the first eighth of ffn_down
    in Q2_K, an untied embedding in Q2_K, the head in Q5_K; IQ1_* put attn_output in IQ2_XXS. IQ2_S and IQ2_M use IQ3_S
    where those use Q2_K, and IQ2_S's own layers are IQ2_XS."""
    shapes, gqa, mha = llama(16, 4096, 11008), ModelFacts(16, 32, 8), ModelFacts(16, 32, 32)
    for file_type, low, default in (("IQ2_XXS", "Q2_K", "IQ2_XXS"), ("IQ1_S", "Q2_K", "IQ1_S"),
                                    ("IQ2_S", "IQ3_S", "IQ2_XS"), ("IQ2_M", "IQ3_S", "IQ2_S")):
        types = types_of(file_type, shapes, gqa, pure=False, importance=True)
        assert layers_of(types, "attn_v", "Q4_K") == set(range(16))
        assert layers_of(types, "ffn_down", low) == {0, 1} and layers_of(types, "ffn_down", default) == set(range(2, 16))
        assert types["token_embd.weight"] == low and types["output.weight"] == "Q5_K"
        output = "IQ2_XXS" if file_type == "IQ1_S" else "IQ3_S" if low == "IQ3_S" else default
        assert layers_of(types, "attn_output", output) == set(range(16))
        assert layers_of(types, "attn_q", default) == layers_of(types, "ffn_up", default) == set(range(16))
        assert layers_of(types_of(file_type, shapes, mha, pure=False, importance=True), "attn_v", low) == set(range(16))


def test_iq3_mixes_follow_llama_quantize() -> None:
    """IQ3_XS: attn_q/attn_k and the middle three quarters of ffn_gate/ffn_up in IQ3_XXS; IQ3_XXS: attn_q/attn_k in
    IQ2_S, attn_output and the embedding in IQ3_S; IQ3_M: attn_v, attn_output and the first eighth of ffn_down in
    Q4_K. Without an importance matrix IQ3_XXS's attn_v is IQ3_S and its ffn_down Q3_K (Q4_K in the first eighth)."""
    shapes, facts = llama(16, 4096, 11008), ModelFacts(16, 32, 32)
    xs = types_of("IQ3_XS", shapes, facts, pure=False, importance=True)
    assert layers_of(xs, "attn_q", "IQ3_XXS") == layers_of(xs, "attn_k", "IQ3_XXS") == set(range(16))
    assert layers_of(xs, "ffn_up", "IQ3_XXS") == layers_of(xs, "ffn_gate", "IQ3_XXS") == set(range(2, 14))
    assert layers_of(xs, "ffn_up", "IQ3_S") == {0, 1, 14, 15} and layers_of(xs, "attn_v", "IQ3_S") == set(range(16))
    xxs = types_of("IQ3_XXS", shapes, facts, pure=False, importance=True)
    assert layers_of(xxs, "attn_q", "IQ2_S") == layers_of(xxs, "attn_output", "IQ3_S") == set(range(16))
    assert layers_of(xxs, "attn_v", "IQ3_XXS") == layers_of(xxs, "ffn_down", "IQ3_XXS") == set(range(16))
    assert xxs["token_embd.weight"] == "IQ3_S" and xxs["output.weight"] == "Q5_K"
    m = types_of("IQ3_M", shapes, facts, pure=False)
    assert layers_of(m, "attn_v", "Q4_K") == layers_of(m, "attn_output", "Q4_K") == set(range(16))
    assert layers_of(m, "ffn_down", "Q4_K") == {0, 1} and layers_of(m, "ffn_up", "IQ3_S") == set(range(16))
    assert m["output.weight"] == "Q6_K"
    q3s = types_of("IQ3_S", shapes, ModelFacts(16, 32, 8), pure=False)
    assert layers_of(q3s, "attn_v", "Q4_K") == set(range(16)) and layers_of(q3s, "attn_q", "IQ3_S") == set(range(16))


def test_types_that_need_an_importance_matrix_are_refused_without_one() -> None:
    """llama-quantize refuses IQ1_*, IQ2_* and IQ3_XXS tensors without --imatrix (the embedding and the head aside);
    IQ3_S, IQ3_M and the IQ4 types run without one."""
    import pytest

    from quantfab.tasks.errors import UserError

    shapes, facts = llama(8, 4096, 11008), ModelFacts(8, 32, 8)
    for file_type in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS"):
        with pytest.raises(UserError, match=rf"GGUF {file_type}: blk\.0\.attn_q\.weight gets I.*importance matrix"):
            choose_types(file_type, shapes, facts, pure=False)
    assert types_of("IQ3_XS", shapes, facts, pure=True)["blk.0.attn_q.weight"] == "IQ3_S"  # pure: no IQ3_XXS
    for file_type in ("IQ3_S", "IQ3_M", "IQ4_XS", "MXFP4_MOE"):
        choose_types(file_type, shapes, facts, pure=False)


def test_mxfp4_moe_puts_stacked_experts_in_mxfp4_and_the_rest_in_q8_0() -> None:
    shapes = [("token_embd.weight", (32000, 2048)), ("blk.0.attn_q.weight", (2048, 2048)),
              ("blk.0.ffn_down_exps.weight", (2048, 768)), ("blk.0.ffn_gate_inp.weight", (8, 2048)),
              ("output.weight", (32000, 2048))]
    types = types_of("MXFP4_MOE", shapes, ModelFacts(1, 16, 4, 8), pure=False)
    assert types == {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q8_0", "blk.0.ffn_down_exps.weight": "MXFP4",
                     "blk.0.ffn_gate_inp.weight": None, "output.weight": "Q8_0"}
