"""Starting the server: bind first (so `--port 0` works and the URL printed is the real one), then
uvicorn on that socket until Ctrl-C or SIGTERM, which end it cleanly: open streams get a moment to
finish, the generation threads stop, and the command exits 0."""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CharlmError, ConfigError

if TYPE_CHECKING:
    from .app import Limits

EXTRA_HINT = "install the web extra: pip install 'charlm[serve]'"


def require_extra() -> None:
    """The server's libraries are an optional extra; say how to get them rather than fail on import."""
    missing = []
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise CharlmError(f"charlm serve needs {' and '.join(missing)}, which {verb} not installed", EXTRA_HINT)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one clear line saying why there is none."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535 (got {port})")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise ConfigError(
            f"--host {host}: no such address", "use 127.0.0.1, 0.0.0.0 or a name this machine has"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == 98:
            raise ConfigError(
                f"port {port} on {host} is already in use", "choose another with --port (0 picks a free one)"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror})", "choose another --host or --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(
    sources: list[Path],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    precision: str = "auto",
    limits: Limits | None = None,
    warn: Callable[[str], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serves until interrupted. `warn(text)` says things on stderr; `on_ready(url)` announces the URL."""
    require_extra()
    import uvicorn

    from .app import Limits, create_app
    from .models import Models

    limits = limits or Limits()
    for source in sources:
        if not source.exists() and source != Path("checkpoints"):
            raise CharlmError(f"--checkpoint {source}: no such file or folder", "give a checkpoint or a folder of them")
    models = Models(sources, device=device, precision=precision)
    if not models.offers():
        where = ", ".join(str(s) for s in sources)
        raise CharlmError(
            f"no checkpoint to serve in {where}", "train one first (charlm train FILE) or pass --checkpoint"
        )
    loopback = is_loopback(host)
    sock = bind(host, port)
    app = create_app(models, limits, loopback_only=loopback)
    if not loopback and warn is not None:
        warn(
            f"listening on {host}: anyone who can reach this machine on port {sock.getsockname()[1]} can "
            "use these models (there is no login); use --host 127.0.0.1 to keep it to this machine"
        )
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, lifespan="off")
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(url_of(sock))
    try:
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then raises the signal again
            pass
    finally:
        models.close()
        sock.close()
        sys.stdout.flush()
