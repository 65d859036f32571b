"""convert: write each output format from the quantize stage's codes and the model's float tensors."""

from __future__ import annotations

import uuid
from pathlib import Path

from quantfab.tasks.convert import FORMATS
from quantfab.tasks.download import materialize
from quantfab.tasks.manifests import ConvertManifest, FormatFile, ModelManifest, QuantizeManifest
from quantfab.tasks.quantize.layer_file import LayerFile
from quantfab.tasks.store import Store


def convert(model: ModelManifest, quantized: QuantizeManifest, outputs: list, name: str, store: Store) -> ConvertManifest:
    model_dir = materialize(store, model.files)
    config, weights = model_dir.config(), model_dir.weights()
    files: dict[str, FormatFile] = {}
    for o in outputs:
        fmt = FORMATS[o.format]
        q = quantized.outputs.get(o.key)
        grids = {m.name: m.grid for m in q.modules} if q else {}
        planned = fmt.plan(o, config, weights.tensors, grids)

        layer_files = [LayerFile(store.local_path(b)) for b in q.layers] if q else []
        replaced = {k: i for i, lf in enumerate(layer_files) for k in lf.float_names()}

        def tensor_data(t, grids=grids, fmt=fmt, layer_files=layer_files, replaced=replaced):
            module = t.hf_name.removesuffix(".weight")
            if grids.get(module):
                return fmt.pack(t, layer_files[int(module.split(".")[2])].encoded(module))
            if t.hf_name in replaced:  # a float the method changed, e.g. an AWQ-scaled norm
                return fmt.float_tensor(t, layer_files[replaced[t.hf_name]].float(t.hf_name))
            return fmt.float_tensor(t, weights.load([t.hf_name])[t.hf_name].numpy())

        filename = f"{name}-{o.type}{fmt.extension}"
        path = Path(store.scratch()) / f"{uuid.uuid4().hex}-{filename}"
        try:
            fmt.write(path, o, model_dir, planned, tensor_data, name)
            blob = store.put_file(path)
        finally:
            path.unlink(missing_ok=True)
        types: dict[str, int] = {}
        for t in planned:
            types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
        fallbacks = [f"{m.name}: {m.note}" for m in (q.modules if q else []) if m.grid is None and "row length" in m.note]
        files[o.key] = FormatFile(output=o.key, filename=filename, blob=blob, tensor_types=types, fallbacks=fallbacks,
                                  bits_per_weight=round(blob.size * 8 / model.parameters, 4))
    return ConvertManifest(files=files)
