"""The swapper on CPU tensors: where each component lives at each stage boundary, the order of moves and
prefetches, evicted weights failing loudly, and the same image from every forced plan as from the resident one
(in-process engines and one real server)."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import RunningServer
from engine_helpers import job, transformer_inputs
from fake_streams import fake_streams
from PIL import Image

from pipeline.component_sizes import measure_folder
from pipeline.engine import Engine
from pipeline.jobs import Preview
from pipeline.offload_plan import ComponentSizes, Working, plan_offload, spread
from pipeline.placement import decide_placement
from pipeline.pool import ModelConfig, ModelPool
from pipeline.swapping import Swapper
from pipeline.weights import inspect_model


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _pipe() -> SimpleNamespace:
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False))
    return SimpleNamespace(
        text_encoder=encoder,
        transformer=torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)),
        vae=torch.nn.Linear(16, 3),
    )


def _plan(pipe: SimpleNamespace, name: str, free: int, working: Working | None = None):
    sizes = ComponentSizes(
        transformer=_bytes(pipe.transformer), text_encoder=_bytes(pipe.text_encoder), vae=_bytes(pipe.vae)
    )
    return plan_offload(sizes, working or Working(0, 0, 0), free, force=name, transformer_blocks=2)


def test_transformer_resident_takes_turns_with_the_encoder_and_stays_across_cache_hits():
    pipe = _pipe()
    x = torch.randn(2, 16)
    expected = pipe.transformer(x)
    t, e = _bytes(pipe.transformer), _bytes(pipe.text_encoder)
    no_room = _bytes(pipe.vae) + _bytes(pipe.text_encoder)  # the encoder and the VAE fill the device: no prefetch
    swapper = Swapper(pipe, _plan(pipe, "transformer-resident", free=no_room), "cpu")
    assert swapper.where("transformer") == swapper.where("text_encoder") == "host"
    assert swapper.where("vae") == "device"
    with pytest.raises(RuntimeError):  # an evicted component fails loudly
        pipe.transformer(x)

    swapper.enter("encode")
    assert (swapper.where("text_encoder"), swapper.where("transformer")) == ("device", "host")
    pipe.text_encoder(torch.tensor([[1, 2]]))
    swapper.enter("denoise")
    assert (swapper.where("text_encoder"), swapper.where("transformer")) == ("host", "device")
    assert torch.equal(pipe.transformer(x), expected)
    swapper.enter("decode")
    swapper.enter("denoise")  # the next batch: every prompt cached, no encode stage
    swapper.enter("decode")
    swapper.enter("encode")  # a cache miss: the transformer steps out
    assert swapper.where("transformer") == "host"
    assert swapper.moves.events == [
        f"encode: load text_encoder ({e} bytes)",
        f"denoise: evict text_encoder ({e} bytes)",
        f"denoise: load transformer ({t} bytes)",
        f"encode: evict transformer ({t} bytes)",
        f"encode: load text_encoder ({e} bytes)",
    ]
    assert (swapper.moves.loads, swapper.moves.evictions) == (3, 2)


def test_encoder_swapped_never_moves_the_transformer_or_the_vae():
    pipe = _pipe()
    transformer_weight = pipe.transformer[0].weight
    swapper = Swapper(pipe, _plan(pipe, "encoder-swapped", free=10**9), "cpu")
    assert set(swapper.weights) == {"text_encoder"}
    for stage in ("encode", "denoise", "decode", "denoise", "decode"):
        swapper.enter(stage)
    assert pipe.transformer[0].weight is transformer_weight and transformer_weight.numel() == 16 * 16
    assert [event.split(" (")[0] for event in swapper.moves.events] == [
        "encode: load text_encoder",
        "denoise: evict text_encoder",
    ]


def test_the_transformer_is_prefetched_into_the_room_left_while_the_encoder_runs():
    pipe = _pipe()
    t, e, v = _bytes(pipe.transformer), _bytes(pipe.text_encoder), _bytes(pipe.vae)
    half_layer = 16 * 16 * 4 + 16 * 4  # room for the first layer (weight and bias) only
    plan = _plan(pipe, "transformer-resident", free=v + e + half_layer)
    swapper = Swapper(pipe, plan, "cpu")
    swapper.enter("encode")
    assert swapper.where("transformer") == "partial"
    assert swapper.moves.prefetched_bytes == half_layer
    assert swapper.moves.events[-1] == f"encode: prefetch transformer ({half_layer} bytes)"
    swapper.enter("denoise")
    assert swapper.moves.events[-1] == f"denoise: load transformer ({t - half_layer} bytes)"
    assert swapper.where("transformer") == "device"


def test_tied_weights_are_kept_once_and_stay_tied():
    encoder = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False))
    encoder[1].weight = encoder[0].weight  # (16, 8) both: an lm_head tied to the embeddings
    pipe = SimpleNamespace(text_encoder=encoder, transformer=torch.nn.Linear(4, 4), vae=torch.nn.Linear(4, 4))
    swapper = Swapper(pipe, _plan(pipe, "encoder-swapped", free=10**9), "cpu")
    weights = swapper.weights["text_encoder"]
    assert len(weights.host) == 1 and not weights.host[0].is_pinned()  # no CUDA here: nothing pinned
    swapper.enter("encode")
    assert encoder[1].weight is encoder[0].weight and encoder[0].weight.shape == (16, 8)


def _engine(folder, offload: str) -> Engine:
    components = measure_folder(folder, itemsize=4)
    placement = decide_placement(offload=offload, weight_params=1, cuda_available=False, components=components)
    engine = Engine(
        ModelPool([ModelConfig(name="tiny", spec=inspect_model(folder), placement=placement, weight_bytes=1)])
    )
    engine.start()
    assert engine.wait_ready(120), engine.load_error
    return engine


def _with_previews(engine: Engine, **fields):
    """A job's result, with its previews (decoded mid-denoise) collected."""
    previews: list[Preview] = []
    handle = engine.submit(job(**fields), lambda event: previews.append(event) if isinstance(event, Preview) else None)
    return handle.future.result(120), previews


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def resident_images(tiny_klein):
    engine = _engine(tiny_klein, "resident")
    try:
        first = engine.submit(job(prompt="a lighthouse", size=64, seeds=(3,))).future.result(120).images[0]
        again, previews = _with_previews(engine, prompt="a harbour", size=64, seeds=(4,), steps=4, partial_images=2)
        assert len(previews) == 2
        return _pixels(first), _pixels(again.images[0])
    finally:
        engine.stop(10)


