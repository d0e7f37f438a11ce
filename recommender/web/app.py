"""The ``/ui`` Starlette app: two pages, their static files and the form description.

Mounted by :mod:`recommender.service` (``@bentoml.asgi_app(ui_app, path=UI_PATH)``). The
pages are public files; everything they show comes from the JSON API, which checks the
API key on every call, so nothing here needs a key.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recommender.web.fields import form_description

UI_PATH = "/ui"
STATIC_DIR = Path(__file__).parent / "static"

# Same-origin only: the pages may load their own files and call their own API, nothing
# else (no CDN, no inline script or style to inject into, no framing). The API key lives
# in sessionStorage, so keeping foreign script out is what protects it.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    # Small files that change with the package; always revalidate (ETag/Last-Modified).
    (b"cache-control", b"no-cache"),
]


class SecurityHeaders:
    """Adds :data:`_HEADERS` to every response of the UI app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _page(filename: str):
    async def page(_request: Request) -> Response:
        return FileResponse(STATIC_DIR / filename, media_type="text/html")

    return page


@cache
def _fields() -> dict:
    return form_description()


async def _fields_json(_request: Request) -> Response:
    return JSONResponse(_fields())


ui_app = Starlette(
    routes=[
        Route("/", _page("clinician.html"), methods=["GET"], name="ui_home"),
        Route("/clinician", _page("clinician.html"), methods=["GET"], name="ui_clinician"),
        Route("/auditor", _page("auditor.html"), methods=["GET"], name="ui_auditor"),
        Route("/fields.json", _fields_json, methods=["GET"], name="ui_fields"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="ui_static"),
    ],
    middleware=[Middleware(SecurityHeaders)],
)
