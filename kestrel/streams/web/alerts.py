"""The analysts' alert queue, served by the worker: HTML pages and the JSON API behind them.

* ``GET /alerts`` open cases by risk; ``GET /alerts/{case_id}`` one case with its reasons,
  transactions, the card's recent history and confirm-fraud / dismiss buttons
* ``GET /api/alerts``, ``GET /api/alerts/{case_id}`` the same as JSON
* ``POST /api/alerts/{case_id}/verdict`` ``{"verdict": "fraud" | "genuine", "note"?}`` with
  ``Authorization: Bearer <KESTREL_API_TOKEN>``: closes the case and produces one label per
  transaction; 202 with the label event ids, 409 once the case is closed

The pages never hold the token, every value is escaped and the Content-Security-Policy allows
only this server's own script and stylesheet (kestrel/streams/web/pages.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import faust
import orjson
from faust.web import Request, Response, View

from kestrel.streams.alerts.cases import SEVERITIES, Problem, parse_verdict
from kestrel.streams.ingest.producer import EVENT_ID_HEADER
from kestrel.streams.web.auth import token_refusal
from kestrel.streams.web.pages import PAGE_HEADERS, TOKEN_BOX, TOKEN_JS, serve_static
from kestrel.streams.web.pages import e as _e
from kestrel.streams.web.pages import page as _shell
from kestrel.streams.web.pages import time_html as _time

if TYPE_CHECKING:
    from kestrel.streams.worker.runtime import Runtime

CASE_ID = re.compile(r"^[0-9a-f]{20}$")
MAX_BODY = 16 * 1024
DEFAULT_LIMIT, MAX_LIMIT = 100, 500

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d232a; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1.5rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #dde2e6; vertical-align: top; }
th { background: #f3f5f7; }
.sev { padding: .1rem .45rem; border-radius: .6rem; font-weight: 600; font-size: 12px; }
.sev-low { background: #e8f1fb; } .sev-medium { background: #fff3cd; }
.sev-high { background: #ffd8b5; } .sev-critical { background: #f8c0c0; }
.token { background: #f3f5f7; padding: .6rem; margin-bottom: 1rem; }
.actions button { margin-right: .5rem; padding: .4rem .9rem; }
#confirm-fraud { background: #b3261e; color: #fff; border: 0; }
button:disabled { opacity: .45; cursor: not-allowed; }
.ok { color: #146c2e; } .error { color: #b3261e; }
code { font-size: 12px; }
td a, td time { white-space: nowrap; }
"""

JS = '"use strict";\n' + TOKEN_JS + r"""
(function () {
  setUpTokenBox();
  const result = document.getElementById("result");
  const buttons = Array.from(document.querySelectorAll("button[data-verdict]"));
  for (const button of buttons) {
    button.addEventListener("click", async () => {
      if (!sessionStorage.getItem(TOKEN_KEY)) {
        result.className = "error"; result.textContent = "Paste the API token first."; return;
      }
      const note = document.getElementById("note").value.trim();
      buttons.forEach((b) => { b.disabled = true; });
      result.className = ""; result.textContent = "sending…";
      const {status, body} = await postJson(
        "/api/alerts/" + encodeURIComponent(document.body.dataset.caseId) + "/verdict",
        note ? {verdict: button.dataset.verdict, note} : {verdict: button.dataset.verdict});
      if (status === 202) {
        result.className = "ok";
        result.textContent = "Verdict " + body.verdict + " recorded; " + body.labels.length + " label(s) sent.";
        document.getElementById("status").textContent = "closed";
        const list = document.getElementById("labels");
        for (const id of body.labels) {
          const li = document.createElement("li");
          li.textContent = id;
          list.appendChild(li);
        }
      } else {
        result.className = "error";
        result.textContent = "Refused (" + status + "): " + (body.message || "no answer");
        if (status !== 409) buttons.forEach((b) => { b.disabled = false; });
      }
    });
  }
})();
"""


def _page(title: str, body: str, attrs: str = "") -> str:
    return _shell(title, body, "/alerts/static/alerts.css", attrs)


def _severity(severity: str) -> str:
    return f'<span class="sev sev-{_e(severity)}">{_e(severity)}</span>'


def _score(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, int | float) else _e(value)


def _amount(line: Mapping[str, Any]) -> str:
    amount = line.get("amount")
    return f"{amount:,.2f} {_e(line.get('currency'))}" if isinstance(amount, int | float) else ""