@pytest.mark.parametrize("offload", ["encoder-swapped", "encoder-streamed", "transformer-resident", "block-streaming"])
def test_every_forced_plan_makes_the_resident_image(tiny_klein, resident_images, offload):
    engine = _engine(tiny_klein, offload)
    try:
        model = engine.pool.get()
        assert model.swapper is not None and model.swapper.plan.name == offload
        first = engine.submit(job(prompt="a lighthouse", size=64, seeds=(3,))).future.result(120).images[0]
        # A second batch with previews: the VAE decodes mid-denoise without evicting the transformer.
        again, previews = _with_previews(engine, prompt="a harbour", size=64, seeds=(4,), steps=4, partial_images=2)
        assert len(previews) == 2
        cached = engine.submit(job(prompt="a harbour", size=64, seeds=(4,), steps=4)).future.result(120)
        for image, expected in zip(
            (first, again.images[0], cached.images[0]), (*resident_images, resident_images[1]), strict=True
        ):
            assert np.abs(_pixels(image) - expected).max() <= 1
        events = model.swapper.moves.events
        assert not any(
            event.startswith("denoise: evict transformer") or "decode: evict transformer" in event for event in events
        )
        encodes = [event for event in events if event.startswith("encode: load text_encoder")]
        if offload in ("encoder-streamed", "block-streaming"):  # the encoder streams through diffusers' hooks
            assert model.swapper.where("text_encoder") == "streamed" and not events
            # Its layers stream but for those the room keeps (here, RAM: all but two, under encoder-streamed),
            # spread through the 27 the encode runs; the embedding streams.
            encoder = model.pipe.text_encoder
            part = next(part for part in model.swapper.plan.components if part.component == "text_encoder")
            assert part.resident_blocks == (25 if offload == "encoder-streamed" else 0)
            staying = set(spread(27, part.resident_blocks))
            for index, layer in enumerate(encoder.get_decoder().layers):
                linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
                assert all(hasattr(m, "_diffusers_hook") != (index in staying) for m in linears), index
            assert hasattr(encoder.get_decoder().embed_tokens, "_diffusers_hook")
        else:
            assert len(encodes) == 2  # two distinct prompts; the third request hit the prompt cache
        if offload == "block-streaming":  # the transformer streamed, but for the blocks the room holds (here, RAM:
            # all but two of its three): the middle one stays, the first and the last stream
            transformer = model.pipe.transformer
            assert model.swapper.where("transformer") == "streamed"
            assert model.swapper.plan.components[1].resident_blocks == 1
            hooked = [hasattr(b, "_diffusers_hook") for b in (*transformer.transformer_blocks,
                                                              *transformer.single_transformer_blocks)]  # fmt: skip
            assert hooked == [True, False, True]
    finally:
        engine.stop(10)


