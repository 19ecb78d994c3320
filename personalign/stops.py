"""Per-user stop buttons: the event a user's running work checks, and the call that sets it.

Each service that runs long work for a user (a chat reply, a studio sweep) registers the
work's stop event under the user, so a later "Stop" request from the same user reaches it.
One user's stop never reaches another user's work, and a newer run replaces an older one.
"""

from __future__ import annotations

import threading


class UserStops:
    """The stop event of each user's work in progress; safe to share between threads."""

    def __init__(self) -> None:
        self._events: dict[str | None, threading.Event] = {}
        self._lock = threading.Lock()

    def register(self, user: str | None, event: threading.Event | None = None) -> threading.Event:
        """Make ``event`` (a fresh one if None) the user's current stop event, and return it."""
        event = event if event is not None else threading.Event()
        with self._lock:
            self._events[user] = event
        return event

    def release(self, user: str | None, event: threading.Event) -> None:
        """Forget ``event`` once its work is done, unless a newer run has replaced it."""
        with self._lock:
            if self._events.get(user) is event:
                del self._events[user]

    def stop(self, user: str | None) -> None:
        """Set the user's current stop event, if any work is in progress."""
        with self._lock:
            event = self._events.get(user)
        if event is not None:
            event.set()