def render_queue(cases: Sequence[Mapping[str, Any]], total: int) -> str:
    """The open-cases page, highest risk first.

    >>> "&lt;b&gt;" in render_queue([{"case_id": "c", "severity": "high", "risk": 0.9, "hits": 2, "card": "<b>",
    ...     "reasons": [], "opened_at": "t", "updated_at": "t", "actions": {}}], 1)
    True
    """
    rows = "".join(
        f'<tr data-case-id="{_e(c["case_id"])}"><td>{_severity(c["severity"])}</td><td>{_score(c["risk"])}</td>'
        f'<td>{_e(c["hits"])}</td>'
        f'<td>{_e(", ".join(r["code"] for r in c["reasons"][:4]))}</td>'
        f"<td><code>{_e(c['card'][:12])}…</code></td><td>{_time(c['opened_at'])}</td><td>{_time(c['updated_at'])}</td>"
        f'<td><a href="/alerts/{_e(c["case_id"])}">open case</a></td></tr>'
        for c in cases)
    table = (f'<table id="queue"><thead><tr><th>severity</th><th>risk</th><th>hits</th><th>reasons</th>'
             f"<th>card</th><th>opened</th><th>updated</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
             if cases else '<p id="empty">No open alerts.</p>')
    body = (f"<h1>Fraud alerts</h1><p>{_e(total)} open case(s), by risk (severity, then highest score). "
            'JSON: <a href="/api/alerts">/api/alerts</a></p>' + table)
    return _page("Kestrel fraud alerts", body)


def _lines(lines: Sequence[Mapping[str, Any]], table_id: str) -> str:
    if not lines:
        return f'<p id="{table_id}">none in the decision log</p>'
    rows = "".join(
        f'<tr data-event-id="{_e(t["event_id"])}"><td>{_time(t["event_time"])}</td><td>{_amount(t)}</td>'
        f'<td>{_e(t["merchant_id"])}</td><td>{_e(t.get("terminal_id") or "")}</td><td>{_score(t["score"])}</td>'
        f'<td>{_e(t["action"])}</td><td>{_e("; ".join(str(r["message"]) for r in t["reasons"]))}</td>'
        f'<td><code>{_e(t["event_id"])}</code></td></tr>'
        for t in lines)
    return (f'<table id="{table_id}"><thead><tr><th>time</th><th>amount</th><th>merchant</th><th>terminal</th>'
            f"<th>score</th><th>action</th><th>reasons</th><th>event id</th></tr></thead><tbody>{rows}</tbody></table>")


def render_case(case: Mapping[str, Any]) -> str:
    """One case: why it fired, its transactions, the card's recent history, the verdict buttons."""
    reasons = "".join(f"<tr><td><code>{_e(r['code'])}</code></td><td>{_e(r['count'])}</td>"
                      f"<td>{_e(r.get('message'))}</td></tr>" for r in case["reasons"])
    verdict = case.get("verdict")
    decided = (f'<p id="decided">Verdict <b>{_e(verdict["verdict"])}</b> at {_time(verdict["at"])}'
               f'{": " + _e(verdict["note"]) if verdict.get("note") else ""}</p>' if verdict else "")
    open_ = case["status"] == "open"
    actions = (TOKEN_BOX + '<div class="actions"><p><label>Note (optional) <input id="note" maxlength="1000" size="60">'
               '</label></p>'
               f'<button id="confirm-fraud" type="button" data-verdict="fraud"{"" if open_ else " disabled"}>'
               "Confirm fraud</button>"
               f'<button id="dismiss" type="button" data-verdict="genuine"{"" if open_ else " disabled"}>'
               "Dismiss (genuine)</button></div>"
               '<p id="result" role="status"></p><ul id="labels"></ul>')
    body = (f'<p><a href="/alerts">← all alerts</a></p><h1>Case <code>{_e(case["case_id"])}</code></h1>'
            f'<p>{_severity(case["severity"])} risk {_score(case["risk"])} · status <b id="status">'
            f'{_e(case["status"])}</b> · {_e(case["hits"])} flagged transaction(s) · card <code>{_e(case["card"])}'
            f'</code> · opened {_time(case["opened_at"])} · last hit {_time(case["last_event_time"])}</p>{decided}'
            f'{actions}<h2>Why it fired</h2><table id="reasons"><thead><tr><th>reason</th><th>times</th>'
            f"<th>latest</th></tr></thead><tbody>{reasons}</tbody></table>"
            f"<h2>Flagged transactions</h2>{_lines(case['transactions'], 'transactions')}"
            f"<h2>Card's recent history</h2>{_lines(case['history'], 'history')}"
            '<script src="/alerts/static/alerts.js"></script>')
    return _page(f"Kestrel case {case['case_id']}", body, f' data-case-id="{_e(case["case_id"])}"')


