"""Who is using the app: sign-in against stored users, and the single-user mode's local user.

Every service call names a user; this module turns that name into the id that scopes
every storage query. With sign-in off, the name is None and means the local user.
"""

from __future__ import annotations

import storage
from personalign.errors import NotFoundError, user_errors


class AccountService:
    """Users, passwords and the name-to-id mapping that scopes all data."""

    def __init__(self, db: storage.Database) -> None:
        self._db = db

    def authenticate(self, username: str, password: str) -> bool:
        """Whether the password is right for the user (Gradio's `auth` callable)."""
        with self._db.session() as s:
            return storage.authenticate(session=s, username=username, password=password) is not None

    def create_user(self, username: str, password: str) -> None:
        with self._db.session() as s, user_errors():
            storage.create_user(session=s, username=username, password=password)

    def usernames(self) -> list[str]:
        with self._db.session() as s:
            return [u.username for u in storage.list_users(session=s) if u.username != storage.LOCAL_USERNAME]

    def user_id(self, username: str | None) -> int:
        """The id for a signed-in name, or for the local user when sign-in is off (None)."""
        with self._db.session() as s:
            if username is None:
                return storage.get_or_create_local_user(session=s).id
            user = storage.get_user(session=s, username=username)
        if user is None:
            raise NotFoundError(f"No user named {username!r}.")
        return user.id
