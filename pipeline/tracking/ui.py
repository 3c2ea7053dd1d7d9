"""`ssod ui`: MLflow's UI on the tracking store, started and watched as a child process."""

from __future__ import annotations

import collections
import socket
import subprocess
import sys
import threading
import time

from pipeline.errors import InputError
from pipeline.tracking.tracker import open_client


def runs_url(uri: str, experiment: str, host: str, port: int) -> str:
    """Where the UI shows the experiment's runs table (a fresh browser otherwise opens on another page)."""
    found = open_client(uri).get_experiment_by_name(experiment)
    base = f"http://{host}:{port}/"
    return f"{base}#/experiments/{found.experiment_id}/runs" if found is not None else base


UI_LINES_KEPT = 50


def check_port(host: str, port: int, flag: str = "--port") -> None:
    """The UI can listen on host:port: the port is free and the host is an address of this machine."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        raise InputError(f"--host {host}: not a host name or address of this machine ({exc})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            raise InputError(f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def ui_command(uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


class _Relay(threading.Thread):
    """The child's output: held until the UI answers (a failed start is one line, not its log), then relayed."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.lines, self.live = stream, collections.deque(maxlen=UI_LINES_KEPT), False
        self.held: list[str] = []
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        for line in self.stream or ():
            with self.lock:
                self.lines.append(line.rstrip())
                if self.live:
                    sys.stderr.write(line)
                else:
                    self.held.append(line)

    def go_live(self) -> None:
        with self.lock:
            sys.stderr.writelines(self.held)
            self.held, self.live = [], True

    def last_line(self) -> str:
        meaningful = [line.strip() for line in self.lines if line.strip()]
        return meaningful[-1][:300] if meaningful else "no output"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def serve_ui(uri: str, host: str = "127.0.0.1", port: int = 5000, experiment: str | None = None) -> int:
    """Run `mlflow ui` on the given store until it exits (Ctrl-C stops it); returns 0 (also after Ctrl-C).

    The port is checked first; a UI that exits with an error is an InputError: its exit code and last line.
    Once it answers, the address printed opens `experiment`'s runs table (a fresh browser lands elsewhere)."""
    check_port(host, port)
    command = ui_command(uri, host, port)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        relay = _Relay(proc.stdout)
        try:
            while proc.poll() is None and not relay.live:
                if _answers(host, port):
                    relay.go_live()
                    url = runs_url(uri, experiment, host, port) if experiment else f"http://{host}:{port}/"
                    print(f"MLflow UI: {url} (Ctrl-C stops it)", file=sys.stderr)
                else:
                    time.sleep(0.25)
            code = proc.wait()
        except KeyboardInterrupt:  # the UI got the same Ctrl-C and is shutting down: the way to stop it
            proc.wait()
            return 0
        relay.join(timeout=5)
    if code != 0:
        raise InputError(
            f"mlflow ui on {host}:{port} (tracking.uri={uri}) exited with code {code}: {relay.last_line()}"
        )
    return 0
