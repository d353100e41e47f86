"""Build tiny random-weight FLUX.2 folders with the real diffusers and transformers classes.

The folders load through `DiffusionPipeline.from_pretrained` exactly as real FLUX.2 weights do, so the whole
server runs end to end on a laptop CPU in well under a second per image. Their images are noise: the weights
are random. Everything is built offline and deterministically (fixed seed, deterministic tokenizer training).

Sizes are the real configs scaled down, keeping what the pipelines rely on:
- klein stacks Qwen3 hidden states (9, 18, 27) and dev stacks Mistral hidden states (10, 20, 30), so the text
  encoders keep that many layers, and the transformer's `joint_attention_dim` is 3 x the encoder's hidden size;
- the VAE's 32 latent channels packed in 2x2 patches give the transformer's 128 `in_channels`;
- `attention_head_dim` equals the sum of `axes_dims_rope` (four rope axes);
- the scheduler is configured like the real models (flow matching with dynamic shifting).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from tokenizers import Tokenizer
    from transformers import PixtralProcessor, PreTrainedTokenizerBase

Variant = Literal["klein", "dev"]
VARIANTS: tuple[Variant, ...] = ("klein", "dev")

_SEED = 0
_CORPUS = [
    "a photo of a cat on a red sofa in the sun",
    "a watercolor painting of mountains at night with stars",
    "make the sky blue and add a starry night to this image",
    "system user assistant",
]
_ENCODER_HIDDEN = 16
_JOINT_ATTENTION_DIM = 3 * _ENCODER_HIDDEN


def build_tiny_weights(out_dir: str | Path, variant: Variant = "klein") -> Path:
    """Write a tiny FLUX.2 `variant` ("klein" or "dev") diffusers folder to `out_dir` and return its path."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out = Path(out_dir)
    build_tiny_pipeline(variant).save_pretrained(out)
    return out


def build_tiny_pipeline(variant: Variant = "klein") -> Flux2KleinPipeline | Flux2Pipeline:
    """The tiny `variant` pipeline in memory (on the CPU, float32), the same one `build_tiny_weights` writes."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        return _build_klein() if variant == "klein" else _build_dev()


# The tiny transformer's keywords (both families; dev adds guidance embeddings), and klein's tiny Qwen3 text
# encoder's (27 layers: klein reads hidden states 9, 18 and 27), for builds that take configs (the test of the
# full-size build path, pipeline/architectures.py).
TINY_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=128,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_JOINT_ATTENTION_DIM,
    timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4),
)


def tiny_klein_encoder(vocab_size: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=_ENCODER_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=27,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )


def _transformer(guidance_embeds: bool) -> Flux2Transformer2DModel:
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

    # (diffusers' @register_to_config leaves its models' constructors untyped: the annotation types the result.)
    transformer: Flux2Transformer2DModel = Flux2Transformer2DModel(**TINY_TRANSFORMER, guidance_embeds=guidance_embeds)
    return transformer


def _vae() -> AutoencoderKLFlux2:
    from diffusers.models.autoencoders.autoencoder_kl_flux2 import AutoencoderKLFlux2

    # Four blocks: a VAE scale factor of 8, as in the real model.
    vae: AutoencoderKLFlux2 = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=32, norm_num_groups=4
    )
    return vae


def flow_match_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as the real FLUX.2 models configure it."""
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    scheduler: FlowMatchEulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return scheduler


def _byte_level_bpe(special_tokens: list[str], unk_token: str | None) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=unk_token))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The byte-level alphabet lets any text (any language, emoji) tokenize, as with the real tokenizers.
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    return bpe


def klein_tokenizer() -> PreTrainedTokenizerBase:
    """A small Qwen2 tokenizer with klein's special tokens and chat template (its ids index any Qwen3 vocab)."""
    # transformers 5 keeps this name as a lazy alias (of Qwen2Tokenizer) that its type stubs do not declare.
    from transformers import Qwen2TokenizerFast  # type: ignore[attr-defined]

    bpe = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], unk_token=None)
    tokenizer: PreTrainedTokenizerBase = Qwen2TokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def _build_klein() -> Flux2KleinPipeline:
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = klein_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**tiny_klein_encoder(len(tokenizer))))
    # The ignored arg-types, here and in _build_dev: diffusers annotates `scheduler` with a name from its lazy
    # namespace, which type checkers resolve to a dummy placeholder class, and dev's `tokenizer` as AutoProcessor.
    return Flux2KleinPipeline(
        scheduler=flow_match_scheduler(),  # type: ignore[arg-type]
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(guidance_embeds=False),
        is_distilled=True,
    )


def dev_tokenizer() -> PreTrainedTokenizerBase:
    """A small tokenizer with dev's special tokens and chat template (its ids index any Mistral vocab)."""
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "[IMG]",
        "[IMG_BREAK]",
        "[IMG_END]",
        "[INST]",
        "[/INST]",
        "[SYSTEM_PROMPT]",
        "[/SYSTEM_PROMPT]",
    ]
    bpe = _byte_level_bpe(specials, unk_token="<unk>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    # diffusers sends messages as lists of {"type": "text" | "image"} parts.
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[INST]{% endif %}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}[IMG]{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if m['role'] == 'system' %}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}[/INST]"
        "{% else %}{{ eos_token }}{% endif %}{% endfor %}"
    )
    return tokenizer


def dev_processor() -> PixtralProcessor:
    """`dev_tokenizer` in a small PixtralProcessor, as dev's tokenizer folder holds one (needs torchvision)."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    tokenizer = dev_tokenizer()
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(patch_size=16, size={"longest_edge": 64}),
        tokenizer=tokenizer,
        patch_size=16,
        spatial_merge_size=1,
        image_token="[IMG]",
        image_break_token="[IMG_BREAK]",
        image_end_token="[IMG_END]",
        chat_template=tokenizer.chat_template,
    )
    return processor


def _build_dev() -> Flux2Pipeline:
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    processor = dev_processor()
    tokenizer = processor.tokenizer
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=MistralConfig(
                vocab_size=len(tokenizer),
                hidden_size=_ENCODER_HIDDEN,
                intermediate_size=32,
                num_hidden_layers=30,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=1024,
            ),
            # transformers 4 takes head_dim; 5 derives the same 8 (hidden_size / heads) and its types lack the keyword.
            vision_config=PixtralVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,  # type: ignore[call-arg]
                num_attention_heads=2,
                head_dim=8,
                image_size=64,
                patch_size=16,
            ),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=1,
            vision_feature_layer=-1,
        )
    )
    return Flux2Pipeline(
        scheduler=flow_match_scheduler(),  # type: ignore[arg-type]
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=processor,  # type: ignore[arg-type]
        transformer=_transformer(guidance_embeds=True),
    )
