"""The whole DAG on the real TinyStories-656K model, on a real Prefect (ephemeral API)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from quantfab.pipelines.keys import recipe_digest
from quantfab.pipelines.quantize import LISTENERS, quantize
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks.convert.gguf import GGUFTensors
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import QualityGateFailed
from quantfab.tasks.quantize.grids import grid_named
from quantfab.tasks.quantize.layer_file import LayerFile
from quantfab.tasks.store import Store

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"
FAST = ["calibration.samples=16", "calibration.seq_len=128", "validate.tokens=4096", "validate.window=128"]
# nf4 has no GGUF grid. rtn and group write three file types; gptq takes the asymmetric Q4_1 path and the
# Q4_K_M mix (on this model's rows of 128 and 384 that is llama.cpp's Q5_0/Q8_0 fallback), awq Q4_0
# (test_methods covers both methods on both kinds of grid).
TYPES = {"rtn": ["Q8_0", "Q4_0", "Q4_1"], "group": ["Q8_0", "Q4_0", "Q4_1"], "gptq": ["Q4_1", "Q4_K_M"], "awq": ["Q4_0"]}
METHODS = list(TYPES)
# rtn's outputs go without an importance matrix (llama.cpp's plain rounding, from the weights alone); the others
# ship one, as GGUF outputs do by default


def gguf_key(method: str, file_type: str) -> str:
    return f"gguf-{file_type}" + ("-noimatrix" if method == "rtn" and file_type != "Q8_0" else "")


def gguf_file(method: str, file_type: str) -> str:
    return f"tinystories-656k-q4_0-{gguf_key(method, file_type).removeprefix('gguf-')}.gguf"
# a folder format through the whole flow (test_formats proves its consumers); g32: g128 is one group per row here
FOLDER_OUTPUTS = {"awq": "{format: compressed-tensors, type: int4, group_size: 32}"}


def run(overrides: list[str], store: Path) -> tuple[dict, dict[str, str]]:
    seen: dict[str, str] = {}
    listener = lambda stage, status, _s: seen.__setitem__(stage, status)  # noqa: E731
    LISTENERS.append(listener)
    try:
        return quantize(str(RECIPE), overrides, str(store)), seen
    finally:
        LISTENERS.remove(listener)


@pytest.fixture(scope="module")
def built(prefect_env, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One cold run per method into one store."""
    base = tmp_path_factory.mktemp("flow")
    out = {"store": base / "store"}
    for method in METHODS:
        dest = base / f"pkg-{method}"
        ggufs = [f"{{format: gguf, type: {t}, imatrix: false}}" if method == "rtn" else f"{{gguf: {t}}}"
                 for t in TYPES[method]]
        outputs = ", ".join(ggufs + ([FOLDER_OUTPUTS[method]] if method in FOLDER_OUTPUTS else []))
        overrides = [*FAST, f"outputs=[{outputs}]", f"quantize.method={method}", f"package.destination={dest}"]
        result, stages = run(overrides, out["store"])
        out[method] = {"result": result, "stages": stages, "dest": dest, "overrides": overrides}
    return out


