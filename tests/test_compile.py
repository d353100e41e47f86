"""`--compile`: the transformer's repeated blocks compiled and warmed up at load (on the CPU with tiny weights
here); the images match the uncompiled server's for the same seed."""

from __future__ import annotations

import contextlib

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


def _small_image(pipe, steps: int, seed: int, **extra) -> np.ndarray:
    """One 64x64 image straight from the pipeline, as floats."""
    import torch

    output = pipe(
        prompt="a red kite",
        height=64,
        width=64,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **extra,
    )
    return np.asarray(output.images[0])


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
        return _small_image(pipe, steps=1, seed=5)

    eager = image()
    compilation.compile_transformer(pipe)
    compiled = image()
    install(pipe.transformer)  # other processors on every block: their guards fail, a recompile is due
    past_limit = image()
    torch._dynamo.reset()
    assert np.abs(compiled - eager).max() <= 2 / 255
    assert np.abs(past_limit - eager).max() <= 2 / 255  # our processors act as diffusers' own without a cache


def test_cached_reference_edits_reuse_one_compiled_graph_for_every_block():
    """`--compile --reference-cache on`: regional compilation compiles one block's code for all the blocks, so
    the number of compiled variants must not grow with the number of layers. Traced, a per-layer name or dict key
    is a guard (19 variants of the single-stream block for 6 layers, once; on an H200 the blocks hit the recompile
    limit and ran eager); the references reach the attention as tensors instead (pipeline/reference_cache.py).
    Here a transformer of 3 + 6 blocks and one of 6 + 12 compile as many variants of each block: a generation, a
    prefill and an edit step, each at most twice (torch compiles a first shape static, then dynamic)."""
    import torch
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from PIL import Image
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from pipeline import compilation
    from pipeline.reference_cache import ATTENTION_KWARG, install, prefill
    from pipeline.tiny_weights import build_tiny_pipeline

    references = [Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    variants = {}
    for double, single in ((3, 6), (6, 12)):
        torch._dynamo.reset()
        pipe = build_tiny_pipeline("klein")
        config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
        layers = {"num_layers": double, "num_single_layers": single}
        pipe.register_modules(transformer=Flux2Transformer2DModel(**{**config, **layers}))
        pipe.transformer.eval()
        pipe.set_progress_bar_config(disable=True)
        install(pipe.transformer)
        compilation.compile_transformer(pipe)

        def image(count: int, pipe=pipe) -> np.ndarray:
            with torch.inference_mode():
                if not count:
                    return _small_image(pipe, steps=2, seed=1)
                kv = prefill(pipe, [tuple(references[:count])], 1.0)
                return _small_image(pipe, steps=2, seed=1, attention_kwargs={ATTENTION_KWARG: kv})

        first = {count: image(count) for count in (0, 1, 4)}
        again = {count: image(count) for count in (4, 0, 1)}
        variants[double] = {
            name: len(_debug_get_cache_entry_list(type(blocks[0]).forward.__code__))
            for name, blocks in (
                ("double", pipe.transformer.transformer_blocks),
                ("single", pipe.transformer.single_transformer_blocks),
            )
        }
        for count in (0, 1, 4):  # the same seed gives the same image, run after run
            assert np.abs(first[count] - again[count]).max() <= 1 / 255
    torch._dynamo.reset()
    assert variants[3] == variants[6], variants
    assert max(variants[3].values()) <= 6, variants


def test_the_warm_up_compiles_what_cached_reference_edits_need():
    """`--compile --reference-cache on`: the warm-up at load also runs a cached-reference edit (batches of 1 and 2),
    whose prefill and steps are graphs of their own, so the first edits, with any number of references, compile
    nothing inside their request. Without it (the control) the same edits compile new graphs."""
    import torch
    from PIL import Image
    from torch._dynamo.utils import counters

    from pipeline import compilation
    from pipeline.reference_cache import ATTENTION_KWARG, install, prefill
    from pipeline.tiny_weights import build_tiny_pipeline

    sizes = [(112, 80), (80, 64), (96, 112)]  # tiny sizes whose token counts match no other dimension (duck sizing)

    def edit(pipe, references: int, batch: int) -> None:
        images = tuple(Image.new("RGB", sizes[i], (40 * i, 90, 200 - 30 * i)) for i in range(references))
        with torch.inference_mode():
            kv = prefill(pipe, [images] * batch, 1.0)
            pipe(
                prompt=[f"an edit {i}" for i in range(batch)], height=96, width=96, num_inference_steps=2,
                output_type="latent", attention_kwargs={ATTENTION_KWARG: kv},
            )  # fmt: skip

    compiled, warm_up_graphs = {}, {}
    for warm_references in (True, False):
        torch._dynamo.reset()
        pipe = build_tiny_pipeline("klein")
        pipe.set_progress_bar_config(disable=True)
        install(pipe.transformer)
        compilation.compile_transformer(pipe)
        start = counters["stats"]["unique_graphs"]
        compilation.warm_up(pipe, side=96, references=warm_references)
        before = counters["stats"]["unique_graphs"]
        warm_up_graphs[warm_references] = before - start
        for references, batch in ((1, 1), (3, 1), (2, 2)):
            edit(pipe, references, batch)
        compiled[warm_references] = counters["stats"]["unique_graphs"] - before
    torch._dynamo.reset()
    assert compiled[False] > 0  # the control: edits do compile graphs of their own
    assert compiled[True] == 0, compiled
    # The edits' graphs at load: a prefill and an edit step per block type, beside the generations' (batches of 1
    # and 2). With a graph break around the reference attention, the warm-up compiled 26 graphs instead of 10.
    assert warm_up_graphs[True] <= warm_up_graphs[False] + 6, warm_up_graphs


def test_the_vaes_group_norms_compile_to_a_few_graphs_and_decode_and_encode_the_same():
    """`--compile` also compiles the VAE's group norms (PyTorch's eager kernel gives each group one thread block:
    half of a 1024² decode on an H200). Their statistics: one compiled function for every norm, 4-D feature maps and
    the mid-block attention's transposed 3-D input, at any size, in two graphs (a batch of one and larger ones;
    `functional.group_norm` compiled as is made 7 here, past 8 a size runs eager). The decoder's pass over the
    values: a graph per feature-map size (positions), whatever the batch, up to `STATIC_POSITIONS` sizes, then
    eager. The encoder's norms (references, a masked edit's source) share the statistics' graphs and apply them
    eagerly: references of any size compile nothing once the decoder's graphs are there. The pixels are the eager
    decode's, the latents the eager encode's; with autograd on, a norm is the module's own."""
    import torch
    from torch._dynamo.utils import counters

    from pipeline import compilation
    from pipeline.decoding import decode
    from pipeline.tiny_weights import build_tiny_pipeline

    torch._dynamo.reset()
    pipe = build_tiny_pipeline("klein")
    generator = torch.Generator().manual_seed(3)
    shapes = ((1, 32, 8, 8), (2, 32, 8, 8), (3, 32, 8, 8), (1, 32, 12, 8), (2, 32, 10, 14))
    latents = {shape: torch.randn(shape, generator=generator) for shape in shapes}
    eager = {shape: [np.asarray(image, dtype=np.int16) for image in decode(pipe, x)] for shape, x in latents.items()}
    references = [torch.rand((1, 3, *size), generator=generator) * 2 - 1 for size in ((64, 48), (80, 96), (64, 48))]
    with torch.inference_mode():
        eager_latents = [pipe.vae.encode(pixels).latent_dist.mean for pixels in references]
    decoder_norms = [m for m in pipe.vae.decoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    encoder_norms = [m for m in pipe.vae.encoder.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert compilation.compile_vae_norms(pipe) == len(decoder_norms) + len(encoder_norms)
    assert decoder_norms and encoder_norms
    assert all("forward" in vars(norm) for norm in decoder_norms + encoder_norms)
    apply = decoder_norms[0].forward.args[2]
    new_graphs = []
    for shape, x in latents.items():
        start = counters["stats"]["unique_graphs"]
        for image, expected in zip(decode(pipe, x), eager[shape], strict=True):
            assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1, shape
        new_graphs.append(counters["stats"]["unique_graphs"] - start)
    # The first decode: the statistics' graph and one apply graph for each of the tiny decoder's 4 feature-map
    # sizes (compiled, not silently eager); a batch of 2: the statistics' batched graph; of 3: nothing new; a new
    # size: its first 2 feature-map sizes (6 in all), the rest eager; a third size: all eager.
    assert new_graphs == [5, 1, 0, 2, 0], new_graphs
    assert len(apply.positions) == compilation.STATIC_POSITIONS
    before = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for pixels, expected in zip(references, eager_latents, strict=True):
            torch.testing.assert_close(pipe.vae.encode(pixels).latent_dist.mean, expected, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == before  # the decoder's statistics graph served every reference
    norm = decoder_norms[0]
    again = counters["stats"]["unique_graphs"]
    with torch.inference_mode():  # as the decodes run: compiled (the statistics' graph serves a new shape)
        hidden = torch.randn(2, norm.num_channels, 8, 8, generator=generator)
        expected = torch.nn.functional.group_norm(hidden, norm.num_groups, norm.weight, norm.bias, norm.eps)
        assert torch.allclose(norm(hidden), expected, atol=1e-5)
    hidden = hidden.clone()
    assert torch.equal(norm(hidden), expected)  # autograd on: the module's own forward
    assert counters["stats"]["unique_graphs"] == again
    torch._dynamo.reset()


def test_the_steps_graphs_capture_around_the_compiled_blocks_without_compiling_anything_new():
    """`--compile` on CUDA captures the default size's steps as CUDA graphs at the warm-up (faked here): the capture
    pass and the replays run the blocks' graphs compiled by the warm-up's first pass (no recompile for the graphs'
    own input tensors), and a replayed generation is the compiled eager one."""
    import torch
    from fake_graphs import fake_capture
    from torch._dynamo.utils import counters

    from pipeline import compilation, transformer_graphs
    from pipeline.tiny_weights import build_tiny_pipeline

    def generation(graph: bool) -> torch.Tensor:
        with torch.inference_mode(), transformer_graphs.graphed(pipe) if graph else contextlib.nullcontext():
            return pipe(
                prompt=["a red kite"], height=96, width=96, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(4),
            ).images  # fmt: skip

    warm_up_graphs = {}
    for graphed in (False, True):
        torch._dynamo.reset()
        pipe = build_tiny_pipeline("klein")
        pipe.set_progress_bar_config(disable=True)
        if graphed:
            steps = transformer_graphs.install(pipe.transformer, fake_capture, free=lambda device: None)
        compilation.compile_pipeline(pipe)
        start = counters["stats"]["unique_graphs"]
        compilation.warm_up(pipe, side=96)
        warm_up_graphs[graphed] = counters["stats"]["unique_graphs"] - start
    assert steps.captures == 2
    before = counters["stats"]["unique_graphs"]
    replayed, replays = generation(True), steps.replays
    assert replays == 2 + 2 and torch.equal(replayed, generation(False))
    assert counters["stats"]["unique_graphs"] == before
    torch._dynamo.reset()
    assert warm_up_graphs[True] == warm_up_graphs[False] > 0, warm_up_graphs


def test_a_compile_that_fails_at_the_warm_up_is_undone_and_the_model_serves_eager(tiny_klein, monkeypatch, caplog):
    """torch.compile builds at the warm-up: a failure there (here Triton's, on a machine without a C compiler)
    leaves the model as the eager one: no compiled block or norm left, the CUDA graphs uninstalled, the placement
    saying so, one error line in the log, and the eager pipeline's images exactly."""
    import logging
    from dataclasses import replace

    import torch
    from diffusers import DiffusionPipeline

    import pipeline.loader as loader
    from pipeline import encoder_graphs, transformer_graphs
    from pipeline.compilation import group_norms
    from pipeline.placement import decide_placement
    from pipeline.weights import inspect_model

    def failing_warm_up(pipe, side):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore lines")

    monkeypatch.setattr(loader, "warm_up", failing_warm_up)
    placement = decide_placement(weight_params=1, cuda_available=False, compile=True, toolchain_missing="")
    placement = replace(placement, encoder_graphs=True, transformer_graphs=True)  # as on CUDA, to be taken back
    with caplog.at_level(logging.ERROR, logger="flux2.loader"):
        model = loader.load_model(inspect_model(tiny_klein), placement)
    pipe = model.pipe
    assert not (model.placement.compile or model.placement.encoder_graphs or model.placement.transformer_graphs)
    assert model.placement.reasons[-1] == (
        "compile: failed at load (RuntimeError: Failed to find C compiler. Please specify via CC environment "
        "variable.); off"
    )
    assert "--compile failed at the warm-up" in caplog.text and "serving uncompiled" in caplog.text
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in pipe.transformer.modules())
    assert not any("forward" in vars(norm) for norm in group_norms(pipe.vae.decoder) + group_norms(pipe.vae.encoder))
    assert transformer_graphs.installed(pipe.transformer) is None
    assert encoder_graphs.installed(pipe.text_encoder) is None
    assert "forward" not in vars(pipe.transformer) and "forward" not in vars(pipe.text_encoder)
    eager = DiffusionPipeline.from_pretrained(tiny_klein)
    eager.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        assert np.array_equal(_small_image(pipe, 2, 5), _small_image(eager, 2, 5))
