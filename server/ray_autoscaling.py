"""Ray Serve's autoscaling policy for flux2-local: replicas follow the images waiting and running, not the
requests (one request may ask for 10 images). Each replica reports `{"images": queued + running}` from its
`record_autoscaling_stats`; Ray averages each over its look-back window and calls this policy on its controller,
then applies min/max replicas and the up/down-scale delays itself.

Ray pickles this module's function by value into its controller: keep it free of other project imports."""

from __future__ import annotations

import math
from typing import Any

IMAGES_METRIC = "images"


def queued_images_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Enough replicas that each holds about `target_ongoing_requests` images (set to one full batch).
    `ctx` is Ray's `AutoscalingContext`."""
    per_replica = ctx.aggregated_metrics.get(IMAGES_METRIC, {})
    if not per_replica:  # no report yet (replicas starting): keep what was decided
        return ctx.target_num_replicas, {}
    target = ctx.config.target_ongoing_requests or 1
    images = sum(per_replica.values())
    return max(1, math.ceil(images / target)), {}
