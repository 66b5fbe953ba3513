"""/ui: the dashboard's page and assets, public (the page asks for an API key and sends it with every call).

Every response carries a strict Content-Security-Policy: scripts and styles only from these files, requests
only to this origin, no frames. The scripts never build HTML from strings, so text from users (file names,
event messages, model output) cannot become markup even if the policy were lifted.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import NotFound

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load (the ETag makes that cheap), so an upgraded server is never paired with old JS.
    "Cache-Control": "no-cache",
}
# Served by name only: a fixed set read once, so no request path ever reaches the filesystem.
ASSETS = {path.name: path for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES and path.stem != "index"}

router = APIRouter(prefix="/ui", include_in_schema=False)


def _serve(path: Path) -> FileResponse:
    return FileResponse(path, media_type=f"{MEDIA_TYPES[path.suffix]}; charset=utf-8", headers=HEADERS)


@router.get("")
def index() -> FileResponse:
    return _serve(STATIC / "index.html")


@router.get("/assets/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"No dashboard asset '{name}'")
    return _serve(ASSETS[name])
