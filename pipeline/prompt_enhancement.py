"""Prompt enhancement (the API's `prompt_enhancement: "on"`): a language model rewrites the prompt before it is
encoded, and the rewrite is what the image is generated from.

Which language model: `--enhancer-model` (a local instruction-tuned causal LM folder with its tokenizer), else the
served model's own text encoder: klein's Qwen3 is a causal LM, prompted with a system message written for image
prompts; FLUX.2 dev's Mistral 3 vision-language encoder rewrites through diffusers' caption upsampling
(`upsample_prompt`), which also looks at the reference images of an edit.

A rewrite is sampled with the job's first seed, so the same prompt, seed and references always give the same
rewrite; rewrites are kept in an LRU cache keyed by those and the model. A rewrite that comes back empty, or too long
for the text encoder (`MAX_SEQUENCE_LENGTH` tokens), falls back to the original prompt with a warning."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from .internals import execution_device
from .jobs import GenerationJob
from .loader import LoadedModel
from .lru import LRU
from .prompts import MAX_SEQUENCE_LENGTH, measure_prompt

log = logging.getLogger("flux2.enhance")

DEFAULT_MAX_NEW_TOKENS = 300
TEMPERATURE = 0.7  # klein and --enhancer-model; dev's caption upsampling uses diffusers' own 0.15
DEV_TEMPERATURE = 0.15
_THINKING = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


class EnhancerError(ValueError):
    """An --enhancer-model that cannot rewrite prompts; the message says why."""


@dataclass(frozen=True)
class Rewrite:
    prompt: str  # what the text encoder gets: the rewrite, or the original prompt
    warnings: tuple[str, ...] = ()


class PromptEnhancer:
    """Rewrites the prompts of the jobs that ask for it, on the engine's worker (it needs the loaded model)."""

    def __init__(
        self, model_path: str | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_entries: int = 1024
    ):
        self.model_path = model_path
        self.max_new_tokens = max_new_tokens
        self._cache: LRU[tuple[str, str, int, tuple[bytes, ...]], str] = LRU(max_entries)
        self._external: tuple[Any, Any] | None = None  # (causal LM, tokenizer) of --enhancer-model, once loaded

    @property
    def hits(self) -> int:
        return self._cache.hits

    @property
    def misses(self) -> int:
        return self._cache.misses

    def rewrite(self, model: LoadedModel, job: GenerationJob) -> Rewrite:
        if not job.enhance_prompt:
            return Rewrite(job.prompt)
        key = (self.model_path or str(model.spec.path), job.prompt, job.seeds[0], job.reference_digests)
        text = self._cache.get(key)
        if text is None:
            try:
                text = self._generate(model, job)
            except torch.OutOfMemoryError:
                raise  # the engine's: it splits the batch and tries again
            except Exception:  # a rewrite that fails costs its own request the rewrite, not the batch its images
                log.exception("prompt enhancement failed")
                return _fallback(job.prompt, "the prompt enhancer failed (the server's log says why)")
            self._cache.put(key, text)
        return self._checked(model, job.prompt, text)

    def _checked(self, model: LoadedModel, prompt: str, text: str) -> Rewrite:
        """The rewrite if the text encoder can read all of it; else the original prompt, with a warning."""
        rewrite = clean_rewrite(text)
        if not rewrite:
            return _fallback(prompt, "the rewrite came back empty")
        if measure_prompt(model.pipe, model.spec.family, rewrite).truncated:
            return _fallback(prompt, f"the rewrite was longer than the text encoder's {MAX_SEQUENCE_LENGTH} tokens")
        return Rewrite(rewrite)

    def _generate(self, model: LoadedModel, job: GenerationJob) -> str:
        if self.max_new_tokens <= 0:
            return ""  # nothing may be generated: the rewrite is empty (and falls back)
        pipe: Any = model.pipe
        device = execution_device(pipe)
        with torch.inference_mode(), torch.random.fork_rng(devices=_cuda_devices(device)):
            torch.manual_seed(job.seeds[0])
            if self.model_path is None and model.spec.family == "dev":
                images = [list(job.references)] if job.references else None
                rewritten: list[str] = pipe.upsample_prompt(
                    job.prompt, images=images, temperature=DEV_TEMPERATURE, device=device
                )
                return rewritten[0]
            lm, tokenizer = (
                self._external_model(device, pipe) if self.model_path else (pipe.text_encoder, pipe.tokenizer)
            )
            return _chat_generate(lm, tokenizer, system_message(bool(job.references)), job.prompt, self.max_new_tokens)

    def _external_model(self, device: torch.device, pipe: Any) -> tuple[Any, Any]:
        if self._external is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = str(self.model_path)
            log.info("loading the prompt enhancer %s", path)
            lm: Any = AutoModelForCausalLM.from_pretrained(path, dtype=pipe.text_encoder.dtype)
            self._external = (lm.to(device).eval(), AutoTokenizer.from_pretrained(path))
        return self._external


def check_enhancer_model(path: str) -> None:
    """At start, an --enhancer-model that is not a causal language model's folder (or a cached hub id) is a
    EnhancerError naming it, not a failure of every request that asks for a rewrite."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EnhancerError(
            f"--enhancer-model {path}: not a language model's folder (no usable config.json: {exc})"
        ) from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise EnhancerError(
            f"--enhancer-model {path}: a {config.model_type} model, not a causal language model that writes text"
        )


def system_message(edit: bool) -> str:
    """The FLUX.2 authors' own system messages for prompt upsampling (text to image, or an edit instruction)."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE_UPSAMPLING_I2I, SYSTEM_MESSAGE_UPSAMPLING_T2I

    return SYSTEM_MESSAGE_UPSAMPLING_I2I if edit else SYSTEM_MESSAGE_UPSAMPLING_T2I


def clean_rewrite(text: str) -> str:
    """The rewrite without a reasoning block, surrounding whitespace or quotes."""
    text = _THINKING.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _chat_generate(lm: Any, tokenizer: Any, system: str, prompt: str, max_new_tokens: int) -> str:
    """Sample a reply (the global generator, seeded by the caller) with the tokenizer's chat template if it has one,
    else a plain instruction template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    else:
        text = f"{system}\n\nPrompt: {prompt}\nRewritten prompt:"
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(lm.device)
    eos = tokenizer.eos_token_id
    output = lm.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=TEMPERATURE,
        top_p=0.95,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True))


def _fallback(prompt: str, why: str) -> Rewrite:
    message = f"prompt_enhancement: {why}; the original prompt was used."
    log.warning(message)
    return Rewrite(prompt, (message,))


def _cuda_devices(device: torch.device) -> list[torch.device]:
    return [device] if torch.device(device).type == "cuda" else []
