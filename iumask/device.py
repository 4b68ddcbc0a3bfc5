"""Where and at what precision models run: the device and autocast helpers that training and
inference share (so inference never imports the training engine).

* :func:`resolve_device`: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked before any work.
* :meth:`Precision.resolve`, the one constructor every stage (make-masks, predict, evaluate,
  training) uses: ``off``, ``bf16`` autocast (CUDA and CPU) or ``fp16`` autocast (CUDA, with a
  gradient scaler), as it really runs on the device (:func:`usable_amp`: fp16 on a CPU falls back
  to float32 with a one-line warning). Its ``amp`` is the mode actually used, which identities
  record: :func:`resolve_amp` puts it into a stage's options before their identity is built.
"""

from __future__ import annotations

import dataclasses

import torch

from iumask.errors import IumaskError
from iumask.progress import warn

AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; checked before any work starts."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise IumaskError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise IumaskError(f"--device {device!r}: iumask runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise IumaskError(f"--device {device!r}: no CUDA GPU is available here; use --device cpu (or auto)")
        if resolved.index is not None and resolved.index >= count:
            raise IumaskError(f"--device {device!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    return resolved


def usable_amp(amp: str, device: torch.device) -> str:
    """The autocast mode that runs on ``device``: bf16 on CUDA (if the GPU has it) and on the CPU
    (torch's CPU autocast), fp16 on CUDA only: on the CPU it is switched off with a warning (so
    one config serves GPU and CPU machines)."""
    if amp not in AMP_MODES:
        raise IumaskError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    kind = torch.device(device).type
    if amp == "fp16" and kind != "cuda":
        warn(f"--amp fp16 needs a CUDA device; running on {kind} in float32 (--amp bf16 works on the CPU)")
        return "off"
    if amp == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise IumaskError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
    return amp


class Precision:
    """Autocast and gradient scaling for one AMP mode that runs on ``device``: fp16 with gradient
    scaling on CUDA, bf16 without. Build it with :meth:`resolve` (the mode as it really runs);
    ``amp`` is that mode, ``off`` when nothing is autocast."""

    def __init__(self, amp: str, device: torch.device):
        self.device_type = torch.device(device).type
        self.enabled = amp == "bf16" or (amp == "fp16" and self.device_type == "cuda")
        self.amp = amp if self.enabled else "off"
        self.dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        self.scaled = self.enabled and self.dtype == torch.float16

    @classmethod
    def resolve(cls, amp: str, device: torch.device) -> "Precision":
        """The precision ``--amp amp`` really runs at on ``device`` (:func:`usable_amp`: fp16 on a CPU
        is float32, said in one warning line; a GPU without bfloat16 refuses bf16). Its ``amp`` is
        what a model's, store's or evaluation's identity records."""
        return cls(usable_amp(amp, device), device)

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.scaled)


def resolve_amp(options, device: torch.device):
    """``options`` (a configuration dataclass with an ``amp`` field: training, masks, evaluation,
    predict) with the autocast mode that really runs on ``device`` (:meth:`Precision.resolve`),
    which the identities built from it then record."""
    amp = Precision.resolve(options.amp, device).amp
    return options if amp == options.amp else dataclasses.replace(options, amp=amp)
