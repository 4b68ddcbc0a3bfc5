"""Joint training augmentation: geometry applied identically to image, label and IU mask.

``JointAugment(...)(sample, rng)`` takes the sample dict that
:class:`~iumask.data.folder.SegmentationDataset` hands to its transform
(``{"image": uint8 (H, W, 3), "label": (H, W) uint8/uint16[, "iu": float32 (H, W)]}``) and returns
the same keys. Steps, in this order:

1. photometric jitter (image only): brightness, contrast and saturation factors drawn uniformly
   in ``[1 - jitter, 1 + jitter]``, composed into one affine colour map (rounded, saturated uint8);
2. random scale, uniform in ``scale``: image bilinear, label and IU mask nearest-neighbour with the
   same output grid, so a label pixel and its mask value always come from the same source pixel
   (the mask is constant per instance, so nearest-neighbour keeps it exact);
3. random crop to ``crop`` (H, W), or back to the input size when ``crop`` is None, padding where
   the scaled sample is smaller (image 0, label ``ignore_index``, IU mask 0) at a random offset;
4. horizontal flip with probability 0.5.

All random numbers are drawn up front in a fixed order from ``rng``, so the result depends only on
the rng state and the settings, and switching one step off does not change what the others draw.
Jitter runs before the geometry so that padding stays exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from iumask.errors import IumaskError

DEFAULT_AUGMENTATION: dict[str, Any] = {"scale": [0.5, 2.0], "crop": None, "flip": True, "jitter": 0.2}

OPTION_KEYS = ("scale", "crop", "flip", "jitter", "ignore_index")
SAMPLE_KEYS = ("image", "label", "iu", "valid")  # valid: uint8, 1 inside the image, 0 in padding
MAX_LABEL_VALUE = 65535

# ITU-R BT.601 luma weights for RGB, used for the contrast mean and the saturation grey.
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# Uniform draws per call: scale, crop y, crop x, flip, brightness, contrast, saturation.
_NUM_DRAWS = 7


class JointAugment:
    """Picklable ``transform(sample, rng) -> sample`` for :class:`SegmentationDataset`.

    ``scale``: (low, high) range of the scale factor; (1, 1) disables scaling.
    ``crop``: output (H, W) (an int means square), or None to keep the input size.
    ``flip``: random horizontal flip with p=0.5. ``jitter``: photometric strength in [0, 1); 0 disables.
    ``ignore_index``: the label value written into padding.
    Invalid settings raise :class:`~iumask.errors.IumaskError`.
    """

    def __init__(
        self,
        scale: tuple[float, float] | list[float] = (0.5, 2.0),
        crop: tuple[int, int] | list[int] | int | None = None,
        flip: bool = True,
        jitter: float = 0.2,
        ignore_index: int = 255,
    ) -> None:
        self.scale = _parse_scale(scale)
        self.crop = _parse_crop(crop)
        self.flip = _parse_flip(flip)
        self.jitter = _parse_jitter(jitter)
        self.ignore_index = _parse_ignore(ignore_index)

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, ignore_index: int | None = None) -> JointAugment:
        """Build from a (JSON) dict with any of ``scale, crop, flip, jitter, ignore_index``.

        Missing keys take :data:`DEFAULT_AUGMENTATION` (``ignore_index`` 255); ``ignore_index``
        given as an argument (e.g. the dataset's) overrides the dict. ``from_options(a.describe()) == a``.
        """
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise IumaskError(
                f"augmentation options must be a JSON object like {DEFAULT_AUGMENTATION}, got {options!r}"
            )
        unknown = sorted(set(options) - set(OPTION_KEYS))
        if unknown:
            raise IumaskError(
                f"augmentation options: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"allowed keys are {', '.join(OPTION_KEYS)}"
            )
        merged: dict[str, Any] = {**DEFAULT_AUGMENTATION, "ignore_index": 255, **options}
        if ignore_index is not None:
            merged["ignore_index"] = ignore_index
        return cls(**merged)

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (for run manifests); inverse of :meth:`from_options`."""
        return {
            "scale": [self.scale[0], self.scale[1]],
            "crop": None if self.crop is None else [self.crop[0], self.crop[1]],
            "flip": self.flip,
            "jitter": self.jitter,
            "ignore_index": self.ignore_index,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JointAugment):
            return NotImplemented
        return self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash((self.scale, self.crop, self.flip, self.jitter, self.ignore_index))

    def __repr__(self) -> str:
        return (f"JointAugment(scale={self.scale}, crop={self.crop}, flip={self.flip}, "
                f"jitter={self.jitter}, ignore_index={self.ignore_index})")

    def __call__(self, sample: Mapping[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label, iu, valid = _check_sample(sample, self.ignore_index)
        h, w = label.shape
        u = rng.random(_NUM_DRAWS)

        if self.jitter > 0:
            image = _color_jitter(image, *(1.0 + self.jitter * (2.0 * u[4:7] - 1.0)))

        # Scale: one output grid for all three arrays.
        lo, hi = self.scale
        if lo != 1.0 or hi != 1.0:
            s = lo + (hi - lo) * u[0]
            sh, sw = max(1, int(round(h * s))), max(1, int(round(w * s)))
            if (sh, sw) != (h, w):
                image = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_LINEAR)
                # NEAREST_EXACT samples at pixel centres like INTER_LINEAR does (plain NEAREST is off
                # by half a pixel), so labels stay on their image content; label and mask share it.
                label = cv2.resize(label, (sw, sh), interpolation=cv2.INTER_NEAREST_EXACT)
                if iu is not None:
                    iu = cv2.resize(iu, (sw, sh), interpolation=cv2.INTER_NEAREST_EXACT)
                if valid is not None:
                    valid = cv2.resize(valid, (sw, sh), interpolation=cv2.INTER_NEAREST_EXACT)
        else:
            sh, sw = h, w

        # Crop / pad to the output size at a random offset.
        ch, cw = self.crop if self.crop is not None else (h, w)
        if (sh, sw) != (ch, cw):
            ys, yd, ny = _window(sh, ch, u[1])
            xs, xd, nx = _window(sw, cw, u[2])
            image = _place(image, (ch, cw), ys, yd, ny, xs, xd, nx, 0)
            label = _place(label, (ch, cw), ys, yd, ny, xs, xd, nx, self.ignore_index)
            if iu is not None:
                iu = _place(iu, (ch, cw), ys, yd, ny, xs, xd, nx, 0.0)
            if valid is not None:
                valid = _place(valid, (ch, cw), ys, yd, ny, xs, xd, nx, 0)

        if self.flip and u[3] < 0.5:
            image = image[:, ::-1]
            label = label[:, ::-1]
            if iu is not None:
                iu = iu[:, ::-1]
            if valid is not None:
                valid = valid[:, ::-1]

        out = {"image": np.ascontiguousarray(image), "label": np.ascontiguousarray(label)}
        for key, value in (("iu", iu), ("valid", valid)):
            if value is not None:
                out[key] = np.ascontiguousarray(value)
        return out


def _window(size: int, target: int, u: float) -> tuple[int, int, int]:
    """(source start, destination start, length) of the copied span along one axis."""
    slack = abs(size - target)
    offset = min(int(u * (slack + 1)), slack)
    if size >= target:
        return offset, 0, target  # crop
    return 0, offset, size  # pad


def _place(arr: np.ndarray, shape: tuple[int, int], ys: int, yd: int, ny: int,
           xs: int, xd: int, nx: int, fill: float) -> np.ndarray:
    src = arr[ys:ys + ny, xs:xs + nx]
    if src.shape[:2] == shape:
        return src
    out = np.full(shape + arr.shape[2:], fill, dtype=arr.dtype)
    out[yd:yd + ny, xd:xd + nx] = src
    return out


def _color_jitter(image: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Brightness, then contrast (around the mean grey), then saturation, as one affine map.

    x -> b*x; x -> c*x + (1-c)*mean_grey; x -> s*x + (1-s)*grey(x). Grey is linear and maps
    (1,1,1) to 1, so the composition is M x + t with M = c*b*S, S = s*I + (1-s)*1 w^T and
    t = (1-c)*b*mean_grey(original). Unlike step-wise clamping, only the final result is clipped.
    """
    mean_grey = float(np.dot(_GRAY_WEIGHTS, cv2.mean(image)[:3]))
    sat = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _GRAY_WEIGHTS)
    m = contrast * brightness * sat
    t = (1.0 - contrast) * brightness * mean_grey
    affine = np.hstack([m, np.full((3, 1), t)]).astype(np.float32)
    return cv2.transform(np.ascontiguousarray(image), affine)


def _check_sample(
    sample: Mapping[str, np.ndarray], ignore_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    extra = sorted(set(sample) - set(SAMPLE_KEYS))
    if extra:
        raise ValueError(f"JointAugment: cannot align unknown sample key(s) {extra}; expected {SAMPLE_KEYS}")
    image, label, iu = sample["image"], sample["label"], sample.get("iu")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"JointAugment: image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if label.ndim != 2 or label.dtype not in (np.uint8, np.uint16) or label.shape != image.shape[:2]:
        raise ValueError(f"JointAugment: label must be uint8/uint16 {image.shape[:2]}, got {label.dtype} {label.shape}")
    if ignore_index > np.iinfo(label.dtype).max:
        raise ValueError(f"JointAugment: ignore_index {ignore_index} does not fit the {label.dtype} label")
    if iu is not None:
        if iu.shape != label.shape:
            raise ValueError(f"JointAugment: iu mask is {iu.shape} but the label is {label.shape}")
        iu = iu.astype(np.float32, copy=False)
    valid = sample.get("valid")
    if valid is not None and (valid.shape != label.shape or valid.dtype != np.uint8):
        raise ValueError(f"JointAugment: valid mask must be uint8 {label.shape}, got {valid.dtype} {valid.shape}")
    return image, label, iu, valid


def _number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _parse_scale(scale: Any) -> tuple[float, float]:
    ok = isinstance(scale, (list, tuple)) and len(scale) == 2 and all(_number(v) for v in scale)
    if ok:
        lo, hi = float(scale[0]), float(scale[1])
        ok = math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi
    if not ok:
        raise IumaskError(f"augmentation: scale must be [low, high] with 0 < low <= high, e.g. [0.5, 2.0]; "
                          f"got {scale!r} ([1, 1] disables scaling)")
    return lo, hi


def _parse_crop(crop: Any) -> tuple[int, int] | None:
    if crop is None:
        return None
    if _number(crop) and not isinstance(crop, (list, tuple)):
        crop = [crop, crop]
    ok = isinstance(crop, (list, tuple)) and len(crop) == 2
    ok = ok and all(_number(v) and float(v).is_integer() and v >= 1 for v in crop)
    if not ok:
        raise IumaskError(f"augmentation: crop must be null or [height, width] in pixels (>= 1), got {crop!r}")
    return int(crop[0]), int(crop[1])


def _parse_flip(flip: Any) -> bool:
    if not isinstance(flip, (bool, np.bool_)):
        raise IumaskError(f"augmentation: flip must be true or false, got {flip!r}")
    return bool(flip)


def _parse_jitter(jitter: Any) -> float:
    if not _number(jitter) or not 0.0 <= float(jitter) < 1.0:
        raise IumaskError(f"augmentation: jitter must be a number in [0, 1) (0 disables it), got {jitter!r}")
    return float(jitter)


def _parse_ignore(ignore_index: Any) -> int:
    ok = isinstance(ignore_index, (int, np.integer)) and not isinstance(ignore_index, (bool, np.bool_))
    if not ok or not 0 <= int(ignore_index) <= MAX_LABEL_VALUE:
        raise IumaskError(
            f"augmentation: ignore_index must be an integer in 0..{MAX_LABEL_VALUE}, got {ignore_index!r}"
        )
    return int(ignore_index)
