"""The service under load, on 127.0.0.1: latency, throughput, memory, a soak and the camera page.

    python -m benchmarks.service_load MODEL_DIR IMAGE_DIR [--images 200] [--levels 1,4,16,64]
        [--seconds 20] [--soak 600] [--camera 15]

In one run: the in-process caption of one photo (Captioner, warm) and the offline batched rate
(encode + compiled search over ``--images`` photos, 32 at a time); then ``captioning serve`` as a
subprocess and, against it: one client's latency; ``--levels`` concurrent clients, each sending
one photo per request for ``--seconds`` (p50/p95/p99, images/s, errors, 503s counted apart, the
server's peak RSS); a soak at 16 clients for ``--soak`` seconds (RSS each minute: the last
minute's against the second's); and the web page's camera mode in headless Chromium with its
fake camera for ``--camera`` seconds (frames per second). Every loop is bounded in count and time.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.serving import running_server  # noqa: E402

MAX_REQUESTS = 200_000  # per level: a bound on the loop besides its time


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url, photos, clients, seconds, pid, rss_log=None):
    """``clients`` threads posting one photo per request for ``seconds``: latencies and statuses."""
    import httpx

    stop = time.monotonic() + seconds
    lat, codes, lock, count = [], [], threading.Lock(), [0]

    def client(i):
        with httpx.Client(timeout=60) as c:
            k = i
            while time.monotonic() < stop:
                with lock:
                    if count[0] >= MAX_REQUESTS:
                        return
                    count[0] += 1
                name, data = photos[k % len(photos)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/caption", files=[("images", (name, data))])
                    code = r.status_code
                except httpx.HTTPError:
                    code = -1
                with lock:
                    lat.append(time.perf_counter() - t0)
                    codes.append(code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    peak, samples = 0.0, []
    while any(t.is_alive() for t in threads):
        m = rss_mb(pid)
        peak = max(peak, m)
        samples.append((time.perf_counter() - t0, m))
        time.sleep(1)
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    codes = np.array(codes)
    ok = np.array(lat)[codes == 200]
    return {
        "clients": clients,
        "requests": len(codes),
        "ok": int((codes == 200).sum()),
        "busy": int((codes == 503).sum()),
        "errors": int(((codes != 200) & (codes != 503)).sum()),
        "images_s": (codes == 200).sum() / elapsed,
        "p50": np.percentile(ok, 50) * 1000 if len(ok) else float("nan"),
        "p95": np.percentile(ok, 95) * 1000 if len(ok) else float("nan"),
        "p99": np.percentile(ok, 99) * 1000 if len(ok) else float("nan"),
        "rss_peak": peak,
        "rss": samples,
    }


def camera_fps(url, seconds):
    chromium = shutil.which("chromium")
    if not chromium:
        return None
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            page.click("#cam")
            page.wait_for_function("Number(document.getElementById('fps').dataset.frames || 0) >= 1", timeout=60_000)
            page.wait_for_timeout(seconds * 1000)
            return float(page.get_attribute("#fps", "data-fps")), int(page.get_attribute("#fps", "data-frames"))
        finally:
            browser.close()


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--images", "n_images", default=200, show_default=True, type=int)
@click.option("--levels", default="1,4,16,64", show_default=True)
@click.option("--seconds", default=20, show_default=True, type=int, help="Per concurrency level.")
@click.option("--soak", default=600, show_default=True, type=int, help="Seconds at 16 clients (0: none).")
@click.option("--camera", default=15, show_default=True, type=int, help="Seconds of camera mode (0: none).")
def main(model_dir, image_dir, n_images, levels, seconds, soak, camera):

    from captioning.inference import Captioner

    paths = sorted(p for p in Path(image_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n_images]
    photos = [(p.name, p.read_bytes()) for p in paths]

    captioner = Captioner.load(model_dir)
    captioner.caption([paths[0]])
    one = []
    for i in range(30):
        t0 = time.perf_counter()
        captioner.caption([paths[i % len(paths)]])
        one.append(time.perf_counter() - t0)
    in_process = float(np.median(one))
    arrays = np.stack([captioner.read(p) for p in paths])
    captioner.caption_features(captioner.encode(arrays[:32]))  # warm-up: compile the batch of 32
    t0 = time.perf_counter()
    for i in range(0, len(arrays), 32):
        captioner.caption_features(captioner.encode(arrays[i : i + 32]))
    offline = len(arrays) / (time.perf_counter() - t0)
    del captioner
    print(f"{model_dir}: in-process one photo {1000 * in_process:.1f} ms (median of 30); "
          f"offline batched {offline:.1f} images/s over {len(arrays)} photos (32 at a time)")  # fmt: skip

    with running_server(model_dir, "--max-queue", "512") as (url, server):
        solo = load(url, photos, 1, seconds, server.pid)
        print(f"one client: median {solo['p50']:.1f} ms = {solo['p50'] / 1000 / in_process:.2f}x in-process; "
              f"{solo['images_s']:.1f} images/s")  # fmt: skip
        head = "clients | requests | p50 ms | p95 ms | p99 ms | images/s | vs offline | vs 1 client | errors | 503"
        print(f"| {head} | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for clients in (int(c) for c in levels.split(",")):
            r = solo if clients == 1 else load(url, photos, clients, seconds, server.pid)
            print(f"| {clients} | {r['requests']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                  f"{r['images_s']:.1f} | {r['images_s'] / offline:.2f} | {r['images_s'] / solo['images_s']:.2f} | "
                  f"{r['errors']} | {r['busy']} | {r['rss_peak']:.0f} |")  # fmt: skip
        if camera:
            fps = camera_fps(url, camera)
            shown = "chromium not found" if fps is None else f"{fps[0]:.1f} frames/s, {fps[1]} frames"
            print(f"camera mode (headless Chromium, fake camera, {camera} s): {shown}")
        if soak:
            r = load(url, photos, 16, soak, server.pid)
            by_minute = {}
            for t, m in r["rss"]:
                by_minute.setdefault(int(t // 60), []).append(m)
            minutes = [float(np.mean(v)) for _, v in sorted(by_minute.items())]
            last, second = minutes[-1], minutes[1] if len(minutes) > 1 else minutes[0]
            print(f"soak, 16 clients, {soak} s: {r['requests']} requests, {r['errors']} errors, {r['busy']} 503, "
                  f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms, {r['images_s']:.1f} images/s; RSS per minute (MB): "
                  f"{', '.join(f'{m:.0f}' for m in minutes)}; last / second minute {last / second:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
