"""Start the Personalign web app.

    python app.py [--model embedded] [--quantize auto] [--data-dir DIR] [--host H] [--port P] [--auth]

Host and port default to Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (else 127.0.0.1:7860).
With --auth, people sign in with accounts made by `python -m personalign user add NAME`;
without it the app is single-user, for local use.
"""

from __future__ import annotations

import argparse
import logging
import sys

from personalign.accounts import AccountService
from personalign.cli import (
    add_data_argument,
    add_model_arguments,
    load_engine,
    open_database,
    run,
)
from personalign.services import build_services


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Personalign: personalized chat with a local model.")
    add_model_arguments(parser)
    add_data_argument(parser)
    parser.add_argument("--host", default=None, help="address to serve on (default $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--auth", action="store_true", help="require sign-in with users stored in the database")
    args = parser.parse_args(argv)
    args.run = serve
    return args


def serve(args: argparse.Namespace) -> int:
    from ui import launch_app  # Gradio is imported only when serving

    db = open_database(args)
    # Checked before the model loads, so a misconfigured start fails in a second, not a minute.
    if args.auth and not AccountService(db).usernames():
        print("error: --auth needs at least one user: python -m personalign user add NAME", file=sys.stderr)
        return 2
    services = build_services(db, load_engine(args))
    launch_app(services, auth=args.auth, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(parse_args()))
