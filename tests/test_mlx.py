"""mlx: mlx-lm's affine checkpoint. MLX's own quantizer's answers on fixed inputs (recorded from mlx 0.32.4's
mx.quantize), the bit-stream layout, a TinyStories build's folder, and (marked ``mlx``: mlx-lm in a venv of its own,
``QUANTFAB_MLX_PYTHON``) mlx-lm loading it, generating and computing validate's logits."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import forward as forward_mod
from quantfab.tasks.convert import FORMATS
from quantfab.tasks.convert.mlx import pack_bits, unpack_bits
from quantfab.tasks.download import materialize
from quantfab.tasks.quantize.grids import grid_named
from quantfab.tasks.quantize.layer_file import LayerFile
from quantfab.tasks.store import Store
from quantfab.tasks.texts import windows

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
OUTPUTS = "[{mlx: int4}, {format: mlx, type: int8, group_size: 32}, {format: mlx, type: int3, dtype: float16}]"
# mx.quantize(w as float16, group_size=32, bits) on the inputs of ``known_weights``: codes, scales, biases
KNOWN = {
    3: ([[2767570741, 2489505245, 2329423306, 2761247926, 3431304089, 3536477297],
         [1558860380, 3063680564, 1287967118, 756244446, 1294364231, 1575955595]],
        [[0.025177001953125, -0.0250091552734375], [-0.02655029296875, -0.0280609130859375]]),
    4: ([[4201146810, 3664428168, 3046331013, 2225766555, 2320020668, 2246282632, 1500042507, 3618091608],
         [4104921977, 143147384, 2276947336, 1177044802, 129629821, 1704552363, 1974978700, 1602025640]],
        [[0.0125885009765625, -0.01250457763671875], [-0.01180267333984375, -0.01403045654296875]]),
}
KNOWN_BIASES = [[-0.1258544921875, 0.10003662109375], [0.106201171875, 0.11224365234375]]


def known_weights() -> np.ndarray:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((2, 64)) * 0.05).astype(np.float32)
    w[1, :32] += 0.03  # a group whose maximum outweighs its minimum: a negative scale
    return w


@pytest.mark.parametrize("bits", sorted(KNOWN))
def test_the_reference_is_mx_quantize(bits: int) -> None:
    """Codes, scales and biases equal MLX's own quantizer's on the same float16 weights, bit for bit."""
    grid = grid_named(f"MLX{bits}_G32_F16")
    enc = grid.reference(known_weights())
    words, scales = KNOWN[bits]
    assert pack_bits(enc.codes.astype(np.int16) + grid.offset, bits).tolist() == words
    assert enc.d.tolist() == scales and enc.m.tolist() == KNOWN_BIASES


def test_codes_are_one_little_endian_bit_stream_per_row() -> None:
    """3-bit codes straddle bytes: code k occupies bits 3k..3k+2 of the row's stream; 8-bit codes reach 255."""
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 0] * 4], np.int64)
    stream = sum(int(c) << (3 * k) for k, c in enumerate(codes[0]))
    words = pack_bits(codes, 3)
    assert words.tolist() == [[(stream >> (32 * i)) & 0xFFFFFFFF for i in range(3)]]
    wide = np.arange(256, dtype=np.int64).reshape(2, 128)
    assert np.array_equal(unpack_bits(pack_bits(wide, 8), 8, 128), wide)
    grid = grid_named("MLX8_G32_F32")
    enc = grid.reference(np.linspace(-1, 3, 64, dtype=np.float32).reshape(2, 32))
    assert enc.codes.min() == -128 and enc.codes.max() == 127  # unsigned 0 and 255, held as u - 128


class Build:
    """The recipe's model (TinyStories-656K) through gptq to the three mlx outputs, down_proj at 6 bits; or what
    ``overrides`` ask instead."""

    def __init__(self, store: Store, overrides: tuple[str, ...] = ()):
        from quantfab.tasks import calibrate as calibrate_mod
        from quantfab.tasks import download as download_mod
        from quantfab.tasks.convert.stage import convert
        from quantfab.tasks.quantize.stage import quantize

        r = load_recipe(RECIPE, ["calibration.samples=16", "calibration.seq_len=128", "quantize.method=gptq",
                                 "quantize.overrides={'*.mlp.down_proj': {bits: 6}}", f"outputs={OUTPUTS}",
                                 *overrides])
        self.recipe, self.store = r, store
        self.model = download_mod.download(r.model.source, None, r.model.include, False, store)
        c = r.calibration
        self.calibration = calibrate_mod.calibrate(self.model, c.source, c.samples, c.seq_len, c.seed, c.text_field,
                                                   "cpu", store)
        self.quantized = quantize(self.model, self.calibration, r.quantize, r.outputs, "cpu", store)
        self.converted = convert(self.model, self.quantized, r.outputs, r.name, store, self.calibration)
        self.folder = materialize(store, self.model.files)

    def written(self, key: str) -> Path:
        f = self.converted.files[key]
        return materialize(self.store, f.files).path / f.path


