"""`python tools/serve.py` started as users start it, for the tests that need the real command-line server:

    with cli_server(checkpoint, "--allow_weight_reload") as base:   # base = "http://127.0.0.1:PORT"
        httpx.get(base + "/health")

Port 0 (the start-up line says which port), CPU, torch kernels, one thread; the URL is yielded once /health answers
200, stderr is drained all along (a full pipe would block the server), and the process is stopped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def cli_server(checkpoint: str | Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", **(env or {})}
    if env is None or "MINIMIND_API_KEY" not in env:
        full_env.pop("MINIMIND_API_KEY", None)
    cmd = [sys.executable, str(ROOT / "tools" / "serve.py"), "--load", str(checkpoint), "--port", "0"]
    cmd += ["--device", "cpu", "--kernels", "torch", "--threads", "1", "--log_level", "warning", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT, env=full_env)
    try:
        lines: list[str] = []
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line, "the server did not start:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port is not None, "the server did not say its port:\n" + "".join(lines)
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stderr], daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server never became healthy:\n" + "".join(lines)
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
