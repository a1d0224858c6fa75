"""The experiments pages, served by every worker: the list, and one experiment with its plots and controls.

* ``GET /experiments``: every experiment with its status, target, coverage, variants and primary metric
* ``GET /experiments/{key}``: the definition, each variant's live results (units, metrics), the SRM check,
  each variant's verdict against control, the guardrails, plots over time (units exposed per variant, the
  primary metric per variant, each variant's difference to control with its always-valid interval), the
  audit log, and ramp / stop / promote controls that call the API with the token (``experiments.py``)

The plots are SVG drawn here from the monitor's snapshots (``kestrel/streams/experiments/series.py``), so
the page needs no script library; the only script is the controls'. Rendering is pure (``render_*``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import faust
import orjson
import redis
from faust.web import Request, Response, View

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment
from kestrel.streams.experiments.results import DURATIONS, TARGET_METRICS, experiment_results
from kestrel.streams.experiments.series import read_series
from kestrel.streams.experiments.store import ExperimentError, ExperimentStore
from kestrel.streams.web.pages import PAGE_HEADERS, TOKEN_BOX, TOKEN_JS, e, page, serve_static, time_html

if TYPE_CHECKING:
    from kestrel.streams.worker.runtime import Runtime

STYLESHEET = "/experiments/static/experiments.css"
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d232a; max-width: 70rem; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0 1.5rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid #dde2e6; vertical-align: top; }
th { background: #f3f5f7; }
.status { padding: .1rem .45rem; border-radius: .6rem; font-weight: 600; font-size: 12px; background: #e8f1fb; }
.status-running { background: #d7f0dd; } .status-stopped { background: #f3f5f7; }
.token, .controls { background: #f3f5f7; padding: .6rem; margin-bottom: 1rem; }
.controls button { margin-right: .5rem; padding: .3rem .8rem; }
.ok { color: #146c2e; } .error, .bad { color: #b3261e; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; }
svg.plot { background: #fbfcfd; border: 1px solid #dde2e6; }
svg.plot text { font-size: 11px; fill: #4a545e; }
.s0 { stroke: #1f6feb; } .s1 { stroke: #d1242f; } .s2 { stroke: #1a7f37; } .s3 { stroke: #9a6700; }
.f0 { fill: #1f6feb; } .f1 { fill: #d1242f; } .f2 { fill: #1a7f37; } .f3 { fill: #9a6700; }
polyline { fill: none; stroke-width: 2; } polygon.band { fill: #d1242f; opacity: .15; stroke: none; }
line.axis { stroke: #8c959f; } line.zero { stroke: #8c959f; stroke-dasharray: 3 3; }
code { font-size: 12px; }
"""

JS = '"use strict";\n' + TOKEN_JS + r"""
(function () {
  setUpTokenBox();
  const key = document.body.dataset.experiment;
  const result = document.getElementById("result");
  const why = () => document.getElementById("why").value.trim();
  async function act(action, doc) {
    result.className = ""; result.textContent = "sending…";
    const {status, body} = await postJson("/api/experiments/" + encodeURIComponent(key) + "/" + action,
                                          Object.assign({why: why(), who: "experiments page"}, doc));
    if (status === 200) {
      result.className = "ok";
      result.textContent = action + " done: status " + body.status + ", coverage " + body.coverage;
      document.getElementById("status").textContent = body.status;
      document.getElementById("coverage").textContent = body.coverage;
    } else {
      result.className = "error";
      result.textContent = "Refused (" + status + "): " + (body.message || "no answer");
    }
  }
  document.getElementById("ramp").addEventListener("click", () => {
    act("ramp", {coverage: Number(document.getElementById("ramp-to").value)});
  });
  document.getElementById("stop").addEventListener("click", () => act("stop", {}));
  document.getElementById("start").addEventListener("click", () => act("start", {}));
  document.getElementById("promote").addEventListener("click", () => {
    act("promote", {variant: document.getElementById("promote-variant").value});
  });
})();
"""


