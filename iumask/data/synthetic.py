"""A small synthetic road-scene dataset, so that everything runs on a fresh machine without data.

Scenes have sky, buildings with windows, a road in perspective with sidewalks beside it,
vegetation, cars, and street corners at the kerb: a pole with a sign, a parked bicycle, a person.
Class frequencies are imbalanced like CamVid's: the four rare classes cover under 1 % of the pixels
each, but they are in most images and each has a consistent cue, so that a small model learns them
at the demo budget. ``domain="shifted"`` renders the same scenes darker, foggier and
noisier, for domain-shift evaluation. Output is the generic folder format of
:mod:`iumask.data.folder`; identical arguments give byte-identical files.

The generator never deletes or overwrites a file it did not write. Its manifest
(``synthetic.json``) records its parameters and the SHA-256 of every file it wrote; only those
files, unchanged, are ever replaced, and only with ``overwrite``. Where the manifest records no
SHA-256 (one written by an older version, which recorded parameters only, or one claiming the
files of a write still in progress), the expected content is rendered again from the recorded
parameters, in memory: generation is deterministic, so only a file byte-identical to it is its own.

Every file is written through :func:`iumask.files.atomic_write`: a temporary file beside it,
renamed over it when complete. A killed or failed write (full disk) never leaves a partial file
under a dataset name, where it would be mistaken for a user's edit; a killed run may leave the
temporary file (``<name>.<random>.tmp``), which a rerun that writes the dataset deletes (and
``overwrite`` deletes as its own).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import cv2
import numpy as np

from iumask.data.folder import CLASSES_FILE, ClassInfo
from iumask.errors import IumaskError
from iumask.files import file_sha256, temporary_target, write_bytes_atomic

SKY, BUILDING, ROAD, SIDEWALK, VEGETATION, POLE, SIGN, PERSON, BICYCLE, CAR = range(10)
IGNORE = 255

SYNTHETIC_CLASSES = ClassInfo(
    names=("sky", "building", "road", "sidewalk", "vegetation", "pole", "sign", "person", "bicycle", "car"),
    # CamVid's display colours for the same classes.
    colors=(
        (128, 128, 128), (128, 0, 0), (128, 64, 128), (0, 0, 192), (128, 128, 0),
        (192, 192, 128), (192, 128, 128), (64, 64, 0), (0, 128, 192), (64, 0, 128),
    ),
    ignore_index=IGNORE,
)

MANIFEST_FILE = "synthetic.json"
GENERATOR = "iumask.synthetic"
# Bump when the rendering changes (an old folder then needs --overwrite). 2: poles, signs, persons and
# bicycles thicker, in most images (street corners) and with a consistent colour cue.
GENERATOR_VERSION = 2
DOMAINS = ("source", "shifted")
SPLITS = ("train", "val")
_PARAM_KEYS = ("generator", "version", "seed", "num_train", "num_val", "height", "width", "domain")
# What makes up the dataset: anything here that make-synthetic did not write stops a replacement.
# Other files in the folder (a README beside the dataset) are left alone.
_DATASET_DIRS = ("images", "labels")
_DATASET_FILES = (CLASSES_FILE, MANIFEST_FILE)

# Rendering colours (RGB). Deliberately close for the large classes (road/sidewalk/building,
# car/building) so that colour alone does not solve them. The rare classes (pole, sign, person,
# bicycle) are under 1 % of the pixels each; from random weights in 12 epochs a model finds one
# only by a consistent cue: each is painted in its own saturated colour (jittered per scene and per
# instance; persons have a skin-coloured head) with a dark outline, and they stand in a fixed
# arrangement at the kerb. Thinner, duller or more varied ones were not learned at that budget.
_BASE_COLORS = np.array([
    (150, 172, 198),  # sky
    (128, 112, 100),  # building
    (96, 92, 102),    # road
    (138, 130, 124),  # sidewalk
    (72, 108, 52),    # vegetation
    (30, 230, 40),    # pole
    (255, 230, 0),    # sign
    (0, 210, 255),    # person (clothes)
    (255, 0, 220),    # bicycle
    (150, 40, 40),    # car (replaced per car)
], dtype=np.float32)
_SKIN_COLORS = ((225, 180, 150), (180, 130, 100), (120, 85, 60))
_CAR_COLORS = ((160, 35, 35), (35, 50, 120), (200, 200, 200), (40, 40, 40), (120, 120, 125), (130, 115, 95))
# Texture amplitudes per label value: low-frequency blotches and per-pixel grain.
_LOW_AMP = np.full(256, 6.0, dtype=np.float32)
_LOW_AMP[:10] = (4, 12, 10, 8, 22, 4, 3, 6, 4, 6)
_GRAIN_AMP = np.full(256, 10.0, dtype=np.float32)
_GRAIN_AMP[:10] = (2, 6, 8, 5, 16, 4, 3, 6, 5, 4)


def generate_synthetic(
    root: str | Path,
    num_train: int = 48,
    num_val: int = 16,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
    domain: str = "source",
    overwrite: bool = False,
) -> Path:
    """Write a synthetic dataset (splits "train" and "val") to ``root`` and return ``root``.

    A folder already holding this dataset (same arguments) is left untouched; files of it that
    are missing are written again and an interrupted write is finished. Anything else needs
    ``overwrite``: a synthetic dataset made with other arguments is then replaced, deleting only
    the files make-synthetic wrote (checked by SHA-256 against its manifest, or against the files
    its recorded parameters render to where it records none), and a folder holding
    no dataset gets the dataset beside its files. Files it did not write, or that changed since,
    in ``images/``, ``labels/``, ``classes.json`` or ``synthetic.json`` (a user's dataset, a file
    added to the synthetic one) are never deleted or overwritten: the call is refused, even with
    ``overwrite``. Files elsewhere in the folder are kept. The same seed gives the same scenes in
    both domains, so a domain shift is purely photometric.
    """
    params = _params(num_train, num_val, height, width, seed, domain)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise IumaskError(f"{root}: is a file, not a directory; choose a directory for the dataset")
    existing = _read_manifest(root)
    if existing is not None and existing.params == params:
        if not existing.complete:  # an interrupted write of this dataset: its files are ours, finish it
            _write(root, params)
        else:
            _write(root, params, only=[f for f in existing.files if not os.path.lexists(root / f)])
        return root
    # An interrupted write of the manifest leaves its temporary file: not a dataset file.
    entries = [e for e in _entries(root) if temporary_target(e) != MANIFEST_FILE]
    if not entries:
        _write(root, params)
        return root
    foreign = _foreign_files(root, entries, existing)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f", … ({len(foreign)} in all)" if len(foreign) > 3 else "")
        if existing is None:
            raise IumaskError(
                f"{root}: holds files that make-synthetic did not write ({shown}); it never deletes or "
                "overwrites those, even with --overwrite: choose an empty or new folder for the synthetic dataset")
        raise IumaskError(
            f"{root}: the synthetic dataset here has files that make-synthetic did not write or that changed "
            f"since ({shown}); it never deletes or overwrites those, even with --overwrite: move them out of the "
            "folder, or choose an empty or new folder")
    if not overwrite:
        if existing is None:
            shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
            raise IumaskError(
                f"{root}: folder is not empty ({shown}) and holds no synthetic dataset; choose an empty or new "
                "folder, or pass --overwrite to write the dataset beside those files (they are kept)")
        differ = ", ".join(f"{k} {existing.params.get(k)!r} (now {params[k]!r})"
                           for k in _PARAM_KEYS if existing.params.get(k) != params[k])
        raise IumaskError(
            f"{root}: holds a synthetic dataset made with other parameters ({differ}); pass --overwrite to "
            "replace it (only the files make-synthetic wrote are deleted), or choose another folder")
    if existing is not None:
        _delete_own(root, existing)
    _write(root, params)
    return root


@dataclass(frozen=True)
class _Manifest:
    params: dict[str, Any]
    complete: bool
    # every file make-synthetic wrote -> its SHA-256 (None: not recorded; rendered again from the
    # parameters to check a file)
    files: dict[str, str | None]


def _params(num_train: int, num_val: int, height: int, width: int, seed: int, domain: str) -> dict[str, Any]:
    for name, value, low in (("num_train", num_train, 1), ("num_val", num_val, 1),
                             ("height", height, 32), ("width", width, 32), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise IumaskError(f"synthetic dataset: {name} must be an integer >= {low}, got {value!r}")
    if domain not in DOMAINS:
        raise IumaskError(f"synthetic dataset: domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "num_train": num_train,
            "num_val": num_val, "height": height, "width": width, "domain": domain}


def _sample_ids(params: dict[str, Any]) -> dict[str, list[str]]:
    return {split: [f"{split}_{i:04d}" for i in range(params[f"num_{split}"])] for split in SPLITS}


def _planned_files(params: dict[str, Any]) -> list[str]:
    """Every file of the dataset ``params`` describes, manifest excluded."""
    return [CLASSES_FILE, *(f"{kind}/{split}/{sample_id}.png" for split, ids in _sample_ids(params).items()
                            for kind in _DATASET_DIRS for sample_id in ids)]


def _read_manifest(root: Path) -> _Manifest | None:
    """The manifest of a synthetic dataset in ``root``, or None when there is none (or not ours)."""
    path = root / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != GENERATOR:
        return None
    params = {k: data.get(k) for k in _PARAM_KEYS}
    files = data.get("files")
    if files is None:
        # Written before manifests recorded files (the manifest came last, so the dataset is complete):
        # its files are the ones its parameters name, with the content those parameters render to.
        if not all(isinstance(params[k], int) and params[k] >= 0 for k in ("num_train", "num_val")):
            return None
        return _Manifest(params, True, dict.fromkeys(_planned_files(params)))
    if not isinstance(files, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                              for k, v in files.items()):
        return None
    return _Manifest(params, data.get("complete") is True, files)


def _entries(root: Path) -> list[str]:
    """Relative paths of everything in ``root`` that is not a directory (links are not followed)."""
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        found += [(base / name).relative_to(root).as_posix() for name in (*links, *filenames)]
    return sorted(found)


def _in_dataset(rel: str) -> bool:
    return rel in _DATASET_FILES or rel.split("/", 1)[0] in _DATASET_DIRS


def _foreign_files(root: Path, entries: list[str], existing: _Manifest | None) -> list[str]:
    """Files in the dataset's part of the folder that make-synthetic did not write or that changed.

    A file of ``existing`` whose SHA-256 the manifest does not record is compared with the file
    its parameters render to (in memory); the temporary file of an interrupted atomic write of
    one of its files is its own too."""
    foreign, unrecorded = [], []
    for rel in entries:
        if not _in_dataset(rel) or (existing is not None and rel == MANIFEST_FILE):
            continue
        if existing is not None and _own_leftover(rel, existing):
            continue
        if existing is not None and rel in existing.files:
            path = root / rel
            if not path.is_symlink() and path.is_file():
                digest = existing.files[rel]
                if digest is None:
                    unrecorded.append(rel)
                    continue
                if _file_sha256(path) == digest:
                    continue
        foreign.append(rel)
    if unrecorded:
        expected = _rendered_digests(existing.params, unrecorded)
        foreign += [rel for rel in unrecorded if expected.get(rel) is None or _file_sha256(root / rel) != expected[rel]]
    return sorted(foreign)


def _own_leftover(rel: str, existing: _Manifest) -> bool:
    """``rel`` is the temporary file of an interrupted atomic write of one of ``existing``'s files."""
    return temporary_target(rel) in existing.files


