from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy.dialects import sqlite

from storage.columns import JSONObject, UTCDateTime

DIALECT = sqlite.dialect()


def test_datetimes_round_trip_as_aware_utc() -> None:
    column = UTCDateTime()
    local = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    stored = column.process_bind_param(local, DIALECT)
    assert stored == "2024-05-01T10:00:00.000000+00:00"
    restored = column.process_result_value(stored, DIALECT)
    assert restored == local and restored is not None and restored.tzinfo == UTC


def test_stored_text_sorts_like_time() -> None:
    column = UTCDateTime()
    times = [datetime(2024, 1, 1, tzinfo=UTC) + timedelta(microseconds=m) for m in (0, 1, 999_999, 1_000_000)]
    texts = [column.process_bind_param(t, DIALECT) for t in times]
    assert texts == sorted(texts)  # type: ignore[type-var]


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        UTCDateTime().process_bind_param(datetime(2024, 1, 1), DIALECT)


def test_json_object_round_trips_unicode() -> None:
    column = JSONObject()
    value = {"name": "Zoë", "traits": ["kind", 3, None]}
    stored = column.process_bind_param(value, DIALECT)
    assert "Zoë" in stored  # type: ignore[operator]
    assert column.process_result_value(stored, DIALECT) == value
