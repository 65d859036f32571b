"""llama.cpp as the consumer of the GGUF files quantfab writes (marker ``llama_cpp``).

Needs llama-cpp-python (the optional extra ``llama-cpp``; it builds llama.cpp from source, about 40 min on
a busy 2-core machine), so CI leaves it out: ``pytest -m llama_cpp`` runs it.

1. Byte for byte: llama-quantize (``llama_model_quantize``) run on our F32 file gives, for every file type,
   the per-tensor types our rules chose and the very bytes our rtn wrote.
2. Loading and perplexity: llama.cpp loads every file (every file type; the K-quant mixes on a synthetic
   model whose rows fit 256-blocks) and its perplexity on the validate windows agrees with our validate
   stage's within 1 %.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert.gguf import GGUFTensors
from quantfab.tasks.download import materialize
from quantfab.tasks.llama_cpp import llama_cpp_perplexity, llama_quantize
from quantfab.tasks.store import Store

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install .[llama-cpp])")
pytestmark = pytest.mark.llama_cpp

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
SYNTHETIC = "synthetic://llama?layers=8&hidden=256&intermediate=512&heads=4&kv_heads=1&vocab=512"
K_TYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
BUILDS = {  # name -> (model source or None for TinyStories, method, file types)
    "tinystories-rtn": (None, "rtn", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q6_K"]),
    "tinystories-gptq": (None, "gptq", ["Q4_0", "Q4_K_M"]),
    "synthetic-rtn": (SYNTHETIC, "rtn", ["F32", "Q8_0", "Q4_0", *K_TYPES]),
    "synthetic-gptq": (SYNTHETIC, "gptq", ["Q4_K_M", "Q3_K_M"]),
    # rows that K-quant blocks do not cover: SmolLM-135M's width, and hidden 1536 with 1344-wide down_proj rows
    "w576-rtn": ("synthetic://llama?layers=4&hidden=576&intermediate=1536&heads=9&kv_heads=3&vocab=512", "rtn",
                 ["F32", "Q4_K_M", "Q3_K_M", "Q5_K_M"]),
    "w1536-rtn": ("synthetic://llama?layers=4&hidden=1536&intermediate=1344&heads=12&kv_heads=2&vocab=512", "rtn",
                  ["F32", "Q4_K_M"]),
}
PPL_RTOL = 0.01


class Build:
    def __init__(self, source: str | None, method: str, types: list[str], store: Store, stages):
        overrides = ["calibration.samples=16", "calibration.seq_len=128", "validate.tokens=2048", "validate.window=128",
                     f"quantize.method={method}",  # llama_model_quantize beside them runs without an importance matrix
                     "outputs=[" + ", ".join(f"{{format: gguf, type: {t}, imatrix: false}}" for t in types) + "]"]
        if source:
            overrides += [f"model.source={source}", "calibration.source=synthetic://tokens",
                          "validate.source=synthetic://tokens"]
        r = load_recipe(RECIPE, overrides)
        self.recipe, self.store = r, store
        self.key = {o.type: o.key for o in r.outputs}
        built = stages(r, store)
        self.model, self.converted = built.model, built.converted
        self.metrics = validate_mod.measure(self.model, self.converted, r.outputs, r.validate_, "cpu", store)
        self.ids = validate_mod.eval_windows(self.model, r.validate_, store)
        self.config = materialize(store, self.model.files).config()

    def path(self, file_type: str) -> Path:
        f = self.converted.files[self.key[file_type]]
        return materialize(self.store, f.files).path / f.path


@pytest.fixture(scope="module")
def builds(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, stages) -> dict[str, Build]:
    store = Store(str(tmp_path_factory.mktemp("llama-cpp-store")))
    return {name: Build(*spec, store, stages) for name, spec in BUILDS.items()}


@pytest.mark.parametrize("name", ["w576-rtn", "w1536-rtn"])
def test_fallbacks_are_reported_exactly_where_llama_quantize_falls_back(builds: dict[str, Build], name: str,
                                                                        tmp_path: Path) -> None:
    """llama-quantize on our F32 file gives every tensor the type we wrote, and the tensors whose type is
    not the mix's are exactly the ones our report lists, with the type llama.cpp chose."""
    b = builds[name]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(b.config.num_hidden_layers))
    for file_type in BUILDS[name][2][1:]:
        theirs_path = tmp_path / f"{name}-{file_type}.gguf"
        llama_quantize(b.path("F32"), theirs_path, file_type, threads=2)
        theirs = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(theirs_path)).tensors}
        ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(b.path(file_type))).tensors}
        assert ours == theirs, file_type
        reported = {names.get_name(line.split(": ")[0]) + ".weight": line.rsplit("-> ", 1)[1]
                    for line in b.converted.files[b.key[file_type]].fallbacks}
        assert reported and all(theirs[t] == built for t, built in reported.items()), (file_type, reported)
        mix = {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q5_K_M": "Q5_K"}[file_type]
        unreported = {t: k for t, k in theirs.items() if t not in reported and k not in ("F32", mix, "Q6_K", "Q4_K", "Q5_K")}
        assert not unreported, unreported  # every other tensor holds a type of the mix (or a norm's F32)


@pytest.mark.parametrize("name", ["tinystories-rtn", "synthetic-rtn"])
def test_llama_quantize_writes_our_types_and_bytes(builds: dict[str, Build], name: str, tmp_path: Path) -> None:
    b = builds[name]
    for file_type in BUILDS[name][2]:
        if file_type in ("F32", "F16"):
            continue
        theirs_path = tmp_path / f"{name}-{file_type}.gguf"
        llama_quantize(b.path("F32"), theirs_path, file_type, threads=2)
        ours = {t.name: t for t in gguf.GGUFReader(str(b.path(file_type))).tensors}
        theirs = {t.name: t for t in gguf.GGUFReader(str(theirs_path)).tensors}
        assert ours.keys() == theirs.keys()
        for tname, t in theirs.items():
            assert ours[tname].tensor_type == t.tensor_type, (file_type, tname)
            assert np.array_equal(np.asarray(ours[tname].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), (file_type, tname)


@pytest.mark.parametrize("name", list(BUILDS))
def test_llama_cpp_loads_every_file_and_agrees_on_perplexity(builds: dict[str, Build], name: str) -> None:
    b = builds[name]
    for file_type in BUILDS[name][2]:
        ours = b.metrics["outputs"][b.key[file_type]]["perplexity"]
        theirs = llama_cpp_perplexity(b.path(file_type), b.ids, threads=2)
        assert abs(theirs / ours - 1) < PPL_RTOL, (file_type, ours, theirs)
        types = {t for _, t in GGUFTensors(b.path(file_type), b.config).types()}
        if name == "synthetic-rtn" and file_type in K_TYPES:
            assert any(t.endswith("_K") for t in types), types
