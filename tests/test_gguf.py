"""`--transformer-gguf`: a community-style GGUF file (BFL keys, Q8_0) written from the tiny transformer loads through
diffusers' FLUX.2 single-file converter, stays quantized, and serves an image close to the unquantized one; files
that are not GGUF, not FLUX.2 or another model's are refused at start."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from conftest import RunningServer, serve_refused
from engine_helpers import job
from gguf_files import write_gguf
from PIL import Image

from pipeline.engine import Engine
from pipeline.gguf_weights import GGUFError, check_gguf, read_gguf
from pipeline.model_choice import ModelChoice, ModelChoiceError, resolve_models
from pipeline.pool import ModelPool


@pytest.fixture(scope="module")
def tiny_gguf(tiny_klein, tmp_path_factory):
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_klein, subfolder="transformer")
    return write_gguf(transformer, tmp_path_factory.mktemp("gguf") / "tiny-klein-Q8_0.gguf")


def test_the_header_is_read_and_checked_against_the_folder(tiny_klein, tiny_gguf):
    file = read_gguf(tiny_gguf)
    config = json.loads((tiny_klein / "transformer" / "config.json").read_text())
    assert (file.double_blocks, file.single_blocks) == (config["num_layers"], config["num_single_layers"])
    assert 0 < file.largest_block_bytes < file.tensor_bytes < tiny_gguf.stat().st_size
    assert "GGUF" in check_gguf(file, tiny_klein)


def test_bad_files_are_refused(tiny_klein, tiny_gguf, tmp_path):
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(not_gguf)
    with pytest.raises(GGUFError, match="no file"):
        read_gguf(tmp_path / "missing.gguf")
    import gguf

    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), "sd")
    writer.add_tensor("model.diffusion_model.input_blocks.0.0.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"no FLUX\.2 transformer"):
        read_gguf(other)
    file = read_gguf(tiny_gguf)
    from dataclasses import replace

    with pytest.raises(GGUFError, match=r"has 8 double \+ 48 single blocks"):
        check_gguf(replace(file, double_blocks=8, single_blocks=48), tiny_klein)


def test_gguf_and_a_quantized_transformer_are_refused_together(tiny_klein, tiny_gguf):
    with pytest.raises(ModelChoiceError, match="choose one"):
        resolve_models(ModelChoice(sources=(str(tiny_klein),), transformer_gguf=tiny_gguf, quantize="transformer=int8"))


def test_a_gguf_transformer_loads_quantized_and_generates(tiny_klein, tiny_gguf):
    served = resolve_models(ModelChoice(sources=(str(tiny_klein),), transformer_gguf=tiny_gguf))
    config = served.configs[0]
    assert config.placement.transformer_file == tiny_gguf
    assert any("GGUF" in reason for reason in config.placement.reasons)
    engine = Engine(ModelPool([config]))
    engine.start()
    try:
        assert engine.wait_ready(120), engine.load_error
        transformer = engine.pool.get().pipe.transformer
        weight = transformer.transformer_blocks[0].attn.to_q.weight
        assert type(weight).__name__ == "GGUFParameter" and int(weight.quant_type) == 8  # Q8_0
        image = engine.submit(job(prompt="a lighthouse", size=64, seeds=(2,))).future.result(120).images[0]
        assert image.size == (64, 64)
    finally:
        engine.stop(10)


def test_the_server_serves_a_gguf_transformer_close_to_the_original(tiny_klein, tiny_gguf, client, tmp_path):
    from openai import OpenAI

    body = dict(
        prompt="a quiet bay", size="64x64", response_format="b64_json", extra_body={"seed": 7, "num_inference_steps": 2}
    )
    original = client.images.generate(**body).data[0].b64_json
    with RunningServer(["--model", str(tiny_klein), "--transformer-gguf", str(tiny_gguf)], tmp_path) as server:
        assert f"transformer: {tiny_gguf} (GGUF" in server.log()
        gguf_client = OpenAI(base_url=f"{server.base_url}/v1", api_key="k", max_retries=0, timeout=120)
        quantized = gguf_client.images.generate(**body).data[0].b64_json
    a, b = (
        np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"), np.float64)
        for data in (original, quantized)
    )
    # Q8_0 keeps ~8 bits per weight: the image is near the unquantized one, not identical.
    assert np.abs(a - b).mean() < 8.0


def test_the_server_refuses_a_gguf_without_the_model_it_belongs_to(tiny_klein, tmp_path):
    not_flux = tmp_path / "broken.gguf"
    not_flux.write_bytes(b"GGUF but not really")
    assert "is not a GGUF file" in serve_refused("--model", str(tiny_klein), "--transformer-gguf", str(not_flux))
