"""No pickle by default anywhere: not in the weights, not in the tokenizer, not in calibration data.

Every case plants a booby-trapped file (unpickling it, or importing it, creates a marker file) where a
careless loader would run it, then runs the real `quantfab run` in-process. Each run is refused with exit
2 and a message naming the file, the marker never appears, and no pickled bytes reach the store.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from pathlib import Path

import pytest

from quantfab.pipelines.cli import main
from quantfab.tasks import synthetic

pytestmark = pytest.mark.slow
MODEL = "synthetic://llama?layers=2&hidden=64&intermediate=128&heads=2&kv_heads=1&vocab=512&seed=5"
RECIPE = """\
name: no-pickle
model: {{source: {model}, include: {include}}}
calibration: {{source: "{calibration}", samples: 4, seq_len: 64}}
quantize: {{method: rtn}}
outputs: [{{gguf: Q8_0}}]
validate: {{source: "synthetic://tokens?seed=2", tokens: 1024, window: 64, gates: {{max_kl: 1.0, min_top1: 0.0}}}}
package: {{destination: {out}}}
"""
DEFAULT_INCLUDE = '["*.safetensors", "*.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer_config.json"]'


class Trap:
    """Unpickling this touches ``marker``: the proof that something loaded a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def trapped_pickle(marker: Path) -> bytes:
    data = pickle.dumps({"input_ids": Trap(marker)}, protocol=4)
    pickle.loads(pickle.dumps(Trap(marker.with_name("self-check")), protocol=4))  # the trap does fire when loaded
    assert marker.with_name("self-check").exists()
    return data


def calibration_pickle(tmp: Path, marker: Path) -> tuple[str, str]:
    (tmp / "calibration.txt").write_bytes(trapped_pickle(marker))  # a pickle under a text file's name
    return str(tmp / "calibration.txt"), DEFAULT_INCLUDE


def calibration_torch_zip(tmp: Path, marker: Path) -> tuple[str, str]:
    with zipfile.ZipFile(tmp / "calibration.pt", "w") as z:  # torch.save's layout: a zip holding data.pkl
        z.writestr("archive/data.pkl", trapped_pickle(marker))
    return str(tmp / "calibration.pt"), DEFAULT_INCLUDE


def pickled_tokenizer(tmp: Path, marker: Path) -> tuple[str, str]:
    (tmp / "model" / "tokenizer.pkl").write_bytes(trapped_pickle(marker))
    return "synthetic://tokens?seed=1", '["*"]'


def remote_code_tokenizer(tmp: Path, marker: Path) -> tuple[str, str]:
    folder = tmp / "model"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="TrapTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_trap.TrapTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_trap.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass TrapTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (tmp / "story.txt").write_text("Once upon a time there was a little robot who liked to count the stars. " * 60)
    return str(tmp / "story.txt"), '["*"]'


CASES = {  # name -> (plant the trap, what the message names)
    "calibration text that is a pickle": (calibration_pickle, ["calibration.txt", "is a pickle, not text"]),
    "calibration file saved by torch.save": (calibration_torch_zip, ["calibration.pt", "zip archive"]),
    "tokenizer.pkl picked by model.include": (pickled_tokenizer, ["tokenizer.pkl", "picks pickle file"]),
    "tokenizer that needs remote code": (remote_code_tokenizer, ["tokenizer_config.json", "trust_remote_code"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nothing_is_unpickled_or_imported(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    plant, named = CASES[case]
    synthetic.write_model(MODEL, tmp_path / "model")
    marker = tmp_path / "TRAP-FIRED"
    calibration, include = plant(tmp_path, marker)
    trapped = {hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*")
               if p.suffix in (".pkl", ".pt") or p.name == "calibration.txt"}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tmp_path / "model", include=include, calibration=calibration, out=tmp_path / "out"))
    assert main(["run", str(recipe), "--store", str(tmp_path / "store")]) == 2
    message = capsys.readouterr().err.replace("\n", "")
    message = message[message.rindex("error: "):]
    for part in named:
        assert part in message, message
    assert not marker.exists(), "a planted pickle or module was run"
    blobs = {p.name for p in (tmp_path / "store").rglob("*") if p.is_file()}
    assert not {d[2:] for d in trapped} & blobs, "a pickle reached the store"
    assert not (tmp_path / "out").exists()
