"""The generic folder dataset format (the torch Dataset over any format is :mod:`iumask.data.dataset`).

Layout::

    ROOT/classes.json                 {"names": [...], "colors": [[r,g,b], ...], "ignore_index": 255}
    ROOT/images/<split>/<id>.png|jpg|jpeg
    ROOT/labels/<split>/<id>.png      single-channel 8- or 16-bit PNG of class indices

Every problem with the files raises :class:`~iumask.errors.DataError` with a one-line message
that names the file and says how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import cv2
import numpy as np
from PIL import Image

from iumask.data.layout import CLASSES_FILE
from iumask.errors import DataError, IumaskError
from iumask.files import default_cache_dir, write_json_atomic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_SUFFIX = ".png"
MAX_LABEL_VALUE = 65535  # labels are at most 16-bit PNGs

# Decode pixels as stored: labels (read with PIL) ignore EXIF orientation, so images must too,
# or a rotated JPEG would no longer line up with its label.
_CV2_READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
FINGERPRINT_CACHE_SUBDIR = "fingerprints"
# What a split's cached "pixels_checked" says: every pair checked by this version of the check (a
# stricter check in a later iumask raises it, so splits are checked again once).
PIXEL_CHECK_VERSION = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Files changed this recently are hashed but their split is not cached (see _metadata_signature).
RACY_SECONDS = 2.0
_HASH_CHUNK = 1 << 20


def class_differences(names: list[str], expected: list[str], shown: int = 3) -> str:
    """A short description of how two class lists differ (the first ``shown`` differences and the
    counts), for messages that would otherwise list hundreds of names."""
    diffs = [f"class {i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, expected)) if a != b]
    if len(names) != len(expected):
        diffs.insert(0, f"{len(names)} classes vs {len(expected)}")
    more = f", and {len(diffs) - shown} more difference(s)" if len(diffs) > shown else ""
    return "; ".join(diffs[:shown]) + more


@dataclass(frozen=True)
class ClassInfo:
    """Class names, optional display colours and the label value that marks ignored pixels."""

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] | None = None
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        """The classes.json representation."""
        out: dict[str, Any] = {"names": list(self.names)}
        if self.colors is not None:
            out["colors"] = [list(c) for c in self.colors]
        out["ignore_index"] = self.ignore_index
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = CLASSES_FILE) -> ClassInfo:
        """Validate a classes.json dict; errors name ``source``."""
        if not isinstance(data, dict):
            raise DataError(f'{source}: expected a JSON object like {{"names": ["road", "car"]}}')
        names = _parse_names(data.get("names"), source)
        colors = _parse_colors(data.get("colors"), len(names), source)
        ignore = _parse_ignore(data.get("ignore_index", 255), len(names), source)
        return cls(names=names, colors=colors, ignore_index=ignore)

    def palette(self) -> np.ndarray:
        """A (max(256, C), 3) uint8 RGB colour table indexed by label value (every class has a
        colour, more than 256 classes included); the ignore index, when inside it, is black."""
        table = _default_palette(max(256, self.num_classes))
        if self.colors is not None:
            n = min(len(self.colors), len(table))
            table[:n] = np.asarray(self.colors[:n], dtype=np.uint8)
        if self.ignore_index < len(table):
            table[self.ignore_index] = 0
        return table


def _parse_names(names: Any, source: str) -> tuple[str, ...]:
    if names is None:
        raise DataError(f'{source}: missing "names"; add "names": [<one name per class>]')
    if not isinstance(names, list) or not names:
        raise DataError(f'{source}: "names" must be a non-empty list of class names')
    if not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f'{source}: every entry of "names" must be a non-empty string')
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DataError(f'{source}: class name "{n}" appears twice in "names"; make names unique')
        seen.add(n)
    return tuple(names)


def _parse_colors(colors: Any, num_classes: int, source: str) -> tuple[tuple[int, int, int], ...] | None:
    if colors is None:
        return None
    if not isinstance(colors, list) or len(colors) != num_classes:
        raise DataError(f'{source}: "colors" must list one [r, g, b] per class ({num_classes}); fix or remove it')
    for c in colors:
        ok = isinstance(c, list) and len(c) == 3
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
        if not ok:
            raise DataError(f'{source}: colour {c!r} is not [r, g, b] with integers in 0..255; fix "colors"')
    return tuple((c[0], c[1], c[2]) for c in colors)


def _parse_ignore(ignore: Any, num_classes: int, source: str) -> int:
    if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= MAX_LABEL_VALUE:
        raise DataError(f'{source}: "ignore_index" must be an integer in 0..{MAX_LABEL_VALUE}, got {ignore!r}')
    if ignore < num_classes:
        raise DataError(
            f'{source}: "ignore_index" {ignore} is a class index (0..{num_classes - 1}); '
            f"use a value >= {num_classes}, e.g. 255"
        )
    return ignore


def _default_palette(size: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved palette: deterministic and visually distinct (its first 256
    entries are VOC's; beyond them the same interleaving of the index's next bits continues)."""
    table = np.zeros((size, 3), dtype=np.uint8)
    for i in range(size):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        table[i] = (r, g, b)
    return table


