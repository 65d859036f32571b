"""The package README is a Hub model card: YAML front matter for a quantized model, the source's license carried
over, and the build's provenance (issue #25). The flow's own card is checked in tests/test_flow.py."""

from __future__ import annotations

import yaml

from quantfab.tasks.manifests import CalibrationManifest, ConvertManifest, ModelManifest, QualityManifest
from quantfab.tasks.package import Provenance, model_card, source_front_matter
from quantfab.tasks.store import Blob

BLOB = Blob(digest="ab" * 32, size=1)
RECIPE = "name: x\noutputs:\n- format: mlx\n  type: int4\n- format: gguf\n  type: Q4_K_M\n"


def card(source: str, source_card: str = "", revision: str = "0123abcd") -> str:
    model = ModelManifest(source=source, revision=revision, files={}, model_type="llama", num_layers=2, parameters=10)
    quality = QualityManifest(report=BLOB, passed=True, table="| t |", failures=[])
    calibration = CalibrationManifest(tokens=Blob(digest="cd" * 32, size=2), stats=[], count=4096, source="text.txt")
    return model_card(model, ConvertManifest(files={}), quality, RECIPE,
                      Provenance("ef" * 32, "1.2.3", calibration, source_card),
                      {"protocol": {"tokens": 100, "windows": 2, "window": 51, "tokens_sha256": "12" * 32}})


def front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_hub_source_gives_its_id_and_its_license_and_the_first_outputs_library() -> None:
    source_card = "---\nlicense: other\nlicense_name: tongyi-qianwen\nlicense_link: https://x/LICENSE\ntags: [a]\n---\n# Q"
    got = front(card("hf://Qwen/Qwen3-30B-A3B", source_card))
    assert got == {"base_model": "Qwen/Qwen3-30B-A3B", "base_model_relation": "quantized", "quantized_by": "quantfab",
                   "library_name": "mlx", "tags": ["quantized", "quantfab", "gguf", "mlx"], "license": "other",
                   "license_name": "tongyi-qianwen", "license_link": "https://x/LICENSE"}


def test_the_provenance_names_every_digest_and_the_rebuild_command() -> None:
    text = card("hf://org/m", "---\nlicense: apache-2.0\n---\n")
    assert front(text)["license"] == "apache-2.0"
    assert "- Source: `hf://org/m` at revision `0123abcd`" in text
    assert f"- Recipe (below): sha256 `{'ef' * 32}`" in text
    assert f"- Calibration: 4,096 tokens from `text.txt`, token file sha256 `{'cd' * 32}`" in text
    assert f"- Evaluation: 100 scored tokens (2 windows of 51), token ids sha256 `{'12' * 32}`" in text
    assert "`quantfab run recipe.yaml --set model.revision=0123abcd` with quantfab 1.2.3" in text


def test_a_local_source_keeps_its_path_pins_no_revision_and_claims_no_license() -> None:
    text = card("/models/tiny", "# no front matter\nlicense: mit\n")
    got = front(text)
    assert got["base_model"] == "/models/tiny" and "license" not in got
    assert "`quantfab run recipe.yaml` with quantfab 1.2.3" in text


def test_a_malformed_source_card_is_ignored() -> None:
    assert source_front_matter("---\nlicense: [unclosed\n---\n") == {}
    assert source_front_matter("---\n- a list\n---\n") == {}
    assert source_front_matter("no front matter") == {}
