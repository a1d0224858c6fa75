"""The ``recs.requests`` agent: recommendations asked for over Kafka, answered on ``recs.responses``."""

from __future__ import annotations

import time
from typing import Any

import faust
import orjson

from kestrel.feature_store import topics
from kestrel.streams.records import Output
from kestrel.streams.recs.service import parse_request
from kestrel.streams.worker.runtime import Runtime, ack_events, take_batches


def install_request_agent(app: faust.App, runtime: Runtime) -> None:
    """Answer ``recs.requests`` on ``recs.responses`` (key: the request's key), in micro-batches.

    Requests are taken like payments (:func:`take_batches`: records fetched
    before a rebalance are left unacked for the partition's next owner) and
    acked only once their answers were acknowledged by the broker:
    at-least-once answers, none lost to a rebalance.
    """
    source = runtime.topic(topics.RECS_REQUESTS)
    settings = runtime.settings

    async def answer_requests(stream: Any) -> None:
        async for events in take_batches(stream, settings.batch_size, settings.batch_within_s):
            started = time.time()
            parsed = [(e.message.key or b"", parse_request(e.message.value)) for e in events]
            good = [(key, p) for key, p in parsed if not isinstance(p, str)]
            results = await runtime.recommend([doc["user_id"] for _, (doc, _) in good],
                                              [opt for _, (_, opt) in good]) if good else []
            answers = iter(results)
            outputs = []
            for key, p in parsed:
                if isinstance(p, str):
                    doc: dict[str, Any] = {"type": "recommendation_response", "error": p}
                else:
                    req, _ = p
                    res = next(answers)
                    doc = {"type": "recommendation_response", "request_id": req.get("request_id"),
                           "user_id": req["user_id"], "items": res.items, "path": res.path,
                           "model_version": res.model_version,
                           **({"experiments": list(res.experiments)} if res.experiments else {}),
                           "processing_ms": round((time.time() - started) * 1000, 3)}
                outputs.append(Output(topics.RECS_RESPONSES, key, orjson.dumps(doc), ""))
            await runtime.send(outputs)
            await ack_events(stream, events)

    answer_requests.__name__ = answer_requests.__qualname__ = "answer_recs_requests"
    app.agent(source, name="kestrel.recs.requests")(answer_requests)

