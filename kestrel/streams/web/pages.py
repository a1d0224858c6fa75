"""What the worker's HTML pages share: strict headers, escaping, the page shell, times, the token box.

The pages never hold the API token: the operator pastes it once, the page
keeps it in the tab's sessionStorage and sends it as a bearer header with
``fetch`` (a header, not a cookie, so no other site can make the browser
send it). Every value in the HTML is escaped, and the Content-Security-Policy
allows only this server's own scripts and stylesheets.
"""

from __future__ import annotations

from html import escape
from typing import Any

import faust
from faust.web import Request, Response, View

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"}

# the token box every page with actions shows (its script: TOKEN_JS)
TOKEN_BOX = ('<div class="token"><label>API token <input id="token" type="password" autocomplete="off"></label> '
             '<button id="save-token" type="button">Use token</button> <span id="token-state"></span></div>')
TOKEN_JS = r"""
const TOKEN_KEY = "kestrel-api-token";
function setUpTokenBox() {
  const input = document.getElementById("token");
  const state = document.getElementById("token-state");
  const show = () => {
    state.textContent = sessionStorage.getItem(TOKEN_KEY) ? "token set for this tab" : "no token yet";
  };
  document.getElementById("save-token").addEventListener("click", () => {
    const value = input.value.trim();
    if (value) { sessionStorage.setItem(TOKEN_KEY, value); input.value = ""; }
    show();
  });
  show();
}
async function postJson(path, doc) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) return {status: 0, body: {message: "Paste the API token first."}};
  try {
    const resp = await fetch(path, {method: "POST", body: JSON.stringify(doc),
                                    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token}});
    return {status: resp.status, body: await resp.json().catch(() => ({}))};
  } catch (err) {
    return {status: 0, body: {message: String(err)}};
  }
}
"""


def serve_static(app: faust.App, prefix: str, script: str, stylesheet: str) -> None:
    """``{prefix}.js`` and ``{prefix}.css``: a page's own script and stylesheet, under the strict headers."""
    for suffix, body, kind in ((".js", script, "text/javascript"), (".css", stylesheet, "text/css")):
        raw = body.encode()

        class Static(View):
            async def get(self, request: Request, raw: bytes = raw, kind: str = kind) -> Response:
                return self.bytes(raw, content_type=kind, headers=dict(PAGE_HEADERS))

        Static.__name__ = Static.__qualname__ = f"Static_{prefix.strip('/').replace('/', '_')}_{suffix[1:]}"
        app.page(prefix + suffix)(Static)


def e(value: Any) -> str:
    """``value`` escaped for HTML text and attributes (None: empty)."""
    return escape("" if value is None else str(value), quote=True)


def page(title: str, body: str, stylesheet: str, attrs: str = "") -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f'<link rel="stylesheet" href="{e(stylesheet)}"></head><body{attrs}>{body}</body></html>')


def time_html(iso: Any) -> str:
    """An ISO time as ``2026-03-01 12:00:05Z``, the full value in the element's datetime.

    >>> time_html("2026-03-01T12:00:05.123Z")
    '<time datetime="2026-03-01T12:00:05.123Z">2026-03-01 12:00:05Z</time>'
    """
    text = str(iso or "")
    short = text[:19].replace("T", " ") + ("Z" if text.endswith("Z") else "")
    return f'<time datetime="{e(text)}">{e(short)}</time>'
