"""DeepLabV3+ members (segmentation-models-pytorch): building, saving and loading weights, logits.

A member lives in a folder (see :mod:`iumask.artifacts`): ``model.safetensors`` (weights, loaded
without running code from the file) and ``manifest.json``. How members' outputs become class
probabilities (an ensemble, MC dropout) is :mod:`iumask.uncertainty`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from iumask.artifacts import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    atomic_write,
    checked_manifest,
    file_sha256,
    write_json_atomic,
)
from iumask.errors import IumaskError

DEFAULT_ENCODERS = ("mobilenet_v2", "resnet50", "resnet101")
ARCHITECTURE = "DeepLabV3Plus"
OUTPUT_STRIDE = 16


def build_model(encoder: str, num_classes: int, encoder_weights: str | None = None) -> torch.nn.Module:
    """A DeepLabV3+ with output stride 16 (as the authors).

    ``encoder_weights``: None (random init), ``"imagenet"`` (smp downloads them: needs internet) or
    the path of a local state dict (``.pth``/``.pt``/``.safetensors``) for the encoder, for offline
    machines.
    """
    check_encoder(encoder)
    local = encoder_weights not in (None, "none", "imagenet")
    model = smp.DeepLabV3Plus(
        encoder_name=encoder,
        encoder_weights=None if local or encoder_weights == "none" else encoder_weights,
        encoder_output_stride=OUTPUT_STRIDE,
        classes=num_classes,
    )
    if local:
        load_encoder_weights(model, Path(encoder_weights))
    return model


def check_encoder(encoder: str) -> None:
    """Refuse an encoder name smp does not know, suggesting the closest ones."""
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        close = difflib.get_close_matches(encoder, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(DEFAULT_ENCODERS)}"
        raise IumaskError(f"--encoder {encoder!r}: unknown encoder; choose one of segmentation-models-pytorch's "
                          f"encoders ({hint})")


def encoder_weights_identity(encoder_weights: str | None) -> dict:
    """What a manifest records of ``--encoder-weights`` beyond its name: a local file's SHA-256,
    so a file whose content changed is not taken for the same initialisation. (That the file exists
    is checked once, by :class:`iumask.config.ModelConfig`.)"""
    if encoder_weights in (None, "none", "imagenet"):
        return {}
    return {"encoder_weights_sha256": file_sha256(encoder_weights)}


def load_encoder_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a local encoder state dict (e.g. an ImageNet checkpoint saved on another machine)."""
    if not path.is_file():
        raise IumaskError(f"{path}: encoder weights file not found; give an existing file, 'imagenet' or 'none'")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which
        raise IumaskError(f"{path}: cannot read encoder weights ({exc.__class__.__name__}); give a state dict "
                          "file") from exc
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    # Classification heads (fc.*, classifier.*) are not part of the encoder; drop what doesn't fit.
    own = model.encoder.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise IumaskError(
            f"{path}: {len(missing)} encoder tensors missing (e.g. {missing[0]!r}); "
            "is this the state dict of the same encoder?"
        )
    model.encoder.load_state_dict({k: state[k] for k in own})


def save_member(folder: Path, model: torch.nn.Module, manifest: dict) -> None:
    """Weights first, manifest last: a manifest says the weights beside it are complete.

    An older member in ``folder`` stays usable until the new weights are fully written; its
    manifest is removed just before they replace the old ones, so a crash in between leaves a
    folder that reads as unfinished (the train command resumes it), never old manifest + new weights.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # Serialised in memory and written through our own handle: a full disk is then an OSError
    # (named and cleaned up by atomic_write), not a safetensors error.
    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    with atomic_write(folder / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(data)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
    manifest = dict(manifest, weights_sha256=file_sha256(folder / WEIGHTS_FILE))
    write_json_atomic(folder / MANIFEST_FILE, manifest)


def load_member(folder: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a member from its manifest and load its weights (no code runs from the file), after
    checking that they are the weights the manifest recorded."""
    folder = Path(folder)
    manifest = checked_manifest(folder)
    weights = folder / WEIGHTS_FILE
    model = build_model(manifest["encoder"], len(manifest["classes"]["names"]))
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:
        raise IumaskError(f"{weights}: cannot load weights ({exc.__class__.__name__}); rerun the train command "
                          "that made it with the same options (it retrains this member)") from exc
    return model.to(device).eval(), manifest


def pad_to_stride(images: torch.Tensor, stride: int = OUTPUT_STRIDE) -> tuple[torch.Tensor, tuple[int, int]]:
    """DeepLabV3+ needs sides divisible by its output stride: pad bottom/right (reflect)."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return images, (h, w)


def predict_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    padded, (h, w) = pad_to_stride(images)
    return model(padded)[..., :h, :w]


