"""Column types that SQLite lacks natively: aware UTC datetimes and JSON objects.

Both are stored as TEXT. This module knows how values are encoded on disk; it
does not know which tables use them.
"""

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Dialect, Text
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as fixed-width ISO-8601 UTC text.

    Fixed width (always microseconds, always +00:00) makes text order equal
    time order, so ORDER BY works on the raw column.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if value.tzinfo is None:
            # A naive datetime has no defined instant; storing it would silently guess.
            raise ValueError("naive datetimes cannot be stored; use an aware UTC datetime")
        return value.astimezone(UTC).isoformat(timespec="microseconds")

    def process_result_value(self, value: str | None, dialect: Dialect) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)


class JSONObject(TypeDecorator[dict[str, Any]]):
    """A JSON object (dict) stored as TEXT."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: dict[str, Any] | None, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value, ensure_ascii=False, allow_nan=False)

    def process_result_value(self, value: str | None, dialect: Dialect) -> dict[str, Any] | None:
        return None if value is None else json.loads(value)
