"""`serve --ray` without a cluster: its options refused or turned into Ray Serve deployment options, the autoscaling
policy against Ray's own context class, the Ray Serve config file building an application, the proxy's errors put
in OpenAI's envelope, the message without Ray installed, and the x-flux2-replica header of a single process."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from pipeline.engine import EngineOptions
from server.cli import app as cli
from server.options import ServeConfig
from server.ray_autoscaling import IMAGES_METRIC, queued_images_policy
from server.ray_proxy import ProxyErrorEnvelopeMiddleware
from server.scaleout import AUTOSCALING_POLICY, RayOptions, deployment_options
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2"], "--replicas only applies with --ray"),
        (["--replicas", "2", "--gpus-per-replica", "0.5"], "--replicas, --gpus-per-replica only apply with --ray"),
        (["--ray", "--replicas", "2", "--autoscale", "1:3"], "either --replicas or --autoscale"),
        (["--ray", "--autoscale", "3:1"], "--autoscale must be MIN:MAX"),
        (["--ray", "--autoscale", "two"], "--autoscale must be MIN:MAX"),
        (["--ray", "--replicas", "0"], "--replicas must be at least 1"),
        (["--ray", "--gpus-per-replica", "0"], "--gpus-per-replica must be above 0"),
    ],
)
def test_impossible_ray_options_are_usage_errors(args, message):
    result = CliRunner().invoke(cli, ["serve", *args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_fixed_replicas_become_deployment_options():
    settings, engine = Settings(shutdown_timeout=20), EngineOptions(max_batch_images=4, max_queue_images=16)
    options = deployment_options(RayOptions(enabled=True, replicas=3), settings, engine, gpus=1.0)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    # The proxy sends a replica as many requests as its engine can hold: the engine's own 429 is the limit.
    assert options["max_ongoing_requests"] == 20 and options["max_queued_requests"] == -1
    assert options["graceful_shutdown_timeout_s"] > settings.shutdown_timeout
    cpu = deployment_options(RayOptions(enabled=True), settings, engine, gpus=0.0)
    assert cpu["ray_actor_options"] == {"num_cpus": 1.0}


def test_autoscaling_counts_images_with_our_policy():
    engine = EngineOptions(max_batch_images=4)
    options = deployment_options(RayOptions(enabled=True, autoscale="1:5"), Settings(), engine, gpus=0.5)
    scaling = options["autoscaling_config"]
    assert "num_replicas" not in options
    assert (scaling["min_replicas"], scaling["initial_replicas"], scaling["max_replicas"]) == (1, 1, 5)
    assert scaling["target_ongoing_requests"] == 4
    assert scaling["policy"] == {"policy_function": AUTOSCALING_POLICY}
    module, name = AUTOSCALING_POLICY.split(":")
    assert getattr(importlib.import_module(module), name) is queued_images_policy


def test_the_policy_reads_rays_autoscaling_context():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the [ray] extra)")
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    def context(images: dict[str, float], current: int) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=None,
            deployment_name="Flux2Replica",
            app_name="flux2",
            current_num_replicas=current,
            target_num_replicas=current,
            running_replicas=[],
            total_num_requests=0.0,
            total_queued_requests=0.0,
            aggregated_metrics={IMAGES_METRIC: images} if images else {},
            raw_metrics={},
            capacity_adjusted_min_replicas=1,
            capacity_adjusted_max_replicas=8,
            policy_state={},
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=None,
            config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4),
        )

    # 2 replicas holding 10 and 7 images, 4 each wanted: 5 replicas. One request for n=10 counts 10, not 1.
    assert queued_images_policy(context({"a": 10.0, "b": 7.0}, 2))[0] == 5
    assert queued_images_policy(context({"a": 0.0, "b": 1.0}, 2))[0] == 1
    assert queued_images_policy(context({}, 3))[0] == 3  # no report yet: keep the current target


def test_the_serve_config_file_builds_an_application(tmp_path):
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the [ray] extra)")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema(**yaml.safe_load((ROOT / "deploy" / "ray-serve.yaml").read_text()))
    (application,) = config.applications
    module, name = application.import_path.split(":")
    builder = getattr(importlib.import_module(module), name)
    built = builder(application.args)
    assert isinstance(built, serve.Application)
    deployment = built._bound_deployment
    assert deployment.name == "Flux2Replica"
    assert deployment.num_replicas == application.args["replicas"]
    assert deployment.ray_actor_options["num_gpus"] == application.args["gpus_per_replica"]
    (bound_config,) = deployment.init_args
    assert isinstance(bound_config, ServeConfig) and bound_config.ray.enabled
    assert bound_config.settings.output_dir == Path(application.args["output_dir"])
    # The args are serve options by name: a misspelt one is refused, not ignored.
    with pytest.raises(ValueError, match="unknown serve option"):
        builder({"output_dirr": str(tmp_path)})


def test_without_ray_the_command_says_how_to_install_it(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['ray.serve'] = None\n"
        "from server.cli import main\n"
        f"sys.argv = ['flux2-local', 'serve', '--ray', '--weights-dir', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert 'pip install -e ".[ray]"' in run.stderr


async def _proxy_answer(inner) -> httpx.Response:
    transport = httpx.ASGITransport(app=ProxyErrorEnvelopeMiddleware(inner))
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        return await client.post("/v1/images/generations", json={"prompt": "x"})


def test_the_proxys_own_errors_come_in_openais_envelope():
    async def died(scope, receive, send):  # what Ray's proxy does when the replica holding the request died
        return

    async def backpressure(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"3")],
            }
        )
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure."})

    async def ours(scope, receive, send):  # a replica's own answer passes untouched
        body = b'{"error": {"message": "busy", "type": "rate_limit_exceeded", "param": null, "code": "x"}}'
        await send({"type": "http.response.start", "status": 429, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    dead = asyncio.run(_proxy_answer(died))
    assert dead.status_code == 503 and dead.headers["retry-after"] == "1"
    assert dead.json()["error"]["code"] == "replica_unavailable"
    assert set(dead.json()["error"]) == {"message", "type", "param", "code"}
    full = asyncio.run(_proxy_answer(backpressure))
    assert (full.status_code, full.headers["retry-after"]) == (503, "3")
    assert full.json()["error"]["message"].endswith("Request dropped due to backpressure.")
    mine = asyncio.run(_proxy_answer(ours))
    assert (mine.status_code, mine.json()["error"]["message"]) == (429, "busy")


def test_a_single_process_names_itself_in_every_answer(server):
    for response in (
        httpx.get(f"{server.base_url}/health"),
        httpx.get(f"{server.base_url}/v1/nope"),
        httpx.get(f"{server.base_url}/v1/models"),
    ):
        name = response.headers["x-flux2-replica"]
        assert name.startswith("local@") and name.endswith(f":{server.process.pid}")
