"""The web chat page at `/`: one static file (static/chat.html), served as is. No build step and nothing from a
CDN, so it works on an air-gapped machine and on loopback exactly as on a public host.

The page itself holds no data and needs no key; everything it shows comes from the API (/v1/models,
/v1/chat/completions), which does, so under `--api-key` the page asks for the key and sends it as a Bearer token.

Model output never becomes HTML: the page builds every element with `createElement` + `textContent` (its small
markdown renderer included). The Content-Security-Policy below is the second wall: it allows exactly the page's
own inline script and style (by their SHA-256, computed here when the app is built) and network calls to this
origin only, so even an injected `<img onerror=...>` or `<script>` would not run or phone out.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

PAGE = Path(__file__).parent / "static" / "chat.html"


def _hashes(html: str, tag: str) -> str:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


@cache
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and the headers it is served with (its CSP pins its own script and style)."""
    html = PAGE.read_text(encoding="utf-8")
    csp = (
        f"default-src 'none'; script-src {_hashes(html, 'script')}; style-src {_hashes(html, 'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",  # a new deepsail version's page, not yesterday's, after an upgrade
    }
    return html.encode("utf-8"), headers


def add_web_routes(app: FastAPI) -> None:
    """GET / -> the chat page."""

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        body, headers = page()
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)
