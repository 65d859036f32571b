"""llama.cpp's lattice types (IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) as ported to NumPy: the search
writes llama.cpp's bytes, its codes and scales decode as gguf-py's dequantize, an importance steers it, and it refuses
what llama.cpp cannot quantize."""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest

from quantfab.tasks.quantize.grids import GRIDS
from quantfab.tasks.quantize.lattice import LatticeGrid

LATTICE = [n for n, g in GRIDS.items() if isinstance(g, LatticeGrid)]
ASSERTS_WEIGHTS = {"IQ1_S", "IQ2_XXS", "IQ2_XS"}  # quantize_<type> asserts quant_weights; the others accept NULL
CASES = [(name, weighted) for name in LATTICE for weighted in (True, False) if weighted or name not in ASSERTS_WEIGHTS]


def case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """6 x 512 normal weights with the zeros the searches treat apart (a zero 32-block and a zero 16-block in live
    super-blocks, a zero group of 8, a whole zero super-block), and a skewed importance with every 9th column zero."""
    x = np.random.default_rng(seed).standard_normal((6, 512)).astype(np.float32)
    x[1, 64:96] = 0
    x[3, 16:32] = 0
    x[4, 296:304] = 0
    x[2, 256:] = 0
    importance = (np.random.default_rng(seed + 100).uniform(size=512) ** 4 * 50).astype(np.float32)
    importance[::9] = 0
    return x, importance


# (type, seed, with the importance) -> SHA-256 of quantize_<type>(x, 6, 512, importance or NULL) for case(seed), from
# llama-cpp-python 0.3.36's vendored ggml-quants.c built with gcc -O2 -DNDEBUG (no -march) and called through ctypes
# after iq2xs_init_impl(type) (IQ1_*, IQ2_*) or iq3xs_init_impl(256 / 512) (IQ3_XXS / IQ3_S).
KNOWN: dict[tuple[str, int, bool], str] = {
    ("IQ3_XXS", 1, True): "1adb6621286c2260ce5c19999c23a52243844125b48e74cf420ce28e7009e091",
    ("IQ3_XXS", 1, False): "5993c98c44503e5d797dacd5992e6b791cd197fe85e0db042797e5f9406b5aa6",
    ("IQ3_XXS", 2, True): "261cbe24cca97e9eb6c8a846e214556e25276c1a1f76872c086923eb019e58e1",
    ("IQ3_XXS", 2, False): "d7f5f4b70d86e89883d399f470a8dc27465163ba0c9b879073ba002700531bf6",
    ("IQ3_S", 1, True): "bac80dca870a586fb856dbd2eb5aa54dd8a6df2bbbe791f2db5e8131e1ce7742",
    ("IQ3_S", 1, False): "eb7e2ccf52892f532b531ba62458b10bfd756115e6afe55557e8215bc89388c4",
    ("IQ3_S", 2, True): "0208ec50cffee308d0545ced4a98558de315c232ef1b2d33402ceb41ea3d5c24",
    ("IQ3_S", 2, False): "7620d5daeff856baf594ab15096f72f2d7e716d08e482a28697afde7e927283a",
    ("IQ2_XXS", 1, True): "f341fdcf6ce341a729ce25a53f9cf589f21f8ad2128ee2cf2546c607beee02c8",
    ("IQ2_XXS", 2, True): "7da12c1b1ab417f7b6032ddbafaaa58eab3580401550a12c18e0f88ee798de16",
    ("IQ2_XS", 1, True): "50cb5ad3053fe655271d3424145c64757206cb1b3259e939ce447f1d3a0c35b0",
    ("IQ2_XS", 2, True): "9167ba705a62d0bfbb53bfd4312fa7a74f34ad146400af58c8effce49a0d18dc",
    ("IQ2_S", 1, True): "355c37401b07e43186fa5fc6e475c2700d13b3eba3f72226645ba6b2038c64ba",
    ("IQ2_S", 1, False): "23f1b3973d40279a1df1bc18d415d6b8d766acad4391bb31a1293ad3595ff2d5",
    ("IQ2_S", 2, True): "ecf45f214f17d522105cef11d648f7589a04975d31d17fdcc0df3eb6067bb89e",
    ("IQ2_S", 2, False): "410a5d6d763920e041db9a952dc11729fcfbf6b17a2adea786fcb7c4d85a1b18",
    ("IQ1_S", 1, True): "5efd4a450d64c95bcd83a0439fe5c9df55401caeb7dc3ec4b9e20382adfb6562",
    ("IQ1_S", 2, True): "5da013416fb52d1c3c04fb9f055762f9b6f8fc0e6cbdcba2d3dfc5a37f7d5b15",
    ("IQ1_M", 1, True): "a5dd2ea2eac805fba5da9939e7efd9af885162a0e344a356b18453acdd6d0d00",
    ("IQ1_M", 1, False): "1f9cee011ead1111c3899a0a6bc42ee8637087e2369b932531b0eec2d602f504",
    ("IQ1_M", 2, True): "94a083664704581a7798f20c4a1fb3587facb6dd6f70903f9dc2d3589f4f26f4",
    ("IQ1_M", 2, False): "af6f7651fd7eaf43207facacec0bbe7326fc7a079375ef4bf02f31ba5a2fbc5c",
}


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(("name", "weighted"), CASES)
def test_bytes_are_llama_cpps(name: str, seed: int, weighted: bool) -> None:
    x, importance = case(seed)
    raw = GRIDS[name].search(x, importance if weighted else None)[2]
    assert raw.dtype == np.uint8 and raw.shape == (6, 2 * GRIDS[name].type_size)
    assert hashlib.sha256(raw.tobytes()).hexdigest() == KNOWN[name, seed, weighted]


