"""Scoring and retrieval: fraud rules and models, the online learner, two-tower retrieval, popularity."""
