"""Token and megapixel accounting for a job: what the model processed, in OpenAI's usage terms and the
product's pricing terms. Pure arithmetic over sizes."""

from __future__ import annotations

from dataclasses import dataclass

from .jobs import GenerationJob
from .references import PATCH, encoded_size
from .sizes import billable_megapixels


@dataclass(frozen=True)
class Accounting:
    text_tokens: int
    reference_tokens: int
    output_tokens: int
    output_megapixels: int
    reference_megapixels: int

    @property
    def input_tokens(self) -> int:
        return self.text_tokens + self.reference_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def billed_megapixels(self) -> int:
        return self.output_megapixels + self.reference_megapixels

    def per_image(self, images: int, delivered: int) -> list[Accounting]:
        """The accounting of a request that made `images` images split into `delivered` parts that sum to it, one per
        image delivered (a stream's completed events): each image's own output, and on the first the inputs (the
        text and references are processed once per request) and any withheld image's output."""
        one_tokens, one_megapixels = self.output_tokens // images, self.output_megapixels // images
        rest = delivered - 1
        first = Accounting(
            text_tokens=self.text_tokens,
            reference_tokens=self.reference_tokens,
            output_tokens=self.output_tokens - rest * one_tokens,
            output_megapixels=self.output_megapixels - rest * one_megapixels,
            reference_megapixels=self.reference_megapixels,
        )
        return [first] + [Accounting(0, 0, one_tokens, one_megapixels, 0)] * rest


def account(job: GenerationJob, text_tokens: int) -> Accounting:
    reference_sizes = [image.size for image in job.references]
    encoded_sizes = [encoded_size(w, h) for w, h in reference_sizes]  # one token per 16 x 16 pixels
    reference_tokens = sum((w // PATCH) * (h // PATCH) for w, h in encoded_sizes)
    output_tokens = job.n * (job.run_width // PATCH) * (job.run_height // PATCH)
    return Accounting(
        text_tokens=text_tokens,
        reference_tokens=reference_tokens,
        output_tokens=output_tokens,
        output_megapixels=job.n * billable_megapixels(job.width, job.height),
        reference_megapixels=sum(billable_megapixels(w, h, minimum=1) for w, h in reference_sizes),
    )
