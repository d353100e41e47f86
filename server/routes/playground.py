from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

# Everything the page needs is in this one file: no script, style or font from anywhere else (air-gapped), and
# the policy below makes the browser hold it to that.
_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'"
)


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def playground() -> HTMLResponse:
    page = files("server").joinpath("playground/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": _POLICY, "X-Content-Type-Options": "nosniff"})
