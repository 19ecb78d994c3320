"""Turning service errors into messages in the browser, so a bad input never breaks a page.

A `UserError` is shown as the service worded it; anything else is logged in full and the
person sees a short notice. The server keeps running either way.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

import gradio as gr

from personalign.errors import UserError

log = logging.getLogger(__name__)


def _as_gr_error(err: Exception) -> gr.Error:
    if isinstance(err, gr.Error):
        return err
    if isinstance(err, UserError):
        return gr.Error(str(err), print_exception=False)
    log.exception("unexpected error in a UI handler")
    return gr.Error("Something went wrong on the server; the details are in its log.", print_exception=False)


def shows_errors(fn: Callable) -> Callable:
    """Wrap a handler (plain or generator) so its errors reach the user as readable messages."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise _as_gr_error(err) from err

        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise _as_gr_error(err) from err

    return plain


def user_of(request: gr.Request | None) -> str | None:
    """The signed-in user's name, or None in single-user mode (the local user)."""
    return getattr(request, "username", None) or None
