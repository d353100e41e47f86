"""Served files carry their request (b64_json, url and streamed images alike), `--no-metadata` leaves them bare, and
`flux2-local reproduce FILE` makes the same image again from a file alone (edits: with their inputs, checked)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from conftest import RunningServer
from hostile_images import png
from imaging import decode_bytes, generate, pixels

from pipeline.file_metadata import SCHEMA, MissingMetadata, read_metadata
from server.provenance import server_version

STEPS = {"num_inference_steps": 2}


def b64_files(response) -> list[bytes]:
    return [base64.b64decode(item.b64_json) for item in response.data]


def test_each_generated_image_records_its_own_seed_and_the_request(client, server):
    response = generate(
        client, prompt="a kite over dunes", n=2, seed=41, size="64x48", response_format="b64_json", **STEPS
    )
    first, second = (read_metadata(data) for data in b64_files(response))
    model = next(iter(httpx.get(f"{server.base_url}/v1/models").json()["data"]))["id"]
    assert first == {
        "schema": SCHEMA,
        "version": server_version(),
        "mode": "generation",
        "model": model,
        "prompt": "a kite over dunes",
        "seed": 41,
        "index": 0,
        "n": 2,
        "steps": 2,
        "guidance_scale": first["guidance_scale"],
        "size": "64x48",
        "output_format": "png",
        "background": "opaque",
    }
    assert isinstance(first["guidance_scale"], float)
    assert (second["seed"], second["index"]) == (42, 1)
    assert [item.seed for item in response.data] == [41, 42]


def test_url_and_streamed_files_carry_it_too(client, server):
    response = generate(
        client,
        prompt="a lantern",
        seed=5,
        size="48x32",
        output_format="jpeg",
        output_compression=70,
        **STEPS,
    )
    record = read_metadata(httpx.get(response.data[0].url).content)
    assert (record["seed"], record["output_format"], record["output_compression"]) == (5, "jpeg", 70)
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "a lantern", "seed": 5, "size": "48x32", "stream": True, "partial_images": 1, **STEPS},
        timeout=60,
    ) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data:")]
    completed = [e for e in events if '"image_generation.completed"' in e]
    data = base64.b64decode(json.loads(completed[0].removeprefix("data:"))["b64_json"])
    assert read_metadata(data)["seed"] == 5


def test_an_edit_records_the_hashes_of_its_inputs(client):
    source, mask = png(64, 48), png(64, 48)
    response = client.images.edit(
        image=("in.png", source, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="night",
        response_format="b64_json",
        extra_body={"seed": 3, **STEPS},
    )
    record = read_metadata(b64_files(response)[0])
    assert record["mode"] == "edit" and record["references_embedded"] is False
    assert record["references"] == [hashlib.sha256(source).hexdigest()]
    assert record["mask_sha256"] == hashlib.sha256(mask).hexdigest()


def test_no_metadata_serves_bare_files(tiny_klein, tmp_path):
    with RunningServer(["--model", str(tiny_klein), "--no-metadata"], tmp_path) as bare:
        for output_format in ("png", "jpeg", "webp", "avif"):
            body = httpx.post(
                f"{bare.base_url}/v1/images/generations",
                json={
                    "prompt": "private",
                    "size": "32x32",
                    "output_format": output_format,
                    "response_format": "b64_json",
                    **STEPS,
                },
                timeout=60,
            ).json()
            data = base64.b64decode(body["data"][0]["b64_json"])
            image = decode_bytes(data)
            assert not {"exif", "xmp", "flux2-local", "parameters"} & set(image.info)
            assert not image.getexif()
            for marker in (b"private", b"flux2", b"Exif", b"xmpmeta", b"tEXt", b"iTXt"):
                assert marker not in data, (output_format, marker)
            with pytest.raises(MissingMetadata):
                read_metadata(data)


def reproduce(*args, cwd):
    """`flux2-local reproduce` in a real process (the path a user takes)."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "reproduce", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def reproduce_here(*args, cwd, monkeypatch):
    """The same command run in this process (typer's runner), to keep the tests that call it often quick."""
    from typer.testing import CliRunner

    from server.cli import app

    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, ["reproduce", *args])


