"""A real ``fewshot serve`` process on a free loopback port, for the service's tests and benchmark."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    registry: Path
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(registry: Path, *args: str, timeout: float = 120.0, code: Path = ROOT) -> Server:
    """Start ``fewshot serve registry args...`` and wait until /readyz says ready; ``code``: the folder the
    fewshot package is imported from (another version's, for benchmarks)."""
    port = free_port()
    log = registry.parent / f"serve-{port}.log"
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "fewshot", "serve", str(registry), "--port", str(port),
                                    *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", registry, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"fewshot serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"fewshot serve did not become ready in {timeout} s:\n{log.read_text()}")
