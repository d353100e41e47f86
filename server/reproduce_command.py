"""`flux2-local reproduce FILE`: read the parameters an image file carries (`pipeline.file_metadata`, written by the
server unless --no-metadata) and send the same request for that one image (its seed, n=1) to a running server.
An edit or a variation needs its input images again (`--image`, `--mask`): they are not in the file, only their
SHA-256, which each given file must match."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from PIL import Image

from pipeline.codecs import FILE_EXTENSIONS
from pipeline.file_metadata import MissingMetadata, read_metadata

from .client import ClientError, format_named, run_request
from .client_commands import _API_KEY, _SERVER
from .provenance import sha256_hex

_ENDPOINTS = {"generation": "generations", "edit": "edits", "variation": "variations"}


class CannotReproduce(ValueError):
    """Why the file's request cannot be made again, in words for the terminal."""


def reproduction(record: dict[str, Any], images: list[bytes], mask: bytes | None) -> tuple[str, dict[str, Any]]:
    """(endpoint, form fields) that make the recorded image again; the given inputs are checked against it."""
    mode = record.get("mode")
    if mode not in _ENDPOINTS:
        raise CannotReproduce(f"the file records an unknown mode {mode!r}")
    if "prompt_omitted" in record:
        raise CannotReproduce(
            "the prompt was too long for this file format's metadata and was left out (only its SHA-256 "
            f"{record.get('prompt_sha256')} is recorded)"
        )
    _check_inputs(record, images, mask)
    fields: dict[str, Any] = {
        "model": record.get("model") or None,
        "n": 1,
        "seed": record["seed"],
        "num_inference_steps": record["steps"],
        "guidance_scale": record["guidance_scale"],
        "size": record["size"],
        "output_format": record["output_format"],
        "output_compression": record.get("output_compression"),
    }
    if mode != "variation":
        fields["prompt"] = record["prompt"]
    if record.get("prompt_enhancement") == "on" and "revised_prompt" in record:
        # The rewrite the image was made from, sent as the prompt (enhancement off): the same image, whichever of
        # its request's n it was (a request's rewrite is drawn from its first seed, not this image's).
        fields["prompt"] = record["revised_prompt"]
    if record.get("loras"):  # a multipart form (edits, variations) carries them as JSON text
        fields["loras"] = record["loras"] if mode == "generation" else json.dumps(record["loras"])
    return _ENDPOINTS[mode], fields


def _check_inputs(record: dict[str, Any], images: list[bytes], mask: bytes | None) -> None:
    if record["mode"] == "generation":
        if images or mask is not None:
            raise CannotReproduce("this image was made from a prompt alone: --image and --mask are not used")
        return
    expected = list(record.get("references", []))
    if len(images) != len(expected):
        raise CannotReproduce(
            f"this image is {'a variation' if record['mode'] == 'variation' else 'an edit'} of {len(expected)} "
            f"image(s), which a file cannot hold: pass the same file(s) with --image, in the order first sent "
            f"(got {len(images)}; SHA-256 expected: {', '.join(expected)})"
        )
    for number, (data, want) in enumerate(zip(images, expected, strict=True), start=1):
        if sha256_hex(data) != want:
            raise CannotReproduce(f"--image number {number} is not the file used: its SHA-256 should be {want}")
    want_mask = record.get("mask_sha256")
    if want_mask is None and mask is not None:
        raise CannotReproduce("this edit used no mask: leave out --mask")
    if want_mask is not None and (mask is None or sha256_hex(mask) != want_mask):
        raise CannotReproduce(f"this edit used a mask: pass the same file with --mask (SHA-256 {want_mask})")


def reproduce(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="An image file flux2-local wrote.")],
    image: Annotated[
        list[Path] | None,
        typer.Option(
            "-i",
            "--image",
            exists=True,
            dir_okay=False,
            show_default=False,
            help="For an edit or a variation: its input image(s), in the order first sent (checked by SHA-256).",
        ),
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, show_default=False, help="The edit's mask, if it had one."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="File to write. Default: FILE's name + '-reproduced'.", show_default=False),
    ] = None,
    server: Annotated[str, _SERVER] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, _API_KEY] = None,
) -> None:
    """Make an image again from the parameters in its file's metadata, and say whether it came out the same."""
    original = file.read_bytes()
    inputs = list(image or [])
    try:
        record = read_metadata(original)
        endpoint, fields = reproduction(
            record, [p.read_bytes() for p in inputs], mask.read_bytes() if mask is not None else None
        )
        target = _target(file, output, record.get("output_format") or "png")
        (saved,) = run_request(server, api_key, endpoint, fields, inputs, mask, target)
    except (MissingMetadata, CannotReproduce, ClientError) as exc:
        typer.echo(f"error: {file}: {exc}", err=True)
        raise typer.Exit(code=1) from exc
    typer.echo(f"{saved.path}  ({saved.size}, seed {saved.seed}): {_compare(original, saved.path.read_bytes())}")


def _target(file: Path, output: Path | None, output_format: str) -> Path:
    """Where the image goes: `output`, unless its extension names another format than the original's (a ClientError
    before the request), else FILE's name + '-reproduced' with FILE's extension, or the format's own where FILE's
    names another format or none."""
    extension = FILE_EXTENSIONS.get(output_format, output_format)
    if output is not None:
        named = format_named(output.suffix.lstrip("."))
        if named not in (None, output_format):
            raise ClientError(
                f"the image is made again as {output_format}, as the original was, not as {named} ({output.name}): "
                f"give -o a .{extension} name"
            )
        return output
    suffix = file.suffix if format_named(file.suffix.lstrip(".")) == output_format else f".{extension}"
    return Path(f"{file.stem}-reproduced{suffix}")


def _compare(original: bytes, again: bytes) -> str:
    """Whether the new file is the same as the original: its bytes, else its pixels."""
    if original == again:
        return "the same bytes as the original"
    first, second = (np.asarray(_decode(data), dtype=np.int16) for data in (original, again))
    if first.shape == second.shape and (first == second).all():
        return "the same pixels as the original"
    if first.shape != second.shape:
        return f"a different size from the original ({first.shape[1]}x{first.shape[0]})"
    return f"differs from the original (largest pixel difference {int(np.abs(first - second).max())})"


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