def _rendered_digests(params: dict[str, Any], rels: Iterable[str]) -> dict[str, str]:
    """The SHA-256 of the files ``rels`` of the dataset ``params`` describes, rendered in memory.
    Empty when ``params`` cannot be rendered by this version (another generator version, bad
    values): then no file can be shown to be its own."""
    try:
        keys = ("num_train", "num_val", "height", "width", "seed", "domain")
        checked = _params(**{k: params.get(k) for k in keys})
    except IumaskError:
        return {}
    if checked != {k: params.get(k) for k in _PARAM_KEYS}:
        return {}  # another generator or version: its rendering may differ
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in _render_files(checked, set(rels))}


def _delete_own(root: Path, existing: _Manifest) -> None:
    """Delete the files of ``existing`` (checked unchanged by the caller) and the folders they leave
    empty. The manifest stays until the new one replaces it, so an interrupted replacement can be
    rerun."""
    folders = set()
    for rel in [*existing.files, *_leftovers(root, set(existing.files))]:
        path = root / rel
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise IumaskError(f"{path}: cannot delete it ({exc.strerror}); check the folder's "
                              "permissions") from None
        folders.update(p for p in Path(rel).parents if p != Path("."))
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            (root / folder).rmdir()
        except OSError:
            pass  # not empty: holds something else


