from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health", summary="200 once the model is loaded, 503 before (or if loading failed)")
async def health(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    state = engine.state
    body = {"status": "ok" if state == "ready" else state}
    if engine.load_error:
        body["error"] = engine.load_error
    return JSONResponse(body, status_code=200 if state == "ready" else 503)
