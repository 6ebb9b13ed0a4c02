"""Fetch the real datasets: resumable, verified HTTP downloads, then safe, idempotent unpacking.

``DATASETS`` is the one table of what can be fetched: for every file its public URL, its size
in bytes and its SHA-256 where the publisher's server or the publisher states them (None where
nobody published one: then the size alone is checked, or, with neither, the zip's own CRC-32 of
every member while unpacking), and the ``dvc exp run -S`` settings that train on it.

A download goes to ``<file>.part`` and continues from there after an interruption (HTTP Range;
a server that ignores Range restarts it cleanly), retries transient failures with exponential
backoff, verifies, and only then is renamed into place. Unpacking refuses members that would
land outside the target (absolute paths, ``..``, links), extracts into a temporary folder and
moves the result into place only when complete; a marker makes a rerun a no-op.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from .errors import CaptioningError

CHUNK = 1 << 20


class DownloadError(CaptioningError):
    """A download or unpack failed; the message names the file and what to do."""


@dataclasses.dataclass(frozen=True)
class Remote:
    url: str
    size: int | None = None  # bytes; None: not on record
    sha256: str | None = None  # the publisher's digest; None: none published
    unpack: bool = True  # False: keep the file as it is

    @property
    def name(self) -> str:
        return PurePosixPath(self.url.split("?")[0]).name


@dataclasses.dataclass(frozen=True)
class Dataset:
    files: tuple[Remote, ...]
    params: dict  # `dvc exp run -S` settings; "{out}" stands for the download folder
    manual: str = ""  # set when the publisher hands the files out only by hand: what to do


_FLICKR8K = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/"
_COCO = "http://images.cocodataset.org/"
_KARPATHY = Remote("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip")
# Settings for real photos: ImageNet VGG16 at its native 224 px (block5_conv3, 14x14x512),
# words seen 5 times, early stopping and scores on the validation split.
_REAL = {
    "features.backbone": "vgg16",
    "features.weights": "imagenet",
    "features.layer": "block5_conv3",
    "features.image_size": 224,
    "vocab.min_count": 5,
    "train.embed_dim": 256,
    "train.units": 512,
    "train.attention_units": 256,
    "train.attention_reg": 0.01,
    "train.batch_size": 128,
    "train.learning_rate": 0.001,
    "train.lr_decay": 1.0,
    "evaluate.beam_size": 5,
}

# Sizes: the Content-Length the publisher's server sends (the same figure in many public
# download logs). No publisher here publishes SHA-256 digests, so none is given: never invented.
DATASETS = {
    "flickr8k": Dataset(
        files=(Remote(_FLICKR8K + "Flickr8k_Dataset.zip"), Remote(_FLICKR8K + "Flickr8k_text.zip")),
        params={
            **_REAL,
            "dataset.captions": "{out}/Flickr8k.token.txt",
            "dataset.images": "{out}/Flicker8k_Dataset",
            "dataset.splits": "{out}",
            "dataset.format": "flickr_token",
            "evaluate.split": "test",
        },
    ),
    "flickr30k": Dataset(
        files=(_KARPATHY,),
        params={
            **_REAL,
            "dataset.captions": "{out}/dataset_flickr30k.json",
            "dataset.images": "{out}/flickr30k-images",
            "dataset.splits": "{out}/dataset_flickr30k.json",
            "dataset.format": "karpathy",
            "evaluate.split": "test",
        },
        manual="The Flickr30k photos are handed out by their publisher on request only "
        "(https://shannon.cs.illinois.edu/DenotationGraph/). Unpack flickr30k-images.tar into {out}; "
        "this command fetches the Karpathy split with the captions.",
    ),
    "coco2014": Dataset(
        files=(
            Remote(_COCO + "zips/train2014.zip", 13510573713),
            Remote(_COCO + "zips/val2014.zip", 6645013297),
            Remote(_COCO + "annotations/annotations_trainval2014.zip", 252872794),
            _KARPATHY,
        ),
        # Karpathy's dataset_coco.json names images as train2014/... and val2014/...
        params={
            **_REAL,
            "dataset.captions": "{out}/dataset_coco.json",
            "dataset.images": "{out}",
            "dataset.splits": "{out}/dataset_coco.json",
            "dataset.format": "karpathy",
            "evaluate.split": "test",
        },
    ),
    "coco2017": Dataset(
        files=(
            Remote(_COCO + "zips/train2017.zip", 19336861798),
            Remote(_COCO + "zips/val2017.zip", 815585330),
            Remote(_COCO + "annotations/annotations_trainval2017.zip", 252907541),
        ),
        # The Karpathy split is defined on the 2014 names; with 2017 the train set is split by
        # seed and val2017 stays held out (use coco2014 for numbers comparable with papers).
        params={
            **_REAL,
            "dataset.captions": "{out}/annotations/captions_train2017.json",
            "dataset.images": "{out}/train2017",
            "dataset.splits": "{out}/annotations/captions_train2017.json",
            "dataset.format": "coco",
            "evaluate.split": "val",
        },
    ),
    "karpathy": Dataset(files=(_KARPATHY,), params={}),
}


def dvc_command(dataset: Dataset, out) -> str:
    """The `dvc exp run` line that trains and evaluates on a downloaded dataset."""
    sets = " ".join(f"-S {k}={str(v).format(out=out)}" for k, v in dataset.params.items())
    return f"dvc exp run {sets}" if sets else ""


# ---- downloading ---------------------------------------------------------------------------


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _verify(path, remote: Remote, url):
    size = Path(path).stat().st_size
    if remote.size is not None and size != remote.size:
        return f"{size} bytes, expected {remote.size}"
    if remote.sha256 is not None and (digest := _sha256(path)) != remote.sha256:
        return f"SHA-256 {digest}, expected {remote.sha256}"
    return None


class _Transient(Exception):
    """A failure worth retrying (dropped connection, time-out, 5xx)."""


def _get(url, part: Path, expected_size, timeout, progress):
    """One HTTP attempt that appends to ``part`` from where it ends. Raises on failure."""
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "captioning-download/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and expected_size in (None, have):
            return  # asked past the end of a file that is already whole
        if e.code == 429 or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(
            f"{url}: HTTP {e.code} {e.reason}: the file is not there (moved or withdrawn?);"
            " check the URL in captioning/download.py"
        ) from None
    except urllib.error.URLError as e:
        raise _Transient(f"cannot reach {urllib.parse.urlsplit(url).netloc}: {e.reason}") from None
    except (TimeoutError, ConnectionError) as e:
        raise _Transient(str(e) or type(e).__name__) from None
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start again from byte 0
            have = 0
        elif have and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            have = 0  # a range we did not ask for: trust nothing, start again
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        if expected_size is not None and total is not None and total != expected_size:
            raise DownloadError(
                f"{url}: the server offers {total} bytes, the table expects {expected_size}:"
                " the file changed upstream; check captioning/download.py"
            )
        try:
            with (
                open(part, "ab" if have else "wb") as f,
                tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name[:-5],
                    disable=not progress,
                    leave=False,
                ) as bar,
            ):
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
                        raise _Transient(f"connection dropped after {f.tell()} bytes ({type(e).__name__})") from None
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DownloadError(
                    f"{part}: disk full after {part.stat().st_size} bytes"
                    f"{f' of {total}' if total else ''}; free space and rerun (it resumes)"
                ) from None
            raise
        if total is not None and part.stat().st_size < total:
            raise _Transient(f"connection closed after {part.stat().st_size} of {total} bytes")


def fetch(remote: Remote, dest, retries=5, backoff=2.0, timeout=60, progress=True, sleep=time.sleep, log=print):
    """Download ``remote`` to ``dest`` (resuming ``dest.part``), verify it, then rename into place.

    An existing ``dest`` that verifies is kept (nothing is downloaded). Returns ``dest``.
    """
    dest = Path(dest)
    if dest.is_file() and _verify(dest, remote, remote.url) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if remote.size is not None and part.exists() and part.stat().st_size > remote.size:
        part.unlink()  # longer than the file can be: not ours to resume
    last = None
    for attempt in range(retries + 1):
        try:
            _get(remote.url, part, remote.size, timeout, progress)
            break
        except _Transient as e:
            last = e
            if attempt < retries:
                wait = backoff * 2**attempt
                log(f"{dest.name}: {e}; retrying in {wait:.0f}s ({attempt + 1}/{retries})")
                sleep(wait)
    else:
        have = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"{remote.url}: failed {retries + 1} times, last: {last}. No network? "
            f"Rerun to resume ({have} bytes kept in {part})"
        )
    problem = _verify(part, remote, remote.url)
    if problem:
        part.unlink()
        raise DownloadError(
            f"{dest}: downloaded file has {problem}: corrupted in transit or changed upstream;"
            " it was deleted, rerun to download it again"
        )
    os.replace(part, dest)
    return dest


# ---- unpacking -----------------------------------------------------------------------------


def _safe_name(name: str, archive) -> PurePosixPath | None:
    """The member's relative path, None to skip it, or an error if it would escape the target."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or (p.parts and p.parts[0].endswith(":")) or ".." in p.parts:
        raise DownloadError(f"{archive}: refusing member {name!r}: it would be written outside the target folder")
    if not p.parts or p.parts[0] == "__MACOSX":  # macOS resource forks: not data
        return None
    return p


