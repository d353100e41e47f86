"""The product page's JavaScript edit example, run with the official OpenAI Node SDK (6.x) against the server."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

NODE_DIR = Path(__file__).resolve().parent / "node"


@pytest.fixture(scope="module")
def node_sdk():
    if not shutil.which("node"):
        pytest.fail("node is needed for the Node SDK test (the test machine has Node 20)")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return NODE_DIR


def test_seed_javascript_edit_example(node_sdk, server, tmp_path):
    source = tmp_path / "source.png"
    Image.fromarray(np.random.RandomState(3).randint(0, 255, (96, 128, 3), dtype=np.uint8)).save(source)
    run = subprocess.run(
        ["node", "seed_edit_example.mjs", f"{server.base_url}/v1", str(source)],
        cwd=node_sdk,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    url, summary = run.stdout.strip().splitlines()
    assert url.startswith(f"{server.base_url}/v1/images/files/")
    image = Image.open(io.BytesIO(httpx.get(url).content))
    assert (image.format, image.size) == ("PNG", (1024, 1024))
    second = json.loads(summary)
    assert (second["size"], second["seed"]) == ("64x64", 5)
    assert second["b64"] > 100
