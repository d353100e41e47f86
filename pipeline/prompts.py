"""What the text encoder makes of a prompt: its token count, and whether (and where) it is truncated.

The pipelines wrap the prompt in the model's chat template and cut the result at `max_sequence_length` (512)
tokens without a word; this module measures the same thing, so the server can report real token counts and say
when a prompt was cut."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .internals import Flux2Pipe

MAX_SEQUENCE_LENGTH = 512


@dataclass(frozen=True)
class PromptTokens:
    text_tokens: int  # the prompt's own tokens that reach the encoder
    truncated: bool
    used_prompt: str  # the part of the prompt the model actually sees


def measure_prompt(pipe: Flux2Pipe, family: str, prompt: str, max_length: int = MAX_SEQUENCE_LENGTH) -> PromptTokens:
    tokenizer = pipe.tokenizer.tokenizer if family == "dev" else pipe.tokenizer
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    templated = _templated_length(pipe, family, prompt)
    if templated <= max_length:
        return PromptTokens(text_tokens=len(prompt_ids), truncated=False, used_prompt=prompt)
    room = max(0, len(prompt_ids) - (templated - max_length))
    used = tokenizer.decode(prompt_ids[:room], skip_special_tokens=True)
    return PromptTokens(text_tokens=room, truncated=True, used_prompt=used)


def _templated_length(pipe: Flux2Pipe, family: str, prompt: str) -> int:
    """Tokens of the prompt as the pipeline sends it to its encoder, before padding and truncation."""
    if family == "dev":
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input(prompts=[prompt], system_message=pipe.system_message)
        ids = pipe.tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=True, return_dict=True
        )["input_ids"]
        return len(ids[0])
    text = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    return len(pipe.tokenizer(text)["input_ids"])
