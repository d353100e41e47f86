"""docs/DEPLOY.md's commands use only real serve options, and its systemd unit starts the README's server."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

from server.options import OPTIONS

DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "DEPLOY.md"


def serve_commands(text: str) -> list[list[str]]:
    joined = text.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if "flux2-local serve" in line and not line.lstrip().startswith(("#", "|")) and "`" not in line:
            words = shlex.split(line.split("flux2-local serve", 1)[1].split("&")[0].split("#")[0])
            commands.append(words)
    return commands


def test_every_serve_flag_in_the_deploy_guide_is_an_option():
    flags = {option.flag for option in OPTIONS} | {"--no-" + option.flag[2:] for option in OPTIONS}
    commands = serve_commands(DEPLOY.read_text())
    assert len(commands) >= 6
    for words in commands:
        used = {word.split("=")[0] for word in words if word.startswith("--")}
        assert used <= flags, f"not a serve option: {sorted(used - flags)}"


def test_the_systemd_unit_runs_flux2_local_serve_as_its_user():
    unit = re.search(r"```ini\n(.*?)```", DEPLOY.read_text(), re.S).group(1)
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(unit)
    service = parser["Service"]
    command = shlex.split(service["ExecStart"])
    assert command[0].endswith("/flux2-local") and command[1] == "serve"
    assert service["User"] != "root" and service["Environment"] == "HF_HUB_OFFLINE=1"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