def _write(root: Path, params: dict[str, Any], only: list[str] | None = None) -> None:
    """Write the dataset (or just the files in ``only``), recording it in the manifest as it goes."""
    if only is not None and not only:
        return
    files = _planned_files(params)
    wanted = set(files if only is None else only)
    if only is None:  # claim the files first, so that an interrupted write is recognised as ours
        root.mkdir(parents=True, exist_ok=True)
        _write_manifest(root, {**params, "complete": False, "files": dict.fromkeys(files)})
    digests = {rel: _write_file(root / rel, data) for rel, data in _render_files(params, wanted)}
    if only is None:
        _write_manifest(root, {**params, "complete": True, "files": dict(sorted(digests.items()))})
    _remove_leftovers(root, {*files, MANIFEST_FILE})


def _leftovers(root: Path, own: set[str]) -> list[str]:
    """The temporary files that killed atomic writes of the ``own`` files left behind (each write
    has its own temporary name, so a rewrite does not replace them)."""
    return [rel for rel in _entries(root) if temporary_target(rel) in own]


def _remove_leftovers(root: Path, own: set[str]) -> None:
    for rel in _leftovers(root, own):
        (root / rel).unlink(missing_ok=True)


def _render_files(params: dict[str, Any], wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """(relative path, content) of the files in ``wanted`` of the dataset ``params`` describes,
    rendered in memory one sample at a time; the same parameters always give the same bytes."""
    if CLASSES_FILE in wanted:
        yield CLASSES_FILE, (json.dumps(SYNTHETIC_CLASSES.to_dict(), indent=2) + "\n").encode("utf-8")
    for split_code, (split, ids) in enumerate(_sample_ids(params).items()):
        for i, sample_id in enumerate(ids):
            name = f"{split}/{sample_id}.png"
            if f"images/{name}" not in wanted and f"labels/{name}" not in wanted:
                continue
            rng = np.random.default_rng([params["seed"], split_code, i])
            image, label = render_scene(rng, params["height"], params["width"], params["domain"])
            for kind, array in (("images", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)), ("labels", label)):
                if f"{kind}/{name}" in wanted:
                    yield f"{kind}/{name}", _png(array)


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:  # pragma: no cover - PNG encoding of a uint8 array does not fail
        raise IumaskError("synthetic dataset: cannot encode a PNG")
    return encoded.tobytes()


