from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from ..errors import APIError
from ..media import media_type_for_extension
from ..protocol import ErrorResponse
from ..serving import FILES_ROUTE

router = APIRouter(prefix=FILES_ROUTE)


@router.get(
    "/{name}",
    summary="A generated image, by the name in its url",
    response_class=FileResponse,
    responses={
        200: {
            "content": {t: {} for t in ("image/png", "image/jpeg", "image/webp", "image/gif", "image/avif")},
            "description": "The image",
        },
        404: {"model": ErrorResponse, "description": "No such image (or expired)"},
    },
)
@router.head("/{name}", include_in_schema=False)  # the headers alone (download managers, `curl -I`)
async def get_file(name: str, request: Request) -> FileResponse:
    path = request.app.state.service.store.path_of(name)
    if path is None:
        raise APIError(404, f"No image named '{name}' (it may have expired).", param="name", code="file_not_found")
    media_type = media_type_for_extension(path.suffix) or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"X-Content-Type-Options": "nosniff"})
