"""JWT authentication: every way a token can be wrong is a 401 that says why; a good one passes."""

from __future__ import annotations

import time
import warnings

import httpx
import jwt
import pytest

from llamaserve.server.app import create_app
from llamaserve.server.auth import DEFAULT_PAYLOAD, AuthError, Authenticator, encode_token
from llamaserve.server.settings import ServerSettings
from server_fixtures import ThreadedServer

SECRET = "test-secret-456"  # short, like the original's documented example
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
NOW = int(time.time())

with warnings.catch_warnings():  # building the tokens below with a short secret
    warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
    BAD_TOKENS = {
        "missing header": (None, "missing Authorization header"),
        "wrong scheme": ("Basic dXNlcjpwYXNz", "scheme"),
        "empty bearer": ("Bearer", "empty bearer token"),
        "malformed": ("Bearer not-a-jwt", "malformed"),
        "wrong secret": ("Bearer " + jwt.encode(DEFAULT_PAYLOAD, "another-secret-entirely"), "signature"),
        "alg none": ("Bearer " + jwt.encode(DEFAULT_PAYLOAD, None, algorithm="none"), "'none'"),
        # Same secret, other HMAC: it would verify if the algorithm were taken from the token.
        "HS512": ("Bearer " + jwt.encode(DEFAULT_PAYLOAD, SECRET, algorithm="HS512"), "'HS512'"),
        "expired": ("Bearer " + jwt.encode({**DEFAULT_PAYLOAD, "exp": NOW - 60}, SECRET), "expired"),
        "not yet valid": ("Bearer " + jwt.encode({**DEFAULT_PAYLOAD, "nbf": NOW + 3600}, SECRET), "not valid yet"),
        "missing team_id": ("Bearer " + jwt.encode({"token_id": "debug-test"}, SECRET), "'team_id'"),
        "payload not an object": ("Bearer " + jwt.api_jws.encode(b"[1, 2]", SECRET, algorithm="HS256"), "token"),
        "issued in the future": ("Bearer " + jwt.encode({**DEFAULT_PAYLOAD, "iat": NOW + 3600}, SECRET), "(iat)"),
    }


def _crafted(header: dict) -> str:
    """A token whose header PyJWT refuses with its base InvalidTokenError (no secret needed)."""
    import base64
    import json

    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return "Bearer " + part(header) + "." + part(DEFAULT_PAYLOAD) + ".c2ln"


# Each of these was a 500 on every protected route (issue 15, D1).
BAD_TOKENS.update({
    "crit extension": (_crafted({"alg": "HS256", "typ": "JWT", "crit": ["exp"]}), "malformed"),
    "crit not a list": (_crafted({"alg": "HS256", "crit": "x"}), "malformed"),
    "kid not a string": (_crafted({"alg": "HS256", "kid": 5}), "malformed"),
})


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_authenticator_rejects_with_reason(case):
    header, needle = BAD_TOKENS[case]
    auth = Authenticator(SECRET)
    with pytest.raises(AuthError) as e:
        auth.verify_header(header)
    assert needle in str(e.value)
    assert SECRET not in str(e.value)


def test_authenticator_accepts_valid_and_configurable_claims():
    auth = Authenticator(SECRET)
    assert auth.verify_header("Bearer " + encode_token(DEFAULT_PAYLOAD, SECRET, expires_in=60))["team_id"] == "tenstorrent"
    assert auth.verify_header("bearer " + jwt.encode({**DEFAULT_PAYLOAD, "nbf": NOW - 5}, SECRET))
    no_team = "Bearer " + jwt.encode({"sub": "me"}, SECRET)
    assert Authenticator(SECRET, required_claims=[]).verify_header(no_team) == {"sub": "me"}
    with pytest.raises(AuthError, match="'sub'"):
        Authenticator(SECRET, required_claims=["team_id", "sub"]).verify_header("Bearer " + encode_token(DEFAULT_PAYLOAD, SECRET))


@pytest.fixture(scope="module")
def server():
    srv = ThreadedServer(create_app(ServerSettings(jwt_secret=SECRET)))
    yield srv
    srv.stop()


ROUTES = [("POST", "/inference/llama3-70b", "message"), ("POST", "/chat/llama3-70b", "message"),
          ("POST", "/v1/completions", "error"), ("POST", "/v1/chat/completions", "error"),
          ("GET", "/v1/models", "error"), ("POST", "/tokenize", "error"), ("POST", "/detokenize", "error"),
          ("GET", "/status", "message")]  # /status shows the engine's pid and last error


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_every_route_answers_401_with_www_authenticate(server, case):
    header, needle = BAD_TOKENS[case]
    headers = {"Authorization": header} if header else {}
    for method, path, key in ROUTES:
        r = httpx.request(method, server.url + path, headers=headers, json={"text": "hi", "prompt": "hi"})
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        body = r.json()
        message = body["message"] if key == "message" else body["error"]["message"]
        assert needle in message
        if key == "error":
            assert body["error"]["type"] == "authentication_error"


def test_valid_token_passes_and_open_routes_need_none(server):
    good = {"Authorization": "Bearer " + encode_token(DEFAULT_PAYLOAD, SECRET)}
    assert httpx.get(server.url + "/v1/models", headers=good).status_code == 200
    # /health and /metrics are open (health is 503 here only because no engine runs in this test)
    assert httpx.get(server.url + "/health").status_code == 503
    assert httpx.get(server.url + "/metrics").status_code == 200
    assert httpx.post(server.url + "/inference/no-such-model", json={"text": "hi"}).status_code == 401
    assert httpx.post(server.url + "/inference/no-such-model", json={"text": "hi"}, headers=good).status_code == 404
    # Authentication comes before the engine: with a good token the answer is "not ready", not 401.
    r = httpx.post(server.url + "/inference/llama3-70b", headers=good, json={"text": "hi"})
    assert r.status_code == 503


def test_no_auth_is_an_explicit_opt_out():
    with pytest.raises(ValueError, match="no-auth"):
        create_app(ServerSettings(jwt_secret=None))
    srv = ThreadedServer(create_app(ServerSettings(no_auth=True)))
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 200
    finally:
        srv.stop()
