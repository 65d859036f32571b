"""Load quantfab's gptq and awq checkpoints with transformers + gptqmodel on the CPU (a venv of its own).

Not CI: gptqmodel 7.6 pins numpy 2.2.6 and pulls optimum and torchao. For each folder it pushes an identity
matrix through every quantized Linear to read the weights the consumer's kernel uses, compares them with the
checkpoint decoded from the published layout, then compares logits with a float32 model holding those
decoded weights. The kernels compute in fp16/bf16, so agreement is to that precision; a wrong nibble order
or zero offset would show errors of order 1.

    /work/consumer-venv/bin/python bench/consumers/gptqmodel_loads.py FOLDER [FOLDER ...] [--torch-backend]

The venv (about 13 minutes here; nothing compiles, gptqmodel builds kernels on first use):

    python3.11 -m venv /work/consumer-venv && cd /work/consumer-venv
    bin/pip install torch==2.13.0
    bin/pip install torch==2.13.0 transformers==5.23.0 safetensors accelerate
    bin/pip install torch==2.13.0 transformers==5.23.0 gptqmodel==7.6.0 optimum==2.3.0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import load_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned codes from int32 words, element k of a word at bit bits * k, laid out along ``axis``."""
    per = 32 // bits
    w = np.moveaxis(words.view(np.uint32), axis, -1)
    codes = (w[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & np.uint32((1 << bits) - 1)
    return np.moveaxis(codes.reshape(*w.shape[:-1], -1).astype(np.int64), -1, axis)


def decode(qc: dict, t: dict[str, np.ndarray]) -> np.ndarray:
    """(out, in) float32 weight from the published GPTQ v1 / AWQ GEMM layouts."""
    bits, group = int(qc["bits"]), int(qc["group_size"])
    scales = t["scales"].astype(np.float32)
    if qc["quant_method"] == "gptq":
        q, zeros, g = unpack(t["qweight"], bits, 0), unpack(t["qzeros"], bits, 1) + 1, t["g_idx"].astype(np.int64)
        return (scales[g] * (q - zeros[g])).T
    q, zeros = unpack(t["qweight"], 4, 1), unpack(t["qzeros"], 4, 1)
    inverse = np.argsort(AWQ_ORDER)
    q = q.reshape(q.shape[0], -1, 8)[..., inverse].reshape(q.shape)
    zeros = zeros.reshape(zeros.shape[0], -1, 8)[..., inverse].reshape(zeros.shape)
    return (np.repeat(scales, group, 0) * (q - np.repeat(zeros, group, 0))).T


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    for folder in folders:
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        stored = load_file(str(folder / "model.safetensors"))
        modules = sorted({k.rsplit(".", 1)[0] for k in stored if k.endswith(".qweight")})
        decoded = {m: decode(qc, {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(m + ".")})
                   for m in modules}
        kw = {}
        if "--torch-backend" in sys.argv and qc["quant_method"] == "gptq":
            kw["quantization_config"] = transformers.GPTQConfig(bits=int(qc["bits"]), backend="torch")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float16, **kw)
        kernel = type(model.get_submodule(modules[0])).__name__
        worst = 0.0
        for m in modules:
            with torch.no_grad():
                w = model.get_submodule(m)(torch.eye(decoded[m].shape[1], dtype=torch.float16)).float().T.numpy()
            worst = max(worst, float(np.abs(w - decoded[m]).max() / np.abs(decoded[m]).max()))
        reference = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder),
                                                                  dtype=torch.float32)
        state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in stored.items() if k.rsplit(".", 1)[1] not in
                 ("qweight", "qzeros", "scales", "g_idx")}
        state.update({f"{m}.weight": torch.from_numpy(w.astype(np.float32)) for m, w in decoded.items()})
        reference.load_state_dict(state, strict=False)
        reference.tie_weights()
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, reference.config.vocab_size, (4, 128)))
        with torch.no_grad():
            ours, theirs = reference(ids).logits, model(ids).logits.float()
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        print(f"{folder.name}: {len(modules)} Linears via {kernel}; weights max rel err {worst:.2e}; logits max abs "
              f"diff {(ours - theirs).abs().max().item():.3e} (max |logit| {ours.abs().max().item():.1f}); "
              f"argmax agreement {agree:.1%}", flush=True)


if __name__ == "__main__":
    main()
