"""The image endpoints: thin. Each reads its request (the body model, or `inputs.read_edit_request`), hands it to
the service, and answers JSON or an event stream (with the headers the service set: Server-Timing, ignored
parameters, withheld images). While the service works, the client's disconnect is awaited
(`http.disconnect`), not polled: it cancels the work."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from ..auth import API_KEY_ID
from ..errors import ClientGone
from ..inputs import read_edit_request
from ..metrics import STREAM_STATUS
from ..openapi import EDIT_BODY, IMAGE_RESPONSES, VARIATION_BODY
from ..protocol import ImageGenerationRequest, ImagesResponse
from ..serving import Served
from ..streaming import EventStream
from ..urls import public_base_url
from ..variations import read_variation_request

router = APIRouter(prefix="/v1/images")
T = TypeVar("T")


@router.post(
    "/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=IMAGE_RESPONSES,
    summary="Create images from a prompt",
)
async def create_images(body: ImageGenerationRequest, request: Request, response: Response):
    service = request.app.state.service
    served = await until_disconnected(
        request,
        service.generate(
            body, public_base_url(request, service.settings), headers=response.headers, key_id=_key_id(request)
        ),
    )
    return _answer(served, response, request)


@router.post(
    "/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=IMAGE_RESPONSES,
    openapi_extra=EDIT_BODY,
    summary="Edit or combine up to 10 images from a prompt (optional mask)",
)
async def edit_images(request: Request, response: Response):
    service = request.app.state.service
    inputs = await read_edit_request(request, service.settings.max_image_bytes, request.app.state.remote_fetcher)
    served = await until_disconnected(
        request,
        service.edit(
            inputs, public_base_url(request, service.settings), headers=response.headers, key_id=_key_id(request)
        ),
    )
    return _answer(served, response, request)


@router.post(
    "/variations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    responses=IMAGE_RESPONSES,
    openapi_extra=VARIATION_BODY,
    summary="Make variations of one image",
    description="A variation is an edit of the image with a neutral prompt and a new random seed per image (or "
    "seed + i when `seed` is given); every edit parameter but prompt and mask applies. Default size: the image's.",
)
async def create_variations(request: Request, response: Response):
    service = request.app.state.service
    inputs = await read_variation_request(request, service.settings.max_image_bytes)
    served = await until_disconnected(
        request,
        service.edit(
            inputs,
            public_base_url(request, service.settings),
            headers=response.headers,
            mode="variation",
            key_id=_key_id(request),
        ),
    )
    return _answer(served, response, request)


def _key_id(request: Request) -> str | None:
    """Which API key the request used, as the history names it (set by the auth middleware; None: no keys)."""
    key: str | None = request.scope.get("state", {}).get(API_KEY_ID)
    return key


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled if the client disconnects first (as vLLM's `with_cancellation`): the body has been read,
    so the next ASGI message can only be `http.disconnect`."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _answer(served: Served, response: Response, request: Request):
    """A JSON ImagesResponse, or (stream=true) Server-Sent Events, carrying the headers set on `response`."""
    if isinstance(served, EventStream):
        served.on_status = lambda status: setattr(request.state, STREAM_STATUS, status)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **dict(response.headers)}
        headers.pop("content-length", None)
        return StreamingResponse(served.chunks(), media_type="text/event-stream", headers=headers)
    return served