@pytest.mark.parametrize(("name", "weighted"), CASES)
def test_codes_decode_as_gguf_py(name: str, weighted: bool) -> None:
    """d * codes is what a GGUF reader gets from the bytes, bit for bit, so the codes can stand in for the bytes."""
    grid = GRIDS[name]
    x, importance = case(1)
    codes, d, raw = grid.search(x, importance if weighted else None)
    assert grid.qmin <= codes.min() and codes.max() <= grid.qmax
    ours = np.repeat(d, grid.block, axis=1) * codes
    theirs = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[name]).reshape(x.shape)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("name", LATTICE)
def test_importance_lowers_the_error_it_weighs(name: str) -> None:
    """The search must spend its precision where the importance says. The importance is so skewed (uniform**8) that
    the same values on the wrong columns leave the weighted error 2 to 12 times larger (seeds 0..4), never close."""
    grid = GRIDS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 512)).astype(np.float32)
    importance = (rng.uniform(size=512) ** 8 * 50).astype(np.float32)

    def weighted_error(imp: np.ndarray) -> float:
        codes, d, _ = grid.search(x, imp)
        return float((importance * (np.repeat(d, grid.block, axis=1) * codes - x) ** 2).sum())

    assert weighted_error(importance) < 0.75 * weighted_error(rng.permutation(importance))


@pytest.mark.parametrize("name", LATTICE)
def test_refusals_and_sizes(name: str) -> None:
    """Where llama.cpp would abort (no quant_weights for the types that assert them, rows that are not whole
    super-blocks) the port raises a ValueError that names the type; the sizes are the ones GGUF files use."""
    grid = GRIDS[name]
    with pytest.raises(ValueError, match=f"{name}.*multiple of 256"):
        grid.search(np.ones((2, 384), np.float32), np.ones(384, np.float32))
    if name in ASSERTS_WEIGHTS:
        with pytest.raises(ValueError, match=f"{name}.*importance"):
            grid.search(np.ones((1, 256), np.float32), None)
    assert grid.needs_importance == (name != "IQ3_S")  # llama.cpp's tensor_requires_imatrix
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (256, grid.type_size)
