"""The options of `flux2-local serve`, each written once in `OPTIONS`: its name (--NAME on the command line,
FLUX2_NAME in the environment), type, help, and the field it sets in `Settings` (HTTP), `EngineOptions` (batching),
`ModelChoice` (models and placement) or `RayOptions` (scale-out on Ray Serve), with the unit conversion between
them. An option's default is its field's default, read from the dataclass. `serve_command` turns the table into the
typer command, and `read_options` turns what it parsed into those objects."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.attention import ATTENTION_CHOICES
from pipeline.engine import EngineOptions
from pipeline.model_choice import ModelChoice
from pipeline.placement import DEVICE_CHOICES, DTYPE_CHOICES, OFFLOAD_CHOICES, REFERENCE_CACHE_CHOICES
from pipeline.safety import parse_thresholds
from pipeline.sizes import MAX_OUTPUT_PIXELS, MEGAPIXEL

from .auth import load_keys
from .scaleout import RayOptions
from .settings import Settings


@dataclass(frozen=True)
class Unit:
    """How an option's value becomes its field's value (`into`), and how the field's default becomes the option's
    (`back`)."""

    into: Callable[[Any], Any]
    back: Callable[[Any], Any]


AS_IS = Unit(lambda value: value, lambda value: value)
REPEATED = Unit(lambda values: tuple(values or ()), lambda values: list(values) or None)  # a repeatable option
HOURS = Unit(lambda hours: hours * 3600, lambda seconds: seconds / 3600)
MILLISECONDS = Unit(lambda ms: ms / 1000, lambda seconds: seconds * 1000)
MEBIBYTES = Unit(lambda mb: mb * 1024**2, lambda size: size // 1024**2)
MILLIONS_OF_PIXELS = Unit(lambda mp: int(mp * 1e6), lambda pixels: pixels / 1e6)
COMMA_LIST = Unit(
    lambda text: tuple(p.strip() for p in (text or "").split(",") if p.strip()), lambda v: ",".join(v) or None
)


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        return parse_thresholds(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--safety-thresholds") from exc


THRESHOLDS = Unit(_thresholds, lambda values: ",".join(f"{value:g}" for value in values))
# Megapixels of 1024x1024, never above the product's ceiling.
OUTPUT_MEGAPIXELS = Unit(lambda mp: min(MAX_OUTPUT_PIXELS, int(mp * MEGAPIXEL)), lambda pixels: pixels / MEGAPIXEL)


@dataclass(frozen=True)
class Option:
    name: str  # the parameter's name: --max-steps on the command line, FLUX2_MAX_STEPS in the environment
    value_type: Any  # what the command line parses
    help: str
    feeds: type | None  # the dataclass whose field it sets; None: read apart (the API keys)
    field: str = ""  # that field's name, when not `name`
    unit: Unit = AS_IS
    choices: tuple[str, ...] = ()
    env_name: str = ""  # the environment variable after FLUX2_, when not NAME

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def envvar(self) -> str:
        return "FLUX2_" + (self.env_name or self.name.upper())

    @property
    def default(self) -> Any:
        if self.feeds is None:
            return None
        return self.unit.back(field_default(self.feeds, self.field or self.name))


def field_default(cls: type, name: str) -> Any:
    (found,) = [f for f in fields(cls) if f.name == name]
    if found.default is MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no plain default for the command line to show")
    return found.default


LOG_LEVELS = ("debug", "info", "warning", "error")
# Counts where 0 would serve nothing or half-work (--max-steps 0 refused explicit steps but ran the defaults).
AT_LEAST_ONE = frozenset({"max_steps", "max_batch_images"})


OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        Optional[list[str]],
        feeds=ModelChoice,
        field="sources",
        unit=REPEATED,
        help="A local diffusers folder (e.g. /models/FLUX.2-dev) or a Hugging Face hub id (fetched once, then "
        "read from the hub cache); NAME=PATH_OR_ID names it. Repeat to serve several models: the first is "
        "the default and loads at start, the others load on first use and are evicted least-recently-used "
        "when memory runs short. Default: the diffusers folder found in --weights-dir, else tiny random "
        "test weights built there on first start.",
    ),
    Option("host", str, feeds=Settings, help="Address to bind. Keep 127.0.0.1 unless you mean to serve your network."),
    Option("port", int, feeds=Settings, help="Port to listen on."),
    Option(
        "device",
        str,
        feeds=ModelChoice,
        choices=DEVICE_CHOICES,
        help="auto (CUDA when present, else CPU), cuda or cpu.",
    ),
    Option(
        "dtype",
        str,
        feeds=ModelChoice,
        choices=DTYPE_CHOICES,
        help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32.",
    ),
    Option(
        "offload",
        str,
        feeds=ModelChoice,
        choices=OFFLOAD_CHOICES,
        help="Where the weights live. auto: the first plan that fits the GPU's free memory, chosen from the "
        "components' sizes (logged one line per component): resident (everything on the GPU), encoder-swapped "
        "(the text encoder in pinned host memory, brought in only for prompts missing from the prompt cache), "
        "encoder-streamed (the same, streamed weight by weight on a side stream while the transformer stays), "
        "transformer-resident (the text encoder and the transformer take turns; the transformer whole for every "
        "denoise), block-streaming (transformer blocks streamed with prefetch). Each name forces its plan (on a "
        "CPU, forced plans are simulated). none = resident; model and sequential are diffusers' own CPU offloads "
        "(CUDA only).",
    ),
    Option(
        "compile",
        Optional[bool],
        feeds=ModelChoice,
        help="Compile the transformer's repeated blocks with torch.compile (regional compilation) when a model "
        "loads, and warm it up at 1024x1024 (batches of 1 and 2), so /health turns ready only once it is "
        "compiled; other sizes compile once more each, up to a bound. Default: on with CUDA when everything is "
        "resident and no GGUF, step cache or quantization other than fp8 (transformer, text encoder) is asked "
        "(H200, klein-4B: a served 1024² image 0.35 s instead of 0.65 s, for ~50 s at start), off on the CPU. "
        "--no-compile turns it off.",
    ),
    Option(
        "cache",
        str,
        feeds=ModelChoice,
        help="Step caching on the transformer: off, or taylorseer[:INTERVAL] (the attention layers run fully every "
        "INTERVAL steps, default 5, Taylor-series predictions between). Faster, most for dev's 50 steps; images "
        "differ slightly from uncached ones. diffusers' first-block cache fails on FLUX.2 and is refused.",
    ),
    Option(
        "reference_cache",
        str,
        feeds=ModelChoice,
        choices=REFERENCE_CACHE_CHOICES,
        help="Edits: on computes the reference images' keys and values once per batch (one pass over the "
        "references at timestep 0, references attending only to themselves, as diffusers' Flux2KleinKVPipeline "
        "and the FLUX.2 klein KV checkpoints do) and reuses them every step; much faster with several "
        "references. Images differ from the uncached edit by design (docs/PERFORMANCE.md). Not together with "
        "step caching (cache).",
    ),
    Option(
        "reference_memory",
        str,
        feeds=ModelChoice,
        help="With reference-cache on: GiB of device memory for the K/V of recent reference sets, kept across "
        "requests, so an edit that repeats its references skips their VAE encode and pass (the same images, "
        "least recently used sets dropped first; all of them when the device runs out of memory). auto: half "
        "the memory left free when everything is resident, at most 16 GiB (0 under an offload plan); 1 GiB on "
        "the CPU. 0 keeps none.",
    ),
    Option(
        "attention",
        str,
        feeds=ModelChoice,
        choices=ATTENTION_CHOICES,
        help="The transformer's attention kernel: sdpa (torch picks one per call), or one of torch's own pinned for "
        "every layer: cudnn (cuDNN's fused attention, CUDA), flash (FlashAttention-2, CUDA), efficient (CUDA), math "
        "(unfused, any device; for checking). Masked calls go to torch's pick with cudnn and flash.",
    ),
    Option(
        "quantize",
        str,
        feeds=ModelChoice,
        help="Quantized weights, COMPONENT=SCHEME pairs separated by commas, COMPONENT transformer or "
        "text_encoder, SCHEME int8 (torchao int8 weight-only), fp8-weight (float8 weight-only), fp8 (float8 "
        "matmuls: CUDA 8.9+) or nf4 (bitsandbytes, CUDA). Needs pip install -e '.\\[quant]'. Impossible "
        "combinations are refused at start.",
    ),
    Option(
        "transformer_gguf",
        Optional[Path],
        feeds=ModelChoice,
        help="A community GGUF file of the (first) model's transformer (Q8_0, Q4_K, ...), loaded in place of the "
        "folder's transformer through diffusers' single-file loader; the folder gives everything else. The file "
        "must be the same FLUX.2 model as the folder (block counts are checked at start). Needs pip install -e "
        "'.\\[quant]'. Not with --quantize transformer=...",
    ),
    Option(
        "lora",
        Optional[list[str]],
        feeds=ModelChoice,
        unit=REPEATED,
        help="A LoRA adapter for the (first) model, NAME=PATH[:SCALE]: a local .safetensors file in the diffusers, "
        "kohya (lora_unet_*) or BFL/ai-toolkit (diffusion_model.*) layout, loaded at start. Requests choose "
        'adapters with "loras": [{"name": NAME, "scale": 0.8}]; SCALE (default 1, -2 to 2) is the scale a request '
        "gets when it names none. Repeat for several.",
    ),
    Option(
        "fuse_lora",
        Optional[str],
        feeds=ModelChoice,
        help="Fuse the --lora adapter NAME into the weights at start, at its scale: no cost per step, but it is "
        "always on (requests cannot turn it off or change its scale).",
    ),
    Option(
        "model_name",
        Optional[str],
        feeds=ModelChoice,
        field="first_name",
        help="The id clients use for the (first) model, listed in /v1/models. Default: the folder name or hub "
        "id. Aliases such as flux.2-flex, flux.2-dev, flux.2-klein-4b are added as fit the model.",
    ),
    Option("output_dir", Path, feeds=Settings, help="Where generated images are kept for url responses."),
    Option(
        "weights_dir",
        Path,
        feeds=ModelChoice,
        help="Where to look for a model when --model is not given (and where tiny weights are built).",
    ),
    Option(
        "public_url",
        Optional[str],
        feeds=Settings,
        help="Base of the image URLs handed out (e.g. https://gpu-box.lan:8000). Default: the address the "
        "client called, as the Host or X-Forwarded-Host/-Proto headers give it.",
    ),
    Option(
        "retention_hours",
        float,
        feeds=Settings,
        field="retention_seconds",
        unit=HOURS,
        help="Generated files older than this are deleted.",
    ),
    Option(
        "max_stored_images",
        int,
        feeds=Settings,
        help="At most this many generated files are kept; the oldest go first.",
    ),
    Option(
        "history",
        bool,
        feeds=Settings,
        help="Record every request that is not sync_mode (prompt, parameters, seeds, timings, files, outcome) in "
        "a SQLite history, listed at /v1/images/history; its images are kept as files (b64 and streams too). "
        "--no-history records and keeps nothing.",
    ),
    Option(
        "history_db",
        Optional[Path],
        feeds=Settings,
        help="The history's SQLite file (WAL; several servers on one machine may share it). Default: "
        "history.sqlite3 in --output-dir.",
    ),
    Option("max_steps", int, feeds=Settings, help="Largest num_inference_steps a request may ask for."),
    Option(
        "max_batch_images",
        int,
        feeds=EngineOptions,
        help="Images that compatible requests (same model, size, steps, guidance, references) may share in one "
        "pipeline call.",
    ),
    Option(
        "batch_window_ms",
        float,
        feeds=EngineOptions,
        field="batch_window",
        unit=MILLISECONDS,
        help="How long a batch about to start waits for compatible requests still arriving (a lone request "
        "starts at once).",
    ),
    Option(
        "max_queue_images",
        int,
        feeds=EngineOptions,
        help="Images allowed to wait; beyond, requests get 429 with a Retry-After estimate.",
    ),
    Option(
        "request_timeout", float, feeds=Settings, help="Seconds a request may wait and run; then it is cancelled (504)."
    ),
    Option(
        "shutdown_timeout",
        float,
        feeds=Settings,
        help="On SIGTERM, seconds in-flight work may take to finish before it is cancelled.",
    ),
    Option(
        "max_loaded_models",
        int,
        feeds=ModelChoice,
        field="max_loaded",
        help="With several --model: at most this many in memory at once (0: as many as fit).",
    ),
    Option(
        "prompt_cache_mb",
        int,
        feeds=EngineOptions,
        field="prompt_cache_bytes",
        unit=MEBIBYTES,
        help="CPU memory for cached prompt embeddings (LRU).",
    ),
    Option("metrics", bool, feeds=Settings, help="Serve Prometheus metrics at /metrics."),
    Option(
        "metadata",
        bool,
        feeds=Settings,
        field="embed_metadata",
        help="Write each image's parameters into its file (PNG text chunks, EXIF and XMP; prompt, seed, steps, "
        "guidance, size, model, version) so that `flux2-local reproduce FILE` can make it again. "
        "--no-metadata leaves files bare (privacy).",
    ),
    Option(
        "api_key",
        Optional[list[str]],
        feeds=None,
        env_name="API_KEYS",
        help="A key clients must send as 'Authorization: Bearer KEY' on every /v1 route (repeat for several; "
        "the env var takes them comma- or space-separated). Without any key the API is open: keep --host "
        "127.0.0.1 then.",
    ),
    Option("api_key_file", Optional[Path], feeds=None, help="A file of keys, one per line (# comments)."),
    Option(
        "public_files",
        bool,
        feeds=Settings,
        help="Serve generated image URLs without a key (their names are unguessable).",
    ),
    Option("open_metrics", bool, feeds=Settings, help="Serve /metrics without a key when keys are set."),
    Option(
        "cors_origin",
        Optional[list[str]],
        feeds=Settings,
        field="cors_origins",
        unit=REPEATED,
        env_name="CORS_ORIGINS",
        help="Allow browser pages from this origin (e.g. https://tools.studio.lan; '*' for any) to call the "
        "API. Repeat for several. Default: no CORS.",
    ),
    Option("max_body_mb", int, feeds=Settings, field="max_body_bytes", unit=MEBIBYTES, help="Largest request body."),
    Option(
        "max_image_mb", int, feeds=Settings, field="max_image_bytes", unit=MEBIBYTES, help="Largest input image file."
    ),
    Option(
        "max_input_megapixels",
        float,
        feeds=Settings,
        field="max_input_pixels",
        unit=MILLIONS_OF_PIXELS,
        help="Largest input image, in decoded pixels (decompression bombs).",
    ),
    Option(
        "max_output_megapixels",
        float,
        feeds=Settings,
        field="max_output_pixels",
        unit=OUTPUT_MEGAPIXELS,
        help="Outputs above this are scaled down, aspect kept (1 MP = 1024x1024; the product's ceiling is "
        f"{MAX_OUTPUT_PIXELS // MEGAPIXEL}).",
    ),
    Option("max_prompt_chars", int, feeds=Settings, help="Longest prompt accepted, in characters."),
    Option("playground", bool, feeds=Settings, help="Serve the Playground page at / (--no-playground turns it off)."),
    Option(
        "playground_open",
        bool,
        feeds=Settings,
        help="With API keys set, let the Playground page call the API without one (anyone who can open the "
        "page can then use the GPU).",
    ),
    Option(
        "allow_remote_images",
        bool,
        feeds=Settings,
        help="Fetch http(s) image_url inputs (public addresses only, each redirect checked, size and time "
        "capped). Off: the server never connects out.",
    ),
    Option("remote_image_timeout", float, feeds=Settings, help="Seconds a remote image may take to fetch."),
    Option(
        "enhancer_model",
        Optional[str],
        feeds=EngineOptions,
        help="A local instruction-tuned causal language model folder (with its tokenizer) that rewrites prompts "
        "for prompt_enhancement 'on'. Default: the model's own text encoder (klein's Qwen3; dev's Mistral 3 "
        "caption upsampling, which also sees an edit's images).",
    ),
    Option(
        "enhancer_max_tokens",
        int,
        feeds=EngineOptions,
        help="Most tokens a prompt rewrite may have (klein and --enhancer-model; dev's caption upsampling "
        "allows 512). A rewrite that is empty or too long for the text encoder falls back to the prompt.",
    ),
    Option(
        "safety_checker",
        Optional[str],
        feeds=EngineOptions,
        help="An image-classification model folder or hub id (a transformers NSFW classifier) that screens "
        "every output: flagged images are withheld. Default: none (said at start, in /health and /v1/models).",
    ),
    Option(
        "safety_labels",
        Optional[str],
        feeds=EngineOptions,
        unit=COMMA_LIST,
        help="The safety checker's unsafe labels, comma-separated. Default: its labels named nsfw, unsafe, "
        "porn, hentai, sexy, explicit, nudity or nude.",
    ),
    Option(
        "safety_thresholds",
        str,
        feeds=EngineOptions,
        unit=THRESHOLDS,
        help="Unsafe probability above which an image is withheld, for safety_tolerance 1 (strict) to 5 "
        "(permissive); a request that does not say gets 2.",
    ),
    Option(
        "allow_disable_safety",
        bool,
        feeds=Settings,
        help="Let requests turn the safety checker off with enable_safety_checker=false (otherwise it still "
        "runs, with a warning).",
    ),
    Option(
        "require_safety_checker",
        bool,
        feeds=Settings,
        help="Without --safety-checker, answer 400 to requests with enable_safety_checker=true instead of a warning.",
    ),
    Option("log_level", str, feeds=Settings, help="debug, info, warning or error.", choices=LOG_LEVELS),
    Option(
        "ray",
        bool,
        feeds=RayOptions,
        field="enabled",
        help="Serve through Ray Serve: replicas of this server (one engine and model copy each, one per GPU by "
        "default) behind Ray's HTTP proxy on --host/--port. Needs pip install -e '.\\[ray]'. See docs/RAY.md.",
    ),
    Option("replicas", int, feeds=RayOptions, help="With --ray: how many replicas to run."),
    Option(
        "autoscale",
        Optional[str],
        feeds=RayOptions,
        help="With --ray: MIN:MAX replicas, following the queued and running images (about one full batch, "
        "--max-batch-images, per replica). Instead of --replicas.",
    ),
    Option(
        "gpus_per_replica",
        float,
        feeds=RayOptions,
        help="With --ray: GPUs each replica holds (0.5: two replicas share a GPU). Replicas on the CPU "
        "(--device cpu, or no GPU in the cluster with --device auto) hold one CPU instead.",
    ),
    Option(
        "ray_address",
        Optional[str],
        feeds=RayOptions,
        field="address",
        help="With --ray: the Ray cluster to join (e.g. auto, or ray://head:10001). Default: start one on this "
        "machine, stopped with the server.",
    ),
)


@dataclass(frozen=True)
class ServeConfig:
    """What `serve` was asked for, as the objects it configures."""

    settings: Settings  # model_ids and test_models still empty: they come from the models once resolved
    engine: EngineOptions
    models: ModelChoice
    ray: RayOptions = RayOptions()


def read_options(values: Mapping[str, Any]) -> ServeConfig:
    """The parsed options ({name: value}, every option of OPTIONS) converted into the fields they set."""
    by_class: dict[type, dict[str, Any]] = {Settings: {}, EngineOptions: {}, ModelChoice: {}, RayOptions: {}}
    for option in OPTIONS:
        value = values[option.name]
        if option.choices and isinstance(value, str):  # --log-level INFO, FLUX2_DEVICE=CUDA: the choices' case
            value = value.strip().lower()
        check_choice(value, option.choices, option.flag)
        check_not_negative(value, option.flag)
        if option.name in AT_LEAST_ONE and value is not None and value < 1:
            raise typer.BadParameter(f"must be 1 or more, got {value}", param_hint=option.flag)
        if option.feeds is not None:
            by_class[option.feeds][option.field or option.name] = option.unit.into(value)
    try:
        keys = load_keys(values["api_key"] or [], values["api_key_file"])
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file of keys"
        raise typer.BadParameter(
            f"cannot read {values['api_key_file']}: {reason}", param_hint="--api-key-file"
        ) from exc
    return ServeConfig(
        settings=Settings(**by_class[Settings], api_keys=keys),
        engine=EngineOptions(**by_class[EngineOptions]),
        models=ModelChoice(**by_class[ModelChoice]),
        ray=RayOptions(**by_class[RayOptions]),
    )


def check_not_negative(value: Any, flag: str) -> None:
    """Every number an option takes is a count, a size, a time or a port: a negative one (or NaN) is a mistake."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}", param_hint=flag)


def check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if choices and value not in choices:
        raise typer.BadParameter(f"must be one of {', '.join(choices)}", param_hint=flag)


def serve_command(run: Callable[[ServeConfig], None]) -> Callable[..., None]:
    """`run` as a typer command: its parameters are OPTIONS (typer reads the signature set here), its help is
    `run`'s docstring, and it calls `run` with the ServeConfig the parsed values make."""

    def command(**values: Any) -> None:
        run(read_options(values))

    command.__name__, command.__qualname__ = run.__name__, run.__qualname__
    command.__module__, command.__doc__ = run.__module__, run.__doc__
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [_parameter(option) for option in OPTIONS], return_annotation=None
    )
    return command


def _parameter(option: Option) -> inspect.Parameter:
    info = typer.Option(envvar=option.envvar, help=option.help, show_default=option.default is not None)
    return inspect.Parameter(
        option.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=option.default,
        annotation=Annotated[option.value_type, info],
    )