def test_reproduce_makes_the_same_bytes(client, server, tmp_path):
    (data,) = b64_files(
        generate(client, prompt="a red kite", seed=99, size="64x48", response_format="b64_json", **STEPS)
    )
    (tmp_path / "kite.png").write_bytes(data)
    run = reproduce("kite.png", "--server", server.base_url, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "kite-reproduced.png  (64x48, seed 99): the same bytes as the original" in run.stdout
    assert (tmp_path / "kite-reproduced.png").read_bytes() == data


def test_reproduce_the_second_image_of_two_gives_its_pixels(client, server, tmp_path, monkeypatch):
    response = generate(
        client,
        prompt="two boats",
        n=2,
        seed=10,
        size="48x48",
        output_format="webp",
        response_format="b64_json",
        **STEPS,
    )
    second = b64_files(response)[1]
    (tmp_path / "boats.webp").write_bytes(second)
    (tmp_path / "renamed.png").write_bytes(second)
    here = {"cwd": tmp_path, "monkeypatch": monkeypatch}
    wrong = reproduce_here("boats.webp", "-o", "again.jpg", "--server", server.base_url, **here)
    assert wrong.exit_code == 1 and "as webp, as the original was, not as jpeg" in wrong.stderr
    assert not (tmp_path / "again.jpg").exists()  # refused before any request: WebP bytes never land in a .jpg
    renamed = reproduce_here("renamed.png", "--server", server.base_url, **here)
    assert renamed.exit_code == 0, renamed.output
    assert decode_bytes((tmp_path / "renamed-reproduced.webp").read_bytes()).format == "WEBP"
    run = reproduce_here("boats.webp", "-o", "again.webp", "--server", server.base_url, **here)
    assert run.exit_code == 0, run.output
    assert "seed 11" in run.stdout and "the same pixels as the original" in run.stdout
    again = (tmp_path / "again.webp").read_bytes()
    assert np.array_equal(pixels(decode_bytes(again)), pixels(decode_bytes(second)))
    assert (read_metadata(again)["n"], read_metadata(again)["index"]) == (1, 0)  # it was made alone


def test_reproduce_an_edit_needs_and_checks_its_inputs(client, server, tmp_path, monkeypatch):
    source = png(64, 48)
    (tmp_path / "source.png").write_bytes(source)
    (tmp_path / "other.png").write_bytes(png(32, 32))
    response = client.images.edit(
        image=("source.png", source, "image/png"),
        prompt="snow",
        response_format="b64_json",
        extra_body={"seed": 8, **STEPS},
    )
    (tmp_path / "edit.png").write_bytes(b64_files(response)[0])
    here = {"cwd": tmp_path, "monkeypatch": monkeypatch}
    missing = reproduce_here("edit.png", "--server", server.base_url, **here)
    assert missing.exit_code == 1
    assert "an edit of 1 image(s)" in missing.stderr and "--image" in missing.stderr
    wrong = reproduce_here("edit.png", "-i", "other.png", "--server", server.base_url, **here)
    assert wrong.exit_code == 1 and "--image number 1 is not the file used" in wrong.stderr
    right = reproduce_here("edit.png", "-i", "source.png", "--server", server.base_url, **here)
    assert right.exit_code == 0, right.output
    assert "the same bytes as the original" in right.stdout


def test_reproduce_refuses_a_file_without_our_metadata(tmp_path, monkeypatch):
    (tmp_path / "photo.png").write_bytes(png())
    (tmp_path / "notes.txt").write_text("hello")
    run = reproduce_here("photo.png", cwd=tmp_path, monkeypatch=monkeypatch)
    assert run.exit_code == 1
    assert run.stderr.strip() == "error: photo.png: this PNG file carries no flux2-local metadata"
    run = reproduce_here("notes.txt", cwd=tmp_path, monkeypatch=monkeypatch)
    assert run.exit_code == 1 and "not an image file" in run.stderr
