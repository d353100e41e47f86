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


EXAMPLES = README.parent / "examples"


def test_the_examples_folder_holds_what_the_examples_read():
    image = decode_bytes((EXAMPLES / "source.png").read_bytes())
    assert image.format == "PNG" and image.size == (512, 384)
    # examples/edit.mjs is the README's JavaScript example, as written there.
    assert (EXAMPLES / "edit.mjs").read_text() == example("node-edit")


def test_seed_python_edit_example(server):
    code = example("python-edit").replace("http://localhost:8000", server.base_url)
    run = subprocess.run([sys.executable, "-c", code], cwd=EXAMPLES, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    image = decode_bytes(httpx.get(run.stdout.strip()).content)
    assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_seed_curl_edit_example(server):
    command = example("curl-edit").replace("http://localhost:8000", server.base_url)
    run = subprocess.run(
        ["bash", "-c", command],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "FLUX2_API_KEY": "any"},
    )
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


def test_node_edit_example_as_an_mjs_file(server, tmp_path):
    """The product page's JavaScript, saved as a .mjs file as the README says, runs with the Node SDK."""
    node_dir = README.parent / "tests" / "node"
    if not shutil.which("node") or not (node_dir / "node_modules" / "openai").is_dir():
        import pytest

        pytest.skip("needs node and tests/node's npm packages (.ci/run installs them)")
    script = node_dir / f"readme-edit-{tmp_path.name}.mjs"  # beside node_modules, so 'openai' resolves
    script.write_text(example("node-edit").replace("http://localhost:8000", server.base_url))
    try:
        run = subprocess.run(["node", str(script)], cwd=EXAMPLES, capture_output=True, text=True, timeout=300)
    finally:
        script.unlink()
    assert run.returncode == 0, run.stderr
    image = decode_bytes(httpx.get(run.stdout.strip()).content)
    assert (image.format, image.size) == ("PNG", (1024, 1024))


def test_readme_states_the_measured_figures():
    text = README.read_text()
    assert "TEST_MINUTES" not in text
    size_kb = sum(f.stat().st_size for f in _tiny_folder().rglob("*") if f.is_file()) / 1024
    # One true size, stated the same way everywhere: the files' bytes, rounded to 100 KB.
    stated = f"{round(size_kb, -2):.0f} KB"
    assert text.count(stated) >= 2, (size_kb, stated)


def _tiny_folder():
    import tempfile

    from pipeline.tiny_weights import build_tiny_weights

    return build_tiny_weights(Path(tempfile.mkdtemp()) / "tiny", "klein")