@pytest.mark.parametrize(
    ("offload", "line"),
    [
        ("transformer-resident", "offload plan: transformer: swapped"),
        ("encoder-streamed", "offload plan: text_encoder: streamed"),
    ],
)
def test_a_server_with_a_forced_plan_serves_the_resident_image(tiny_klein, client, tmp_path, offload, line):
    from openai import OpenAI

    body = dict(
        prompt="a quiet bay", size="64x64", response_format="b64_json", extra_body={"seed": 5, "num_inference_steps": 2}
    )
    expected = client.images.generate(**body).data[0].b64_json
    with RunningServer(["--model", str(tiny_klein), "--offload", offload], tmp_path) as server:
        log = server.log()
        assert f"offload plan: {offload} (forced" in log
        assert line in log and "simulated" in log
        swapped = OpenAI(base_url=f"{server.base_url}/v1", api_key="k", max_retries=0, timeout=120)
        got = swapped.images.generate(**body).data[0].b64_json
    import base64

    a = _pixels(Image.open(io.BytesIO(base64.b64decode(expected))))
    b = _pixels(Image.open(io.BytesIO(base64.b64decode(got))))
    assert np.abs(a - b).max() <= 1


def test_host_copies_are_packed_into_a_few_aligned_buffers(monkeypatch):
    """Swapped weights live in a few large host buffers (pinned on CUDA), not one allocation per weight: each copy
    equals its weight, starts at an aligned offset, and a weight larger than a buffer gets one of its own."""
    import torch

    from pipeline.swapping import HostArena

    monkeypatch.setattr(HostArena, "CHUNK_BYTES", 4096)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape, dtype in (
        ((10, 7), torch.float32), ((3,), torch.bfloat16), ((), torch.float32), ((40, 40), torch.float32),
        ((5, 5), torch.float16), ((100,), torch.bfloat16),
    )]  # fmt: skip
    arena = HostArena(pin=False)
    copies = [arena.copy_of(weight) for weight in weights]
    for weight, copy in zip(weights, copies, strict=True):
        assert copy.dtype == weight.dtype and copy.shape == weight.shape and copy.is_contiguous()
        assert torch.equal(copy, weight) and copy.data_ptr() != weight.data_ptr()
        assert (copy.data_ptr() - copy.untyped_storage().data_ptr()) % HostArena.ALIGN == 0
    # 280 + 6 + 4 bytes share the first buffer; the 6,400-byte weight gets its own; the last two share a third
    assert arena.allocations == 3 and arena.allocated_bytes == 4096 + 6400 + 4096
    assert len({copy.untyped_storage().data_ptr() for copy in copies}) == 3
    weights[0].add_(1)  # copies, not aliases
    assert not torch.equal(copies[0], weights[0])


def test_a_swapped_component_keeps_its_weights_in_shared_host_buffers(tiny_klein):
    from diffusers import DiffusionPipeline

    from pipeline.swapping import _Weights

    pipe = DiffusionPipeline.from_pretrained(tiny_klein)
    before = {name: param.detach().clone() for name, param in pipe.transformer.named_parameters()}
    weights = _Weights(pipe.transformer, torch.device("cpu"), pin=False)
    assert weights.host_allocations == 1  # the tiny transformer fits one buffer
    assert len({host.untyped_storage().data_ptr() for host in weights.host}) == 1
    names = [name for name, _ in pipe.transformer.named_parameters()]
    assert all(param.numel() == 0 for param in weights.params)  # evicted: placeholders until a stage loads them
    weights.load(None, None)
    for name, param in zip(names, weights.params, strict=True):
        assert torch.equal(param.data, before[name]), name