def _write_file(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (no partial file, no temporary file left on failure;
    a one-line IumaskError naming the path) and return its SHA-256."""
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    _write_file(root / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def _file_sha256(path: Path) -> str | None:
    """The file's SHA-256 (:func:`iumask.files.file_sha256`), or None if it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


class _Canvas:
    """Draws every shape into the RGB image and the label map together, so they stay aligned."""

    def __init__(self, height: int, width: int) -> None:
        self.h, self.w = height, width
        self.image = np.zeros((height, width, 3), dtype=np.float32)
        self.label = np.full((height, width), SIDEWALK, dtype=np.uint8)

    def poly(self, pts: np.ndarray, color: Any, cls: int) -> None:
        pts = np.round(pts).astype(np.int32)
        cv2.fillPoly(self.image, [pts], _color(color))
        cv2.fillPoly(self.label, [pts], cls)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: Any, cls: int) -> None:
        self.poly(np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)]), color, cls)

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, color: Any, cls: int, thickness: int = -1) -> None:
        args = ((round(cx), round(cy)), (max(1, round(ax)), max(1, round(ay))), 0, 0, 360)
        cv2.ellipse(self.image, *args, _color(color), thickness)
        cv2.ellipse(self.label, *args, cls, thickness)

    def line(self, p0: tuple[float, float], p1: tuple[float, float], color: Any, cls: int, thickness: int = 1) -> None:
        a, b = (round(p0[0]), round(p0[1])), (round(p1[0]), round(p1[1]))
        cv2.line(self.image, a, b, _color(color), thickness)
        cv2.line(self.label, a, b, cls, thickness)


