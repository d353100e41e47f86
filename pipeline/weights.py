"""Where a model's weights are and what they are: read a diffusers folder's `model_index.json` to tell which
FLUX.2 pipeline it holds, its defaults and the names it is served under. No torch work happens here."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("flux2.weights")

TINY_DEFAULT_DIRNAME = "tiny-flux2-klein"
# The hosted product's model id: every served FLUX.2 model answers to it, so the seed's examples run unchanged.
FLEX_ALIAS = "flux.2-flex"


class WeightsError(Exception):
    """The weights cannot be found or are not a FLUX.2 diffusers folder."""


def tensor_sizes(file: Path) -> list[tuple[str, int]]:
    """Each tensor's name and number of elements in a safetensors file, read from its header alone; a WeightsError
    naming the file for one that is not readable (truncated, corrupt)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as tensors:
            names = list(tensors.keys())
            return [(name, math.prod(tensors.get_slice(name).get_shape())) for name in names]
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{file} is not a readable safetensors file ({exc}): copy or download it again") from exc


@dataclass(frozen=True)
class ModelDefaults:
    steps: int
    guidance_scale: float


@dataclass(frozen=True)
class ModelSpec:
    """What a diffusers folder holds, read from its configs."""

    path: Path
    pipeline_class: str  # "Flux2Pipeline" | "Flux2KleinPipeline"
    family: str  # "dev" | "klein"
    is_distilled: bool
    size_label: str | None  # "4b" | "9b" for real klein weights, None when the config matches neither
    defaults: ModelDefaults

    @property
    def aliases(self) -> tuple[str, ...]:
        names = [FLEX_ALIAS, f"flux.2-{self.family}"]
        if self.size_label:
            names.append(f"flux.2-{self.family}-{self.size_label}")
        return tuple(names)


# Per-pipeline defaults, as the model cards recommend: dev is guidance-distilled (embedded guidance 4.0, 50
# steps); distilled klein runs 4 steps without CFG; the klein base model runs 50 steps of real CFG at 4.0.
_DEV_DEFAULTS = ModelDefaults(steps=50, guidance_scale=4.0)
_KLEIN_DISTILLED_DEFAULTS = ModelDefaults(steps=4, guidance_scale=1.0)
_KLEIN_BASE_DEFAULTS = ModelDefaults(steps=50, guidance_scale=4.0)

_FAMILIES = {"Flux2Pipeline": "dev", "Flux2KleinPipeline": "klein", "Flux2KleinKVPipeline": "klein"}
# Real klein transformers, told apart by their depth: 4B has 5 double + 20 single blocks, 9B has 8 + 24.
_KLEIN_SIZES = {(5, 20): "4b", (8, 24): "9b"}


def inspect_model(path: str | Path) -> ModelSpec:
    """Read `path`'s `model_index.json` (and the transformer config) and describe the model."""
    folder = Path(path)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise WeightsError(f"{folder} is not a diffusers folder: it has no model_index.json")
    index = json.loads(index_file.read_text())
    class_name = index.get("_class_name", "")
    family = _FAMILIES.get(class_name)
    if family is None:
        raise WeightsError(
            f"{folder} holds a {class_name or 'unnamed'} pipeline; flux2-local serves FLUX.2 "
            f"({', '.join(sorted(_FAMILIES))})"
        )
    is_distilled = bool(index.get("is_distilled", False)) if family == "klein" else False
    if family == "dev":
        defaults = _DEV_DEFAULTS
    else:
        defaults = _KLEIN_DISTILLED_DEFAULTS if is_distilled else _KLEIN_BASE_DEFAULTS
    size_label = _klein_size(folder) if family == "klein" else None
    return ModelSpec(
        path=folder,
        pipeline_class=class_name,
        family=family,
        is_distilled=is_distilled,
        size_label=size_label,
        defaults=defaults,
    )


def _klein_size(folder: Path) -> str | None:
    config_file = folder / "transformer" / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    return _KLEIN_SIZES.get((config.get("num_layers"), config.get("num_single_layers")))


def resolve_weights(path_or_id: str) -> Path:
    """A local diffusers folder as is, otherwise a Hugging Face hub id fetched into (or read from) the hub cache.

    Only the pipeline's components are fetched (not the single-file checkpoints some repos also hold). With
    `HF_HUB_OFFLINE=1` only the local cache is read."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise WeightsError(f"--model {path_or_id!r} is neither a diffusers folder nor a hub id like 'owner/name'")
    from diffusers import DiffusionPipeline

    log.info("model: fetching hub id %s into the hub cache (or reading it from there)", path_or_id)
    try:
        return Path(DiffusionPipeline.download(path_or_id))
    except Exception as exc:  # network, auth, not found: all end the same way for the user
        raise WeightsError(f"could not get hub id {path_or_id!r}: {exc}") from exc


def find_local_weights(weights_dir: Path) -> Path | None:
    """The diffusers folder to serve from `weights_dir` when no model is named: a real FLUX.2 folder first
    (sorted by name), the tiny test folder only when nothing else is there."""
    if not weights_dir.is_dir():
        return None
    candidates = sorted(p.parent for p in weights_dir.glob("*/model_index.json"))
    real = [p for p in candidates if p.name != TINY_DEFAULT_DIRNAME]
    for folder in real + [p for p in candidates if p.name == TINY_DEFAULT_DIRNAME]:
        try:
            inspect_model(folder)
        except (WeightsError, ValueError):
            continue
        return folder
    return None
