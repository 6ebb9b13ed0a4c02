"""Every class of bad request against a running service, and what it answered.

    python -m benchmarks.bad_requests MODEL_DIR PHOTO      # prints a markdown table

Starts ``captioning serve`` on 127.0.0.1 (a 1 MiB body limit, so the oversized case is quick;
the stalled client is cut off after the default 10 s), sends each case, then a valid photo, and prints the
status, the one-line error and whether the next request was answered. ``tests/test_service.py``
asserts the same catalogue's expected statuses.
"""

import io
import os
import socket
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.serving import running_server  # noqa: E402


def png(array, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", **kw)
    return buf.getvalue()


def bad_requests(ok: bytes) -> dict:
    """name -> (httpx request kwargs, expected status); ``ok``: a valid photo's bytes."""
    gif = io.BytesIO()
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 3] = 128
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 50, 100, 0)).save(cmyk, "JPEG")
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpx in a few kB
    wide = io.BytesIO()
    Image.new("L", (8_000, 6_000)).save(wide, "PNG")  # 48 Mpx: over this server's 40 Mpx limit
    return {  # name -> (request kwargs, expected status)
        "empty body": ({"content": b"", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
        "not an image": ({"files": [("images", ("a.jpg", b"hello, not a photo"))]}, 415),
        "truncated JPEG": ({"files": [("images", ("t.jpg", _jpeg()[: len(_jpeg()) // 2]))]}, 422),
        "decompression bomb PNG": ({"files": [("images", ("bomb.png", bomb.getvalue()))]}, 413),
        "image over the pixel limit": ({"files": [("images", ("wide.png", wide.getvalue()))]}, 413),
        "body over the limit": ({"files": [("images", ("big.png", b"\0" * (2**20 + 10)))]}, 413),
        "wrong content type": ({"content": ok, "headers": {"content-type": "image/png"}}, 415),
        "a path where an image belongs": ({"files": [("images", (None, b"/etc/passwd"))]}, 422),
        "a URL where an image belongs": ({"files": [("images", (None, b"http://127.0.0.1/x.jpg"))]}, 422),
        "malformed multipart": (
            {"content": b"--x\r\nContent-Disposition: form-data\r\n\r\nno end", "headers": _multipart()},
            400,
        ),
        "multipart without a boundary": ({"content": ok, "headers": {"content-type": "multipart/form-data"}}, 400),
        "too many images": ({"files": [("images", ("a.png", ok))] * 5}, 413),
        "empty file": ({"files": [("images", ("e.png", b""))]}, 400),
        "bad query": ({"files": [("images", ("a.png", ok))], "params": {"beam_size": 0}}, 422),
        # valid images of unusual kinds: captioned
        "animated GIF": ({"files": [("images", ("anim.gif", gif.getvalue()))]}, 200),
        "CMYK JPEG": ({"files": [("images", ("cmyk.jpg", cmyk.getvalue()))]}, 200),
        "16-bit PNG": ({"files": [("images", ("16.png", png(np.full((20, 20), 40000, np.uint16))))]}, 200),
        "alpha PNG": ({"files": [("images", ("rgba.png", png(rgba)))]}, 200),
    }


def _jpeg():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _multipart():
    return {"content-type": "multipart/form-data; boundary=x"}


def stalled(port):
    """A client that sends half its body and then nothing: the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 5000\r\n\r\n--x\r\n"
        )
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("photo", type=click.Path(exists=True, dir_okay=False))
def main(model_dir, photo):
    import httpx

    ok = Path(photo).read_bytes()
    with running_server(model_dir, "--max-body-mb", "1", "--max-images", "4") as (url, _):
        print("| request | status | expected | answer | next request |")
        print("|---|---|---|---|---|")
        for name, (kwargs, want) in bad_requests(ok).items():
            r = httpx.post(f"{url}/caption", timeout=60, **kwargs)
            body = r.json()
            answer = body.get("error") or body["captions"][0]["caption"]
            after = httpx.post(f"{url}/caption", files=[("images", ("ok.jpg", ok))], timeout=60).status_code
            print(f"| {name} | {r.status_code} | {want} | {answer} | {after} |")
        status, body = stalled(int(url.rsplit(":", 1)[1]))
        after = httpx.post(f"{url}/caption", files=[("images", ("ok.jpg", ok))], timeout=60).status_code
        print(f"| a client that never finishes its body | {status} | 408 | {body} | {after} |")


if __name__ == "__main__":
    main()
