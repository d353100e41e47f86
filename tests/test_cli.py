"""The `flux2-local` command as a newcomer meets it: no --model builds and serves tiny weights, loudly."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from conftest import RunningServer, serve_refused


def test_serve_without_model_builds_tiny_weights_and_warns(tmp_path):
    server = RunningServer(
        ["--public-url", "http://images.studio.example:9000/"], tmp_path, env={"FLUX2_MODEL_NAME": "from-env"}
    )
    try:
        server.wait_healthy()
        assert (tmp_path / "weights" / "tiny-flux2-klein" / "model_index.json").is_file()
        log = server.log()
        assert "TINY RANDOM-WEIGHT" in log and "images are NOISE" in log
        for decision in ("device: cpu", "dtype: float32", "offload: none"):
            assert decision in log
        models = httpx.get(f"{server.base_url}/v1/models").json()
        assert models["data"][0]["id"] == "from-env"
        body = httpx.post(
            f"{server.base_url}/v1/images/generations",
            timeout=60,
            json={"prompt": "x", "size": "32x32", "num_inference_steps": 1},
        ).json()
        assert body["data"][0]["url"].startswith("http://images.studio.example:9000/v1/images/files/")
    finally:
        code = server.stop()
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status reports the signal.
    assert code in (0, -15)
    assert "Application shutdown complete" in server.log()


def test_bad_model_path_exits_with_a_clear_message(tmp_path):
    assert "neither a diffusers folder nor a hub id" in serve_refused("--model", str(tmp_path / "nope"))


def test_tiny_weights_command(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "tiny-weights", str(tmp_path / "d"), "--variant", "dev"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert '"Flux2Pipeline"' in (tmp_path / "d" / "model_index.json").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "server.cli", "tiny-weights", str(tmp_path / "e"), "--variant", "xl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    (tmp_path / "a-file").write_text("x")
    unwritable = subprocess.run(  # a folder that cannot be made: one line, not diffusers' traceback
        [sys.executable, "-m", "server.cli", "tiny-weights", str(tmp_path / "a-file" / "w")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr
    assert f"error: cannot write the weights to {tmp_path / 'a-file' / 'w'}: Not a directory" in unwritable.stderr


def test_bench_command_runs_and_reports_every_figure():
    # Ratios are measured by the command, not asserted here: timing on a shared CI machine is no test.
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "--count", "2", "--repeats", "1", "--size", "64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for label in (
        "(a) 2 requests one by one",
        "(b) 2 concurrent",
        "(c) one direct pipeline call",
        "(d) 2 direct single",
        "(a)/(b)",
        "(b)/(c)",
        "prompt cache",
        "streaming 3 partial images",
    ):
        assert label in run.stdout


def _cli(*args, cwd=None, env=None):
    import os

    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_generate_command_writes_numbered_files_and_reports_seeds(server, tmp_path):
    from PIL import Image

    run = _cli(
        "generate",
        "a red kite",
        "-o",
        str(tmp_path / "kite.png"),
        "--size",
        "48x32",
        "-n",
        "2",
        "--seed",
        "7",
        "--steps",
        "3",
        "--server",
        server.base_url,
    )
    assert run.returncode == 0, run.stderr
    assert f"{tmp_path / 'kite-1.png'}  (48x32, seed 7)" in run.stdout
    assert f"{tmp_path / 'kite-2.png'}  (48x32, seed 8)" in run.stdout
    for name in ("kite-1.png", "kite-2.png"):
        assert Image.open(tmp_path / name).size == (48, 32)


def test_edit_command_with_two_images_default_names_and_format(server, tmp_path):
    from hostile_images import png
    from PIL import Image

    (tmp_path / "a.png").write_bytes(png(64, 48))
    (tmp_path / "b.png").write_bytes(png(32, 32))
    run = _cli(
        "edit",
        "combine",
        "-i",
        "a.png",
        "-i",
        "b.png",
        "--seed",
        "3",
        "--steps",
        "2",
        "--format",
        "jpeg",
        cwd=tmp_path,
        env={"FLUX2_SERVER": server.base_url},
    )
    assert run.returncode == 0, run.stderr
    assert "flux2-3.jpg  (64x48, seed 3)" in run.stdout
    image = Image.open(tmp_path / "flux2-3.jpg")
    assert (image.format, image.size) == ("JPEG", (64, 48))


def test_client_errors_are_one_clear_line(server, tmp_path):
    bad = _cli("generate", "x", "--size", "huge", "--server", server.base_url)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: 400:") and "(parameter size)" in bad.stderr
    down = _cli("generate", "x", "--server", "http://127.0.0.1:9")
    assert down.returncode == 1 and "could not reach" in down.stderr


def test_an_output_that_cannot_be_written_is_refused_before_the_request(server, tmp_path):
    """Checked before anything is sent (here the server is unreachable, and the error is still the path's): once
    the image was made, then lost to a traceback."""
    unreachable = "http://127.0.0.1:9"
    for output, words in (
        (tmp_path / "missing" / "x.png", "does not exist"),
        (tmp_path, "it is a folder"),
    ):
        run = _cli("generate", "x", "-o", str(output), "--server", unreachable)
        assert run.returncode == 1 and run.stderr.startswith(f"error: cannot write {output}"), run.stderr
        assert words in run.stderr and "Traceback" not in run.stderr
    exported = _cli("history", "--jsonl", str(tmp_path / "missing" / "h.jsonl"), "--server", server.base_url)
    assert exported.returncode == 1 and "error: cannot write" in exported.stderr, exported.stderr
    assert "Traceback" not in exported.stderr


def test_the_output_files_extension_sets_the_format_and_may_not_contradict_it(server, tmp_path):
    from PIL import Image

    made = _cli("generate", "x", "-o", str(tmp_path / "out.jpg"), "--size", "32x32", "--steps", "1",
                "--server", server.base_url)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"
    clash = _cli("generate", "x", "-o", str(tmp_path / "out.png"), "--format", "jpg", "--server", server.base_url)
    assert clash.returncode == 1 and "--format jpg does not match the output file out.png" in clash.stderr
    assert not (tmp_path / "out.png").exists()
    unknown = _cli("generate", "x", "-o", str(tmp_path / "k.xyz"), "--server", server.base_url)
    assert unknown.returncode == 1 and "cannot tell an image format from k.xyz" in unknown.stderr
    assert not (tmp_path / "k.xyz").exists()
    told = _cli("generate", "x", "-o", str(tmp_path / "k.img"), "--format", "webp", "--size", "16x16", "--steps", "1",
                "--server", server.base_url)  # fmt: skip
    assert told.returncode == 0, told.stderr
    assert Image.open(tmp_path / "k.img").format == "WEBP"


def test_a_server_url_ending_in_v1_works_and_another_server_is_named_not_dumped(server, tmp_path):
    """`--server http://host:8000/v1` (the base URL the SDKs take) works; a server that is not flux2-local gets one
    line saying so, not its HTML error page."""
    import http.server
    import threading

    from conftest import free_port

    made = _cli("generate", "x", "--size", "16x16", "--steps", "1", "--server", f"{server.base_url}/v1/",
                cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    other = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        run = _cli("generate", "x", "--server", f"http://127.0.0.1:{other.server_address[1]}", cwd=tmp_path)
    finally:
        other.shutdown()
    assert run.returncode == 1 and "not an answer of flux2-local's" in run.stderr, run.stderr
    assert "<" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_a_broken_tiny_folder_is_rebuilt(tmp_path):
    broken = tmp_path / "weights" / "tiny-flux2-klein"
    broken.mkdir(parents=True)
    (broken / "model_index.json").write_text("{not json")
    with RunningServer([], tmp_path) as server:
        assert httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"] == "tiny-flux2-klein"
        assert "replacing" in server.log()


def test_without_a_terminal_the_client_prints_its_progress_as_lines(server, tmp_path):
    run = _cli(
        "generate",
        "a kite",
        "-o",
        str(tmp_path / "k.png"),
        "--size",
        "32x32",
        "--steps",
        "3",
        "--server",
        server.base_url,
    )  # captured: stdout is a pipe, not a terminal
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert any("request accepted" in line for line in lines)
    assert [line.split("] ", 1)[1] for line in lines if "step " in line] == ["step 1/3", "step 2/3", "step 3/3"]
    assert any("image 1/1 received" in line for line in lines)
    assert f"{tmp_path / 'k.png'}  (32x32, seed" in run.stdout


class _HeaderRecorder:
    """A local HTTP server that records the request headers and answers one completed image event."""

    def __init__(self):
        import base64
        import io
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        b64 = base64.b64encode(buffer.getvalue()).decode()
        event = (
            f'event: image_generation.completed\ndata: {{"b64_json": "{b64}", "size": "8x8", "seed": 1}}\n\n'
        ).encode()
        self.headers: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                recorder.headers.append(dict(self.headers))
                self.rfile.read(int(self.headers.get("content-length", 0)))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(event)))
                self.end_headers()
                self.wfile.write(event)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.mark.parametrize("key", [None, "", "   "])
def test_no_authorization_header_without_a_key(tmp_path, key):
    recorder = _HeaderRecorder()
    env = {"FLUX2_API_KEY": key} if key is not None else {}
    import os

    environment = {k: v for k, v in os.environ.items() if k != "FLUX2_API_KEY"}
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "x", "-o", str(tmp_path / "o.png"), "--server", recorder.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **env},
    )
    recorder.httpd.shutdown()
    assert run.returncode == 0, run.stderr
    assert recorder.headers and not any(k.lower() == "authorization" for k in recorder.headers[0])


def test_a_key_is_sent_as_a_bearer_token(tmp_path):
    recorder = _HeaderRecorder()
    run = _cli("generate", "x", "-o", str(tmp_path / "o.png"), "--server", recorder.url, "--api-key", " sk-1 ")
    recorder.httpd.shutdown()
    assert run.returncode == 0, run.stderr
    assert recorder.headers[0]["Authorization"] == "Bearer sk-1"