def _limit(request: Request) -> int | Problem:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        return Problem(422, "invalid", f"limit must be an integer from 1 to {MAX_LIMIT}", "limit")
    return int(raw)


def install_alert_views(app: faust.App, runtime: Runtime) -> None:
    """Add the alert pages and API to the worker's web server."""
    settings = runtime.settings

    def desk() -> Any:
        return runtime.processor.alerts

    def reply(view: View, doc: Any, status: int = 200) -> Response:
        return view.bytes(orjson.dumps(doc), content_type="application/json", status=status,
                          headers={"Cache-Control": "no-store"})

    def refuse(view: View, problem: Problem) -> Response:
        runtime.metrics.http_rejected.labels(problem.error).inc()
        return reply(view, problem.doc(), problem.status)

    def page(view: View, html: str, status: int = 200) -> Response:
        return view.html(html, status=status, headers=dict(PAGE_HEADERS))

    def refuse_page(view: View, problem: Problem) -> Response:
        runtime.metrics.http_rejected.labels(problem.error).inc()
        field = f" ({_e(problem.field)})" if problem.field else ""
        return page(view, _page("Kestrel alerts", f'<p><a href="/alerts">← all alerts</a></p>'
                                f'<p class="error">{_e(problem.message)}{field}</p>'), problem.status)

    def bad_case_id(case_id: str) -> Problem | None:
        if CASE_ID.match(case_id):
            return None
        return Problem(422, "invalid", "case_id must be 20 lowercase hex characters", "case_id")

    serve_static(app, "/alerts/static/alerts", JS, CSS)

    @app.page("/alerts")
    class AlertQueuePage(View):
        async def get(self, request: Request) -> Response:
            limit = _limit(request)
            if isinstance(limit, Problem):
                return refuse_page(self, limit)
            cases, total = await desk().queue(limit)
            return page(self, render_queue(cases, total))

    @app.page("/alerts/{case_id}")
    class AlertCasePage(View):
        async def get(self, request: Request, case_id: str) -> Response:
            problem = bad_case_id(case_id)
            if problem:
                return refuse_page(self, problem)
            case = await desk().case_view(case_id)
            if case is None:
                return refuse_page(self, Problem(404, "not_found", "no case with this id", "case_id"))
            return page(self, render_case(case))

    @app.page("/api/alerts")
    class AlertQueueApi(View):
        async def get(self, request: Request) -> Response:
            limit = _limit(request)
            if isinstance(limit, Problem):
                return refuse(self, limit)
            cases, total = await desk().queue(limit)
            return reply(self, {"open": total, "alerts": cases, "severities": list(SEVERITIES)})

    @app.page("/api/alerts/{case_id}")
    class AlertCaseApi(View):
        async def get(self, request: Request, case_id: str) -> Response:
            problem = bad_case_id(case_id)
            if problem:
                return refuse(self, problem)
            case = await desk().case_view(case_id)
            if case is None:
                return refuse(self, Problem(404, "not_found", "no case with this id", "case_id"))
            return reply(self, case)

    async def send(records: Sequence[tuple[str, bytes, bytes, str]]) -> None:
        futures = [await runtime.topic(topic).send(key=key, value=value, headers=[(EVENT_ID_HEADER, event_id.encode())])
                   for topic, key, value, event_id in records]
        for fut in futures:
            await fut

    @app.page("/api/alerts/{case_id}/verdict")
    class AlertVerdictApi(View):
        async def post(self, request: Request, case_id: str) -> Response:
            refusal = token_refusal(settings.api_token, request.headers, "verdicts are")
            if refusal:
                return refuse(self, Problem(*refusal))
            problem = bad_case_id(case_id)
            if problem:
                return refuse(self, problem)
            body = await request.read()
            if len(body) > MAX_BODY:
                return refuse(self, Problem(413, "oversized", f"request body larger than {MAX_BODY} bytes"))
            req = parse_verdict(body)
            if isinstance(req, Problem):
                return refuse(self, req)
            result = await desk().record_verdict(case_id, req, send)
            if isinstance(result, Problem):
                return refuse(self, result)
            return reply(self, result, 202)
