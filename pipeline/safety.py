"""The safety checker: a local image-classification model (a transformers NSFW classifier, loaded with
`AutoModelForImageClassification` and `AutoImageProcessor`) screens every output of the jobs that ask for it, on
the engine's worker after the decode. A flagged image is withheld: it leaves the result, which counts it.

The classifier's "unsafe" probability is the sum of the probabilities of its unsafe labels (found by name, e.g.
"nsfw"; `--safety-labels` names them for other classifiers). `safety_tolerance` 1 (strict) to 5 (permissive) picks
the threshold it must exceed to be flagged: `TOLERANCE_THRESHOLDS` by default, `--safety-thresholds` otherwise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from .batching import Slice
from .jobs import GenerationJob, GenerationResult

PreviewSink = Callable[[Slice, int, list[Image.Image]], None]

log = logging.getLogger("flux2.safety")

# An image is flagged when its unsafe probability is above the threshold of the request's safety_tolerance.
TOLERANCE_THRESHOLDS = (0.2, 0.35, 0.5, 0.7, 0.85)  # tolerance 1 (strict) ... 5 (permissive)
DEFAULT_TOLERANCE = 2  # what a request that does not say gets (the hosted API's default)
UNSAFE_LABEL_NAMES = ("nsfw", "unsafe", "porn", "hentai", "sexy", "explicit", "nudity", "nude")


class SafetyCheckerError(Exception):
    """The configured safety checker cannot be used (not found, not a classifier, no unsafe label)."""


def parse_thresholds(text: str) -> tuple[float, ...]:
    """ "0.2,0.35,0.5,0.7,0.85" -> five probabilities, one per tolerance 1..5, each in [0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise ValueError(f"expected five numbers separated by commas, got {text!r}") from exc
    if len(values) != 5 or not all(0.0 <= value <= 1.0 for value in values):
        raise ValueError(f"expected five probabilities between 0 and 1 (tolerance 1 to 5), got {text!r}")
    if list(values) != sorted(values):  # 1 is the strictest: it withholds at the lowest probability
        raise ValueError(f"expected the five in order, tolerance 1 (strict) lowest to 5 (permissive), got {text!r}")
    return values


class SafetyChecker:
    def __init__(
        self,
        classifier: Any,
        processor: Any,
        source: str,
        thresholds: tuple[float, ...] = TOLERANCE_THRESHOLDS,
        unsafe_labels: tuple[str, ...] = (),
    ):
        self.classifier = classifier
        self.processor = processor
        self.source = source
        self.thresholds = thresholds
        labels: dict[int, str] = {int(i): str(name) for i, name in classifier.config.id2label.items()}
        wanted = {name.lower() for name in unsafe_labels or UNSAFE_LABEL_NAMES}
        self.unsafe_ids = sorted(i for i, name in labels.items() if name.lower() in wanted)
        if not self.unsafe_ids:
            raise SafetyCheckerError(
                f"the safety checker {source} has no label named {' or '.join(sorted(wanted))} (its labels: "
                f"{', '.join(labels.values())}); name its unsafe labels with --safety-labels"
            )
        self.multi_label = classifier.config.problem_type == "multi_label_classification"

    @classmethod
    def load(
        cls,
        source: str,
        device: torch.device | str = "cpu",
        thresholds: tuple[float, ...] = TOLERANCE_THRESHOLDS,
        unsafe_labels: tuple[str, ...] = (),
    ) -> SafetyChecker:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            classifier = AutoModelForImageClassification.from_pretrained(source)
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise SafetyCheckerError(f"the safety checker {source} could not be loaded: {exc}") from exc
        checker = cls(classifier.to(device).eval(), processor, source, thresholds, unsafe_labels)
        names = [classifier.config.id2label[i] for i in checker.unsafe_ids]
        log.info("safety checker %s loaded: flags %s above %s", source, "+".join(names), thresholds)
        return checker

    def unsafe_scores(self, images: list[Image.Image]) -> list[float]:
        """Each image's probability of an unsafe label."""
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        inputs = {key: value.to(self.classifier.device) for key, value in inputs.items()}
        with torch.inference_mode():
            logits = self.classifier(**inputs).logits.float()
        probabilities = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
        unsafe = probabilities[:, self.unsafe_ids].sum(dim=-1).clamp(max=1.0)
        return [float(score) for score in unsafe]

    def threshold(self, tolerance: int) -> float:
        return self.thresholds[min(5, max(1, tolerance)) - 1]

    def screen(self, job: GenerationJob, result: GenerationResult) -> GenerationResult:
        """The result without the images flagged at the job's tolerance (counted in `withheld`)."""
        if job.safety_tolerance is None or not result.images:
            return result
        started = time.perf_counter()
        limit = self.threshold(job.safety_tolerance)
        scores = self.unsafe_scores(result.images)
        kept = [i for i, score in enumerate(scores) if score <= limit]
        if len(kept) < len(scores):
            log.info(
                "safety checker: withheld %d of %d images (unsafe scores %s, threshold %.2f)",
                len(scores) - len(kept),
                len(scores),
                ", ".join(f"{score:.3f}" for score in scores),
                limit,
            )
        seconds = time.perf_counter() - started
        return replace(
            result,
            images=[result.images[i] for i in kept],
            seeds=tuple(result.seeds[i] for i in kept),
            withheld=result.withheld + len(scores) - len(kept),
            stages=replace(result.stages, safety=result.stages.safety + seconds),
        )

    def screen_previews(self, sink: PreviewSink) -> PreviewSink:
        """`sink` without the previews of screened jobs in which any image is flagged: a streamed preview must not
        show what the final image would be withheld for."""

        def screened(piece: Slice, index: int, images: list[Image.Image]) -> None:
            tolerance = piece.job.safety_tolerance
            if tolerance is not None and max(self.unsafe_scores(images)) > self.threshold(tolerance):
                log.info("safety checker: a preview was withheld")
                return
            sink(piece, index, images)

        return screened
