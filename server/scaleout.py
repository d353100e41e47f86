"""What `serve --ray` was asked for (`RayOptions`, fed by the serve options table) and the Ray Serve deployment
options it makes: replicas or autoscaling bounds, the resources of one replica, the proxy's back-pressure, the
drain and health-check timing. Plain data: Ray itself is imported only in ray_serving.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.engine import EngineOptions

from .settings import Settings

DEPLOYMENT_NAME = "Flux2Replica"
APP_NAME = "flux2"
RAY_INSTALL_HINT = 'Ray Serve is not installed: pip install -e ".[ray]" (or pip install "flux2-local[ray]").'
# The Ray proxy's callback (set before the cluster starts) that puts its own errors in OpenAI's envelope.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "server.ray_proxy:middlewares"
AUTOSCALING_POLICY = "server.ray_autoscaling:queued_images_policy"


class ScaleOutError(ValueError):
    """A combination of --ray options that cannot work; the message names the option."""


@dataclass(frozen=True)
class RayOptions:
    """The --ray options; the command line's defaults come from here."""

    enabled: bool = False  # serve through Ray Serve replicas instead of one process
    replicas: int = 1  # a fixed number of replicas (one engine, one model copy each)
    autoscale: str | None = None  # "MIN:MAX": replicas follow the queued images between these bounds
    gpus_per_replica: float = 1.0  # GPUs each replica holds (fractions share a GPU); CPU replicas hold none
    address: str | None = None  # an existing Ray cluster ("auto", "ray://head:10001"); default: start one here

    def bounds(self) -> tuple[int, int] | None:
        """(MIN, MAX) of --autoscale, or None for a fixed number of replicas."""
        if self.autoscale is None:
            return None
        low, sep, high = self.autoscale.partition(":")
        try:
            bounds = (int(low), int(high)) if sep else None
        except ValueError:
            bounds = None
        if bounds is None or not 0 < bounds[0] <= bounds[1]:
            raise ScaleOutError(f"--autoscale must be MIN:MAX with 1 <= MIN <= MAX, not {self.autoscale!r}")
        return bounds

    def check(self) -> None:
        """Refuse what cannot work before anything starts."""
        given = [
            flag
            for flag, value, default in (
                ("--replicas", self.replicas, 1),
                ("--autoscale", self.autoscale, None),
                ("--gpus-per-replica", self.gpus_per_replica, 1.0),
                ("--ray-address", self.address, None),
            )
            if value != default
        ]
        if given and not self.enabled:
            verb = "applies" if len(given) == 1 else "apply"
            raise ScaleOutError(f"{', '.join(given)} only {verb} with --ray")
        if self.replicas < 1:
            raise ScaleOutError("--replicas must be at least 1")
        if self.autoscale is not None and self.replicas != 1:
            raise ScaleOutError("give either --replicas or --autoscale, not both")
        if self.gpus_per_replica <= 0:
            raise ScaleOutError("--gpus-per-replica must be above 0 (use --device cpu for CPU replicas)")
        self.bounds()


def replica_resources(gpus: float) -> dict[str, float]:
    """Ray actor resources of one replica: its GPUs, or one CPU for a CPU replica (Ray then sets the replica's
    OMP_NUM_THREADS to it)."""
    return {"num_cpus": 1.0, "num_gpus": gpus} if gpus > 0 else {"num_cpus": 1.0}


def deployment_options(ray: RayOptions, settings: Settings, engine: EngineOptions, gpus: float) -> dict[str, Any]:
    """Keyword arguments for `Deployment.options(...)`.

    - Back-pressure: the proxy sends a replica up to `max_ongoing_requests` requests at once, as many as its engine
      can hold (a request is at least one image), so each replica's own queue limit answers 429 with its
      Retry-After; requests beyond that wait in the proxy (`max_queued_requests`, -1: unbounded, which the Ray
      Serve config file can bound: the proxy then answers 503).
    - Drain: on shutdown or scale-down Ray stops routing to the replica, waits for its requests for up to
      `graceful_shutdown_timeout_s` (the --shutdown-timeout plus a margin for the engine to stop), then stops it.
    - Autoscaling counts queued + running images per replica (server/ray_autoscaling.py), aiming at one full
      batch (--max-batch-images) each.
    """
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": replica_resources(gpus),
        "max_ongoing_requests": engine.max_batch_images + engine.max_queue_images,
        "max_queued_requests": -1,
        "graceful_shutdown_timeout_s": settings.shutdown_timeout + 10.0,
        "graceful_shutdown_wait_loop_s": 1.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
    }
    bounds = ray.bounds()
    if bounds is None:
        options["num_replicas"] = ray.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": bounds[0],
            "initial_replicas": bounds[0],
            "max_replicas": bounds[1],
            "target_ongoing_requests": engine.max_batch_images,  # read by our policy as images per replica
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 300.0,
            "policy": {"policy_function": AUTOSCALING_POLICY},
        }
    return options
