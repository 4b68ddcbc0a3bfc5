"""The members' architectures and default encoders by name, without importing torch or
segmentation-models-pytorch: the CLI's ``--arch`` choices and ``--help`` read these, and building
a configuration validates names against them (:mod:`iumask.models` builds the models).

:data:`ARCHITECTURES` is segmentation-models-pytorch's registry
(``smp.MODEL_ARCHITECTURES_MAPPING``) as of the version in constraints.txt;
tests/test_architectures.py checks that it is the installed version's.
"""

from __future__ import annotations

from iumask.errors import IumaskError

DEFAULT_ENCODERS = ("mobilenet_v2", "resnet50", "resnet101")
ARCHITECTURE = "DeepLabV3Plus"  # the paper's, and the default
# --arch name -> the class name manifests record.
ARCHITECTURES = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "manet": "MAnet",
    "linknet": "Linknet",
    "fpn": "FPN",
    "pspnet": "PSPNet",
    "deeplabv3": "DeepLabV3",
    "deeplabv3plus": "DeepLabV3Plus",
    "pan": "PAN",
    "upernet": "UPerNet",
    "segformer": "Segformer",
    "dpt": "DPT",
}


def architecture_name(arch: str) -> str:
    """The class name of ``arch`` (``unet``, ``Unet``, ``deeplabv3plus`` ...), as manifests record it."""
    by_lower = {name.lower(): name for name in ARCHITECTURES.values()}
    found = ARCHITECTURES.get(str(arch).lower()) or by_lower.get(str(arch).lower())
    if found is None:
        raise IumaskError(f"--arch {arch!r}: unknown architecture; choose one of segmentation-models-pytorch's: "
                          f"{', '.join(ARCHITECTURES)}")
    return found
