"""The experiments' HTTP API on every worker: read freely, change with the token, every change audited.

    GET  /api/experiments                      every experiment
    GET  /api/experiments/{key}                one, with its audit log
    GET  /api/experiments/{key}/results        per-variant outcomes, SRM, comparisons, guardrails, verdict
    POST /api/experiments                      create (body: the definition)         token
    POST /api/experiments/{key}/{action}       start | stop | ramp {"coverage"} | promote {"variant"};
                                               optional "why" and "who"             token

Refusals are JSON with the field that was wrong (422), as the alert API's are.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import faust
import orjson
import pydantic
import redis
from faust.web import Request, Response, View

from kestrel.feature_store.keys import KeySpace
from kestrel.models.experiments import Experiment
from kestrel.streams.experiments.results import experiment_results
from kestrel.streams.experiments.store import ExperimentError, ExperimentStore
from kestrel.streams.web.auth import token_refusal
from kestrel.streams.web.experiment_pages import install_experiment_pages

if TYPE_CHECKING:
    from kestrel.streams.worker.runtime import Runtime

MAX_BODY = 64 * 1024
ACTIONS = ("start", "stop", "ramp", "promote")


def install_experiment_views(app: faust.App, runtime: Runtime) -> None:
    settings = runtime.settings
    keys = KeySpace(settings.redis_prefix)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s)
    store = ExperimentStore(client, keys)
    install_experiment_pages(app, runtime, client, keys, store)  # the HTML pages, beside the API

    def reply(view: View, doc: Any, status: int = 200) -> Response:
        return view.bytes(orjson.dumps(doc, default=str), content_type="application/json", status=status,
                          headers={"Cache-Control": "no-store"})

    def refuse(view: View, status: int, error: str, message: str, **extra: Any) -> Response:
        runtime.metrics.http_rejected.labels(error).inc()
        return reply(view, {"error": error, "message": message, **extra}, status)

    async def run(view: View, fn: Any, *args: Any) -> Response:
        """A store call in a thread (the store's client is synchronous), its refusals as 4xx."""
        try:
            result = await asyncio.to_thread(fn, *args)
        except ExperimentError as exc:
            status = 404 if str(exc).startswith("no experiment") else 409
            return refuse(view, status, "not_found" if status == 404 else "conflict", str(exc))
        except pydantic.ValidationError as exc:
            return refuse(view, 422, "invalid", "not a valid experiment",
                          fields=[{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                                  for e in exc.errors()])
        return reply(view, result.model_dump() if isinstance(result, Experiment) else result)

    async def body_of(view: View, request: Request) -> dict[str, Any] | Response:
        raw = await request.read()
        if len(raw) > MAX_BODY:
            return refuse(view, 413, "oversized", f"request body larger than {MAX_BODY} bytes")
        try:
            doc = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            return refuse(view, 400, "bad_json", f"not valid JSON: {exc}")
        if not isinstance(doc, dict):
            return refuse(view, 422, "invalid", "the body must be a JSON object")
        return doc

    @app.page("/api/experiments")
    class Experiments(View):
        async def get(self, request: Request) -> Response:
            return await run(self, lambda: [e.model_dump() for e in store.list()])

        async def post(self, request: Request) -> Response:
            refusal = token_refusal(settings.api_token, request.headers, "experiment changes are")
            if refusal:
                return refuse(self, *refusal)
            doc = await body_of(self, request)
            if isinstance(doc, Response):
                return doc
            who = str(doc.pop("who", "") or "api")
            why = str(doc.pop("why", "") or "")
            return await run(self, lambda: store.create(Experiment.model_validate(doc), who, why))

    @app.page("/api/experiments/{key}")
    class OneExperiment(View):
        async def get(self, request: Request, key: str) -> Response:
            return await run(self, lambda: {**store.get(key).model_dump(), "history": store.history(key)})

    @app.page("/api/experiments/{key}/{action}")
    class ExperimentAction(View):
        async def get(self, request: Request, key: str, action: str) -> Response:
            if action != "results":
                return refuse(self, 404, "not_found", "GET /api/experiments/{key}/results; changes are POSTs")
            return await run(self, lambda: experiment_results(client, keys, store.get(key)))

        async def post(self, request: Request, key: str, action: str) -> Response:
            refusal = token_refusal(settings.api_token, request.headers, "experiment changes are")
            if refusal:
                return refuse(self, *refusal)
            if action not in ACTIONS:
                return refuse(self, 404, "not_found", f"action must be one of {ACTIONS}", field="action")
            doc = await body_of(self, request)
            if isinstance(doc, Response):
                return doc
            who, why = str(doc.get("who") or "api"), str(doc.get("why") or "")
            if action == "ramp":
                coverage = doc.get("coverage")
                if not isinstance(coverage, int | float) or isinstance(coverage, bool):
                    return refuse(self, 422, "invalid", "coverage must be a number from 0 to 1", field="coverage")
                return await run(self, store.ramp, key, float(coverage), who, why)
            if action == "promote":
                variant = doc.get("variant")
                if not isinstance(variant, str):
                    return refuse(self, 422, "invalid", "give the winning variant's key", field="variant")
                return await run(self, store.promote, key, variant, who, why)
            return await run(self, getattr(store, action), key, who, why)
