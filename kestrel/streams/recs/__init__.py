"""Recommendations online: the serving path, the ``recs.requests`` agent and its benchmark."""
