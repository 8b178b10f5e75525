"""Bearer-token authentication: HS256 JWTs signed with the server's secret.

The algorithm is pinned, so a token claiming `alg: none` or any other algorithm is refused;
`exp` and `nbf` are enforced when present. Error messages say what was wrong with the token,
never anything about the secret.
"""

from __future__ import annotations

import secrets
import time
import warnings
from typing import Any

import jwt

try:
    from jwt.warnings import InsecureKeyLengthWarning
except ImportError:  # older PyJWT
    InsecureKeyLengthWarning = UserWarning

# The original's documented secrets are short ("test-secret-456"): they must keep working
# without a warning on every request, hence the local warning filters below.

ALGORITHM = "HS256"
DEFAULT_PAYLOAD = {"team_id": "tenstorrent", "token_id": "debug-test"}


class AuthError(Exception):
    """Authentication failed; the message is safe to send to the client."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def encode_token(payload: dict[str, Any], secret: str, expires_in: float | None = None) -> str:
    payload = dict(payload)
    if expires_in is not None:
        payload["exp"] = int(time.time() + expires_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm=ALGORITHM)


def decode_token(token: str, secret: str) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.decode(token, secret, algorithms=[ALGORITHM])


class Authenticator:
    def __init__(self, secret: str, required_claims: list[str] | tuple[str, ...] = ("team_id",)) -> None:
        if not secret:
            raise ValueError("the JWT secret must not be empty")
        self._secret = secret
        self.required_claims = tuple(required_claims)

    def verify_header(self, header: str | None) -> dict[str, Any]:
        """Returns the token's claims, or raises AuthError saying what was wrong."""
        if not header:
            raise AuthError("missing Authorization header: send 'Authorization: Bearer <token>'")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError(f"unsupported Authorization scheme {scheme[:20]!r}: use 'Bearer <token>'")
        token = token.strip()
        if not token:
            raise AuthError("empty bearer token")
        return self.verify_token(token)

    def verify_token(self, token: str) -> dict[str, Any]:
        try:
            # Not only DecodeError: a header with `crit` or a non-string `kid` raises the base
            # InvalidTokenError, which must be a 401 like any other bad token.
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise AuthError(f"token algorithm {str(alg)[:20]!r} is not accepted: only {ALGORITHM}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                claims = jwt.decode(
                    token,
                    self._secret,
                    algorithms=[ALGORITHM],
                    options={"require": [], "verify_aud": False, "verify_iss": False},
                )
        except jwt.ExpiredSignatureError:
            raise AuthError("token has expired (exp)") from None
        except jwt.ImmatureSignatureError as exc:
            # PyJWT raises the same error for a future `iat` and a future `nbf`.
            claim = "iat" if "iat" in str(exc) else "nbf"
            what = "was issued in the future" if claim == "iat" else "is not valid yet"
            raise AuthError(f"token {what} ({claim})") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature does not verify with this server's secret") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        if not isinstance(claims, dict):
            raise AuthError("token payload must be a JSON object")
        for claim in self.required_claims:
            if claims.get(claim) in (None, ""):
                raise AuthError(f"token is missing the required claim {claim!r}")
        return claims
