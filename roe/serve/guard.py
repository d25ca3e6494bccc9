"""Who may talk to the server: the Host header (DNS rebinding) and the API key, checked before routing.

A pure ASGI middleware (no request body is read here, streaming is untouched). It knows nothing
of models or requests: it answers 400 for a Host the server does not go by and 401 for a /v1
route (or the API documents, which list the registered schedule names) without the right
``Authorization: Bearer`` key, both in OpenAI's error format.
"""

import hmac
import ipaddress
import json

from roe.serve.protocol import ApiError, ServeConfig

LOCAL_NAMES = ("localhost", "localhost.localdomain")
KEYED = ("/v1", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # besides /v1/*: /health needs no key


def host_name(host: str) -> str:
    """The name of a Host header without its port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, cfg: ServeConfig) -> bool:
    """Whether a Host header names this server.

    NOTE: an IP address is always allowed: a DNS-rebinding page is served under a *name* the
    attacker controls and re-points at this machine, so its requests carry that name. Names must
    be the bound host, localhost, or one of ``cfg.allowed_hosts`` ("*" turns the check off).
    """
    if "*" in cfg.allowed_hosts:
        return True
    name = host_name(host).rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in {*LOCAL_NAMES, host_name(cfg.host), *(h.lower() for h in cfg.allowed_hosts)}


def key_matches(authorization: str, key: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class Guard:
    """ASGI middleware: Host check on every HTTP request, Bearer key on /v1 routes and the API documents
    (when a key is set)."""

    def __init__(self, app, cfg: ServeConfig) -> None:
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                await _answer(send, error)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if "host" in headers and not host_allowed(headers["host"], self.cfg):
            return ApiError(400, "the Host header does not name this server (see roe serve --allowed-hosts)",
                            code="invalid_host")
        path = scope["path"]
        if self.cfg.api_key and (path in KEYED or path.startswith("/v1/")) and not key_matches(
                headers.get("authorization", ""), self.cfg.api_key):
            return ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key")
        return None


async def _answer(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
