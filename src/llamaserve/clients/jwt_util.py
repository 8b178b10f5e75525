"""The original `jwt_util.py`: encode a JSON payload into an HS256 token, or decode one."""

from __future__ import annotations

import json
import os
import sys

import jwt

from llamaserve.server.auth import DEFAULT_PAYLOAD, decode_token, encode_token


class TokenToolError(Exception):
    pass


def resolve_secret(secret: str | None, env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    # A flag given wins over the environment, as everywhere in llamaserve (the original
    # jwt_util.py let JWT_SECRET win, which silently ignored an explicit --secret).
    value = secret or env.get("JWT_SECRET")
    if not value:
        raise TokenToolError("no secret: set JWT_SECRET or pass --secret")
    return value


def encode(payload_text: str | None, secret: str, expires_in: float | None = None) -> str:
    if payload_text is None:
        payload = dict(DEFAULT_PAYLOAD)
    else:
        try:
            payload = json.loads(payload_text)
        except json.JSONDecodeError as exc:
            raise TokenToolError(f"PAYLOAD is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise TokenToolError(f"PAYLOAD must be a JSON object, got {type(payload).__name__}")
    return encode_token(payload, secret, expires_in)


def decode(token: str | None, secret: str) -> dict:
    if not token:
        raise TokenToolError("decode needs the token as PAYLOAD")
    try:
        return decode_token(token.strip(), secret)
    except jwt.InvalidTokenError as exc:
        raise TokenToolError(f"invalid token: {exc}") from None


def main(mode: str, payload: str | None, secret: str | None, expires_in: float | None) -> int:
    try:
        key = resolve_secret(secret)
        if mode == "encode":
            print(encode(payload, key, expires_in))
        elif mode == "decode":
            print(json.dumps(decode(payload, key)))
        else:
            raise TokenToolError(f"unknown mode {mode!r}: use encode or decode")
    except TokenToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