@pytest.mark.parametrize("weights", ["tiny_klein", "tiny_dev"])
def test_streaming_options_register_with_streams(weights, request, monkeypatch):
    """Under an 8 GiB cap on an H100, block streaming failed at start: diffusers' block level with
    `block_modules` (how the text encoder's layers, two levels down, used to be reached) registers a prefetch-order
    hook per level, and with CUDA streams the outer one tracks modules the inner one already tracks. A CPU has
    no streams, so diffusers' stream backend and pinning are faked here: the error is reproduced with the old
    options, and the options `stream_blocks` uses register with streams: one prefetch-order hook per component,
    every text-encoder weight in a group (the tied embedding and output head included)."""
    import diffusers.hooks.group_offloading as group_offloading
    from diffusers import DiffusionPipeline

    import pipeline.swapping as swapping
    from pipeline.swapping import stream_blocks

    fake_streams(monkeypatch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(swapping, "_settle", lambda modules, tensors, device: None)  # no CUDA to keep them on
    folder = request.getfixturevalue(weights)

    def fresh():
        return DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)

    old = fresh().text_encoder
    with pytest.raises(ValueError, match="layer_execution_tracker already exists"):
        group_offloading.apply_group_offloading(
            old, onload_device=torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1,
            use_stream=True, block_modules=["model", "language_model"],
        )  # fmt: skip

    pipe = fresh()
    stream_blocks(pipe.text_encoder, "cuda", text_encoder=True)
    stream_blocks(pipe.transformer, "cuda")
    for module in (pipe.text_encoder, pipe.transformer):
        registries = [sub._diffusers_hook for sub in module.modules() if hasattr(sub, "_diffusers_hook")]
        lazy = [r for r in registries if r.get_hook(group_offloading._LAZY_PREFETCH_GROUP_OFFLOADING) is not None]
        assert lazy == [module._diffusers_hook]  # one prefetch-order hook, on the component itself
        groups = [r.get_hook(group_offloading._GROUP_OFFLOADING) for r in registries]
        assert all(group is not None and group.group.stream is not None for group in groups[1:])
    # What diffusers does to every group-offloaded component when a LoRA loads (into the transformer): remove the
    # hooks and apply them again with the same options; with streams that must register as cleanly.
    group_offloading._maybe_remove_and_reapply_group_offloading(pipe.text_encoder)
    registries = [sub._diffusers_hook for sub in pipe.text_encoder.modules() if hasattr(sub, "_diffusers_hook")]
    lazy = [r for r in registries if r.get_hook(group_offloading._LAZY_PREFETCH_GROUP_OFFLOADING) is not None]
    assert lazy == [pipe.text_encoder._diffusers_hook]
    linears = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    assert linears and all(m._diffusers_hook.get_hook(group_offloading._GROUP_OFFLOADING) is not None for m in linears)
    blocks = pipe.transformer.transformer_blocks
    group = blocks[0]._diffusers_hook.get_hook(group_offloading._GROUP_OFFLOADING).group
    assert group.stream is not None
    # The onload device carries its index: diffusers reports it as the pipeline's execution device, and torch
    # 2.11's memory queries refuse a bare "cuda" (both streamed plans failed their first image on an H100).
    assert group.onload_device == torch.device("cuda", 0)


