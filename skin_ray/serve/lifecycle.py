"""`skin-ray serve`'s lifecycle: refuse a listener that cannot work or should not (beyond loopback without keys)
before Ray starts, run the app until SIGINT or SIGTERM, then drain what was received."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable

from ray import serve

from skin_ray.api_keys import read_key_file
from skin_ray.config import ServeSettings
from skin_ray.runtime import StartupError, init_ray
from skin_ray.serve import app_builder


def serve_until_stopped(
    settings: ServeSettings, host: str, port: int, verbose: bool, address: str | None, say: Callable[[str], None]
) -> None:
    """Check the listener, start (or join) Ray and the app on `host`:`port`, and serve until SIGINT or SIGTERM;
    then drain. `say` gets the lines an operator reads."""
    check_exposure(host, settings)
    check_port_free(host, port)
    # Handlers first: the service answers (through HAProxy) before serve.run returns, and a stop asked for
    # while it starts must still drain rather than kill the process.
    stop = threading.Event()

    def stop_on_signals():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())

    stop_on_signals()
    started_ray = init_ray(verbose=verbose, address=address)
    stop_on_signals()  # again: Ray's core worker installs a SIGTERM handler of its own that aborts the process
    serve.start(http_options={"host": host, "port": port})
    try:
        handle = serve.run(app_builder(settings), name="skin-ray", route_prefix="/")
    except RuntimeError as exc:  # a replica failed to start; Serve keeps its traceback in the replica's log
        serve.shutdown()
        raise StartupError(f"{exc} Why is in Ray's Serve logs (a local Ray: /tmp/ray/session_latest/logs/serve/)") from None
    say(f"skin-ray is serving on http://{host}:{port}/ (API docs at /docs); Ctrl-C stops it")
    stop.wait()
    say(f"stopping: new requests get 503, those received finish (up to {settings.drain_timeout_s:g} s)")
    # A Ray of this command's own stops with the process, which refuses connections from then on. On a
    # cluster the app is deleted instead (Serve itself stays).
    unfinished = asyncio.run(_stop(handle, settings.drain_timeout_s, delete_app=not started_ray))
    if unfinished:
        say(f"{unfinished} requests did not finish within --drain-timeout-s")


async def _stop(handle, drain_timeout_s: float, delete_app: bool) -> int:
    """Drain the Ingress, then delete the app if asked; how many requests did not finish. In an event loop:
    under Serve's throughput mode (which `skin-ray serve` turns on) a handle routes calls on the caller's loop."""
    unfinished = await handle.drain.remote(drain_timeout_s)
    if delete_app:
        serve.delete("skin-ray")  # blocks this loop, which has nothing else to do
    return unfinished


def check_exposure(host: str, settings: ServeSettings) -> None:
    """Refuse, before Ray starts, a key file that cannot be used, and serving beyond loopback without keys
    unless the operator asked for it (--allow-unauthenticated)."""
    if settings.api_keys:
        read_key_file(settings.api_keys)
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback and not settings.allow_unauthenticated:
        raise ValueError(
            f"refusing to serve on {host} without API keys: anyone who can reach it could use it. Pass --api-keys FILE "
            "(one NAME:SECRET a line, or set SKIN_RAY_API_KEYS_FILE), or --allow-unauthenticated to serve anyone"
        )


def check_port_free(host: str, port: int) -> None:
    """Fail in a second with a reason, rather than after Ray has started with a traceback."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); stop what uses it or pass --port") from None
