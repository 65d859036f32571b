"""convert: write each output format from the quantize stage's codes and the model's float tensors."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from quantfab.tasks.convert import FORMATS
from quantfab.tasks.download import materialize
from quantfab.tasks.manifests import ConvertManifest, FormatFile, ModelManifest, QuantizeManifest, weight_bytes
from quantfab.tasks.quantize.layer_file import LayerFile
from quantfab.tasks.store import Blob, Store


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

        out_name = fmt.output_name(o, name)
        work = Path(store.scratch()) / f"convert-{uuid.uuid4().hex}"
        work.mkdir()
        try:
            fmt.write(work / out_name, o, model_dir, planned, tensor_data, name)
            blobs = _put_tree(work, work / out_name, store)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        types: dict[str, int] = {}
        for t in planned:
            types[t.type_name] = types.get(t.type_name, 0) + 1
        fallbacks = [f"{m.name}: {m.note}" for m in (q.modules if q else []) if m.grid is None and "row length" in m.note]
        files[o.key] = FormatFile(output=o.key, path=out_name, files=blobs, tensor_types=types, fallbacks=fallbacks,
                                  bits_per_weight=round(weight_bytes(blobs) * 8 / model.parameters, 4))
    return ConvertManifest(files=files)


def _put_tree(root: Path, written: Path, store: Store) -> dict[str, Blob]:
    """Every file a format wrote (one file, or a folder's files), keyed by its path under ``root``."""
    paths = [written] if written.is_file() else sorted(p for p in written.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): store.put_file(p) for p in paths}