def test_streamed_weights_are_packed_into_host_buffers_that_diffusers_keeps_as_its_copies(tiny_klein, monkeypatch):
    """diffusers' group offloading with streams pins a host copy of every weight, one by one (torch's host allocator
    rounds each up to a power of two: up to twice the bytes, and slow); `stream_blocks` first packs the streamed
    weights into a few host buffers (pinned on a GPU), so diffusers finds them pinned and keeps them as its copies.
    Here (a CPU, streams faked) the buffers are not pinned and the faked pinning returns the tensor, as a real
    `pin_memory()` returns an already pinned one: every streamed weight of the text encoder and of the transformer
    is a view into one buffer, diffusers' host copy is that view, the values and the tie hold. (The resident blocks
    stay out of the buffers: `test_resident_blocks_stay_on_the_device_spread_evenly_and_the_rest_streams`.)"""
    import diffusers.hooks.group_offloading as group_offloading
    from diffusers import DiffusionPipeline

    import pipeline.swapping as swapping
    from pipeline.swapping import stream_blocks

    fake_streams(monkeypatch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(swapping, "_settle", lambda modules, tensors, device: None)  # no CUDA to keep them on
    pipe = DiffusionPipeline.from_pretrained(tiny_klein, dtype=torch.float32)
    encoder, transformer = pipe.text_encoder, pipe.transformer
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    tied = encoder.get_input_embeddings().weight is encoder.get_output_embeddings().weight
    stream_blocks(encoder, "cuda", text_encoder=True)
    stream_blocks(transformer, "cuda")

    def storages(module):
        return {p.untyped_storage().data_ptr() for p in [*module.parameters(), *module.buffers()]}

    # One buffer each for the whole (tiny) encoder and the transformer's blocks, not one allocation per weight (the
    # transformer's other parts stay on the device: `test_the_transformers_parts_outside_its_blocks_stay_...`).
    blocks = [transformer.transformer_blocks, transformer.single_transformer_blocks]
    assert len(storages(encoder)) == 1 and len(set().union(*(storages(b) for b in blocks))) == 1
    for module in (encoder, transformer):
        for sub in module.modules():
            hook = getattr(sub, "_diffusers_hook", None)
            group = hook.get_hook(group_offloading._GROUP_OFFLOADING) if hook is not None else None
            for param, host in group.group.cpu_param_dict.items() if group is not None else ():
                assert host.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    assert all(torch.equal(p, before[name]) for name, p in encoder.named_parameters())
    assert (encoder.get_input_embeddings().weight is encoder.get_output_embeddings().weight) == tied


def test_the_transformers_parts_outside_its_blocks_stay_on_the_device(monkeypatch, caplog):
    """diffusers' block-level offloading groups a module's parts outside its block lists (FLUX.2's embedders,
    modulations, final norm and projection: 0.4 GB for klein-4B, 1.6 GB for dev) without a stream: copied
    synchronously from pageable host memory at every forward and back at its end, at every denoising step.
    `stream_blocks` keeps them on the device instead: the group is emptied, nothing outside the blocks is offloaded
    after a forward (the blocks still are), the log says how much stays, and the output is the same."""
    import diffusers.hooks.group_offloading as group_offloading

    from pipeline.internals import top_level_offload_group
    from pipeline.swapping import stream_blocks
    from pipeline.tiny_weights import build_tiny_pipeline

    transformer = build_tiny_pipeline("klein").transformer
    inputs = transformer_inputs(transformer)
    with torch.inference_mode():
        before = transformer(**inputs)[0]
    outside = sum(
        p.numel() * p.element_size()
        for name, p in transformer.named_parameters()
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    )
    with caplog.at_level(logging.INFO, logger="flux2.swapping"):
        stream_blocks(transformer, "cpu")
    group = top_level_offload_group(transformer)
    assert group is not None and (group.modules, group.parameters, group.buffers) == ([], [], [])
    assert any(f"keeps {outside / 1024**3:.2f} GiB outside its blocks" in r.getMessage() for r in caplog.records)
    offloaded: list[torch.nn.Module] = []
    real_offload = group_offloading.ModuleGroup.offload_

    def offload(self):
        offloaded.extend(self.modules)
        return real_offload(self)

    monkeypatch.setattr(group_offloading.ModuleGroup, "offload_", offload)
    with torch.inference_mode():
        assert torch.equal(transformer(**inputs)[0], before)
    assert transformer.x_embedder not in offloaded and transformer.norm_out not in offloaded
    assert transformer.transformer_blocks[0] in offloaded


def test_resident_blocks_stay_on_the_device_spread_evenly_and_the_rest_streams():
    """`stream_blocks` with resident blocks: those (spread evenly through the blocks' order) get no offloading hook
    and go to the device; the others are streamed; the module's block lists are whole and in order again after;
    and the transformer computes what it did before."""
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    from pipeline.swapping import stream_blocks
    from pipeline.tiny_weights import build_tiny_pipeline

    assert spread(10, 2) == [2, 7] and spread(25, 6) == [2, 6, 10, 14, 18, 22] and spread(3, 0) == []
    assert spread(4, 9) == [0, 1, 2, 3]  # never more than there are
    transformer = build_tiny_pipeline("klein").transformer
    lists = (transformer.transformer_blocks, transformer.single_transformer_blocks)
    blocks = [block for blocks_of in lists for block in blocks_of]
    inputs = transformer_inputs(transformer)
    with torch.inference_mode():
        before = transformer(**inputs)[0]
    stream_blocks(transformer, "cpu", resident_blocks=1)
    assert (transformer.transformer_blocks, transformer.single_transformer_blocks) == lists
    assert [b for blocks_of in lists for b in blocks_of] == blocks

    def hooked(block):
        registry = getattr(block, "_diffusers_hook", None)
        return registry is not None and registry.get_hook(_GROUP_OFFLOADING) is not None

    assert [hooked(block) for block in blocks] == [True, False, True]
    with torch.inference_mode():
        assert torch.equal(transformer(**inputs)[0], before)