@pytest.mark.parametrize("method", METHODS)
def test_package_published_and_gguf_decodes_to_the_quantizer_reconstruction(built: dict, method: str) -> None:
    b = built[method]
    assert b["stages"]["quantize"] == "ran" and b["stages"]["package"] == "ran"
    dest: Path = b["dest"]
    manifest = json.loads((dest / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (dest / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
    assert {f["path"] for f in manifest["files"]} >= {gguf_file(method, t) for t in TYPES[method]} | {
        "config.json", "tokenizer.json", "quality.json", "README.md"}
    assert not any("quantfab-staging" in p.name for p in dest.parent.iterdir())

    # Read back with gguf-py and compare with what the quantize stage produced, bit for bit.
    store = Store(str(built["store"]))
    recipe = load_recipe(RECIPE, b["overrides"])
    quant = _cached_quantize_manifest(store, recipe)
    model = materialize(store, _cached_model(store, recipe).files)
    config = model.config()
    embed = model.weights().load(["model.embed_tokens.weight"])["model.embed_tokens.weight"].numpy()
    q8_0 = grid_named("Q8_0")
    for qtype in TYPES[method]:
        reader = GGUFTensors(dest / gguf_file(method, qtype), config)
        types = dict(reader.types())
        assert types["output_norm.weight"] == "F32"
        # The tied embedding is llama.cpp's output head: Q6_K, which rows of 128 turn into Q8_0, rounded to nearest.
        assert types["token_embd.weight"] == "Q8_0"
        assert np.array_equal(reader.array("model.embed_tokens.weight"), q8_0.decode(q8_0.reference(embed)))
        q = quant.outputs[gguf_key(method, qtype)]
        expected_types = {"Q4_K_M": {"Q5_0", "Q8_0"}}.get(qtype, {qtype})
        assert {m.grid for m in q.modules} == expected_types
        for m in q.modules:
            assert types[reader.tmap.get_name(f"{m.name}.weight", try_suffixes=(".weight",))] == m.grid
            layer = int(m.name.split(".")[2])
            enc = LayerFile(store.local_path(q.layers[layer])).encoded(m.name)
            expected = grid_named(m.grid).decode(enc)
            got = reader.array(f"{m.name}.weight")
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), m.name
        for blob in q.layers:  # floats a method changed (AWQ's scaled norms) ship as changed, exactly
            layer_file = LayerFile(store.local_path(blob))
            for name in layer_file.float_names():
                assert np.array_equal(reader.array(name), layer_file.float(name)), name
    first = quant.outputs[gguf_key(method, TYPES[method][0])]
    assert any(LayerFile(store.local_path(b)).float_names() for b in first.layers) == (method == "awq")


def test_folder_format_is_published_whole_with_its_size(built: dict) -> None:
    dest: Path = built["awq"]["dest"]
    manifest = json.loads((dest / "manifest.json").read_text())
    ct = manifest["formats"]["compressed-tensors-int4-g32"]
    folder = "tinystories-656k-q4_0-int4-g32-ct"
    assert ct["path"] == folder
    assert {f["path"] for f in manifest["files"]} >= {f"{folder}/{n}" for n in ("config.json", "model.safetensors",
                                                                                 "tokenizer.json")}
    assert ct["weight_bytes"] == (dest / folder / "model.safetensors").stat().st_size
    report = json.loads((dest / "quality.json").read_text())["outputs"]["compressed-tensors-int4-g32"]
    assert report["bits_per_weight"] == ct["bits_per_weight"] and report["kl_divergence"] > 0
    card = (dest / "README.md").read_text()
    assert f"| {folder} | {ct['weight_bytes']:,} | {ct['bits_per_weight']:.3f} |" in card


def _cached(stage: str, store: Store, recipe, up: dict):
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    from quantfab.pipelines.keys import stage_inputs
    from quantfab.pipelines.keys import cache_key

    results = ResultStore(result_storage=LocalFileSystem(basepath=str(store.results_dir())), serializer=JSONSerializer())
    return results.read(cache_key(stage, stage_inputs(stage, recipe, store.url, up))).result


def _cached_model(store: Store, recipe):
    return _cached("download", store, recipe, {})


def _cached_quantize_manifest(store: Store, recipe):
    up = {"download": _cached_model(store, recipe)}
    up["calibrate"] = _cached("calibrate", store, recipe, up)
    up["allocate"] = _cached("allocate", store, recipe, up)
    return _cached("quantize", store, recipe, up)


def test_quality_report_has_every_metric_and_gate(built: dict) -> None:
    report = json.loads((built["group"]["dest"] / "quality.json").read_text())
    assert {k: v for k, v in report["protocol"].items() if k != "tokens_sha256"} == {"tokens": 32 * 127, "windows": 32,
                                                                                     "window": 128}
    for key in ("gguf-Q8_0", "gguf-Q4_0", "gguf-Q4_1"):
        m = report["outputs"][key]
        assert m["baseline_perplexity"] == report["baseline_perplexity"]
        assert 0 <= m["kl_divergence"] and 0 <= m["top1_agreement"] <= 1
        assert set(m["gates"]) == {"max_ppl_increase", "max_kl"}
        assert all(g["passed"] for g in m["gates"].values())
        assert 0 < m["kl_divergence_se"] < m["kl_divergence"] and 0 < m["top1_agreement_se"] < 0.05
        assert m["ln_ppl_ratio_se"] > 0 and m["ppl_increase"] == pytest.approx(np.expm1(m["ln_ppl_ratio"]), rel=1e-9)
        low, high = m["gates"]["max_kl"]["interval"]
        assert low < m["kl_divergence"] < high and m["gates"]["max_kl"]["judged_by"] == "estimate"
    table = (built["group"]["dest"] / "README.md").read_text()
    kl = report["outputs"]["gguf-Q4_0"]
    assert f"{kl['kl_divergence']:.5f} ± {kl['kl_divergence_se']:.2g}" in table
    q8, q4 = report["outputs"]["gguf-Q8_0"], report["outputs"]["gguf-Q4_0"]
    assert q8["kl_divergence"] < q4["kl_divergence"]  # 8 bits must beat 4
    errors = [r["relative_output_error"] for r in q4["modules"]]
    assert len(errors) == 14 and errors == sorted(errors, reverse=True) and errors[-1] > 0  # worst first
    assert {(r["method"], r["grid"]) for r in q4["modules"]} == {("group", "Q4_0")}


def test_the_model_card_has_the_hubs_front_matter_and_the_builds_provenance(built: dict) -> None:
    """The package README opens with YAML the Hub reads (base model, relation quantized, library, tags), lists
    the digests of the recipe, the calibration tokens and the evaluation tokens the build used, and shows the
    package's charts."""
    b = built["group"]
    card = (b["dest"] / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"].endswith("tinystories-656k") and front["base_model_relation"] == "quantized"
    assert front["quantized_by"] == "quantfab" and front["library_name"] == "gguf"
    assert {"quantized", "quantfab", "gguf"} <= set(front["tags"]) and "license" not in front  # the source has none
    store = Store(str(built["store"]))
    recipe = load_recipe(RECIPE, b["overrides"])
    up = {"download": _cached_model(store, recipe)}
    calibration = _cached("calibrate", store, recipe, up)
    report = json.loads((b["dest"] / "quality.json").read_text())
    assert f"Recipe (below): sha256 `{recipe_digest(recipe)}`" in card
    assert f"token file sha256 `{calibration.tokens.digest}`" in card
    assert f"token ids sha256 `{report['protocol']['tokens_sha256']}`" in card
    assert "quantfab run recipe.yaml" in card
    for chart in ("size-vs-kl", "gguf-Q4_0-module-error"):  # group reports every module's error
        assert (b["dest"] / "charts" / f"{chart}.png").read_bytes().startswith(b"\x89PNG")
        assert f"![{chart}](charts/{chart}.png)" in card


def test_rtn_gathers_no_statistics_unless_the_recipe_asks_for_the_module_report(built: dict, tmp_path: Path) -> None:
    """rtn quantizes from the weights alone: its calibrate stores token windows only and its modules carry no
    error; quantize.module_report: true gathers the statistics and reports every quantized Linear's error."""
    store = Store(str(built["store"]))
    b = built["rtn"]
    recipe = load_recipe(RECIPE, b["overrides"])
    assert _cached("calibrate", store, recipe, {"download": _cached_model(store, recipe)}).stats == []
    report = json.loads((b["dest"] / "quality.json").read_text())
    modules = report["outputs"]["gguf-Q4_0-noimatrix"]["modules"]
    assert len(modules) == 14 and all(r["relative_output_error"] is None for r in modules)
    dest = tmp_path / "reported"
    _, stages = run([*b["overrides"], "quantize.module_report=true", f"package.destination={dest}"], built["store"])
    # calibrate with statistics: the group build's record in this store; quantize runs again, with them
    assert stages["calibrate"] == "cached" and stages["quantize"] == "ran"
    modules = json.loads((dest / "quality.json").read_text())["outputs"]["gguf-Q4_0-noimatrix"]["modules"]
    assert len(modules) == 14 and all(r["relative_output_error"] > 0 for r in modules)


def test_rerun_in_a_new_process_hits_every_stage_without_running_bodies(built: dict, prefect_env) -> None:
    """A fresh interpreter whose stage implementations all raise still completes: every stage is a cache hit."""
    b = built["rtn"]
    code = (
        "import sys\n"
        "import quantfab.tasks.download as d, quantfab.tasks.calibrate as c, quantfab.tasks.validate as v\n"
        "import quantfab.tasks.package as p, quantfab.tasks.quantize.stage as q, quantfab.tasks.convert.stage as k\n"
        "import quantfab.tasks.quantize.allocate as a\n"
        "def boom(*a, **kw): raise SystemExit('a stage body executed')\n"
        "d.download = c.calibrate = v.validate = p.package = q.quantize = k.convert = a.allocate = boom\n"
        "from quantfab.pipelines.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    args = [sys.executable, "-c", code, "run", str(RECIPE), "--store", str(built["store"])]
    for o in b["overrides"]:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **prefect_env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("download", "calibrate", "allocate", "quantize", "convert", "validate", "package"):
        assert any(line.split()[:2] == [stage, "cached"] for line in proc.stderr.splitlines()), proc.stderr


def test_an_up_to_date_build_is_found_by_the_flows_keys_without_torch_or_prefect(built: dict, prefect_env) -> None:
    """`quantfab run` on an unchanged, published build answers from the store alone. The keys it finds are
    the ones the flow recorded, calibrate's included (group fits codes to XᵀX; gptq measures its own inputs, so its
    GGUF outputs' importance matrices read XᵀX's diagonal alone; rtn's outputs ship none: three calibrations, all
    recorded in this store), and neither torch, transformers nor Prefect is imported."""
    from quantfab.pipelines.uptodate import up_to_date
    from quantfab.tasks.builds import read_builds

    store = Store(str(built["store"]))
    keys = {}
    for method in ("rtn", "group", "gptq"):
        b = built[method]
        found = up_to_date(load_recipe(RECIPE, b["overrides"]), store)
        assert found is not None, method
        keys[method] = {stage: cached.key for stage, cached in found.items()}
        flow = [r for r in read_builds(store) if r.destination == str(b["dest"]) and r.status == "published"][-1]
        assert keys[method] == flow.results
    assert keys["group"]["download"] == keys["rtn"]["download"] == keys["gptq"]["download"]
    assert len({keys[m]["calibrate"] for m in ("rtn", "group", "gptq")}) == 3  # none, XᵀX, its diagonal
    assert up_to_date(load_recipe(RECIPE, [*built["gptq"]["overrides"], "validate.tokens=2048"]), store) is None

    code = ("import sys\nfrom quantfab.pipelines.cli import main\nrc = main(sys.argv[1:])\n"
            "print('imported:', sorted(m for m in ('torch', 'transformers', 'prefect') if m in sys.modules))\n"
            "sys.exit(rc)")
    args = [sys.executable, "-c", code, "run", str(RECIPE), "--store", str(built["store"])]
    for o in built["gptq"]["overrides"]:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **prefect_env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported: []" in proc.stdout and "up to date" in proc.stderr
    assert [line.split()[:2] for line in proc.stderr.splitlines()[1:8]] == [[s, "cached"] for s in keys["gptq"]]
    # plan too, of the build and of a change to it (the model's frozen config is memoized since the run): awq
    # reads the statistics, which group's calibrate record holds
    for more in ([], ["--set", "quantize.method=awq"]):
        proc = subprocess.run([*args[:3], "plan", *args[4:], *more], capture_output=True, text=True,
                              env={**os.environ, **prefect_env}, timeout=300)
        assert proc.returncode == 0 and "imported: []" in proc.stdout, proc.stdout + proc.stderr[-3000:]
        status = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.startswith("  ")
                  and line.split()[0] in keys["gptq"]}
        assert status == ({s: "hit" for s in keys["gptq"]} if not more else
                          {"download": "hit", "calibrate": "hit", "allocate": "hit",  # no budget: keyed on those
                           **{s: "miss" for s in list(keys["gptq"])[3:]}})


def test_changing_only_a_gate_reruns_only_validate_and_package(built: dict) -> None:
    b = built["group"]
    _, stages = run([*b["overrides"], "validate.gates.max_kl=0.5"], built["store"])
    assert stages == {"download": "cached", "calibrate": "cached", "allocate": "cached", "quantize": "cached",
                      "convert": "cached", "validate": "ran", "package": "ran"}


def test_a_new_revision_label_over_the_same_bytes_reruns_only_download_and_package(built: dict) -> None:
    """What a watch run does when an upstream's listing changed but its weights did not."""
    b = built["group"]
    result, stages = run([*b["overrides"], "model.revision=relabelled"], built["store"])
    assert stages == {"download": "ran", "calibrate": "cached", "allocate": "cached", "quantize": "cached",
                      "convert": "cached", "validate": "cached", "package": "ran"}
    assert json.loads((b["dest"] / "manifest.json").read_text())["source_revision"] == "relabelled"


def test_impossible_gate_fails_the_run_and_publishes_nothing(built: dict, tmp_path: Path) -> None:
    dest = tmp_path / "never"
    overrides = [*built["group"]["overrides"], f"package.destination={dest}", "validate.gates.max_kl=0"]
    with pytest.raises(QualityGateFailed) as exc:
        run(overrides, built["store"])
    assert "max_kl" in str(exc.value) and "| gguf-Q4_0 |" in exc.value.table
    assert not dest.exists()


def test_deleted_package_is_republished_not_trusted_from_cache(built: dict) -> None:
    b = built["rtn"]
    (b["dest"] / "manifest.json").unlink()
    _, stages = run(b["overrides"], built["store"])
    assert stages["validate"] == "cached" and stages["package"] == "ran"
    assert (b["dest"] / "manifest.json").is_file()
