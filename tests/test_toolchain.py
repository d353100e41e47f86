"""What `torch.compile` builds at run time needs a compiler and Python's headers (pipeline/toolchain.py): a machine
without them leaves the compile off under auto and refuses an asked one at start, with what to install."""

from __future__ import annotations

import importlib.util
import os

import pytest
from conftest import serve_refused

from pipeline import toolchain
from pipeline.placement import PlacementError, decide_placement

GIB = 1024**3
CUDA = dict(weight_params=1000, cuda_available=True, cuda_free_bytes=80 * GIB)


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """No compiler on the PATH, none named by CC/CXX, and no Python.h where the builders look."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(toolchain, "python_headers", lambda: tmp_path / "include")
    return tmp_path


def test_a_bare_machine_lacks_the_compilers_and_the_headers(bare_machine):
    cuda, cpu = toolchain.compile_toolchain_missing("cuda"), toolchain.compile_toolchain_missing("cpu")
    assert "a C compiler" in cuda and "Python's headers" in cuda and "C++" not in cuda
    assert "a C++ compiler" in cpu and "Python's headers" in cpu and "Triton" not in cpu


def test_a_compiler_on_the_path_or_named_by_the_environment_and_the_headers_are_enough(bare_machine, monkeypatch):
    (bare_machine / "include").mkdir()
    (bare_machine / "include" / "Python.h").write_text("/* the header */\n")
    bin_dir = bare_machine / "bin"
    bin_dir.mkdir()
    gcc = bin_dir / "gcc"
    gcc.write_text("#!/bin/sh\n")
    gcc.chmod(0o755)
    assert toolchain.compile_toolchain_missing("cuda") == ""  # gcc found on the PATH, as Triton finds it
    assert "C++ compiler" in toolchain.compile_toolchain_missing("cpu")  # g++ is not gcc
    monkeypatch.setenv("CXX", "/opt/compilers/bin/clang++")  # taken as given, as Inductor takes it
    assert toolchain.compile_toolchain_missing("cpu") == ""


def test_no_triton_is_missing_on_cuda(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert "Triton" in toolchain.compile_toolchain_missing("cuda")


def test_auto_leaves_the_compile_off_and_an_asked_compile_is_refused_with_what_to_install():
    lacking = "a C compiler (CC, gcc or clang) for Triton's kernel launchers"
    auto = decide_placement(**CUDA, toolchain_missing=lacking)
    assert not auto.compile and not auto.encoder_graphs and not auto.transformer_graphs
    line = next(reason for reason in auto.reasons if reason.startswith("compile:"))
    assert line.startswith("compile: off (auto: this machine lacks a C compiler")
    assert "apt install gcc libc6-dev python3-dev" in line
    with pytest.raises(PlacementError, match=r"--compile needs what this machine lacks: a C compiler.*apt install gcc"):
        decide_placement(**CUDA, compile=True, toolchain_missing=lacking)
    with pytest.raises(PlacementError, match=r"C\+\+ compiler.*apt install g\+\+"):
        decide_placement(weight_params=1000, cuda_available=False, compile=True, toolchain_missing="a C++ compiler")
    assert decide_placement(**CUDA, toolchain_missing="").compile  # nothing missing: auto compiles on CUDA


def test_the_machine_is_looked_at_only_where_a_compile_is_considered(monkeypatch):
    def looked(device):
        raise AssertionError(f"looked for a toolchain for {device}")

    monkeypatch.setattr(toolchain, "compile_toolchain_missing", looked)
    monkeypatch.setattr("pipeline.placement.compile_toolchain_missing", looked)
    assert not decide_placement(weight_params=1000, cuda_available=False).compile  # the CPU's default: no compile
    assert not decide_placement(**CUDA, compile=False).compile
    assert not decide_placement(**CUDA, cache="taylorseer").compile  # held back for another reason first


def test_serve_compile_without_a_compiler_exits_with_what_to_install(tmp_path, tiny_klein):
    """The CLI on a machine without g++ (the CPU's compile builds C++): refused at start, exit status 2."""
    env = {key: value for key, value in os.environ.items() if key not in ("CC", "CXX")}
    env["PATH"] = str(tmp_path)  # no compiler on it; the interpreter is named by its path
    stderr = serve_refused("--model", str(tiny_klein), "--compile", env=env)
    assert "--compile needs what this machine lacks: a C++ compiler" in stderr
    assert "apt install g++ python3-dev" in stderr


def test_bench_compile_without_a_compiler_is_refused_before_anything_is_built(bare_machine):
    """`bench --compile` as serve: refused at start, exit status 2, with what to install (it used to time the eager
    baseline first and then fail inside the warm-up with Triton's or Inductor's own error)."""
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(
        app, ["bench", "--architecture", "tiny", "--device", "cpu", "--compile"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2, result.output
    assert "needs what this machine lacks: a C++ compiler" in result.output
    assert "apt install g++ python3-dev" in result.output
    assert "eager baseline" not in result.output
