"""The chat page at / (docs/API.md#the-chat-page): HTML, CSS and plain JavaScript shipped in the
package (pyproject's package-data), served as they are: no build step, nothing from the internet."""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"


async def chat_page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html")


def page_routes() -> list[BaseRoute]:
    """`GET /` (the page) and `/static/...` (what it loads); neither needs the API key."""
    return [Route("/", chat_page, methods=["GET"]), Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")]
