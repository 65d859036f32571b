"""GGUF builds with an importance matrix: ours (calibrate -> quantize -> convert, imatrix: true) beside llama.cpp's own
(llama-imatrix on the same calibration text, then llama-quantize --imatrix), and both without one, side by side.

Both sides read one text file: the recipe's calibration text, less the characters the model's vocabulary has no
token for (llama-imatrix stops at those). Ours samples the recipe's windows from it; llama-imatrix takes as many
chunks of the same length. llama.cpp quantizes our F32 file. Every file is decoded by gguf-py and scored by one
forward on the recipe's validation windows (PPL, KL against fp32, top-1). Needs llama.cpp's tools
(bench/consumers/build_llama_cpp_tools.sh).

    python bench/imatrix_vs_llama_cpp.py --tools ../llama-cpp-tools [--types Q4_0,Q4_K_M] [--methods rtn,gptq]
        [--model DIR]   # another model with the recipe's tokenizer (bench/train_tinystories_256.py's)

A file type llama.cpp quantizes only with an importance matrix (IQ1_*, IQ2_*, IQ3_XXS/XS) is built with one only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert.gguf import GGUFFormat, GGUFOptions, GGUFTensors
from quantfab.tasks.convert.stage import convert
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UserError
from quantfab.tasks.quantize.stage import quantize
from quantfab.tasks.store import Store

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tinystories-656k-q4_0.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", type=Path, required=True, help="folder with llama-imatrix and llama-quantize")
    ap.add_argument("--types", default="Q4_0,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="model.source instead of the recipe's (a folder or URL)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["QUANTFAB_THREADS"] = str(args.threads)
    types = args.types.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        chosen = [f"model.source={args.model}"] if args.model else []
        base = load_recipe(RECIPE, [*chosen, "outputs=[{format: gguf, type: F32, imatrix: true}]"])
        model = download_mod.download(base.model.source, None, base.model.include, False, store)
        folder = materialize(store, model.files)
        text = Path(tmp) / "calibration.txt"
        kept = vocabulary_text(Path(base.calibration.source), folder.path / "tokenizer.json", text)
        cal = base.calibration
        print(f"calibration text: {kept * 100:.2f} % of {cal.source}'s characters have tokens; {cal.samples} x "
              f"{cal.seq_len} tokens", flush=True)
        overrides = [*chosen, f"calibration.source={text}"]
        config, weights = folder.config(), folder.weights()
        required = {t for t in types if needs_importance(t, config, weights.tensors)}
        files: dict[tuple[str, str, bool], Path] = {}

        def build(method: str, outputs: str) -> Any:
            r = load_recipe(RECIPE, [*overrides, f"quantize.method={method}", f"outputs={outputs}"])
            c = r.calibration
            calibration = calibrate_mod.calibrate(model, c.source, c.samples, c.seq_len, c.seed, c.text_field, "cpu",
                                                  store, True)
            return convert(model, quantize(model, calibration, r.quantize, r.outputs, "cpu", store), r.outputs,
                           r.name, store, calibration)

        f32 = build("rtn", "[{format: gguf, type: F32, imatrix: true}]").files["gguf-F32-imatrix"]
        source = materialize(store, f32.files).path / f32.path
        ours_imatrix = source.with_name(source.name.removesuffix(".gguf") + ".imatrix.gguf")
        theirs_imatrix = Path(tmp) / "llama-imatrix.gguf"
        run([args.tools / "llama-imatrix", "-m", source, "-f", text, "-c", cal.seq_len, "--chunks", cal.samples,
             "-o", theirs_imatrix, "-t", args.threads])
        print(f"importance matrices, ours against llama-imatrix's: {agreement(ours_imatrix, theirs_imatrix)}", flush=True)
        for t in types:
            for label, extra in (("", []), ("imatrix", ["--imatrix", theirs_imatrix]))[t in required:]:
                path = Path(tmp) / f"llama-cpp-{t}-{label}.gguf"
                run([args.tools / "llama-quantize", *extra, source, path, t, args.threads])
                files[(t, "llama.cpp (llama-imatrix)" if label else "llama.cpp", bool(label))] = path
        for method in args.methods.split(","):
            for imatrix in ([False, True] if method == "rtn" else [True]):
                built = [t for t in types if imatrix or t not in required]
                outputs = "[" + ", ".join(f"{{format: gguf, type: {t}, imatrix: {str(imatrix).lower()}}}"
                                          for t in built) + "]"
                done = build(method, outputs)
                for t in built:
                    f = done.files[GGUFOptions(type=t, imatrix=imatrix).key]
                    files[(t, f"quantfab {method}", imatrix)] = materialize(store, f.files).path / f.path
                print(f"quantfab {method}, imatrix {imatrix}: built", flush=True)
        ids = validate_mod.eval_windows(model, base.validate_, store)
        sources = {"fp32": weights, **{"|".join(map(str, k)): GGUFTensors(p, config) for k, p in files.items()}}
        metrics = validate_mod.compare(config, sources, ids, "cpu")
        print(f"model {base.model.source}: {model.parameters:,} parameters; FP32 PPL "
              f"{metrics['baseline_perplexity']:.2f} on {metrics['tokens']} tokens")
        print("\n| type | built by | imatrix | bits/weight | PPL | KL (nats/token) | top-1 |\n|---|---|---|---|---|---|---|")
        for t in types:
            for (tt, who, imatrix), path in files.items():
                if tt != t:
                    continue
                m = metrics["outputs"]["|".join(map(str, (tt, who, imatrix)))]
                bpw = path.stat().st_size * 8 / model.parameters
                print(f"| {t} | {who} | {'yes' if imatrix else 'no'} | {bpw:.3f} | {m['perplexity']:.2f} | "
                      f"{m['kl_divergence']:.5f} | {m['top1_agreement'] * 100:.2f} % |", flush=True)


def needs_importance(file_type: str, config, tensors) -> bool:
    """Whether llama.cpp refuses ``file_type`` on this model without an importance matrix (our plan does too)."""
    try:
        GGUFFormat().presets(GGUFOptions(type=file_type, imatrix=False), config, tensors)
    except UserError:
        return True
    return False


def vocabulary_text(source: Path, tokenizer: Path, out: Path) -> float:
    """``source`` without the characters no token of ``tokenizer`` spells; the share of characters kept."""
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    known = set("".join(vocab).replace("\u2581", " ")) | {"\n"}
    text = source.read_text(encoding="utf-8")
    kept = "".join(c for c in text if c in known)
    out.write_text(kept, encoding="utf-8")
    return len(kept) / max(len(text), 1)


def agreement(ours: Path, theirs: Path) -> str:
    """Cosine of each tensor's mean squared inputs between two imatrix files: min and median over the tensors."""
    def rows(path: Path) -> dict[str, np.ndarray]:
        t = {x.name: np.asarray(x.data, np.float64) for x in gguf.GGUFReader(path).tensors}
        return {n.removesuffix(".in_sum2"): t[n].reshape(-1) / t[n.removesuffix(".in_sum2") + ".counts"].reshape(-1)[0]
                for n in t if n.endswith(".in_sum2")}
    a, b = rows(ours), rows(theirs)
    if sorted(a) != sorted(b):
        return f"different tensors: {sorted(set(a) ^ set(b))[:4]}"
    cos = [float(a[n] @ b[n] / np.linalg.norm(a[n]) / np.linalg.norm(b[n])) for n in a]
    return f"{len(a)} tensors, cosine min {min(cos):.4f}, median {float(np.median(cos)):.4f}"


def run(command: list[Any]) -> None:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr[-1500:]}")


if __name__ == "__main__":
    main()