def _extract_zip(archive, tmp: Path):
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            rel = _safe_name(info.filename, archive)
            if rel is None:
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DownloadError(f"{archive}: refusing member {info.filename!r}: a symbolic link")
            target = tmp / rel
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:  # reading checks the CRC-32
                shutil.copyfileobj(src, dst, CHUNK)


def _extract_tar(archive, tmp: Path):
    with tarfile.open(archive) as t:
        for m in t:
            rel = _safe_name(m.name, archive)
            if rel is None:
                continue
            if m.issym() or m.islnk():
                raise DownloadError(f"{archive}: refusing member {m.name!r}: a link")
            if not (m.isfile() or m.isdir()):
                raise DownloadError(f"{archive}: refusing member {m.name!r}: not a file or folder")
            t.extract(m, tmp, filter="data")


def unpack(archive, target) -> bool:
    """Unpack ``archive`` (zip or tar) into ``target``; False when a previous run already did.

    Members go to a temporary folder inside ``target`` first and are moved into place only
    when the whole archive extracted cleanly, so a failure leaves no partial folders.
    """
    archive, target = Path(archive), Path(target)
    marker = target / f".{archive.name}.unpacked"
    if marker.is_file():
        return False
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{archive.name}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, tmp)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, tmp)
        else:
            raise DownloadError(
                f"{archive}: neither a zip nor a tar archive (truncated or corrupt?);"
                " delete it and rerun to download it again"
            )
        for entry in sorted(tmp.iterdir()):  # move the finished tree into place
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)  # left by a run that died between two moves
            os.replace(entry, dest)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zipfile.LargeZipFile) as e:
        raise DownloadError(f"{archive}: damaged archive ({e}); delete it and rerun to download it again") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DownloadError(f"{target}: disk full while unpacking {archive.name}; free space and rerun") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    marker.write_text("")
    return True


def fetch_dataset(
    dataset: Dataset, out, keep_archives=False, progress=True, sleep=time.sleep, log=print, retries=5, backoff=2.0
):
    """Download, verify and unpack every file of ``dataset`` into ``out``. Idempotent.

    Returns ``{"downloaded": [...], "unpacked": [...], "kept": [...]}`` (file names).
    """
    out = Path(out)
    report = {"downloaded": [], "unpacked": [], "kept": []}
    for remote in dataset.files:
        dest = out / remote.name
        if remote.unpack and (out / f".{remote.name}.unpacked").is_file():
            report["kept"].append(remote.name)  # done by an earlier run: nothing to fetch
            continue
        fresh = not (dest.is_file() and _verify(dest, remote, remote.url) is None)
        fetch(remote, dest, retries=retries, backoff=backoff, progress=progress, sleep=sleep, log=log)
        if fresh:
            report["downloaded"].append(remote.name)
        if remote.unpack:
            unpack(dest, out)
            report["unpacked"].append(remote.name)
            if not keep_archives:
                dest.unlink()
    return report
