"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fraud_model(tmp_path_factory):
    """(model, artifact path) of a small fraud model trained once per test session."""
    from tests.fraud_fixtures import train_small_model

    return train_small_model(tmp_path_factory.mktemp("fraud-model"))