@pytest.fixture(scope="module")
def build(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Build:
    return Build(Store(str(tmp_path_factory.mktemp("mlx-store"))))


def test_the_folder_is_mlx_lms_layout(build: Build) -> None:
    """config.json's quantization (and quantization_config) names the default bits and group and each Linear
    overridden to other bits; every quantized Linear, the embedding included, is uint32 words with scales and biases
    in the output's float type; norms stay float; the file says format mlx."""
    path = build.written("mlx-int4-g64")
    config = json.loads((path / "config.json").read_text())
    layers = int(config["num_hidden_layers"])
    expected = {"group_size": 64, "bits": 4, "mode": "affine",
                **{f"model.layers.{i}.mlp.down_proj": {"group_size": 64, "bits": 6, "mode": "affine"} for i in range(layers)}}
    assert config["quantization"] == config["quantization_config"] == expected
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "mlx"}
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        assert q.get_dtype() == "U32" and q.get_shape() == [128, 128 * 4 // 32]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [128, 384 * 6 // 32]
        assert f.get_slice("model.layers.0.mlp.down_proj.scales").get_shape() == [128, 384 // 64]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "U32"  # quantized, as mlx-lm's convert does
        assert f.get_slice("model.embed_tokens.biases").get_dtype() == "F32"  # this model is float32
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"
        assert "lm_head.weight" not in f.keys()  # tied
    with safe_open(str(build.written("mlx-int3-g64-float16") / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith(".weight") or "norm" in k} == {"F16"}


def test_every_written_linear_decodes_to_the_quantizers_codes(build: Build) -> None:
    """Read back from the folder, each layer Linear is its grid's decode of the codes quantize chose (mixed bits
    included), and convert's own verification found no mismatch in any tensor."""
    for key in ("mlx-int4-g64", "mlx-int8-g32", "mlx-int3-g64-float16"):
        f = build.converted.files[key]
        assert f.verification.tensors == 15 and not f.verification.mismatches, key  # 14 Linears and the embedding
        reader = FORMATS["mlx"].reader(build.written(key), None)
        q = build.quantized.outputs[key]
        for m in q.modules:
            enc = LayerFile(build.store.local_path(q.layers[int(m.name.split(".")[2])])).encoded(m.name)
            got = reader.load([f"{m.name}.weight"])[f"{m.name}.weight"].numpy()
            assert np.array_equal(got, grid_named(m.grid).decode(enc)), (key, m.name)
        assert {m.grid.split("_")[0] for m in q.modules if m.name.endswith("down_proj")} == {"MLX6"}


def _mlx_python() -> str:
    python = os.environ.get("QUANTFAB_MLX_PYTHON")
    if not python or not Path(python).is_file():
        pytest.skip("mlx-lm not in reach: set QUANTFAB_MLX_PYTHON to a python with mlx[cpu] and mlx-lm "
                    "(bench/consumers/mlx_logits.py says how)")
    return python


@pytest.mark.mlx
def test_mlx_lm_loads_generates_and_computes_validates_logits(build: Build, data_dir: Path, tmp_path: Path) -> None:
    """mlx-lm loads each folder with the bits it was written with (6-bit down_proj, a quantized embedding), generates
    text, and its logits on 8 TinyStories windows equal validate's from our decode of the same folder: within 1e-4
    for float32 folders (3.2e-5 seen, logits up to 22), and for the float16 one, whose whole forward mlx runs in
    float16, within 0.25 with the same top token at 98 % of positions (0.115 and 99.1 % seen)."""
    python = _mlx_python()
    tokenizer = build.folder.tokenizer()
    text = (data_dir / "tinystories-valid-head.txt").read_text(encoding="utf-8")[:20_000]
    ids = windows(np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64),
                  128, 8, 1, "tinystories-valid-head.txt", "test")
    np.save(tmp_path / "ids.npy", ids)
    for key, tolerance in (("mlx-int4-g64", 1e-4), ("mlx-int8-g32", 1e-4), ("mlx-int3-g64-float16", 0.25)):
        out = tmp_path / f"{key}.npy"
        done = subprocess.run([python, str(REPO / "bench" / "consumers" / "mlx_logits.py"), str(build.written(key)),
                               str(tmp_path / "ids.npy"), str(out)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert report["embedding"] == "QuantizedEmbedding" and report["layer0_bits"]["mlp.down_proj"] == 6
        assert len(report["text"].split()) >= 5, report["text"]
        reader = FORMATS["mlx"].reader(build.written(key), None)
        ours = forward_mod.logits(build.folder.config(), reader, build.folder.weights(), ids).numpy()
        theirs = np.load(out)
        assert np.abs(theirs - ours).max() < tolerance, (key, float(np.abs(theirs - ours).max()))
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.98, key


class MoEBuild(Build):
    """A synthetic mixture of experts (random weights in a real transformers architecture) built to mlx int4 by rtn,
    with down_proj at 6 bits."""

    def __init__(self, store: Store, model_type: str):
        down = "w2" if model_type == "mixtral" else "down_proj"
        super().__init__(store, (f"model.source=synthetic://{model_type}?layers=2&hidden=128&experts=4"
                                 "&experts_per_token=2&expert_intermediate=128&intermediate=256",
                                 "calibration.source=synthetic://tokens", "calibration.samples=8",
                                 "calibration.seq_len=32", "quantize.method=rtn",
                                 f"quantize.overrides={{'*.{down}': {{bits: 6}}}}", "outputs=[{mlx: int4}]"))
        self.model_type = model_type


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> MoEBuild:
    return MoEBuild(Store(str(tmp_path_factory.mktemp("mlx-moe"))), request.param)


def test_experts_are_stacked_as_mlx_lms_switch_mlp_and_read_back_per_expert(moe: MoEBuild) -> None:
    """Each layer's experts are one switch_mlp tensor per matrix (expert first; Mixtral's w1/w2/w3 renamed
    gate/down/up_proj as mlx-lm names them), scales and biases too; per-module bits name the stack; config.json has
    the key names mlx-lm reads; read back under the checkpoint's names, every expert decodes to the codes quantize
    chose for it."""
    path = moe.written("mlx-int4-g64")
    config = json.loads((path / "config.json").read_text())
    block = "block_sparse_moe" if moe.model_type == "mixtral" else "mlp"
    assert config["quantization"][f"model.layers.1.{block}.switch_mlp.down_proj"]["bits"] == 6
    # transformers 5 saved num_local_experts and rope_parameters; mlx-lm reads num_experts and rope_theta
    assert config["num_experts"] == config["num_local_experts"] == 4
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        inner = 256 if moe.model_type == "mixtral" else 128  # Mixtral's experts are intermediate_size wide
        assert f.get_slice(f"model.layers.0.{block}.switch_mlp.up_proj.weight").get_shape() == [4, inner, 128 * 4 // 32]
        assert f.get_slice(f"model.layers.0.{block}.switch_mlp.down_proj.scales").get_shape() == [4, 128, inner // 64]
    assert not any(".experts." in n for n in names)
    reader = FORMATS["mlx"].reader(path, None)
    q = moe.quantized.outputs["mlx-int4-g64"]
    experts = [m for m in q.modules if ".experts." in m.name]
    assert len(experts) == 2 * 4 * 3
    for m in experts:
        enc = LayerFile(moe.store.local_path(q.layers[int(m.name.split(".")[2])])).encoded(m.name)
        got = reader.load([f"{m.name}.weight"])[f"{m.name}.weight"].numpy()
        assert np.array_equal(got, grid_named(m.grid).decode(enc)), m.name
    assert not moe.converted.files["mlx-int4-g64"].verification.mismatches


def test_experts_of_one_stack_with_different_bits_are_refused_at_plan_time(tmp_path: Path) -> None:
    from quantfab.pipelines.plan import plan
    from quantfab.tasks.errors import UserError

    r = load_recipe(RECIPE, ["outputs=[{mlx: int4}]", "model.source=synthetic://qwen3_moe?layers=2",
                             "quantize.overrides={'*.experts.0.up_proj': {bits: 8}}",
                             "calibration.source=synthetic://tokens", "validate.source=synthetic://tokens"])
    with pytest.raises(UserError, match=r"mlx: model.layers.0.mlp.switch_mlp.up_proj stacks .*'MLX4_G64_F32', "
                                        r"'MLX8_G64_F32'.*same bits"):
        plan(r, str(tmp_path / "store"))


@pytest.mark.mlx
def test_mlx_lm_loads_a_mixture_of_experts_and_computes_validates_logits(moe: MoEBuild, tmp_path: Path) -> None:
    """mlx-lm builds its SwitchGLU from the stacks (6-bit down_proj) and its logits equal validate's from our decode
    of the same folder within 1e-4 (float32)."""
    python = _mlx_python()
    ids = np.random.default_rng(0).integers(3, 500, size=(4, 32)).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "logits.npy"
    script = REPO / "bench" / "consumers" / "mlx_logits.py"
    done = subprocess.run([python, str(script), str(moe.written("mlx-int4-g64")), str(tmp_path / "ids.npy"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    block = "block_sparse_moe" if moe.model_type == "mixtral" else "mlp"
    assert report["layer0_bits"][f"{block}.switch_mlp.down_proj"] == 6
    assert report["layer0_bits"][f"{block}.switch_mlp.up_proj"] == 4
    reader = FORMATS["mlx"].reader(moe.written("mlx-int4-g64"), None)
    ours = forward_mod.logits(moe.folder.config(), reader, moe.folder.weights(), ids).numpy()
    theirs = np.load(out)
    assert np.abs(theirs - ours).max() < 1e-4, float(np.abs(theirs - ours).max())
