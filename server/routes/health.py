from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health", responses={503: {"description": "Not ready"}}, summary="200 once the default model is loaded; 503 while loading, after a failed load, "
                                "or while shutting down")
async def health(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    state = "stopping" if request.app.state.draining else engine.state
    body = {"status": "ok" if state == "ready" else state, "models_loaded": engine.pool.loaded,
            "queued_images": engine.queued_images, "running_images": engine.running_images,
            "test_models": request.app.state.settings.test_model_ids}
    if engine.load_error:
        body["error"] = engine.load_error
    return JSONResponse(body, status_code=200 if state == "ready" else 503)
