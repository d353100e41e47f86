from fastapi import APIRouter, Request

from ..protocol import ErrorResponse, ImageGenerationRequest, ImagesResponse
from ..urls import public_base_url

router = APIRouter(prefix="/v1/images")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 500, 503)}


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True, responses=_ERRORS,
             summary="Create images from a prompt")
async def create_images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    service = request.app.state.service
    return await service.generate(body, public_base_url(request, service.settings))
