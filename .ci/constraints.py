"""Print constraints.txt: the versions installed in this environment of iumask's runtime dependencies
and of their dependencies, leaving out torch and torchvision (and what only they need), which come
from the PyTorch index chosen at install time (CPU or a CUDA version). Run where iumask is installed
and works (Linux, Python 3.11, the Docker image's platform):

    python .ci/constraints.py > constraints.txt
"""

from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# Pinned versions of iumask's runtime dependencies and theirs, for reproducible Docker builds
# (pip install -c constraints.txt .). torch and torchvision are deliberately not pinned here: they come
# from the PyTorch index the build chooses (CPU or a CUDA version; Dockerfile's TORCH_INDEX), and so do
# the packages only they need. Generated on Linux, Python 3.11, from a working environment:
#     python .ci/constraints.py > constraints.txt"""
SKIP = {"torch", "torchvision"}


def requirements(dist) -> list[str]:
    """The names a distribution needs on this platform, extras left out."""
    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def main() -> None:
    pinned: dict[str, str] = {}
    todo = requirements(distribution("iumask"))
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pinned or name in SKIP:
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        pinned[name] = dist.version
        todo += requirements(dist)
    print(HEADER)
    for name in sorted(pinned):
        print(f"{name}=={pinned[name]}")


if __name__ == "__main__":
    main()