def _status(status: str, element_id: str = "") -> str:
    ident = f' id="{e(element_id)}"' if element_id else ""
    return f'<span class="status status-{e(status)}"{ident}>{e(status)}</span>'


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "–" if value is None else e(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return e(value)


def render_list(experiments: Sequence[Experiment]) -> str:
    """Every experiment, newest definitions as stored.

    >>> exp = Experiment(key="a-b", owner="<b>", target="fraud", hash_attribute="card", seed="s",
    ...                  primary_metric="recall", variants=[{"key": "control"}, {"key": "b"}])
    >>> html = render_list([exp])
    >>> "&lt;b&gt;" in html and 'href="/experiments/a-b"' in html
    True
    """
    rows = "".join(
        f'<tr data-experiment="{e(x.key)}"><td><a href="/experiments/{e(x.key)}">{e(x.key)}</a></td>'
        f"<td>{_status(x.status)}</td><td>{e(x.target)}</td><td>{_num(x.coverage)}</td>"
        f"<td>{e(', '.join(v.key for v in x.variants))}</td><td>{e(x.primary_metric)}</td>"
        f"<td>{e(x.owner)}</td></tr>" for x in experiments)
    table = ('<table id="experiments"><thead><tr><th>experiment</th><th>status</th><th>target</th><th>coverage</th>'
             f"<th>variants</th><th>primary metric</th><th>owner</th></tr></thead><tbody>{rows}</tbody></table>"
             if experiments else '<p id="empty">No experiments yet: <code>kestrel experiments create</code>.</p>')
    return page("Kestrel experiments", "<h1>Experiments</h1><p>JSON: "
                '<a href="/api/experiments">/api/experiments</a></p>' + table, STYLESHEET)


def svg_plot(plot_id: str, title: str, lines: Mapping[str, Sequence[tuple[float, float]]],
             band: Sequence[tuple[float, float, float]] = (), zero: bool = False,
             width: int = 420, height: int = 170) -> str:
    """A small line plot: one polyline per named series (time, value), an optional shaded band (time, lo, hi).

    >>> svg = svg_plot("p", "units", {"control": [(0, 0), (10, 5)], "b": [(0, 0), (10, 4)]})
    >>> svg.count("<polyline"), 'points="40.0,140.0 410.0,22.0"' in svg
    (2, True)
    >>> "no data yet" in svg_plot("p", "units", {"control": []})
    True
    """
    left, right, top, bottom = 40, 10, 22, 30
    points = [(t, y) for series in lines.values() for t, y in series] + \
             [p for t, lo, hi in band for p in ((t, lo), (t, hi))]
    head = (f'<svg class="plot" id="{e(plot_id)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{e(title)}"><text x="{left}" y="14">{e(title)}</text>')
    if not points:
        return head + f'<text x="{left}" y="{height // 2}">no data yet</text></svg>'
    t0, t1 = min(t for t, _ in points), max(t for t, _ in points)
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    if zero:
        y0, y1 = min(y0, 0.0), max(y1, 0.0)
    t1, y1 = (t1 if t1 > t0 else t0 + 1.0), (y1 if y1 > y0 else y0 + 1.0)

    def x(t: float) -> float:
        return round(left + (width - left - right) * (t - t0) / (t1 - t0), 1)

    def y(v: float) -> float:
        return round(height - bottom - (height - top - bottom) * (v - y0) / (y1 - y0), 1)

    parts = [head, f'<line class="axis" x1="{left}" y1="{height - bottom}" x2="{width - right}" '
                   f'y2="{height - bottom}"/>',
             f'<text x="2" y="{y(y1) + 4}">{_num(y1, 3)}</text><text x="2" y="{y(y0) + 4}">{_num(y0, 3)}</text>']
    if zero:
        parts.append(f'<line class="zero" x1="{left}" y1="{y(0.0)}" x2="{width - right}" y2="{y(0.0)}"/>')
    if band:
        outline = [(x(t), y(hi)) for t, _, hi in band] + [(x(t), y(lo)) for t, lo, _ in reversed(band)]
        parts.append('<polygon class="band" points="' + " ".join(f"{a},{b}" for a, b in outline) + '"/>')
    for i, (name, series) in enumerate(lines.items()):
        if series:
            parts.append(f'<polyline class="s{i % 4}" data-series="{e(name)}" points="'
                         + " ".join(f"{x(t)},{y(v)}" for t, v in series) + '"/>')
        parts.append(f'<text class="f{i % 4}" x="{left + 90 * i}" y="{height - 8}">{e(name)}</text>')
    minutes = (t1 - t0) / 60
    parts.append(f'<text x="{width - right - 110}" y="{height - 8}">last {minutes:.0f} min</text></svg>')
    return "".join(parts)


def render_experiment(exp: Experiment, report: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                      series: Sequence[Mapping[str, Any]]) -> str:
    """One experiment: what it compares, how each variant does, over time, its audit log and its controls."""
    metric = report["primary_metric"]
    names = list(TARGET_METRICS[exp.target])
    timed = [m for m in DURATIONS if any(m in report["variants"][v.key] for v in exp.variants)]

    def duration(summary: Mapping[str, Any] | None) -> str:
        return (f'{_num(summary["mean_ms"])} (p50 {_num(summary["p50_ms"])}, p99 {_num(summary["p99_ms"])})'
                if summary else "")

    variant_rows = "".join(
        f'<tr data-variant="{e(v.key)}"><td>{e(v.key)}</td><td>{_num(exp.weights()[i])}</td>'
        f"<td>{e(v.model or '')}</td><td><code>{e(orjson.dumps(v.params).decode() if v.params else '')}</code></td>"
        + "".join(f"<td>{_num(report['variants'][v.key].get(n))}</td>" for n in ["units", *names])
        + "".join(f'<td class="duration">{duration(report["variants"][v.key].get(m))}</td>' for m in timed)
        + "</tr>" for i, v in enumerate(exp.variants))
    variants = ('<table id="variants"><thead><tr><th>variant</th><th>weight</th><th>model</th><th>params</th>'
                + "".join(f"<th>{e(n)}</th>" for n in ["units", *names])
                + "".join(f"<th>{e(m)}: mean (p50, p99)</th>" for m in timed)
                + f"</tr></thead><tbody>{variant_rows}</tbody></table>")
    verdicts = "".join(
        f'<li data-variant="{e(k)}">{e(k)} against {e(exp.variants[0].key)} on {e(metric)}: '
        + (f'<b>{e(c["verdict"])}</b> (difference {_num(c["difference"])}, interval {e(c["ci"])})'
           if "verdict" in c else e(c.get("note", ""))) + "</li>"
        for k, c in report["comparisons"].items())
    adjusted = report.get("cuped")
    if adjusted:
        verdicts += "".join(
            f'<li class="cuped" data-variant="{e(k)}">{e(k)}, CUPED (variance '
            f'{_num(-100 * adjusted["variance_reduction"], 3)}% by {e(adjusted["covariate"])}): '
            f'<b>{e(c["verdict"])}</b></li>' for k, c in adjusted["comparisons"].items())
    srm = report.get("srm_p_value")
    mismatch = "— MISMATCH: the split is not the configured one; do not trust the results"
    srm_line = (f'<p id="srm" class="{"bad" if report.get("srm") else ""}">Sample ratio: p = {_num(srm)} '
                f'{mismatch if report.get("srm") else "(no mismatch)"}</p>' if srm is not None
                else '<p id="srm">Sample ratio: no units yet</p>')
    guardrails = "".join(
        f"<tr><td>{e(g)}</td><td>{e(k)}</td><td>{e(c.get('verdict') or c.get('note', ''))}</td></tr>"
        for g, by in report["guardrails"].items() for k, c in by.items())
    guard_table = (f'<table id="guardrails"><thead><tr><th>guardrail</th><th>variant</th><th>now</th></tr></thead>'
                   f"<tbody>{guardrails}</tbody></table>" if guardrails else "<p>No guardrails.</p>")
    keys = [v.key for v in exp.variants]
    plots = ('<div class="plots">'
             + svg_plot("plot-units", "units exposed", {k: [(s["t"], s["units"].get(k, 0)) for s in series]
                                                        for k in keys}, zero=True)
             + svg_plot("plot-metric", metric, {k: [(s["t"], s["metric"][k]) for s in series
                                                    if s["metric"].get(k) is not None] for k in keys})
             + "".join(svg_plot(f"plot-diff-{k}", f"{k} − {keys[0]}: {metric}, always-valid interval",
                                {k: [(s["t"], (s["ci"][k][0] + s["ci"][k][1]) / 2) for s in series if s["ci"].get(k)]},
                                [(s["t"], s["ci"][k][0], s["ci"][k][1]) for s in series if s["ci"].get(k)],
                                zero=True) for k in keys[1:])
             + "</div>")
    audit = "".join(f"<tr><td>{time_html(h.get('at'))}</td><td>{e(h.get('action'))}</td><td>{e(h.get('who'))}</td>"
                    f"<td>{e(h.get('why'))}</td></tr>" for h in reversed(history))
    options = "".join(f'<option value="{e(k)}">{e(k)}</option>' for k in keys)
    controls = (TOKEN_BOX + '<div class="controls"><label>Why <input id="why" maxlength="500" size="50"></label> '
                f'<label>coverage <input id="ramp-to" type="number" min="0" max="1" step="0.05" '
                f'value="{e(exp.coverage)}"></label> <button id="ramp" type="button">Ramp</button> '
                '<button id="start" type="button">Start</button> <button id="stop" type="button">Stop</button> '
                f'<select id="promote-variant">{options}</select> <button id="promote" type="button">Promote</button>'
                '<p id="result" role="status"></p></div>')
    body = (f'<p><a href="/experiments">← all experiments</a></p><h1>{e(exp.key)}</h1>'
            f"<p>{_status(exp.status, 'status')} · {e(exp.target)} · by {e(exp.hash_attribute)} · coverage "
            f'<b id="coverage">{_num(exp.coverage)}</b> · primary metric <b>{e(metric)}</b> · seed '
            f"<code>{e(exp.seed)}</code>{' · ' + e(exp.description) if exp.description else ''}</p>"
            f"{controls}<h2>Variants</h2>{variants}{srm_line}<h2>Verdict</h2><ul id=\"verdicts\">{verdicts}</ul>"
            f"<h2>Over time</h2>{plots}<h2>Guardrails</h2>{guard_table}"
            f'<h2>Audit log</h2><table id="audit"><thead><tr><th>when</th><th>change</th><th>who</th><th>why</th>'
            f"</tr></thead><tbody>{audit}</tbody></table>"
            f'<p>JSON: <a href="/api/experiments/{e(exp.key)}/results">results</a></p>'
            '<script src="/experiments/static/experiments.js"></script>')
    return page(f"Kestrel experiment {exp.key}", body, STYLESHEET, f' data-experiment="{e(exp.key)}"')


def install_experiment_pages(app: faust.App, runtime: Runtime, client: redis.Redis, keys: KeySpace,
                             store: ExperimentStore) -> None:
    """The pages, on the API's store and client (``install_experiment_views`` calls this)."""
    def html(view: View, text: str, status: int = 200) -> Response:
        return view.html(text, status=status, headers=dict(PAGE_HEADERS))

    serve_static(app, "/experiments/static/experiments", JS, CSS)

    @app.page("/experiments")
    class ExperimentsPage(View):
        async def get(self, request: Request) -> Response:
            return html(self, render_list(await asyncio.to_thread(store.list)))

    @app.page("/experiments/{key}")
    class ExperimentPage(View):
        async def get(self, request: Request, key: str) -> Response:
            def gather() -> tuple[Experiment, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
                exp = store.get(key)
                return exp, experiment_results(client, keys, exp), store.history(key), read_series(client, keys, key)

            try:
                exp, report, history, series = await asyncio.to_thread(gather)
            except ExperimentError as exc:
                runtime.metrics.http_rejected.labels("not_found").inc()
                return html(self, page("Kestrel experiments", '<p><a href="/experiments">← all experiments</a></p>'
                                       f'<p class="error">{e(exc)}</p>', STYLESHEET), 404)
            return html(self, render_experiment(exp, report, history, series))
