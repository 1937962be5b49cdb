"""api_calls on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest

from storage.api_calls import ApiCallRow, record_api_calls, study_cost_usd
from storage.db import make_engine, make_session_factory, migrate, transaction


def test_calls_are_recorded_and_their_cost_summed_per_study(database_url: str) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    calls = [
        ApiCallRow("1.2", "openai", "gpt-4.1", 2, 0, 0, 0.0, 812.0, 429, "HTTP 429"),
        ApiCallRow("1.2", "openai", "gpt-4.1", 2, 1600, 300, 0.0056, 2300.5, 200, None),
        ApiCallRow("9.9", "openai", "gpt-4.1", 1, 800, 100, 0.0024, 1000.0, 200, None),
    ]
    with transaction(sessions) as session:
        assert record_api_calls(session, calls, now, job_id=7) == 3
    with sessions() as session:
        assert study_cost_usd(session, "1.2") == pytest.approx(0.0056)
        assert study_cost_usd(session, "0.0") == 0.0
    engine.dispose()
