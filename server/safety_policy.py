"""What a request's safety fields mean on this server, and how a screened result is answered.

- With a safety checker (`--safety-checker`): every output is screened at the request's `safety_tolerance` (1
  strict ... 5 permissive, default 2). `enable_safety_checker=false` turns it off only when the operator allows it
  (`--allow-disable-safety`); otherwise the checker still runs and the field is reported as not honoured.
- Without one: `safety_tolerance` and `enable_safety_checker=true` are reported as not honoured (or, with
  `--require-safety-checker`, `enable_safety_checker=true` is a 400).
- A screened result: every image flagged is OpenAI's `moderation_blocked` error; some flagged, the others are
  returned, with `x-flux2-withheld` and `withheld_images` saying how many were not."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.jobs import GenerationResult
from pipeline.safety import DEFAULT_TOLERANCE

from .errors import APIError
from .protocol import ImageParameters
from .settings import Settings

WITHHELD_HEADER = "x-flux2-withheld"


@dataclass(frozen=True)
class SafetyDecision:
    tolerance: int | None  # the job's safety_tolerance; None: its images are not screened
    unhonoured: dict[str, str] = field(default_factory=dict)  # {parameter: why it was not acted on}


def decide_safety(params: ImageParameters, checker: str | None, settings: Settings) -> SafetyDecision:
    if checker is None:
        unhonoured = {}
        if params.enable_safety_checker:
            if settings.require_safety_checker:
                raise APIError(
                    400,
                    "enable_safety_checker is true, but this server has no safety checker configured; its operator "
                    "requires one for such requests (--require-safety-checker).",
                    param="enable_safety_checker",
                    code="safety_checker_unavailable",
                )
            unhonoured["enable_safety_checker"] = (
                "enable_safety_checker: no safety checker runs on this server (none is configured): the images "
                "are not screened."
            )
        if params.safety_tolerance is not None:
            unhonoured["safety_tolerance"] = "safety_tolerance has no effect: no safety checker runs on this server."
        return SafetyDecision(None, unhonoured)
    tolerance = params.safety_tolerance or DEFAULT_TOLERANCE
    if params.enable_safety_checker is False:
        if settings.allow_disable_safety:
            unhonoured = {}
            if params.safety_tolerance is not None:
                unhonoured["safety_tolerance"] = "safety_tolerance has no effect: enable_safety_checker is false."
            return SafetyDecision(None, unhonoured)
        return SafetyDecision(
            tolerance,
            {
                "enable_safety_checker": "enable_safety_checker=false is not allowed on this server: the safety "
                "checker screened the images."
            },
        )
    return SafetyDecision(tolerance)


def check_withheld(result: GenerationResult, tolerance: int | None) -> list[str]:
    """The `moderation_blocked` error when every image was flagged; else the warnings about withheld ones."""
    if not result.withheld:
        return []
    if not result.images:
        raise APIError(
            400,
            f"Your request was rejected by the safety system: this server's safety checker flagged all "
            f"{result.withheld} generated image{'s' if result.withheld > 1 else ''} (safety_tolerance {tolerance}).",
            type="image_generation_user_error",
            code="moderation_blocked",
        )
    total = result.withheld + len(result.images)
    return [
        f"{result.withheld} of {total} images {'was' if result.withheld == 1 else 'were'} withheld: the safety "
        f"checker flagged {'it' if result.withheld == 1 else 'them'} (safety_tolerance {tolerance})."
    ]
