"""The one exception type whose message is meant for the person using the app.

Services raise `UserError` for problems a user can fix (an empty message, a bad file);
the UI and CLI show its message as is. Anything else is a bug and is logged in full.
"""

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; its message is shown to them unchanged."""


class NotFoundError(UserError):
    """Something the user asked for does not exist, or is not theirs."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise storage's validation (ValueError) and not-found (LookupError) errors as UserError."""
    try:
        yield
    except UserError:
        raise
    except LookupError as err:
        raise NotFoundError(str(err).strip("'\"") or "That item was not found.") from err
    except ValueError as err:
        raise UserError(str(err)) from err
