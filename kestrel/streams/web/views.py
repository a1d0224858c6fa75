"""HTTP views of the worker: health, metrics, event intake and recommendations."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import faust
import orjson
from faust.web import Request, Response, View

from kestrel.feature_store.topics import EVENT_TYPE_TOPIC
from kestrel.streams.ingest.producer import EVENT_ID_HEADER, partition_key
from kestrel.streams.ingest.validation import Rejection, check_time, validate_document
from kestrel.streams.recs.service import parse_request
from kestrel.streams.web.auth import token_refusal

if TYPE_CHECKING:
    from kestrel.streams.worker.runtime import Runtime

MAX_BATCH = 1000


def install_views(app: faust.App, runtime: Runtime) -> None:
    settings = runtime.settings

    def reply(view: View, doc: Any, status: int = 200) -> Response:
        return view.bytes(orjson.dumps(doc), content_type="application/json", status=status)

    def refuse(view: View, status: int, error: str, message: str, **extra: Any) -> Response:
        runtime.metrics.http_rejected.labels(error).inc()
        return reply(view, {"error": error, "message": message, **extra}, status)

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request) -> Response:
            try:
                await runtime.processor.client.ping()
            except Exception as exc:
                return reply(self, {"status": "degraded", "redis": str(exc)}, 503)
            return reply(self, {"status": "ok", "redis": "ok", "app": settings.app_id})

    @app.page("/ready")
    class Ready(View):
        async def get(self, request: Request) -> Response:
            assigned = sorted(f"{tp.topic}:{tp.partition}" for tp in app.consumer.assignment())
            ready = bool(assigned) and runtime.warm
            return reply(self, {"ready": ready, "partitions": assigned, "models_warm": runtime.warm},
                         200 if ready else 503)

    @app.page("/metrics")
    class PrometheusMetrics(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(runtime.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.page("/recommendations/{user_id}")
    class Recommendations(View):
        async def get(self, request: Request, user_id: str) -> Response:
            raw_k = request.query.get("k", "10")
            if not raw_k.isdigit() or not 1 <= int(raw_k) <= 100:
                return refuse(self, 422, "invalid", "k must be an integer from 1 to 100", field="k")
            query = request.query
            wanted: dict[str, Any] = {"user_id": user_id, "k": int(raw_k),
                                      "exclude": [x for x in query.get("exclude", "").split(",") if x]}
            try:
                if "per_category" in query:
                    wanted["per_category"] = int(query["per_category"])
                if "mmr_lambda" in query:
                    wanted["mmr_lambda"] = float(query["mmr_lambda"])
                if "path" in query:
                    wanted["path"] = query["path"]
            except ValueError:
                return refuse(self, 422, "invalid", "per_category must be an integer, mmr_lambda a number")
            parsed = parse_request(orjson.dumps(wanted))
            if isinstance(parsed, str):
                return refuse(self, 422, "invalid", parsed)
            _, opts = parsed
            (res,) = await runtime.recommend([user_id], opts)
            return reply(self, {"user_id": user_id, "k": opts.k, "items": res.items,
                                "model_version": res.model_version, "path": res.path,
                                **({"experiments": list(res.experiments)} if res.experiments else {})})

    @app.page("/events")
    class Events(View):
        async def post(self, request: Request) -> Response:
            refusal = token_refusal(settings.api_token, request.headers, "event intake is")
            if refusal:
                return refuse(self, *refusal)
            body = await request.read()
            if len(body) > settings.max_event_bytes * MAX_BATCH:
                return refuse(self, 413, "oversized", "request body too large")
            try:
                doc = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return refuse(self, 400, "bad_json", f"not valid JSON: {exc}")
            docs = doc if isinstance(doc, list) else [doc]
            if not 1 <= len(docs) <= MAX_BATCH:
                return refuse(self, 422, "invalid", f"send 1 to {MAX_BATCH} events per request")
            events = []
            for i, item in enumerate(docs):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind not in EVENT_TYPE_TOPIC:
                    return refuse(self, 422, "invalid", "type must be one of transaction, interaction, label",
                                  field="type", index=i)
                if len(orjson.dumps(item)) > settings.max_event_bytes:
                    return refuse(self, 413, "oversized", f"event larger than {settings.max_event_bytes} bytes",
                                  index=i)
                parsed = validate_document(item, kind)
                if not isinstance(parsed, Rejection):
                    parsed = check_time(parsed, time.time(), settings.max_future_s) or parsed
                if isinstance(parsed, Rejection):
                    return refuse(self, 422, parsed.reason, parsed.message, field=parsed.field, index=i,
                                  event_id=parsed.event_id)
                events.append((kind, item, parsed))
            futures = []
            for kind, item, event in events:
                topic = runtime.topic(EVENT_TYPE_TOPIC[kind])
                key = partition_key(event, runtime.processor.hasher)
                futures.append(await topic.send(key=key, value=orjson.dumps(item),
                                                headers=[(EVENT_ID_HEADER, event.event_id.encode())]))
            accepted = []
            for (kind, _, event), fut in zip(events, futures, strict=True):
                meta = await fut
                accepted.append({"event_id": event.event_id, "topic": EVENT_TYPE_TOPIC[kind],
                                 "partition": meta.partition, "offset": meta.offset})
            return reply(self, {"accepted": len(accepted), "events": accepted}, 202)
