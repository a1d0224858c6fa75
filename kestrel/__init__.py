"""Kestrel: real-time recommendations and fraud detection on Kafka, Faust, Redis, torch and FAISS.

Four layers, each importing only the ones below it (checked by tests/unit/test_layers.py):
``streams`` (the running system) -> ``offline`` (training, evaluation, simulation) ->
``models`` (scoring and retrieval) -> ``feature_store`` (contracts, topics, keys, the online store).
"""
