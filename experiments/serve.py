"""An OpenAI-compatible HTTP server of streaming conversations (`streamjax.serve`: the engine and the API).

python -m experiments.serve --config=configs/serve.py --workdir=/tmp/streamjax/serve

The model is loaded, the engine started, and uvicorn serves `streamjax.serve.api`'s app on config.host
and config.port (0: a free port). Once the socket listens, `workdir/server.json` says where
({"host", "port", "pid", "model"}); sessions are saved in `workdir/sessions`. SIGTERM or SIGINT stops
accepting requests, lets the running ones end (or cancels them after `SHUTDOWN_SECONDS`), closes the
engine (which saves the resident sessions) and exits 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pathlib
import signal
import socket
import threading

import uvicorn

from experiments.program import main
from streamjax.files import chat_models, loading
from streamjax.runs import workdir as workdir_lib
from streamjax.runs import writes
from streamjax.serve import api, engine

CONFIG_FIELDS = (
    "model", "chat_template", "dtype", "num_sinks", "window", "slots", "host", "port", "api_key", "max_body_bytes",
    "default_max_tokens", "max_tokens_limit", "seed", "chunk_size", "block_size", "max_stop_strings",
)  # fmt: skip
SHUTDOWN_SECONDS = 10  # how long a stop waits for running requests before cancelling them


def check_config(config, workdir: pathlib.Path) -> engine.EngineSettings:
    """Raise ValueError for a server config that cannot run, before anything is loaded; returns the
    engine's settings (checked by `EngineSettings.check`)."""
    missing = [field for field in CONFIG_FIELDS if field not in config]
    unknown = sorted(set(config.keys()) - set(CONFIG_FIELDS))
    if missing or unknown:
        raise ValueError(f"config fields missing: {missing}, unknown: {unknown} (see configs/serve.py)")
    for field in ("model", "host", "chat_template", "api_key"):
        if not isinstance(config[field], str):
            raise ValueError(f"{field} must be a string, got {config[field]!r}")
    if not config.model or not config.host:
        raise ValueError(f"model and host must not be empty, got {config.model!r} and {config.host!r}")
    if not is_int(config.port) or not 0 <= config.port <= 65535:
        raise ValueError(f"port must be an int in [0, 65535] (0: a free port), got {config.port!r}")
    if not is_int(config.max_body_bytes) or config.max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {config.max_body_bytes!r}")
    if not config.api_key and not is_loopback(config.host):
        raise ValueError(
            f"host {config.host!r} is not a loopback address, so anyone who can reach it could use the server: "
            "set --config.api_key (clients then send 'Authorization: Bearer <key>'), or serve on 127.0.0.1"
        )
    loading.parse_dtype(config.dtype)
    settings = engine.EngineSettings(
        slots=config.slots, num_sinks=config.num_sinks, window=config.window, session_dir=str(workdir / "sessions"),
        default_max_tokens=config.default_max_tokens, max_tokens_limit=config.max_tokens_limit, seed=config.seed,
        chunk_size=config.chunk_size, block_size=config.block_size, max_stop_strings=config.max_stop_strings,
    )  # fmt: skip
    settings.check()
    return settings


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only: "localhost" or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def run(config, workdir: str | os.PathLike) -> None:
    """Serve until SIGTERM or SIGINT (see the module's docstring)."""
    workdir = pathlib.Path(workdir).expanduser()
    settings = check_config(config, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lib.workdir_lock(workdir):  # one server per sessions directory
        model = chat_models.load_chat_model(config.model, config.dtype, None, config.chat_template or None)
        server_engine = engine.Engine(model, settings)
        server_engine.start()
        try:
            app = api.create_app(
                server_engine, model_name=config.model, api_key=config.api_key, max_body_bytes=config.max_body_bytes
            )
            serve(app, config.host, config.port, workdir / "server.json", config.model)
        finally:
            server_engine.close()


def serve(app, host: str, port: int, address_file: pathlib.Path, model_name: str) -> None:
    """Serve `app` on (host, port) until a signal stops it; `address_file` says where while it listens."""
    listener = listen(host, port)
    server = StoppableServer(uvicorn.Config(app, timeout_graceful_shutdown=SHUTDOWN_SECONDS, log_level="info"))
    bound_host, bound_port = listener.getsockname()[:2]
    writes.write_json(address_file, {"host": bound_host, "port": bound_port, "pid": os.getpid(), "model": model_name})
    try:
        server.run(sockets=[listener])
    finally:
        address_file.unlink(missing_ok=True)
        listener.close()


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and listening: clients that connect before uvicorn accepts wait."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}; choose another port") from None
    listener.listen(2048)
    return listener


class StoppableServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM or SIGINT only stops it: the program then closes the engine (saving
    the sessions) and exits 0, where uvicorn would raise the signal again once stopped."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self.handle_exit) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


if __name__ == "__main__":
    main(run)