def load_classes(root: str | Path) -> ClassInfo:
    """Read and validate ``ROOT/classes.json``."""
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise DataError(f'{path}: not found; create it with {{"names": [<one name per class>]}}')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); fix the file") from None
    return ClassInfo.from_dict(data, source=str(path))


@dataclass(frozen=True, eq=False)
class LabelTable:
    """A lookup table from stored label values to class indices, applied when a label is read.

    ``table[v]`` is the class index (or ignore index) for stored value ``v``, or -1 where ``v`` is
    not a value of the format: reading such a label raises :class:`DataError` naming the file.
    ``name`` identifies the table and its version in dataset fingerprints; ``valid`` describes
    the accepted stored values for error messages.
    """

    name: str
    table: np.ndarray  # int16, at most 65536 entries
    valid: str

    def apply(self, label: np.ndarray, path: Path) -> np.ndarray:
        """Map ``label`` through the table; values outside it raise :class:`DataError` naming ``path``."""
        table = self.table
        if label.dtype == np.uint8 and len(table) >= 256 and int(table.max()) <= 255:
            # OpenCV's 8-bit lookup: several times faster than numpy's indexing (check-data reads every label)
            head = table[:256]
            bad = cv2.LUT(label, (head < 0).astype(np.uint8))
            if cv2.countNonZero(bad):
                self._reject(int(label[bad != 0].min()), path)
            return cv2.LUT(label, np.maximum(head, 0).astype(np.uint8))
        too_big = label >= len(table)
        if too_big.any():
            self._reject(int(label[too_big].min()), path)
        mapped = table[label]
        bad = mapped < 0
        if bad.any():
            self._reject(int(label[bad].min()), path)
        out_dtype = np.uint8 if int(table.max()) <= 255 else np.uint16
        return mapped.astype(out_dtype)

    def _reject(self, value: int, path: Path) -> NoReturn:
        raise DataError(
            f"{path}: label value {value} is not in the {self.name} table ({self.valid}); "
            "fix or re-export the label file"
        )


