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


def test_past_the_recompile_limit_the_blocks_run_eager_instead_of_failing(tiny_klein, monkeypatch):
    """What the compiled blocks see changes with more than sizes (attention processors, the reference cache's
    arguments): past the recompile limit a request must still succeed, eager, never fail (torch makes the limit a
    hard error under fullgraph=True)."""
    import torch
    from diffusers import DiffusionPipeline

    from pipeline import compilation
    from pipeline.reference_cache import install

    torch._dynamo.reset()  # counts from other tests' compiles of the same block code would leak in
    monkeypatch.setattr(compilation, "MAX_RECOMPILES", 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    pipe = DiffusionPipeline.from_pretrained(tiny_klein)
    pipe.set_progress_bar_config(disable=True)

    def image() -> np.ndarray:
        output = pipe(
            prompt="a red kite",
            height=64,
            width=64,
            num_inference_steps=1,
            generator=torch.Generator().manual_seed(5),
            output_type="np",
        )
        return np.asarray(output.images[0])

    eager = image()
    compilation.compile_transformer(pipe)
    compiled = image()
    install(pipe.transformer)  # other processors on every block: their guards fail, a recompile is due
    past_limit = image()
    torch._dynamo.reset()
    assert np.abs(compiled - eager).max() <= 2 / 255
    assert np.abs(past_limit - eager).max() <= 2 / 255  # our processors act as diffusers' own without a cache
