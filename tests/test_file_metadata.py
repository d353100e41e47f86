"""The parameters each written file carries (pipeline/file_metadata.py): embedded in every output format's standard
metadata, read back by Pillow and by a plain XML parser, and absent when none is asked for."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ElementTree

import pytest
from hostile_images import noise, png
from PIL import Image, PngImagePlugin

from pipeline.codecs import OUTPUT_FORMATS, encode_image
from pipeline.file_metadata import SCHEMA, MissingMetadata, read_metadata

RECORD = {
    "version": "0.1.0",
    "mode": "generation",
    "model": "tiny-klein",
    "prompt": 'A "lighthouse" <at> dawn & fog, café 東京 \U0001f30a',
    "seed": 2**40 + 3,
    "index": 1,
    "n": 2,
    "steps": 4,
    "guidance_scale": 3.5,
    "size": "64x48",
    "output_format": "png",
    "background": "opaque",
}
LOSSY = ("jpeg", "webp", "avif")
EXIF_IFD, USER_COMMENT, IMAGE_DESCRIPTION, SOFTWARE = 0x8769, 0x9286, 0x010E, 0x0131
RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def xmp_fields(packet: bytes | str) -> dict[str, str]:
    """dc:description, xmp:CreatorTool and flux2:parameters from an XMP packet, parsed as XML."""
    if isinstance(packet, str):
        packet = packet.encode("utf-8")
    root = ElementTree.fromstring(packet[packet.index(b"<x:xmpmeta") : packet.index(b"</x:xmpmeta>") + 12])
    description = root.find(f"{RDF}RDF/{RDF}Description")
    return {element.tag.split("}")[1]: "".join(element.itertext()) for element in description}


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_every_format_round_trips_the_exact_record(output_format):
    data = encode_image(noise(), output_format, metadata=RECORD)
    assert read_metadata(data) == {"schema": SCHEMA, **RECORD}
    assert opened(data).format == {"jpeg": "JPEG"}.get(output_format, output_format.upper())


def test_png_has_readable_text_chunks_and_xmp():
    image = opened(encode_image(noise(), "png", metadata=RECORD))
    assert json.loads(image.info["flux2-local"]) == {"schema": SCHEMA, **RECORD}
    assert image.info["Description"] == RECORD["prompt"]
    assert image.info["Software"] == "flux2-local 0.1.0"
    assert image.info["parameters"].splitlines() == [
        RECORD["prompt"],
        f"Steps: 4, Guidance: 3.5, Seed: {2**40 + 3}, Size: 64x48, Model: tiny-klein, Mode: generation, "
        "Format: png, flux2-local: 0.1.0",
    ]
    xmp = xmp_fields(image.info["xmp"])
    assert xmp["description"] == RECORD["prompt"]
    assert json.loads(xmp["parameters"])["seed"] == 2**40 + 3


@pytest.mark.parametrize("output_format", LOSSY)
def test_lossy_formats_carry_exif_and_xmp(output_format):
    image = opened(encode_image(noise(), output_format, quality=80, metadata=RECORD))
    exif = image.getexif()
    assert exif[SOFTWARE] == "flux2-local 0.1.0"
    assert exif[IMAGE_DESCRIPTION].startswith('A "lighthouse" <at> dawn & fog, caf? ')  # EXIF ASCII: a readable copy
    comment = exif.get_ifd(EXIF_IFD)[USER_COMMENT]
    assert comment.startswith(b"ASCII\x00\x00\x00")
    assert json.loads(comment[8:]) == {"schema": SCHEMA, **RECORD}
    xmp = xmp_fields(image.info["xmp"])
    assert xmp["description"] == RECORD["prompt"]  # XMP is UTF-8: the exact prompt
    assert xmp["CreatorTool"] == "flux2-local 0.1.0"
    assert json.loads(xmp["parameters"]) == {"schema": SCHEMA, **RECORD}


@pytest.mark.parametrize("output_format", OUTPUT_FORMATS)
def test_without_metadata_the_file_is_bare(output_format):
    data = encode_image(noise(), output_format)
    image = opened(data)
    assert not {"exif", "xmp", "comment", "flux2-local", "parameters", "Software"} & set(image.info)
    assert not image.getexif()
    for marker in (b"flux2", b"Exif", b"xmpmeta", b"tEXt", b"iTXt"):
        assert marker not in data
    with pytest.raises(MissingMetadata, match="carries no flux2-local metadata"):
        read_metadata(data)


def test_png_chunks_are_only_the_image_without_metadata():
    data = encode_image(noise(), "png")
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        chunks.append(data[at + 4 : at + 8])
        at += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}


def test_odd_prompts_are_written_safely():
    odd = {**RECORD, "prompt": "ctrl \x00\x07 chars, a lone surrogate \ud800, and ]]> </flux2:parameters>"}
    for output_format in OUTPUT_FORMATS:
        data = encode_image(noise(), output_format, metadata=odd)
        assert read_metadata(data)["prompt"] == odd["prompt"]  # the JSON escapes everything: exact
        if output_format != "gif":
            info = opened(data).info
            xmp_fields(info["xmp"])  # still well-formed XML


def test_readable_copies_of_the_prompt_carry_no_control_characters():
    """PNG's text chunks may not hold NUL, and a NUL ends EXIF's ASCII description early for C readers: the
    readable copies drop control characters (keeping tabs and line breaks); the JSON record stays exact."""
    odd = {**RECORD, "prompt": "a\x00b\x1b[31m c\x7f\td\ne"}
    readable = "ab[31m c\td\ne"
    png_info = opened(encode_image(noise(), "png", metadata=odd)).info
    assert png_info["Description"] == readable
    assert png_info["parameters"].startswith(readable + "\n")
    for output_format in LOSSY:
        data = encode_image(noise(), output_format, quality=80, metadata=odd)
        assert opened(data).getexif()[IMAGE_DESCRIPTION] == readable
        assert read_metadata(data)["prompt"] == odd["prompt"]


def test_a_prompt_too_long_for_jpeg_is_left_out_and_said_so():
    long = {**RECORD, "prompt": "東" * 15_000}
    record = read_metadata(encode_image(noise(), "jpeg", metadata=long))
    assert "prompt" not in record and record["prompt_omitted"]
    assert len(record["prompt_sha256"]) == 64 and record["seed"] == RECORD["seed"]
    assert read_metadata(encode_image(noise(), "webp", metadata=long))["prompt"] == long["prompt"]  # no cap there


def test_files_without_our_record_are_refused_clearly():
    with pytest.raises(MissingMetadata, match="not an image"):
        read_metadata(b"plain text, no image")
    with pytest.raises(MissingMetadata, match="PNG file carries no flux2-local metadata"):
        read_metadata(png())
    foreign = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("flux2-local", '{"schema": "someone-else/9"}')
    noise().save(foreign, format="PNG", pnginfo=info)
    with pytest.raises(MissingMetadata, match="not a flux2-local/1 record"):
        read_metadata(foreign.getvalue())


def test_the_same_record_gives_the_same_bytes():
    image = noise()
    assert encode_image(image, "png", metadata=RECORD) == encode_image(image, "png", metadata=dict(RECORD))
