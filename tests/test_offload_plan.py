"""The offload planner as a pure function over component sizes and free memory: every plan, forced plans, the
"does not fit" verdict, the start-up log lines, and the sizes read from a folder's safetensors headers."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.component_sizes import MeasuredSizes, measure_folder
from pipeline.offload_plan import (
    COMPONENTS,
    CONTEXT_BYTES,
    ComponentSizes,
    DoesNotFit,
    Working,
    estimate_working,
    plan_offload,
)
from pipeline.placement import PlacementError, count_weight_params, decide_placement
from pipeline.quantization import parse_quantization

GIB = 1024**3
# Round numbers shaped like klein-4B in bf16: transformer 7, encoder 8, VAE 0.25 GiB; 25 blocks, 36 layers.
SIZES = ComponentSizes(
    transformer=7 * GIB,
    text_encoder=8 * GIB,
    vae=GIB // 4,
    transformer_block=GIB // 4,
    text_encoder_layer=GIB // 5,
)
WORK = Working(encode=GIB, denoise=2 * GIB, decode=2 * GIB)
BLOCKS, LAYERS = 25, 36


def plan(free_gib: float, **kwargs):
    return plan_offload(
        SIZES,
        WORK,
        int(free_gib * GIB),
        transformer_blocks=BLOCKS,
        text_encoder_layers=LAYERS,
        **kwargs,
    )


def test_everything_resident_when_it_all_fits():
    chosen = plan(17.5)  # 15.25 weights + 2 working
    assert chosen.name == "resident"
    assert chosen.needed_bytes == SIZES.total + 2 * GIB
    assert {chosen.where(c) for c in COMPONENTS} == {"device"}
    assert chosen.swapped == () and chosen.streamed == ()


def test_encoder_swapped_when_the_encoder_alone_is_too_much():
    chosen = plan(17)  # transformer + VAE + encoder + its 1 GiB working = 16.25
    assert chosen.name == "encoder-swapped"
    assert chosen.needed_bytes == int(7.25 * GIB) + 9 * GIB
    assert chosen.swapped == ("text_encoder",)
    assert chosen.where("transformer") == "device" and chosen.where("vae") == "device"


def test_encoder_streamed_when_the_transformer_stays_and_the_encoder_streams_past_it():
    chosen = plan(11)  # transformer + VAE 7.25 + the streamed encoder: outside its layers 0.8 + two 0.2 + working 1
    assert chosen.name == "encoder-streamed"
    assert chosen.needed_bytes == int(7.25 * GIB) + 8 * GIB - 34 * (GIB // 5) + GIB
    assert chosen.swapped == () and chosen.streamed == ("text_encoder",)
    assert chosen.where("transformer") == "device" and chosen.where("vae") == "device"
    assert "streamed weight by weight only for prompts missing from the prompt-embedding cache" in chosen.lines()[1]
    # Without the encoder's layer count nothing can stream: the encoder and the transformer take turns.
    assert plan_offload(SIZES, WORK, 11 * GIB).name == "transformer-resident"
    with pytest.raises(DoesNotFit, match="layer count"):
        plan_offload(SIZES, WORK, 11 * GIB, force="encoder-streamed")
    forced = plan(80, force="encoder-streamed")
    assert forced.forced and forced.streamed == ("text_encoder",)


def test_encoder_streamed_keeps_the_layers_the_room_holds():
    """Under 11 GiB nothing is left once a 4 MP denoise's room (3 GiB beyond the 1024² one) is kept; under 14 GiB
    1.55 GiB is, which holds 7 of the 0.2 GiB layers: they stay on the device, the others stream."""
    part = next(part for part in plan(11).components if part.component == "text_encoder")
    assert part.resident_blocks == 0 and "stay on the device" not in part.why
    roomy = plan(14)
    assert roomy.name == "encoder-streamed"
    part = next(part for part in roomy.components if part.component == "text_encoder")
    assert part.resident_blocks == 7 and part.why.startswith("7 of its 36 layers stay on the device")
    streamed = 8 * GIB - 34 * (GIB // 5)
    assert part.device_bytes == streamed + 7 * (GIB // 5)
    assert roomy.needed_bytes == int(7.25 * GIB) + streamed + GIB + 7 * (GIB // 5) <= roomy.free_bytes


def test_transformer_resident_when_encoder_and_transformer_take_turns():
    chosen = plan(9.3)  # VAE + max(encoder 8 + 1, transformer 7 + 2) = 9.25; streaming the encoder needs 9.45
    assert chosen.name == "transformer-resident"
    assert chosen.needed_bytes == int(9.25 * GIB)
    assert set(chosen.swapped) == {"text_encoder", "transformer"}
    assert chosen.where("vae") == "device"  # previews, masks and decodes never evict the transformer


def test_block_streaming_streams_the_encoder_and_swaps_it_whole_only_when_its_layers_are_unknown():
    chosen = plan(9.25)  # encoder whole: 0.25 + 8 + 1 = 9.25 fits; the whole transformer (9.25) would too,
    assert chosen.name == "transformer-resident"  # so one step less:
    chosen = plan(9.2)
    assert chosen.name == "block-streaming"
    assert chosen.where("transformer") == "streamed" and chosen.where("text_encoder") == "streamed"
    roomy = ComponentSizes(transformer=12 * GIB, text_encoder=4 * GIB, vae=GIB // 4, transformer_block=GIB // 4)
    unknown = plan_offload(roomy, WORK, 9 * GIB, transformer_blocks=BLOCKS)
    assert unknown.name == "block-streaming"
    assert unknown.where("text_encoder") == "swapped" and unknown.where("transformer") == "streamed"
    # The transformer's part on the device: what is outside its blocks plus two blocks (running, prefetched).
    transformer = next(part for part in unknown.components if part.component == "transformer")
    assert transformer.device_bytes == 12 * GIB - 23 * (GIB // 4) and transformer.resident_blocks == 0


def test_block_streaming_keeps_as_many_blocks_as_the_room_holds():
    """What the streamed plan leaves free, less room for a 4 MP image's denoise (3x the 1024² denoise's working
    memory beyond the context), holds transformer blocks that never move, counted at the largest block's size."""
    sizes = ComponentSizes(
        transformer=12 * GIB, text_encoder=4 * GIB, vae=GIB // 4, transformer_block=GIB // 4,
        text_encoder_layer=GIB // 8,
    )  # fmt: skip
    streamed_transformer = 12 * GIB - 23 * (GIB // 4)  # outside the blocks + two blocks: 6.25 GiB
    needed = GIB // 4 + max(4 * GIB - 34 * (GIB // 8) + WORK.encode, streamed_transformer + WORK.denoise, WORK.decode)
    spare_for_4mp = 3 * (WORK.denoise - CONTEXT_BYTES)

    def at(free: int):
        return plan_offload(sizes, WORK, free, transformer_blocks=BLOCKS, text_encoder_layers=LAYERS)

    tight = at(needed + spare_for_4mp + GIB // 8)  # less than one block's room
    assert tight.name == "block-streaming" and tight.needed_bytes == needed
    part = next(part for part in tight.components if part.component == "transformer")
    assert part.resident_blocks == 0 and "25 blocks streamed" in part.why
    roomy = at(needed + spare_for_4mp + 6 * (GIB // 4) + GIB // 8)
    assert roomy.name == "block-streaming" and roomy.where("text_encoder") == "streamed"
    part = next(part for part in roomy.components if part.component == "transformer")
    assert part.resident_blocks == 6 and "6 of its 25 blocks stay on the device" in part.why
    assert part.device_bytes == streamed_transformer + 6 * (GIB // 4)
    assert roomy.needed_bytes == needed + 6 * (GIB // 4) <= roomy.free_bytes
    # Never all of them: streaming holds two blocks anyway (a plan with all of them is transformer-resident's).
    assert at(60 * GIB).name == "resident"
    forced = plan_offload(sizes, WORK, 60 * GIB, transformer_blocks=BLOCKS, text_encoder_layers=LAYERS,
                          force="block-streaming")  # fmt: skip
    assert next(p for p in forced.components if p.component == "transformer").resident_blocks == BLOCKS - 2


def test_block_streaming_streams_the_encoder_when_it_does_not_fit_whole():
    chosen = plan(5)
    assert chosen.name == "block-streaming"
    assert chosen.streamed == ("text_encoder", "transformer")
    encoder = next(part for part in chosen.components if part.component == "text_encoder")
    assert encoder.device_bytes == 8 * GIB - 34 * (GIB // 5)
    assert chosen.needed_bytes <= 5 * GIB


def test_nothing_fits_is_refused_with_the_numbers():
    with pytest.raises(
        DoesNotFit, match=r"does not fit: even block-streaming needs ~\d+\.\d\d GiB .* 2\.00 GiB is free"
    ):
        plan(2)
    # Without block counts, streaming is not on offer: the smallest is transformer-resident.
    with pytest.raises(DoesNotFit, match="even transformer-resident"):
        plan_offload(SIZES, WORK, 5 * GIB)


def test_a_forced_plan_is_kept_and_warned_about_when_it_may_not_fit():
    forced = plan(80, force="block-streaming")
    assert forced.name == "block-streaming" and forced.forced
    assert "forced" in forced.lines()[0] and "fits" in forced.lines()[0]
    tight = plan(10, force="resident")
    assert tight.name == "resident" and "MAY NOT FIT" in tight.lines()[0]
    with pytest.raises(DoesNotFit, match="block count"):
        plan_offload(SIZES, WORK, 80 * GIB, force="block-streaming")


def test_one_log_line_per_component_saying_where_bytes_and_why():
    lines = plan(9.3).lines()
    assert lines[0].startswith("offload plan: transformer-resident (auto: needs ~9.25 GiB, fits in 9.30 GiB free)")
    assert len(lines) == 1 + len(COMPONENTS)
    encoder, transformer, vae = lines[1:]
    assert encoder.startswith("offload plan: text_encoder: swapped (8.00 GiB on the device;")
    assert "prompt-embedding cache" in encoder
    assert transformer.startswith("offload plan: transformer: swapped (7.00 GiB")
    assert vae.startswith("offload plan: vae: device (0.25 GiB")


def test_without_a_prompt_cache_the_encoder_comes_in_for_every_batch():
    assert "every batch" in plan(17, prompt_cache=False).lines()[1]
    assert "every batch" not in plan(17, prompt_cache=True).lines()[1]


def test_working_memory_grows_with_the_size_and_the_batch():
    small, large = estimate_working(512 * 512), estimate_working(2048 * 2048)
    assert large.denoise > small.denoise and large.decode - CONTEXT_BYTES == 16 * (small.decode - CONTEXT_BYTES)
    assert estimate_working(batch=4).denoise > estimate_working(batch=1).denoise
    assert small.encode == large.encode  # the text is 512 tokens whatever the image


def test_measure_folder_reads_component_sizes_from_the_headers(tiny_klein):
    measured = measure_folder(tiny_klein, itemsize=2)
    sizes = measured.sizes
    assert sizes.total == count_weight_params(tiny_klein) * 2
    config = json.loads((tiny_klein / "transformer" / "config.json").read_text())
    assert measured.transformer_blocks == config["num_layers"] + config["num_single_layers"]
    encoder = json.loads((tiny_klein / "text_encoder" / "config.json").read_text())
    assert measured.text_encoder_layers == encoder["num_hidden_layers"]
    assert 0 < sizes.transformer_block < sizes.transformer and 0 < sizes.text_encoder_layer < sizes.text_encoder
    quantized = measure_folder(tiny_klein, itemsize=2, quantization=parse_quantization("transformer=int8"))
    assert quantized.sizes.transformer == sizes.transformer // 2
    assert quantized.sizes.text_encoder == sizes.text_encoder
    # Each block's bytes in the order they run: the double-stream blocks, then the single-stream ones (the
    # headers list them alphabetically, single first), the same as the modules' own.
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_klein, subfolder="transformer")
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert sizes.transformer_block_sizes == tuple(sum(p.numel() for p in b.parameters()) * 2 for b in blocks)
    assert sizes.transformer_block_sizes[0] != sizes.transformer_block_sizes[-1]
    assert quantized.sizes.transformer_block_sizes == tuple(size // 2 for size in sizes.transformer_block_sizes)


def test_resident_blocks_are_counted_by_their_own_sizes():
    """With each block's size known, the room holds the blocks `spread` picks by their bytes, not each at the
    largest block's: here 5 large double-stream blocks before 20 single-stream ones of half the size."""
    from pipeline.offload_plan import resident_blocks, spread

    each = (GIB // 2,) * 5 + (GIB // 4,) * 20
    sizes = ComponentSizes(
        transformer=8 * GIB, text_encoder=4 * GIB, vae=GIB // 4, transformer_block=GIB // 2,
        transformer_blocks_bytes=sum(each), transformer_block_sizes=each, text_encoder_layer=GIB // 8,
    )  # fmt: skip
    room = 3 * GIB
    kept = resident_blocks(room, each)
    assert kept > resident_blocks(room, (GIB // 2,) * 25) == 6
    assert sum(each[index] for index in spread(25, kept)) <= room < sum(each[index] for index in spread(25, kept + 1))
    chosen = plan_offload(sizes, WORK, 9 * GIB, transformer_blocks=25, text_encoder_layers=LAYERS)
    part = next(part for part in chosen.components if part.component == "transformer")
    assert chosen.name == "block-streaming" and part.resident_blocks > 0
    assert part.device_bytes == sizes.streamed_transformer(25) + sum(
        each[index] for index in spread(25, part.resident_blocks)
    )
    assert chosen.needed_bytes <= chosen.free_bytes


def _measured() -> MeasuredSizes:
    return MeasuredSizes(SIZES, BLOCKS, LAYERS, WORK)


def test_placement_plans_on_cuda_from_the_measured_sizes():
    placement = decide_placement(weight_params=1, cuda_available=True, cuda_free_bytes=11 * GIB, components=_measured())
    assert placement.offload == "encoder-streamed" and placement.plan is not None
    assert sum(reason.startswith("offload plan:") for reason in placement.reasons) == 4
    forced = decide_placement(
        offload="encoder-swapped",
        weight_params=1,
        cuda_available=True,
        cuda_free_bytes=80 * GIB,
        components=_measured(),
    )
    assert forced.offload == "encoder-swapped" and forced.plan is not None and forced.plan.forced
    # "none", the name before the planner, is resident; model and sequential stay diffusers' offloads.
    none = decide_placement(
        offload="none", weight_params=1, cuda_available=True, cuda_free_bytes=80 * GIB, components=_measured()
    )
    assert none.offload == "resident"
    model = decide_placement(offload="model", weight_params=1, cuda_available=True, components=_measured())
    assert model.offload == "model" and model.plan is None
    with pytest.raises(PlacementError, match="does not fit"):
        decide_placement(weight_params=1, cuda_available=True, cuda_free_bytes=2 * GIB, components=_measured())


def test_placement_on_the_cpu_simulates_a_forced_plan():
    placement = decide_placement(
        offload="transformer-resident", weight_params=1, cuda_available=False, components=_measured()
    )
    assert placement.device == "cpu" and placement.dtype == torch.float32
    assert placement.plan is not None and placement.plan.name == "transformer-resident"
    assert any("simulated" in reason for reason in placement.reasons)
    assert placement.reasons[-1].startswith("offload plan: vae: device")
    assert decide_placement(weight_params=1, cuda_available=False, components=_measured()).plan is None
    with pytest.raises(PlacementError, match="sizes"):
        decide_placement(offload="block-streaming", weight_params=1, cuda_available=False)


def test_quantized_components_are_never_swapped_whole():
    # A quantized text encoder: the plans that swap it are passed over; it is streamed instead.
    chosen = plan(11, quantized=("text_encoder",))
    assert chosen.name == "encoder-streamed" and chosen.where("text_encoder") == "streamed"
    chosen = plan(9.3, quantized=("text_encoder",))
    assert chosen.name == "block-streaming" and chosen.where("text_encoder") == "streamed"
    assert plan(17.5, quantized=("transformer", "text_encoder")).name == "resident"
    with pytest.raises(DoesNotFit, match="swaps the transformer, whose quantized weights"):
        plan(11, force="transformer-resident", quantized=("transformer",))
