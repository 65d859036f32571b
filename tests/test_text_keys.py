"""calibrate and validate key on the bytes of the texts they read, not on their URLs: a calibration or evaluation
text edited in place reruns the stage that reads it (and only that one), and a text edited after the keys were
computed is refused instead of read under the old key."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from quantfab.pipelines.keys import cache_key, stage_inputs
from quantfab.pipelines.recipe_loading import load_recipe
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.errors import UserError
from quantfab.tasks.store import Store
from quantfab.tasks.texts import CHARS_PER_TOKEN_GUESS, text_digest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tinystories-656k-q4_0.yaml"  # calibration 64 x 256, validate 64 windows of 256


def _keys(recipe, store: Store, model) -> tuple[dict, dict]:
    up = {"download": model, "calibrate": None, "allocate": None, "quantize": None, "convert": None}
    return stage_inputs("calibrate", recipe, store.url, up), stage_inputs("validate", recipe, store.url, up)


def test_an_edited_text_reruns_the_stage_that_reads_it_and_a_late_edit_is_refused(data_dir: Path,
                                                                                  tmp_path: Path) -> None:
    calibration, evaluation = tmp_path / "calibration.txt", tmp_path / "evaluation.txt"
    shutil.copy(data_dir / "tinystories-valid-head.txt", calibration)
    shutil.copy(data_dir / "wikitext2-test.raw", evaluation)
    calibration.chmod(0o644)
    evaluation.chmod(0o644)
    recipe = load_recipe(RECIPE, [f"calibration.source={calibration}", f"validate.source={evaluation}"])
    store = Store(str(tmp_path / "store"))
    model = download_mod.download(recipe.model.source, None, recipe.model.include, False, store)
    cal, val = _keys(recipe, store, model)

    # The key is the sha256 of the bytes read: 4 x 64 x 255 calibration tokens, 64 x 255 evaluation tokens.
    assert cal["text_sha256"] == hashlib.sha256(calibration.read_bytes()[:4 * 64 * 255 * CHARS_PER_TOKEN_GUESS]).hexdigest()
    assert val["text_sha256"] == hashlib.sha256(evaluation.read_bytes()[:64 * 255 * CHARS_PER_TOKEN_GUESS]).hexdigest()

    # Text past what is read changes nothing.
    with calibration.open("a") as f:
        f.write("\nAn ending nobody reads.\n")
    assert _keys(recipe, store, model) == (cal, val)

    # An edit in what calibrate reads changes calibrate's key; validate's own inputs stay (it reruns only as
    # calibrate's new manifest flows down through quantize and convert).
    calibration.write_bytes(b"Twice" + calibration.read_bytes()[4:])
    cal_edited, val_same = _keys(recipe, store, model)
    assert cache_key("calibrate", cal_edited) != cache_key("calibrate", cal)
    assert cache_key("validate", val_same) == cache_key("validate", val)
    with pytest.raises(UserError, match=f"{calibration}: the text changed after this build's cache keys were computed"):
        calibrate_mod.calibration_tokens(model, str(calibration), 64, 256, 0, "text", store, cal["text_sha256"])

    # An edit of the evaluation text reruns validate; read under the old key it is refused.
    evaluation.write_bytes(evaluation.read_bytes().replace(b"the", b"a", 1))
    assert cache_key("validate", _keys(recipe, store, model)[1]) != cache_key("validate", val)
    with pytest.raises(UserError, match=f"{evaluation}: the text changed after this build's cache keys were computed"):
        validate_mod.eval_windows(model, recipe.validate_, store, val["text_sha256"])
    assert validate_mod.eval_windows(model, recipe.validate_, store, text_digest(str(evaluation), 64 * 255)).shape == (64, 256)


def test_synthetic_tokens_are_keyed_by_their_url_and_a_missing_text_is_named() -> None:
    assert text_digest("synthetic://tokens?seed=1", 1024) is None
    with pytest.raises(UserError, match="/nowhere/calibration.txt: no such text file"):
        text_digest("/nowhere/calibration.txt", 1024)
