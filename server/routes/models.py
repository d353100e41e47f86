from fastapi import APIRouter, Request

from pipeline.adapters import Adapters

from ..errors import APIError
from ..protocol import ErrorResponse, LoraCard, ModelCard, ModelList

router = APIRouter(prefix="/v1")


def _cards(request: Request) -> list[ModelCard]:
    settings = request.app.state.settings
    created = request.app.state.started_at
    adapters = request.app.state.engine.model_adapters()
    checker = request.app.state.engine.health().safety_checker
    return [
        ModelCard(
            id=model_id,
            created=created,
            owned_by="flux2-local",
            loras=_loras(adapters.get(name)),
            safety_checker=checker,
        )
        for model_id, name in settings.model_ids.items()
    ]


def _loras(adapters: Adapters | None) -> list[LoraCard]:
    if not adapters:
        return []
    return [LoraCard(name=a.name, scale=a.scale, file=a.path.name, fused=a.fused) for a in adapters.items]


@router.get(
    "/models",
    response_model=ModelList,
    summary="The served model and its aliases (with their LoRA adapters)",
)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(request))


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    summary="One served model",
    responses={404: {"model": ErrorResponse, "description": "Unknown model"}},
)
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(request):
        if card.id == model_id:
            return card
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
