from fastapi import APIRouter, Request, Response

from ..errors import APIError

router = APIRouter()


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus_metrics(request: Request) -> Response:
    if not request.app.state.settings.metrics:
        raise APIError(404, "Metrics are turned off (--no-metrics).", code="not_found")
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
