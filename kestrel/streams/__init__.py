"""The running system: the worker, its HTTP views, the alert desk, recommendations, ingestion and the CLI.

Shared by the subpackages: ``config`` (settings), ``metrics``, ``records`` (what stages hand each other)
and ``services`` (the embedded broker and Redis for development).
"""
