"""Downloads against a real HTTP server on 127.0.0.1 that misbehaves on request; safe unpacking."""

import hashlib
import http.server
import io
import os
import re
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from captioning import download
from captioning.download import DATASETS, Dataset, DownloadError, Remote, fetch, fetch_dataset, unpack


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; ``server.modes[path]``: normal, drop-once, no-range or missing."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        srv = self.server
        data = srv.files.get(self.path)
        mode = srv.modes.get(self.path, "normal")
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if data is None or mode == "missing":
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and mode != "no-range":
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop-once":
            srv.modes[self.path] = "normal"
            self.wfile.write(body[: len(body) // 2])  # then hang up mid-body
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.modes, srv.requests = {}, {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def make_zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def remote_for(server, path, data, **kw):
    server.files[path] = data
    return Remote(server.url + path, **kw)


def no_sleep(log):
    return lambda s: log.append(s)


PHOTOS = make_zip({"Photos/a.jpg": os.urandom(3000), "Photos/b.jpg": os.urandom(3000), "captions.txt": b"a.jpg,x\n"})


def test_download_verify_unpack(server, tmp_path):
    sha = hashlib.sha256(PHOTOS).hexdigest()
    ds = Dataset(files=(remote_for(server, "/d/photos.zip", PHOTOS, size=len(PHOTOS), sha256=sha),), params={})
    rep = fetch_dataset(ds, tmp_path / "out", progress=False, log=lambda s: None)
    assert rep == {"downloaded": ["photos.zip"], "unpacked": ["photos.zip"], "kept": []}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".photos.zip.unpacked", "Photos", "captions.txt"]
    assert (out / "captions.txt").read_bytes() == b"a.jpg,x\n" and len(list((out / "Photos").iterdir())) == 2

    # a rerun downloads nothing and touches nothing
    n = len(server.requests)
    assert fetch_dataset(ds, out, progress=False, log=lambda s: None)["kept"] == ["photos.zip"]
    assert len(server.requests) == n


def test_a_dropped_connection_resumes_from_the_right_byte(server, tmp_path):
    data = os.urandom(5 * download.CHUNK + 123)  # several reads before the drop
    remote = remote_for(server, "/big.bin", data, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    server.modes["/big.bin"] = "drop-once"
    waits, logged = [], []
    fetch(remote, tmp_path / "big.bin", progress=False, sleep=no_sleep(waits), log=logged.append, backoff=0.5)
    assert (tmp_path / "big.bin").read_bytes() == data and not (tmp_path / "big.bin.part").exists()
    assert server.requests == [("/big.bin", None), ("/big.bin", f"bytes={len(data) // 2}-")]
    assert waits == [0.5] and "retrying" in logged[0]


def test_a_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    data = os.urandom(10_000)
    remote = remote_for(server, "/f.bin", data, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    server.modes["/f.bin"] = "no-range"
    (tmp_path / "f.bin.part").write_bytes(b"\0" * 4000)  # an earlier run's partial file
    fetch(remote, tmp_path / "f.bin", progress=False, log=lambda s: None)
    assert server.requests == [("/f.bin", "bytes=4000-")]  # asked to resume, got the whole file
    assert (tmp_path / "f.bin").read_bytes() == data  # not 4000 stale bytes + the file


def test_404_is_a_clear_error_without_retries(server, tmp_path):
    remote = Remote(server.url + "/gone.zip")
    with pytest.raises(DownloadError, match=r"/gone.zip: HTTP 404 .*check the URL"):
        fetch(remote, tmp_path / "gone.zip", progress=False, sleep=no_sleep([]))
    assert len(server.requests) == 1 and not list(tmp_path.iterdir())


def test_a_wrong_checksum_is_refused_and_the_file_deleted(server, tmp_path):
    remote = remote_for(server, "/x.zip", PHOTOS, sha256="0" * 64)
    with pytest.raises(DownloadError, match=r"x.zip: downloaded file has SHA-256 [0-9a-f]{64}, expected 0{64}"):
        fetch(remote, tmp_path / "x.zip", progress=False)
    assert not list(tmp_path.iterdir())  # neither the file nor its .part


def test_a_size_that_differs_from_the_table_is_refused(server, tmp_path):
    remote = remote_for(server, "/x.zip", PHOTOS, size=len(PHOTOS) + 1)
    with pytest.raises(DownloadError, match="offers .* bytes, the table expects"):
        fetch(remote, tmp_path / "x.zip", progress=False)


def test_no_network_is_a_clear_error_after_backing_off(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    with pytest.raises(DownloadError, match=r"failed 3 times, last: cannot reach 127.0.0.1:\d+: .*No network\?"):
        fetch(
            Remote(f"http://127.0.0.1:{port}/a.zip"),
            tmp_path / "a.zip",
            retries=2,
            backoff=1.0,
            progress=False,
            sleep=no_sleep(waits),
            log=lambda s: None,
        )
    assert waits == [1.0, 2.0]  # exponential backoff


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_a_clear_error(server, tmp_path):
    remote = remote_for(server, "/x.zip", PHOTOS)
    (tmp_path / "x.zip.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(DownloadError, match=r"x.zip.part: disk full .*free space and rerun"):
        fetch(remote, tmp_path / "x.zip", progress=False)
    assert not (tmp_path / "x.zip").exists()


def tar_bytes(add):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        add(t)
    return buf.getvalue()


def _tar_member(t, name, data=b"x", kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


EVIL = {
    "zip-slip.zip": make_zip({"ok.txt": b"fine", "../evil.txt": b"escaped"}),
    "absolute.zip": make_zip({"ok.txt": b"fine", "/tmp/evil.txt": b"escaped"}),
    "slip.tar.gz": tar_bytes(lambda t: (_tar_member(t, "ok.txt"), _tar_member(t, "a/../../evil.txt"))),
    "symlink.tar.gz": tar_bytes(
        lambda t: (_tar_member(t, "ok.txt"), _tar_member(t, "link", kind=tarfile.SYMTYPE, link="/etc/passwd"))
    ),
}


@pytest.mark.parametrize("name", sorted(EVIL))
def test_archives_that_escape_the_target_are_refused_whole(tmp_path, name):
    archive = tmp_path / name
    archive.write_bytes(EVIL[name])
    target = tmp_path / "sandbox" / "out"
    with pytest.raises(DownloadError, match="refusing member"):
        unpack(archive, target)
    assert list(target.iterdir()) == []  # not even the harmless ok.txt: no partial result
    assert not (tmp_path / "sandbox" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_a_truncated_archive_is_a_clear_error(server, tmp_path):
    big = make_zip({f"img{i}.jpg": os.urandom(20_000) for i in range(5)})
    ds = Dataset(files=(remote_for(server, "/t.zip", big[: len(big) // 2]),), params={})  # no size on record
    with pytest.raises(DownloadError, match=r"t.zip: (neither a zip nor a tar|damaged).*rerun to download it again"):
        fetch_dataset(ds, tmp_path / "out", progress=False, log=lambda s: None)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["t.zip"]  # no half-unpacked folder


def test_a_damaged_member_fails_its_crc(tmp_path):
    data = bytearray(make_zip({"a.txt": b"A" * 5000}))
    i = data.index(b"A" * 100)  # stored uncompressed: flip a byte of the payload
    data[i] = ord("B")
    (tmp_path / "d.zip").write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="damaged archive .*CRC"):
        unpack(tmp_path / "d.zip", tmp_path / "out")


def test_the_registry_is_well_formed():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, ds in DATASETS.items():
        assert ds.files and len({f.name for f in ds.files}) == len(ds.files), name
        for f in ds.files:
            assert re.fullmatch(r"https?://[a-z0-9.-]+\.[a-z]{2,}/\S+", f.url), f.url
            assert f.size is None or (isinstance(f.size, int) and f.size > 0), f
            assert f.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", f.sha256), f
        for key in ds.params:  # every -S names a real setting: dvc exp run would not catch a typo
            section, setting = key.split(".")
            assert setting in params[section], key
    assert DATASETS["coco2014"].files[0].size == 13510573713  # train2014.zip, as the server sends it


def test_cli_downloads_then_prints_the_training_command(server, tmp_path, monkeypatch):
    from captioning.commands import main as cli

    ds = Dataset(
        files=(remote_for(server, "/d/photos.zip", PHOTOS, size=len(PHOTOS)),),
        params={"dataset.captions": "{out}/captions.txt", "dataset.images": "{out}/Photos"},
    )
    monkeypatch.setitem(DATASETS, "tiny", ds)
    out = tmp_path / "raw"
    result = CliRunner().invoke(cli, ["download", "tiny", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"dvc exp run -S dataset.captions={out}/captions.txt -S dataset.images={out}/Photos" in result.output
    assert (
        result.output.strip().splitlines()[-1] == f"download: tiny -> {out}: 1 downloaded, 1 unpacked, 0 already there"
    )
    again = CliRunner().invoke(cli, ["download", "tiny", "--out", str(out), "--no-progress"])
    assert again.output.strip().endswith("0 downloaded, 0 unpacked, 1 already there")
    bad = CliRunner().invoke(cli, ["download", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "choose from" in bad.output and "coco2014" in bad.output
