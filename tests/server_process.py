"""A server subprocess for tests/test_server.py, and plain HTTP requests to it."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import openai

from tests.conftest import ROOT, free_port, stop_process


@dataclass
class Server:
    """A server subprocess: its base URL and its log."""

    url: str
    log: Path
    process: subprocess.Popen

    def client(self, api_key: str = "none", timeout: float = 60) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as response:
            return json.loads(response.read())

    def log_lines(self) -> list[str]:
        return self.log.read_text(encoding="utf-8", errors="replace").splitlines()


def start_server(model: Path, log: Path, *args: str, python: str | Path = sys.executable) -> Iterator[Server]:
    """``python -m runtime.server`` on ``model`` and a free port, until the generator is closed."""
    port = free_port()
    handle = log.open("w", encoding="utf-8")
    process = subprocess.Popen([str(python), "-m", "runtime.server", "--model", str(model), "--port", str(port),
                                *args], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if server.health()["status"] == "ok":
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text(encoding="utf-8")[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        stop_process(process)
        handle.close()


def logged_at(line: str) -> float:
    """The time of a server log line (logging's default asctime, local time)."""
    stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", line)
    return time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S")) + int(stamp.group(2)) / 1000


def fetch(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(server: Server, body: bytes) -> tuple[int, dict[str, Any]]:
    return fetch(urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json"}))


def announce_body(server: Server, size: int) -> tuple[int, dict[str, Any]]:
    """Announce a ``size``-byte body and read the answer before sending it (the server refuses early)."""
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()
