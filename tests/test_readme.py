"""The README's examples run, unchanged but for the server's address, against a real server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from imaging import decode_bytes

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\s*```\w+\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


def test_readme_commands_are_the_ci_commands():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"```bash\n(pip install torch==2\.14\.1 .*pytest)\n```", text).group(1)
    assert test_command in ci
    assert "flux2-local serve" in re.search(r"```bash\n(pip install torch==2\.14\.1 [^\n]*serve)\n```", text).group(1)


def test_python_example(server, tmp_path):
    code = example("python").replace("http://localhost:8000", server.base_url)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "seed 42"
    image = decode_bytes((tmp_path / "coast.png").read_bytes())
    assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_curl_example(server, tmp_path):
    assert shutil.which("curl"), "the README's curl example needs curl"
    command = example("curl").replace("http://localhost:8000", server.base_url)
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert [item["seed"] for item in body["data"]] == [7, 8]
    assert body["size"] == "1024x768"
    for item in body["data"]:
        assert item["url"].startswith(server.base_url)
        image = decode_bytes(httpx.get(item["url"]).content)
        assert (image.format, image.size) == ("PNG", (1024, 768))


def _source_png(folder):
    from PIL import Image

    Image.new("RGB", (320, 240), (40, 90, 160)).save(folder / "source.png")


def test_seed_python_edit_example(server, tmp_path):
    _source_png(tmp_path)
    code = example("python-edit").replace("http://localhost:8000", server.base_url)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    image = decode_bytes(httpx.get(run.stdout.strip()).content)
    assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_seed_curl_edit_example(server, tmp_path):
    _source_png(tmp_path)
    command = example("curl-edit").replace("http://localhost:8000", server.base_url)
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin:/usr/local/bin", "FLUX2_API_KEY": "any"})
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["size"] == "1024x1024"
    image = decode_bytes(httpx.get(body["data"][0]["url"]).content)
    assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_python_stream_example(server, tmp_path):
    code = example("python-stream").replace("http://localhost:8000", server.base_url)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