class PairedDataset:
    """One split given as explicit (id, image, label) files plus classes; reads and validates on demand.

    Shared by every dataset format: formats differ only in how they find the files and, through
    an optional :class:`LabelTable`, how stored label values map to class indices. ``definition``
    (bytes describing the class definition and label mapping) is hashed into :meth:`fingerprint`,
    so a changed mapping gives another fingerprint even for identical files.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        classes: ClassInfo,
        ids: list[str],
        image_paths: list[Path],
        label_paths: list[Path],
        label_table: LabelTable | None = None,
        extra_files: tuple[Path, ...] = (),
        definition: bytes | None = None,
    ) -> None:
        if not len(ids) == len(image_paths) == len(label_paths):
            raise ValueError("ids, image_paths and label_paths must have the same length")
        self.root = Path(root)
        self.split = split
        self.classes = classes
        self.ids = list(ids)
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.label_table = label_table
        self._extra_files = tuple(extra_files)
        self._definition = definition

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 (H, W, 3) RGB."""
        return read_rgb(self.image_paths[i])

    def verify_image(self, i: int) -> None:
        """Raise :class:`DataError` naming image ``i`` unless it is whole. A PNG is checked by its
        chunks' CRC-32 checksums, which cover every byte its encoder wrote, so a truncated or
        damaged file fails without decoding it (about 30 times faster than decoding: inflating the
        pixels is most of a PNG's decoding time); any other file, or one whose bytes do not start
        as a PNG's, is decoded as training reads it."""
        path = self.image_paths[i]
        buf = _read_bytes(path)
        if not buf.startswith(PNG_SIGNATURE):
            self.read_image(i)
            return
        problem = png_damage(buf)
        if problem:
            raise DataError(f"{path}: the PNG image {problem}; re-copy or re-export the image")

    def image_shape(self, i: int) -> tuple[int, int]:
        """(H, W) of image ``i`` from its header, without decoding the pixels (read now: a sample's
        label is checked against its image as the files are at that moment)."""
        return _header_shape(self.image_paths[i], "image")

    def check_headers(self) -> list[tuple[int, int]]:
        """Read every image's and label's header (not the pixels), so that a missing, unreadable
        or mismatched file stops a command before its first expensive step; return the images'
        (H, W). The shapes of a split that passed are kept with its fingerprint (see
        :meth:`fingerprint`): an unchanged split is checked once, later commands only stat it."""
        try:
            signature, recently_changed = self._metadata_signature(self._files())
        except OSError:  # a missing file: reading the headers names it
            signature, recently_changed = None, True
        cached = self._cached(signature).get("image_shapes") if signature else None
        if (isinstance(cached, list) and len(cached) == len(self)
                and all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) for v in s) for s in cached)):
            return [(h, w) for h, w in cached]
        shapes = []
        for i in range(len(self)):
            shape = _header_shape(self.image_paths[i], "image")
            _check_label_shape(self.label_paths[i], _header_shape(self.label_paths[i], "label"),
                               self.image_paths[i], shape)
            shapes.append(shape)
        if not recently_changed:  # a later write in the same clock tick could keep every stat field
            self._remember(signature, image_shapes=[list(shape) for shape in shapes])
        return shapes

    def check_pixels(self, on_pair: Callable[[], None] | None = None) -> None:
        """Check every image whole (:meth:`verify_image`: a PNG by its checksums, which a file its
        encoder wrote wrongly, checksums and all, passes) and decode every label (values checked
        against the classes), so that a file with an intact header but truncated or damaged data,
        or a label outside the classes, stops a command before training rather than at its first
        validation; stops at the first problem. Threads: zlib and the decoders run without the GIL. ``on_pair``
        is called after each pair (a progress bar).

        A split that passed is kept with its fingerprint (see :meth:`fingerprint`): until one of its
        files or its class definition changes, it is not decoded again."""
        try:
            signature, recently_changed = self._metadata_signature(self._files())
        except OSError:  # a missing file: reading it names it
            signature, recently_changed = None, True
        if signature and self._cached(signature).get("pixels_checked") == PIXEL_CHECK_VERSION:
            for _ in range(len(self) if on_pair is not None else 0):
                on_pair()  # a progress bar ends full: every pair is known to pass
            return

        def read(i: int) -> None:
            self.verify_image(i)
            self.read_label(i)  # checks the size against the image and the values against the classes

        pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
        try:
            for _ in pool.map(read, range(len(self))):
                if on_pair is not None:
                    on_pair()
        finally:
            pool.shutdown(cancel_futures=True)
        if signature and not recently_changed:
            self._remember(signature, pixels_checked=PIXEL_CHECK_VERSION)

    def label_table_for(self, i: int) -> LabelTable | None:
        """The table that maps label ``i`` (formats may choose per file, e.g. labelIds vs trainIds)."""
        return self.label_table

    def read_label(self, i: int) -> np.ndarray:
        """Label ``i`` as (H, W) uint8 or uint16 class indices, validated against its image and classes."""
        path = self.label_paths[i]
        label = _decode_label(path)
        _check_label_shape(path, label.shape, self.image_paths[i], self.image_shape(i))
        table = self.label_table_for(i)
        if table is not None:
            label = table.apply(label, path)
        _check_label_values(label, self.classes, path, self._label_fix_hint())
        return label

    def _label_fix_hint(self) -> str:
        return "fix the label file"

    def fingerprint(self) -> str:
        """Hex SHA-256 identifying this split's content.

        Covers every image and label file of the split (path relative to ROOT and full content,
        in sorted order), the extra files (e.g. classes.json) and the definition bytes, so renaming,
        editing, adding or removing a file, or changing the class mapping, changes it.

        Reading every byte is the cost of a cache hit on a large dataset, so the digest is kept in
        ``<cache>/fingerprints/`` (:func:`iumask.files.default_cache_dir`) under a signature of
        the files' metadata: each path, size, inode, modification and change time (``os.stat``,
        no read). An unchanged split is then hashed once. Writing a file sets its change time
        (ctime), which no tool can set back, so an edited file, even one of the same size with its
        modification time restored, changes the signature and the split is hashed again. A split
        with a file changed in the last two seconds is not cached (file times are coarse). A cache
        that cannot be read or written only costs the hashing.
        """
        files = self._files()
        # Before hashing, so an edit meanwhile is seen next time.
        signature, recently_changed = self._metadata_signature(files)
        cached = self._cached(signature).get("fingerprint")
        if isinstance(cached, str):
            return cached
        digest = self._content_fingerprint(files)
        if not recently_changed:  # a later write in the same clock tick could keep every stat field
            self._remember(signature, fingerprint=digest)
        return digest

    def _files(self) -> list[Path]:
        """Every file of the split, in the fingerprint's order."""
        return sorted([*self.image_paths, *self.label_paths, *self._extra_files])

    @staticmethod
    def _record(signature: str) -> Path:
        return default_cache_dir() / FINGERPRINT_CACHE_SUBDIR / f"{signature[:40]}.json"

    def _cached(self, signature: str) -> dict:
        """What is kept for the split whose metadata has ``signature`` (empty if nothing is)."""
        try:
            cached = json.loads(self._record(signature).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing, unreadable or corrupt: computed again
        return cached if isinstance(cached, dict) and cached.get("signature") == signature else {}

    def _remember(self, signature: str, **values) -> None:
        """Keep ``values`` for the split whose metadata has ``signature``, beside what is kept already
        (the fingerprint, the header shapes); a cache that cannot be written only costs the work."""
        record = self._record(signature)
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(record, {**self._cached(signature), "signature": signature, **values})
        except (OSError, IumaskError):
            pass

    def _metadata_signature(self, files: list[Path]) -> tuple[str, bool]:
        """The signature of the files' metadata, and whether any file changed in the last
        :data:`RACY_SECONDS` (file times are coarse: a second write in the same clock tick could
        leave every field as it was, so such a split is hashed but not cached, as git does)."""
        # Paths as the file system's bytes (os.fsencode): a name that is not UTF-8 is hashed as it is.
        h = hashlib.sha256(os.fsencode(self.root.resolve()) + b"\0")
        h.update(self._definition or b"\0none")
        newest = 0
        prefix = os.path.join(str(self.root), "")
        for path in files:
            stat = os.stat(path)
            newest = max(newest, stat.st_mtime_ns, stat.st_ctime_ns)
            text = str(path)  # a file under root: its relative path by slicing (relative_to is slow on 100k files)
            rel = text[len(prefix):] if text.startswith(prefix) else path.relative_to(self.root).as_posix()
            h.update(b"\0" + os.fsencode(rel) + f"\0{stat.st_size}:{stat.st_ino}:{stat.st_dev}:"
                     f"{stat.st_mtime_ns}:{stat.st_ctime_ns}".encode())
        return h.hexdigest(), newest >= time.time_ns() - int(RACY_SECONDS * 1e9)

    def _content_fingerprint(self, files: list[Path]) -> str:
        h = hashlib.sha256()
        if self._definition is not None:
            # The NUL byte cannot occur in a path, so this entry never equals a file entry.
            name = b"\0definition"
            h.update(len(name).to_bytes(8, "little") + name)
            h.update(len(self._definition).to_bytes(8, "little") + self._definition)
        for path in files:
            rel = os.fsencode(path.relative_to(self.root).as_posix())  # any bytes a file name may hold
            # Length-prefix each name and content so that no two file sets hash the same stream.
            h.update(len(rel).to_bytes(8, "little") + rel)
            h.update(path.stat().st_size.to_bytes(8, "little"))
            with open(path, "rb") as f:
                while chunk := f.read(_HASH_CHUNK):
                    h.update(chunk)
        return h.hexdigest()


class FolderDataset(PairedDataset):
    """One split of a dataset in the generic folder format; reads and validates files on demand."""

    def __init__(self, root: str | Path, split: str) -> None:
        root = Path(root)
        classes = load_classes(root)
        ids, image_paths = list_images(root / "images" / split)
        label_paths = match_labels(root / "labels" / split, ids, image_paths)
        super().__init__(root, split, classes, ids, image_paths, label_paths, extra_files=(root / CLASSES_FILE,))

    def _label_fix_hint(self) -> str:
        return "fix the label file or classes.json"


def list_images(images_dir: Path) -> tuple[list[str], list[Path]]:
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: split folder not found; put the images of this split there")
    by_id: dict[str, Path] = {}
    for p in images_dir.iterdir():
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in by_id:
            raise DataError(f"{p}: another image has the id {p.stem!r} ({by_id[p.stem].name}); keep one of them")
        by_id[p.stem] = p
    if not by_id:
        raise DataError(f"{images_dir}: no .png/.jpg/.jpeg images found; add the images of this split")
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def match_labels(labels_dir: Path, ids: list[str], image_paths: list[Path]) -> list[Path]:
    if not labels_dir.is_dir():
        raise DataError(f"{labels_dir}: label folder not found; put one <id>.png label per image there")
    paths = [labels_dir / f"{i}{LABEL_SUFFIX}" for i in ids]
    for image, label in zip(image_paths, paths):
        if not label.is_file():
            raise DataError(f"{image}: no label file {label}; add it or remove the image")
    return paths


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as uint8 (H, W, 3) RGB, pixels as stored (EXIF orientation ignored);
    a missing, truncated or undecodable file raises :class:`DataError` naming it."""
    path = Path(path)
    buf = _read_bytes(path)
    if not buf:  # OpenCV raises on an empty buffer
        _empty_file(path, "image")
    if path.suffix.lower() in (".jpg", ".jpeg") and not _jpeg_complete(buf):
        # Some OpenCV builds (cv2.imread) decode a truncated JPEG silently with grey rows; refuse it.
        raise DataError(f"{path}: JPEG file is truncated; re-copy or re-export the image")
    try:
        bgr = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), _CV2_READ_FLAGS)
    except cv2.error:
        bgr = None
    if bgr is None:
        raise DataError(f"{path}: cannot decode the image (corrupt or not a PNG/JPEG); replace the file")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def png_damage(buf: bytes) -> str | None:
    """What is wrong with the chunks of the PNG file ``buf`` (which starts with the PNG signature),
    or None when it is whole: every chunk complete, every critical chunk's CRC-32 matching, an IHDR
    first, at least one IDAT, and an IEND. As decoders do (libpng's default), a bad checksum in an
    ancillary chunk (text, colour profile, EXIF: lower-case first letter) and bytes after IEND are
    ignored."""
    view = memoryview(buf)
    pos, kinds = len(PNG_SIGNATURE), []
    while pos + 8 <= len(buf):
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        name = kind.decode("latin-1")
        end = pos + 12 + length
        if end > len(buf):
            return f"is truncated (its {name} chunk at byte {pos} ends past the file's {len(buf)} bytes)"
        critical = not kind[0] & 0x20
        if critical and zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"is damaged (the checksum of its {name} chunk at byte {pos} does not match)"
        if not kinds and kind != b"IHDR":
            return f"is damaged (its first chunk is {name}, not IHDR)"
        kinds.append(kind)
        if kind == b"IEND":
            return None if b"IDAT" in kinds else "has no image data (no IDAT chunk)"
        pos = end
    return "is truncated (it ends before its IEND chunk)"


def _empty_file(path: Path, what: str) -> NoReturn:
    """The one message for an empty (0-byte) image or label, whichever reader finds it first
    (header check, decoding, check-data, training, predict)."""
    raise DataError(f"{path}: the {what} file is empty (0 bytes); re-copy or re-export it")


def _is_empty(path: Path) -> bool:
    try:
        return os.stat(path).st_size == 0
    except OSError:
        return False  # missing or unreadable: the reader says so


def image_header_shape(path: Path) -> tuple[int, int]:
    """(H, W) of the image at ``path`` from its header, without decoding the pixels."""
    return _header_shape(Path(path), "image")


def _header_shape(path: Path, what: str) -> tuple[int, int]:
    if _is_empty(path):
        _empty_file(path, what)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read the {what} header ({e}); replace the file") from None
    return h, w


def _check_label_shape(path: Path, label_shape: tuple[int, ...], image_path: Path, shape: tuple[int, int]) -> None:
    if tuple(label_shape) != tuple(shape):
        raise DataError(
            f"{path}: label is {label_shape[1]}x{label_shape[0]} (WxH) but its image "
            f"{image_path.name} is {shape[1]}x{shape[0]}; labels must match their images"
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror}); check that it exists and is readable") from None


def _jpeg_complete(buf: bytes) -> bool:
    """Whether an end-of-image marker follows the last start-of-scan (trailing data is allowed)."""
    return buf.rfind(b"\xff\xd9") > buf.rfind(b"\xff\xda")


def _decode_label(path: Path) -> np.ndarray:
    buf = _read_bytes(path)
    if not buf:
        _empty_file(path, "label")
    grayscale = buf.startswith(PNG_SIGNATURE) and buf[12:16] == b"IHDR" and len(buf) > 25 and buf[25] == 0
    if grayscale and buf[24] in (8, 16) and png_damage(buf) is None:  # IHDR: colour type 0, depth 8 or 16
        # An 8- or 16-bit grayscale PNG, the usual label: OpenCV decodes it as stored, in about half
        # PIL's time. Anything else goes to PIL: palette labels (PIL keeps the indices where OpenCV
        # expands them to colours), 1-4 bit ones, and damaged files (libpng would print its
        # complaints on stderr at every read; PIL's error names the file).
        label = cv2.imdecode(np.frombuffer(buf, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if label is not None and label.ndim == 2 and label.dtype in (np.uint8, np.uint16):
            return label
    try:
        with Image.open(path) as im:  # its messages name the path
            mode = im.mode
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode the label PNG ({e}); replace the file") from None
    if arr.ndim != 2:
        raise DataError(
            f"{path}: label has {arr.shape[2]} channels (mode {mode}); labels must be single-channel "
            "class indices, not colour images; convert it to an 8-bit grayscale PNG of class indices"
        )
    if arr.dtype == np.bool_ or arr.dtype == np.uint8:
        return arr.astype(np.uint8, copy=False)
    if arr.min() < 0 or arr.max() > MAX_LABEL_VALUE:
        raise DataError(f"{path}: label values must be in 0..{MAX_LABEL_VALUE}; save it as an 8- or 16-bit PNG")
    return arr.astype(np.uint16, copy=False)


def _check_label_values(
    label: np.ndarray, classes: ClassInfo, path: Path, fix: str = "fix the label file or classes.json"
) -> None:
    bad = (label >= classes.num_classes) & (label != classes.ignore_index)
    if bad.any():
        value = int(label[bad].min())
        raise DataError(
            f"{path}: label value {value} is outside 0..{classes.num_classes - 1} and is not the ignore "
            f"label {classes.ignore_index}; {fix}"
        )


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a label map to (H, W) with nearest neighbour, which keeps it inside the label set.

    ``INTER_NEAREST_EXACT`` samples pixel centres like the bilinear image resize does; plain
    ``INTER_NEAREST`` is half a pixel off, so labels would drift from the image content.
    """
    h, w = int(size[0]), int(size[1])
    if label.shape == (h, w):
        return label
    return cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
