"""Start ``captioning serve`` on 127.0.0.1 for a benchmark, and stop it (shared by the service benchmarks)."""

import contextlib
import socket
import subprocess
import sys
import time


@contextlib.contextmanager
def running_server(model_dir, *options, wait_s=180):
    """Yield ``(url, process)`` once the server answers /health on a free port; terminate it after."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "captioning", "serve", "--model", str(model_dir), "--port", str(port), *options]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(cmd)}: the server did not come up")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        yield url, server
    finally:
        server.terminate()
        server.wait(60)
