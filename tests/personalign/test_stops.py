"""Per-user stop events: a stop reaches only its user's current work."""

import threading

from personalign.stops import UserStops


def test_stop_reaches_only_the_users_current_event():
    stops = UserStops()
    alice, bob = stops.register("alice"), stops.register("bob")
    stops.stop("alice")
    assert alice.is_set() and not bob.is_set()
    stops.stop("nobody")  # no work in progress: nothing to do


def test_a_newer_run_replaces_the_older_and_release_keeps_it():
    stops = UserStops()
    given = threading.Event()
    old, new = stops.register(None), stops.register(None, given)
    assert new is given
    stops.release(None, old)  # the old run ending late must not unregister the new one
    stops.stop(None)
    assert new.is_set() and not old.is_set()
    done = stops.register(None)
    stops.release(None, done)
    stops.stop(None)  # released: the finished run's event is no longer reached
    assert not done.is_set()
