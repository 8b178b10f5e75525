"""`llamaserve token encode|decode [--secret S] [PAYLOAD]`: the original jwt_util.py."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "token",
        help="make or read an HS256 JWT for the server's Authorization header",
        description="encode: JSON PAYLOAD -> token (default payload "
        '{"team_id": "tenstorrent", "token_id": "debug-test"}); decode: token -> JSON. '
        "--secret wins over JWT_SECRET in the environment.",
    )
    # A plain string, not choices=: an unknown mode must exit 1 with our message, as the original did.
    parser.add_argument("mode", metavar="encode|decode", help="encode a JSON payload into a token, or decode a token")
    parser.add_argument("payload", nargs="?", default=None, metavar="PAYLOAD", help="JSON payload, or the token to decode")
    parser.add_argument("--secret", default=None, help="HS256 secret (env JWT_SECRET; required one way or the other)")
    parser.add_argument("--expires-in", type=float, default=None, metavar="SECONDS", help="add an exp claim this many seconds ahead (default: no expiry)")
    parser.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from llamaserve.clients.jwt_util import main

    return main(ns.mode, ns.payload, ns.secret, ns.expires_in)
