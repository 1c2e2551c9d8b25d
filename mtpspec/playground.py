"""The web playground at ``/``: watch speculative decoding happen, token by token.

Three static files ship in the package (``mtpspec/static``: ``index.html``, ``app.js``,
``style.css``; package data, no build step, nothing fetched from elsewhere at run time, and a
Content-Security-Policy that forbids it). The page talks to the server through its public API
only: ``GET /v1/models`` for the model and method, and streamed ``/v1/completions`` or
``/v1/chat/completions`` with the two documented extensions (``openai_api``):
``stream_options.include_draft`` marks every token as an accepted draft or the target's own (the
bonus or a correction) with its step's draft length, and ``draft_k: 0`` decodes a request plainly
for the side-by-side comparison.

Must not: read or change the engine, the scheduler or the session; it serves bytes.
"""
from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

from mtpspec.openai_api import APIError

ASSETS = {"index.html": "text/html; charset=utf-8",
          "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# the page may load and call nothing but this server
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
          "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def read_assets() -> dict[str, bytes]:
    """The page's files, read once from the installed package."""
    folder = resources.files("mtpspec") / "static"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def add_routes(app: FastAPI) -> None:
    """``GET /`` (the page) and ``GET /static/NAME`` (its script and style sheet)."""
    assets = read_assets()

    def send(name: str) -> Response:
        return Response(assets[name], media_type=ASSETS[name],
                        headers={"Content-Security-Policy": POLICY,
                                 "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})

    @app.get("/")
    async def page():
        return send("index.html")

    @app.get("/static/{name}")
    async def asset(name: str):
        if name not in assets or name == "index.html":
            raise APIError(404, f"no file {name!r}", code="not_found")
        return send(name)
