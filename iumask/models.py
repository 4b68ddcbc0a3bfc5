"""Members (segmentation-models-pytorch; DeepLabV3+ by default, any smp architecture with ``--arch``):
building, saving and loading weights, logits.

A member lives in a folder (see :mod:`iumask.artifacts`): ``model.safetensors`` (weights, loaded
without running code from the file) and ``manifest.json``. How members' outputs become class
probabilities (an ensemble, MC dropout) is :mod:`iumask.inference`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from iumask.architectures import ARCHITECTURE, ARCHITECTURES, DEFAULT_ENCODERS, architecture_name
from iumask.artifacts import MANIFEST_FILE, WEIGHTS_FILE, check_weights, checked_manifest
from iumask.errors import IumaskError
from iumask.files import atomic_write, file_sha256, write_json_atomic

OUTPUT_STRIDE = 16  # DeepLabV3+'s encoder output stride (as the authors)


def check_architecture(architecture: str, encoder: str) -> None:
    """Refuse an architecture that cannot take ``encoder`` (e.g. DPT needs a ViT encoder), by
    building it without allocating memory (meta device)."""
    try:
        with torch.device("meta"):
            _create(architecture, encoder, 2, None)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IumaskError(f"--arch {architecture} with --encoder {encoder}: segmentation-models-pytorch cannot build "
                          f"it ({reason}); choose another encoder or architecture") from None


def _create(architecture: str, encoder: str, num_classes: int, encoder_weights: str | None) -> torch.nn.Module:
    options = {"encoder_output_stride": OUTPUT_STRIDE} if architecture == ARCHITECTURE else {}
    return smp.create_model(architecture, encoder_name=encoder, encoder_weights=encoder_weights,
                            classes=num_classes, **options)


def build_model(encoder: str, num_classes: int, encoder_weights: str | None = None,
                architecture: str = ARCHITECTURE) -> torch.nn.Module:
    """A segmentation model of ``architecture`` (segmentation-models-pytorch; default DeepLabV3+
    with output stride 16, as the authors).

    ``encoder_weights``: None (random init), ``"imagenet"`` (smp downloads them: needs internet) or
    the path of a local state dict (``.pth``/``.pt``/``.safetensors``) for the encoder, for offline
    machines.
    """
    check_encoder(encoder)
    architecture = architecture_name(architecture)
    local = encoder_weights not in (None, "none", "imagenet")
    model = _create(architecture, encoder, num_classes, None if local or encoder_weights == "none" else encoder_weights)
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
    manifest = checked_manifest(Path(folder))
    return load_weights(folder, manifest, device), manifest


def load_weights(folder: Path, manifest: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The member described by ``manifest`` (already read and checked: :func:`checked_manifest`)
    with the weights in ``folder``, in eval mode; the weights are checked again against the SHA-256
    the manifest recorded (a stat when the file is unchanged: its digest is computed once)."""
    folder = Path(folder)
    check_weights(folder, manifest)
    weights = folder / WEIGHTS_FILE
    recorded = manifest.get("architecture", ARCHITECTURE)  # manifests before --arch: DeepLabV3Plus too
    try:
        architecture = architecture_name(recorded)
    except IumaskError:
        raise IumaskError(f"{folder}: the model is a {recorded}, which this segmentation-models-pytorch "
                          f"does not have ({', '.join(ARCHITECTURES.values())}); install the version it was "
                          "trained with") from None
    model = build_model(manifest["encoder"], len(manifest["classes"]["names"]), architecture=architecture)
    try:
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:
        raise IumaskError(f"{weights}: cannot load weights ({exc.__class__.__name__}); rerun the train command "
                          "that made it with the same options (it retrains this member)") from exc
    return model.to(device).eval()


def pad_to_stride(images: torch.Tensor, stride: int = OUTPUT_STRIDE) -> tuple[torch.Tensor, tuple[int, int]]:
    """The models need sides divisible by their encoder's output stride: pad bottom/right (reflect)."""
    h, w = images.shape[-2:]
    ph, pw = (-h) % stride, (-w) % stride
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return images, (h, w)


def input_stride(model: torch.nn.Module) -> int:
    """What a model's input sides must be divisible by: its encoder's output stride (16 for the
    default DeepLabV3+, 32 for a U-Net)."""
    model = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    return int(getattr(getattr(model, "encoder", None), "output_stride", 32))


def predict_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    padded, (h, w) = pad_to_stride(images, input_stride(model))
    return model(padded)[..., :h, :w]


