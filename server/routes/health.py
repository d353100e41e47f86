from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get(
    "/health",
    responses={503: {"description": "Not ready"}},
    summary="200 once the default model is loaded; 503 while loading, after a failed load, or while shutting down",
)
@router.head("/health", include_in_schema=False)  # uptime monitors that ask with HEAD: the status alone
async def health(request: Request) -> JSONResponse:
    health = request.app.state.engine.health()
    state = health.state
    body = {
        "status": "ok" if state == "ready" else state,
        "models_loaded": list(health.models_loaded),
        "queued_images": health.queued_images,
        "running_images": health.running_images,
        "test_models": request.app.state.settings.test_model_ids,
        "safety_checker": health.safety_checker,  # null: none configured, images are not screened
    }
    if health.load_error:
        body["error"] = health.load_error
    return JSONResponse(body, status_code=200 if state == "ready" else 503)
