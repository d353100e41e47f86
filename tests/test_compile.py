"""`--compile`: the transformer's repeated blocks compiled and warmed up at load (on the CPU with tiny weights
here); the images match the uncompiled server's for the same seed."""

from __future__ import annotations

import httpx
import numpy as np
from conftest import RunningServer
from imaging import decode_b64


def _image(base_url: str, size: str) -> np.ndarray:
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        timeout=600,
        json={
            "prompt": "a red kite over the sea",
            "size": size,
            "seed": 11,
            "num_inference_steps": 2,
            "response_format": "b64_json",
        },
    )
    assert response.status_code == 200, response.text
    return np.asarray(decode_b64(response.json()["data"][0]["b64_json"]), dtype=np.int16)


def test_a_compiled_server_warms_up_at_start_and_makes_the_same_images(tiny_klein, tmp_path, server):
    with RunningServer(
        ["--model", str(tiny_klein), "--compile", "--output-dir", str(tmp_path / "out")],
        tmp_path,
    ) as compiled:
        log = compiled.log()
        assert "compile: the transformer's repeated blocks" in log
        assert "compiled and warmed up at 1024x1024" in log  # before /health said ready
        for size in ("64x64", "96x64"):  # the second size recompiles once (dynamic shapes)
            ours, theirs = _image(compiled.base_url, size), _image(server.base_url, size)
            assert ours.shape == theirs.shape
            assert np.abs(ours - theirs).max() <= 2, size  # compiled float math may move a pixel by 1-2/255


def test_the_compiled_vae_decoder_decodes_as_the_eager_one(tiny_klein):
    """On CUDA `--compile` also compiles the VAE decoder (channels-last first); the function is device-agnostic, so
    its compiled decode is checked here on the CPU at a small size against the eager decode of the same latents."""
    import torch
    from diffusers import DiffusionPipeline

    from pipeline.compilation import compile_vae_decoder
    from pipeline.decoding import decode

    pipe = DiffusionPipeline.from_pretrained(tiny_klein)
    latents = torch.randn(2, pipe.vae.config.latent_channels, 8, 12, generator=torch.Generator().manual_seed(3))
    eager = [np.asarray(image, dtype=np.int16) for image in decode(pipe, latents)]
    compile_vae_decoder(pipe)
    assert pipe.vae.decoder._compiled_call_impl is not None  # nn.Module.compile() was applied in place
    compiled = [np.asarray(image, dtype=np.int16) for image in decode(pipe, latents)]
    assert [image.shape for image in compiled] == [(64, 96, 3)] * 2
    assert max(int(np.abs(a - b).max()) for a, b in zip(eager, compiled, strict=True)) <= 2
