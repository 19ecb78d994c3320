"""Gradio UI for Personalign: wiring only, every handler calls a service."""

from ui.app import build_app, launch_app

__all__ = ["build_app", "launch_app"]
