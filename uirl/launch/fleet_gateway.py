"""The Fleet gateway: the only address of a deployment that SuperNodes (and the outside world) reach.

Flower 1.41's SuperLink serves its Fleet API (SuperNodes), Control API (the ``flwr`` CLI: register
SuperNode keys, submit apps) and Runtime API (the ServerApp) from ONE HTTP server on ``--host``/
``--port``; ``--control-api-address`` and ``--fleet-api-address`` are deprecated and no longer
separate them, and the Control API has no authentication in this distribution. Publishing that port
would let anyone holding the CA certificate register a key of their own and submit apps.

So the SuperLink listens on 127.0.0.1 (or an internal network) only, and this gateway -- TLS on the
published address, TLS to the SuperLink -- forwards nothing but the SuperNode's Fleet calls: POST to
one of the exact paths below, no query string. Every request is checked on its own (a kept-alive
connection cannot slip a second, Control request through), and the path is compared as raw bytes,
so ``/v1/fleet/../control/...`` or percent-encoded tricks are refused, not normalised upstream.
Anything else gets 404 from the gateway and never reaches the SuperLink.

Run it as ``python -m uirl.launch.fleet_gateway --listen 0.0.0.0:9092 --superlink 127.0.0.1:8000
--ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.crt``.
"""

from __future__ import annotations

import argparse
import ssl
import sys

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

#: The Fleet API calls of a Flower 1.41 SuperNode (flwr/supernode/fleet_http_client.py): the only
#: paths forwarded. Node authentication is checked by the SuperLink on each of them.
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the forwarding client sets itself.
_DROP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
         "host", "content-length"}
# Response headers the gateway's own server writes.
_OWN = {"date", "server"}


def allowed(method: str, raw_path: bytes, query: bytes) -> bool:
    """Whether a request may reach the SuperLink: a POST to an exact Fleet path, without a query."""
    return method == "POST" and not query and raw_path.decode("latin-1") in FLEET_PATHS


def create_app(superlink: str, ca_certfile: str):
    """An ASGI app forwarding the allowed requests to ``https://<superlink>`` (verified by the CA)."""
    verify = ssl.create_default_context(cafile=ca_certfile)
    # No read timeout of our own: the SuperNode's client decides how long it waits.
    client = httpx.AsyncClient(base_url=f"https://{superlink}", verify=verify,
                               timeout=httpx.Timeout(30.0, read=None), follow_redirects=False)

    async def forward(request: Request) -> Response:
        scope = request.scope
        raw_path = scope.get("raw_path") or scope["path"].encode()
        if not allowed(request.method, raw_path, scope.get("query_string", b"")):
            return PlainTextResponse("not found: this address serves the Fleet API only\n", status_code=404)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP]
        upstream = client.build_request("POST", raw_path.decode("latin-1"), headers=headers,
                                        content=await request.body())
        try:
            response = await client.send(upstream, stream=True)
        except httpx.TransportError as exc:
            return PlainTextResponse(f"the SuperLink is unreachable: {type(exc).__name__}\n", status_code=502)
        # Raw bytes: the body goes back exactly as the SuperLink encoded it.
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 headers={k: v for k, v in response.headers.items()
                                          if k.lower() not in _DROP | _OWN},
                                 background=BackgroundTask(response.aclose))

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":  # startup: nothing to open
                await send({"type": "lifespan.startup.complete"})
            await client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            response = await forward(Request(scope, receive))
            await response(scope, receive, send)

    return app


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m uirl.launch.fleet_gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to publish (the Fleet address)")
    parser.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink's own (private) address")
    parser.add_argument("--ssl-certfile", required=True, help="certificate presented to SuperNodes")
    parser.add_argument("--ssl-keyfile", required=True)
    parser.add_argument("--ssl-ca-certfile", required=True, help="CA that signed the SuperLink's certificate")
    args = parser.parse_args(argv)
    host, port = args.listen
    uvicorn.run(create_app(args.superlink, args.ssl_ca_certfile), host=host, port=port,
                ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile, log_level="info", access_log=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