def _color(c: Any) -> tuple[float, float, float]:
    return tuple(float(v) for v in c)  # type: ignore[return-value]


def _jitter(rng: np.random.Generator, color: Any, sigma: float = 12.0) -> np.ndarray:
    return np.clip(np.asarray(color, dtype=np.float32) + rng.normal(0, sigma, 3), 0, 255)


def render_scene(rng: np.random.Generator, height: int, width: int,
                 domain: str = "source") -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 (H, W, 3) RGB image and uint8 (H, W) label (255 = ignore)."""
    canvas = _Canvas(height, width)
    colors = np.stack([_jitter(rng, c) for c in _BASE_COLORS])
    horizon = int(height * rng.uniform(0.36, 0.5))
    _draw_sky(canvas, colors[SKY], horizon)
    canvas.image[horizon:] = colors[SIDEWALK]
    _draw_buildings(rng, canvas, colors[BUILDING], horizon)
    road = _draw_road(rng, canvas, colors[ROAD], horizon)
    _draw_vegetation(rng, canvas, colors[VEGETATION], horizon, road)
    _draw_objects(rng, canvas, colors, horizon, road)
    image = _finish(rng, canvas, domain)
    return image, canvas.label


def _draw_sky(canvas: _Canvas, color: np.ndarray, horizon: int) -> None:
    canvas.label[:horizon] = SKY
    # Brighter towards the horizon, like a real sky.
    t = np.linspace(0.85, 1.1, max(horizon, 1), dtype=np.float32)[:, None, None]
    canvas.image[:horizon] = np.clip(color * t, 0, 255)


def _draw_buildings(rng: np.random.Generator, canvas: _Canvas, color: np.ndarray, horizon: int) -> None:
    h, w = canvas.h, canvas.w
    x = int(rng.integers(-w // 10, 1))
    while x < w:
        bw = int(w * rng.uniform(0.12, 0.3))
        if rng.random() > 0.15:  # occasional gaps show the sky
            top = horizon - int(h * rng.uniform(0.08, 0.38))
            bottom = horizon + int(h * rng.uniform(0.02, 0.06))
            canvas.rect(x, top, x + bw - 1, bottom, _jitter(rng, color, 18), BUILDING)
            _draw_windows(rng, canvas, max(x, 0), max(top, 0), min(x + bw - 1, w - 1), bottom)
        x += bw


def _draw_windows(rng: np.random.Generator, canvas: _Canvas, x0: int, y0: int, x1: int, y1: int) -> None:
    """A grid of windows: texture only, the label stays building."""
    sx, sy = int(rng.integers(5, 9)), int(rng.integers(5, 9))
    region = canvas.image[y0 + 2:y1 - 2, x0 + 2:x1 - 1]
    yy, xx = np.ogrid[:region.shape[0], :region.shape[1]]
    windows = (yy % sy < sy // 2) & (xx % sx < sx // 2)
    region[windows] = region[windows] * rng.uniform(0.45, 0.75) + rng.uniform(0, 40)


def _draw_road(rng: np.random.Generator, canvas: _Canvas, color: np.ndarray, horizon: int) -> np.ndarray:
    """A perspective trapezoid; returns its corners (top-left, top-right, bottom-right, bottom-left)."""
    h, w = canvas.h, canvas.w
    vx, half_top = w * rng.uniform(0.35, 0.65), w * rng.uniform(0.03, 0.08)
    left, right = w * rng.uniform(-0.25, 0.15), w * rng.uniform(0.85, 1.25)
    road = np.array([(vx - half_top, horizon), (vx + half_top, horizon), (right, h - 1), (left, h - 1)])
    canvas.poly(road, color, ROAD)
    # Dashed centre line: texture only (labelled road, as in CamVid's road class).
    mid_bottom = (left + right) / 2
    for t0 in np.arange(rng.uniform(0.05, 0.2), 1.0, 0.22):
        t1 = min(t0 + 0.1, 1.0)
        p0 = (vx + (mid_bottom - vx) * t0, horizon + (h - 1 - horizon) * t0)
        p1 = (vx + (mid_bottom - vx) * t1, horizon + (h - 1 - horizon) * t1)
        cv2.line(canvas.image, (round(p0[0]), round(p0[1])), (round(p1[0]), round(p1[1])),
                 (200.0, 200.0, 190.0), max(1, round(2 * t1)))
    return road


def _road_span(road: np.ndarray, y: float) -> tuple[float, float]:
    """Left and right road edges at row ``y``."""
    t = (y - road[0, 1]) / max(road[3, 1] - road[0, 1], 1.0)
    return road[0, 0] + (road[3, 0] - road[0, 0]) * t, road[1, 0] + (road[2, 0] - road[1, 0]) * t


def _draw_vegetation(rng: np.random.Generator, canvas: _Canvas, color: np.ndarray, horizon: int,
                     road: np.ndarray) -> None:
    h, w = canvas.h, canvas.w
    for _ in range(int(rng.integers(1, 5))):
        cx = rng.choice([rng.uniform(-0.05, 0.3), rng.uniform(0.7, 1.05)]) * w
        cy = horizon - h * rng.uniform(-0.05, 0.18)
        canvas.ellipse(cx, cy, w * rng.uniform(0.04, 0.13), h * rng.uniform(0.05, 0.14), _jitter(rng, color, 15),
                       VEGETATION)
    # Foliage edges are ambiguous: a one-pixel ignore ring around vegetation, like CamVid's void.
    veg = canvas.label == VEGETATION
    ring = cv2.dilate(veg.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~veg
    canvas.label[ring] = IGNORE


def _draw_objects(rng: np.random.Generator, canvas: _Canvas, colors: np.ndarray, horizon: int,
                  road: np.ndarray) -> None:
    """Cars on the road and one or two street corners, drawn far to near so that nearer ones occlude
    farther ones; then the dark outlines of the rare classes."""
    objects = [(horizon + (canvas.h - horizon) * rng.uniform(0.08, 0.95), CAR) for _ in range(int(rng.integers(0, 4)))]
    objects += [(horizon + (canvas.h - horizon) * rng.uniform(0.3, 0.95), POLE)
                for _ in range(1 + int(rng.random() < 0.3))]
    for ground, kind in sorted(objects):
        scale = (ground - horizon) / (canvas.h - horizon)
        (_draw_car if kind == CAR else _draw_corner)(rng, canvas, colors, ground, scale, road)
    for cls in (POLE, SIGN, PERSON, BICYCLE):  # painted metal and clothes: dark edges
        inside = (canvas.label == cls).astype(np.uint8)
        edge = inside.astype(bool) & ~cv2.erode(inside, np.ones((3, 3), np.uint8)).astype(bool)
        canvas.image[edge] *= 0.45


def _draw_corner(rng: np.random.Generator, canvas: _Canvas, colors: np.ndarray, ground: float, scale: float,
                 road: np.ndarray) -> None:
    """A street corner at the kerb: a pole (most with a sign) at the edge of the road, a bicycle parked
    behind it on the sidewalk, a person waiting at the kerb in front of it."""
    left, right = _road_span(road, ground)
    edges = [e for e in ((left, -1), (right, 1)) if 20 <= e[0] <= canvas.w - 21]
    if not edges:  # no kerb in the frame on this row: the corner stands near the frame's border
        edges = [(20.0, -1)] if left > canvas.w - 1 - right else [(canvas.w - 21.0, 1)]
    edge, out = edges[int(rng.integers(len(edges)))]  # out: the sidewalk's side of the kerb
    x = edge + out * rng.uniform(1, 5)
    _draw_pole(rng, canvas, colors, x, ground - 1, scale)
    if rng.random() < 0.9:
        _draw_bicycle(rng, canvas, colors, x + out * canvas.w * (0.03 + 0.02 * scale), ground, scale)
    if rng.random() < 0.9:
        _draw_person(rng, canvas, colors, x - out * canvas.w * (0.04 + 0.03 * scale), ground + 1, scale)


def _draw_car(rng: np.random.Generator, canvas: _Canvas, colors: np.ndarray, ground: float, scale: float,
              road: np.ndarray) -> None:
    cw = max(6.0, scale * canvas.w * 0.4)
    ch = cw * rng.uniform(0.45, 0.6)
    left, right = _road_span(road, ground)
    cx = rng.uniform(left + cw / 2, max(left + cw / 2, right - cw / 2) + 1e-3)
    body = _jitter(rng, _CAR_COLORS[int(rng.integers(len(_CAR_COLORS)))], 10)
    x0, x1 = cx - cw / 2, cx + cw / 2
    canvas.rect(x0, ground - ch * 0.6, x1, ground - ch * 0.1, body, CAR)
    canvas.poly(np.array([(x0 + cw * 0.15, ground - ch * 0.6), (x0 + cw * 0.28, ground - ch),
                          (x1 - cw * 0.25, ground - ch), (x1 - cw * 0.1, ground - ch * 0.6)]), body * 0.9, CAR)
    cv2.rectangle(canvas.image, (round(x0 + cw * 0.3), round(ground - ch * 0.92)),
                  (round(x1 - cw * 0.28), round(ground - ch * 0.65)), (35.0, 40.0, 50.0), -1)  # windows
    for wx in (x0 + cw * 0.22, x1 - cw * 0.22):
        canvas.ellipse(wx, ground - ch * 0.12, ch * 0.16, ch * 0.16, (25, 25, 25), CAR)


def _draw_person(rng: np.random.Generator, canvas: _Canvas, colors: np.ndarray, x: float, ground: float,
                 scale: float) -> None:
    ph = canvas.h * (0.098 + 0.07 * scale)  # 11-16 pixels tall at 96 rows
    pw = ph * 0.55
    clothes = _jitter(rng, colors[PERSON], 8)
    leg = max(2, round(pw * 0.35))
    canvas.line((x - pw * 0.18, ground - ph * 0.45), (x - pw * 0.22, ground), clothes, PERSON, leg)
    canvas.line((x + pw * 0.18, ground - ph * 0.45), (x + pw * 0.22, ground), clothes, PERSON, leg)
    canvas.ellipse(x, ground - ph * 0.58, pw / 2, ph * 0.22, clothes, PERSON)
    canvas.ellipse(x, ground - ph * 0.88, pw * 0.3, ph * 0.11,
                   _jitter(rng, _SKIN_COLORS[int(rng.integers(len(_SKIN_COLORS)))], 8), PERSON)


def _draw_bicycle(rng: np.random.Generator, canvas: _Canvas, colors: np.ndarray, x: float, ground: float,
                  scale: float) -> None:
    bw = canvas.w * (0.076 + 0.035 * scale)  # 11-14 pixels long at 128 columns
    r = bw * 0.24
    frame = _jitter(rng, colors[BICYCLE], 8)
    wheels = ((x - bw / 2 + r, ground - r), (x + bw / 2 - r, ground - r))
    for cx, cy in wheels:
        canvas.ellipse(cx, cy, r, r, frame, BICYCLE)
    seat, bar = (x - bw * 0.05, ground - r * 2.4), (x + bw * 0.25, ground - r * 2.6)
    for p0, p1 in ((wheels[0], seat), (seat, (x, ground - r)), ((x, ground - r), wheels[1]),
                   ((x, ground - r), bar), (bar, wheels[1]), (seat, bar)):
        canvas.line(p0, p1, frame, BICYCLE, 2)


def _draw_pole(rng: np.random.Generator, canvas: _Canvas, colors: np.ndarray, x: float, ground: float,
               scale: float) -> None:
    unit = canvas.h / 96  # one pixel of a 96-row frame
    width = max(2, round(unit * (5 + 2 * scale)))  # 6-7 pixels at 96 rows
    x0 = round(x) - width // 2
    x1 = x0 + width - 1
    top = ground - canvas.h * (0.21 + 0.14 * scale) * rng.uniform(0.85, 1.0)
    canvas.rect(x0, top, x1, ground, _jitter(rng, colors[POLE], 8), POLE)
    if rng.random() < 0.9:
        s = unit * (9 + 3 * scale)  # 10-12 pixels at 96 rows
        color = _jitter(rng, colors[SIGN], 8)
        cx, cy = (x0 + x1) / 2, top + s / 2
        shape = int(rng.integers(4))
        if shape == 0:  # round
            canvas.ellipse(cx, cy, s / 2, s / 2, color, SIGN)
        elif shape == 1:  # rectangular plate
            canvas.rect(cx - s / 2, top, cx + s / 2, top + s * 0.8, color, SIGN)
        elif shape == 2:  # triangle
            canvas.poly(np.array([(cx, top), (cx + s / 2, top + s * 0.85), (cx - s / 2, top + s * 0.85)]), color, SIGN)
        else:  # diamond
            canvas.poly(np.array([(cx, top), (cx + s / 2, cy), (cx, top + s), (cx - s / 2, cy)]), color, SIGN)


def _finish(rng: np.random.Generator, canvas: _Canvas, domain: str) -> np.ndarray:
    """Textures, camera blur and noise, then the domain's photometric changes."""
    h, w = canvas.h, canvas.w
    label = canvas.label
    blotches = cv2.resize(rng.normal(size=(h // 8 + 1, w // 8 + 1)).astype(np.float32), (w, h))
    grain = rng.normal(size=(h, w)).astype(np.float32)
    image = canvas.image + (blotches * _LOW_AMP[label] + grain * _GRAIN_AMP[label])[..., None]
    tiles = (np.arange(h)[:, None] % 6 == 0) & (label == SIDEWALK)  # paving joints
    image[tiles] *= 0.8
    image = cv2.GaussianBlur(image, (3, 3), 0.7) * rng.uniform(0.8, 1.15)
    if domain == "shifted":
        image = _shift_domain(rng, image)
        sigma = 14.0
    else:
        sigma = 6.0
    image = image + rng.normal(0, sigma, image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _shift_domain(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Darker, with fog that is densest at the top (far away) of the frame."""
    image = image * rng.uniform(0.5, 0.65)
    fog = np.linspace(0.55, 0.15, image.shape[0], dtype=np.float32)[:, None, None]
    return image * (1 - fog) + rng.uniform(105, 125) * fog
