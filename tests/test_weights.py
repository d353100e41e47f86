"""Reading a diffusers folder: pipeline class, defaults, aliases, and the default-folder search."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.weights import FLEX_ALIAS, WeightsError, find_local_weights, inspect_model, resolve_weights


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_klein_distilled(tiny_klein):
    spec = inspect_model(tiny_klein)
    assert (spec.pipeline_class, spec.family, spec.is_distilled) == ("Flux2KleinPipeline", "klein", True)
    assert (spec.defaults.steps, spec.defaults.guidance_scale) == (4, 1.0)
    assert spec.aliases == (FLEX_ALIAS, "flux.2-klein")


def test_dev(tiny_dev):
    spec = inspect_model(tiny_dev)
    assert (spec.pipeline_class, spec.family) == ("Flux2Pipeline", "dev")
    assert (spec.defaults.steps, spec.defaults.guidance_scale) == (50, 4.0)
    assert spec.aliases == (FLEX_ALIAS, "flux.2-dev")


def test_klein_base_runs_real_cfg(tiny_klein, tmp_path):
    folder = shutil.copytree(tiny_klein, tmp_path / "base")
    _edit_json(folder / "model_index.json", is_distilled=False)
    spec = inspect_model(folder)
    assert not spec.is_distilled
    assert (spec.defaults.steps, spec.defaults.guidance_scale) == (50, 4.0)


@pytest.mark.parametrize("layers, label", [((5, 20), "4b"), ((8, 24), "9b")])
def test_real_klein_sizes_get_their_alias(tiny_klein, tmp_path, layers, label):
    folder = shutil.copytree(tiny_klein, tmp_path / label)
    _edit_json(folder / "transformer" / "config.json", num_layers=layers[0], num_single_layers=layers[1])
    assert f"flux.2-klein-{label}" in inspect_model(folder).aliases


def test_not_flux2_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(WeightsError, match="StableDiffusionPipeline"):
        inspect_model(tmp_path)
    with pytest.raises(WeightsError, match=r"model_index\.json"):
        inspect_model(tmp_path / "missing")


def test_resolve_local_folder_and_bad_names(tiny_klein, tmp_path):
    assert resolve_weights(str(tiny_klein)) == tiny_klein
    with pytest.raises(WeightsError):
        resolve_weights(str(tmp_path / "no-such-folder"))
    with pytest.raises(WeightsError):
        resolve_weights("not a hub id")


def test_hub_id_offline_without_cache_fails_cleanly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"black-forest-labs/FLUX\.2-klein-4B"):
        resolve_weights("black-forest-labs/FLUX.2-klein-4B")


def test_find_local_weights_prefers_real_folders_over_the_tiny_one(tiny_klein, tiny_dev, tmp_path):
    assert find_local_weights(tmp_path / "absent") is None
    assert find_local_weights(tmp_path) is None
    shutil.copytree(tiny_klein, tmp_path / "tiny-flux2-klein")
    assert find_local_weights(tmp_path).name == "tiny-flux2-klein"
    shutil.copytree(tiny_dev, tmp_path / "zz-my-dev")
    assert find_local_weights(tmp_path).name == "zz-my-dev"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{}")
    assert find_local_weights(tmp_path).name == "zz-my-dev"


def test_a_truncated_weights_file_stops_serve_with_one_line(tiny_klein, tmp_path):
    """A corrupt .safetensors (a copy cut short) ended `serve` in safetensors' traceback, even for a second model."""
    from conftest import serve_refused

    broken = shutil.copytree(tiny_klein, tmp_path / "broken")
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    refused = serve_refused("--model", f"good={tiny_klein}", "--model", f"bad={broken}")
    assert f"{weights} is not a readable safetensors file" in refused and "Traceback" not in refused


def test_weights_missing_from_the_files_fail_the_load_by_name(tiny_klein, tmp_path):
    """A config that names more layers than the files hold loaded with those weights left on the meta device, and
    every request then failed with a 500: the load fails instead, saying so."""
    from pipeline.loader import load_model
    from pipeline.model_choice import ModelChoice, resolve_models

    folder = shutil.copytree(tiny_klein, tmp_path / "deeper")
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "num_single_layers": config["num_single_layers"] + 1}))
    served = resolve_models(ModelChoice(sources=(str(folder),))).configs[0]
    with pytest.raises(WeightsError, match=r"the transformer's files lack \d+ of the weights its config names"):
        load_model(served.spec, served.placement)
