"""The package's import structure: layers that import only downwards, no cycles, and no private name
(``_x``) imported from another module. Parses the source (every import, module level or not), so it
runs in milliseconds and fails on the commit that breaks the rule. Last, the CLI's start: commands
that need no model (help, version, a typo, check-data, download) run in a child process that must
not import torch, segmentation-models-pytorch or timm."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "iumask"

# Top to bottom. A module may import modules of lower layers only (and, within its own layer, none
# of the others), so every change of direction shows up here as a failure.
LAYERS = [
    ["iumask.__main__"],
    ["iumask.cli"],
    ["iumask.configfile"],
    ["iumask.stages.run", "iumask.stages.experiment"],
    ["iumask.experiment.report", "iumask.stages.train", "iumask.stages.masks", "iumask.stages.evaluate",
     "iumask.stages.stats", "iumask.stages.predict", "iumask.stages.check_data"],
    ["iumask.model"],
    ["iumask.engine", "iumask.losses", "iumask.inference", "iumask.training_log", "iumask.experiment.spec",
     "iumask.tracking"],
    ["iumask.config", "iumask.experiment.significance", "iumask.experiment.bootstrap", "iumask.figures",
     "iumask.tables"],
    ["iumask.store", "iumask.dataset_stats", "iumask.models", "iumask.distributed", "iumask.device",
     "iumask.data.synthetic"],
    ["iumask.data.formats", "iumask.data.dataset"],
    ["iumask.data.readers"],
    ["iumask.data.augment", "iumask.data.folder", "iumask.download", "iumask.store_lifecycle",
     "iumask.store_writer"],
    ["iumask.artifacts", "iumask.architectures", "iumask.progress", "iumask.transfer", "iumask.overlap",
     "iumask.store_layout", "iumask.data.layout"],
    ["iumask.files"],
    ["iumask.core.metrics", "iumask.core.loss"],
    ["iumask.core.instances", "iumask.core.entropy"],
    ["iumask.errors"],
]
# Package __init__ files re-export what lies below them.
PACKAGES = {"iumask", "iumask.core", "iumask.data", "iumask.stages", "iumask.experiment"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every ``import iumask...`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.startswith("iumask")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iumask") and node.level == 0:
            names = [alias.name for alias in node.names]
            for name in names:  # ``from iumask.stages import train`` imports the module iumask.stages.train
                if f"{node.module}.{name}" in MODULES:
                    found.append((f"{node.module}.{name}", [], node.lineno))
            found.append((node.module, names, node.lineno))
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
LAYER_OF = {module: i for i, layer in enumerate(LAYERS) for module in layer}
# ``iumask`` and ``iumask.core`` re-export the core: importing them is importing the core's layer.
LAYER_OF.update({"iumask": LAYER_OF["iumask.core.loss"], "iumask.core": LAYER_OF["iumask.core.loss"]})


def test_every_module_has_a_layer():
    missing = sorted(set(MODULES) - set(LAYER_OF) - PACKAGES)
    assert not missing, f"add these modules to LAYERS: {missing}"


@pytest.mark.parametrize("module", sorted(set(MODULES) - PACKAGES))
def test_imports_point_down_and_no_private_names_cross(module):
    own = LAYER_OF[module]
    for target, names, line in _imports(MODULES[module]):
        if target in PACKAGES and target not in LAYER_OF:
            continue  # an empty package namespace; the modules imported from it are checked above
        assert target in LAYER_OF, f"{module}:{line} imports unknown module {target}"
        assert LAYER_OF[target] > own, (
            f"{module}:{line} imports {target}, which is not in a lower layer (layer {LAYER_OF[target]} "
            f"vs {own}); imports must point down")
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        assert not private, f"{module}:{line} imports private name(s) {private} from {target}"


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    graph = {m: targets - PACKAGES for m, targets in graph.items() if m not in PACKAGES}
    visiting, done = set(), set()

    def visit(node, path):
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join([*path, node])}"
        visiting.add(node)
        for target in sorted(graph.get(node, ())):
            visit(target, [*path, node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def _imported_closure(module: str) -> set[str]:
    """Every iumask module ``module`` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for target, _, _ in _imports(MODULES[todo.pop()]):
            if target in MODULES and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize("module", ["iumask.inference", "iumask.stages.masks", "iumask.stages.evaluate",
                                    "iumask.stages.predict"])
def test_inference_does_not_import_the_training_engine(module):
    assert "iumask.engine" not in _imported_closure(module), f"{module} imports the training engine"


# The core's functions that turn probabilities into entropy and instance uncertainty.
MAP_FUNCTIONS = {"pixel_entropy", "instance_uncertainty", "instance_uncertainty_batch"}


def test_one_place_computes_entropy_and_iu_from_probabilities():
    """Outside the core, only iumask.inference calls the entropy and IU functions: every stage gets
    its maps from there, with the run's choices applied the same way."""
    callers = {}
    for module, path in MODULES.items():
        if module.startswith("iumask.core") or module == "iumask.inference":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in MAP_FUNCTIONS:
                    callers.setdefault(module, []).append(f"{name} (line {node.lineno})")
    assert not callers, f"entropy/IU computed outside iumask.inference: {callers}"


def test_stages_take_model_objects():
    """A stage's model parameter is a resolved Model (iumask.model.Model), never a path each stage would
    resolve again: the CLI, run and experiment resolve a path once."""
    wrong = []
    for module, path in MODULES.items():
        if not module.startswith("iumask.stages."):
            continue
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(function, ast.FunctionDef) and not function.name.startswith("_"):
                for arg in function.args.args + function.args.kwonlyargs:
                    if arg.arg in ("model", "models") and arg.annotation is not None:
                        annotation = ast.unparse(arg.annotation)
                        if annotation not in ("Model", "list[Model]", "ModelConfig", "torch.nn.Module"):  # a network
                            wrong.append(f"{module}.{function.name}({arg.arg}: {annotation})")
    assert not wrong, f"stages taking something else than a Model: {wrong}"


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``path`` but the docstrings (f-strings' fixed parts too)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_store_names_no_command_option():
    """The store is used by several commands (make-masks, predict, run, experiment) and from Python:
    each passes its own advice (artifacts.StoreAdvice), so no message of store.py names an option."""
    named = [(module, line, text) for module in ("iumask.store", "iumask.store_layout", "iumask.store_lifecycle",
                                                 "iumask.store_writer")
             for line, text in _strings(MODULES[module]) if re.search(r"(?<![\w-])--[a-z]", text)]
    assert not named, f"store.py messages name command options: {named}"


def test_one_function_makes_the_reuse_decision():
    """Members, checkpoints, mask stores and predict's folder all decide with
    artifacts.reuse_decision: no other function returns a Reuse value of its own."""
    deciders = []
    for module, path in MODULES.items():
        for function in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Return) and any(_is_reuse_member(value) for value in (
                        [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value])):
                    deciders.append(f"{module}.{function.name} (line {node.lineno})")
    assert {decider.split(" ")[0] for decider in deciders} == {"iumask.artifacts.reuse_decision"}, deciders


def _is_reuse_member(node) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Reuse"


# ----------------------------------------------------------------------------- start-up

# What importing costs seconds; a command that builds or loads no model imports none of them (and
# mlflow, imported only when a command tracks its runs; zarr, only when a store is opened: 0.15 s).
HEAVY = ("torch", "segmentation_models_pytorch", "timm", "mlflow", "zarr")
# What reading images needs (numpy also starts OpenBLAS's threads): a command that reads no data
# (--help, --version, a typo, download's manual steps) imports none of them either.
READERS = ("numpy", "cv2", "PIL")
# Runs ``iumask ARGS`` as the console script does, then reports the heavy modules and readers it
# imported (on stderr, last line) and exits with the command's code.
RUN_CLI = f"""
import json, sys
from iumask.cli import main
sys.argv = ["iumask", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
print(json.dumps([m for m in {HEAVY + READERS!r} if m in sys.modules]), file=sys.stderr)
sys.exit(code)
"""


def _child(code: str, *args: str) -> tuple[int, str, list[str]]:
    """(exit code, stdout, heavy modules imported) of ``python -c code args`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert lines, f"no report from the child process; stderr empty, stdout: {done.stdout[-2000:]}"
    return done.returncode, done.stdout, json.loads(lines[-1])


def test_importing_the_cli_imports_no_heavy_library():
    code, _, heavy = _child(f"import json, sys, iumask.cli\n"
                            f"print(json.dumps([m for m in {HEAVY + READERS!r} if m in sys.modules]), file=sys.stderr)")
    assert code == 0 and heavy == [], f"import iumask.cli imports {heavy}"


@pytest.mark.parametrize("args, expect, shows", [
    (["--help"], 0, "train-baseline"),
    (["--version"], 0, "iumask "),
    (["trian-baseline"], 2, ""),  # a typo: the usage error, nothing else
    (["train-baseline", "--help"], 0, "--arch"),
    (["download", "cityscapes", "--out", "{tmp}/cityscapes"], 0, "cityscapes"),
])
def test_commands_without_a_model_import_no_heavy_library(args, expect, shows, tmp_path):
    code, stdout, heavy = _child(RUN_CLI, *(a.format(tmp=tmp_path) for a in args))
    assert code == expect and shows in stdout, (code, stdout[-2000:])
    assert heavy == [], f"iumask {' '.join(args)} imports {heavy}"


def test_check_data_imports_no_heavy_library(make_synthetic):
    data = make_synthetic("startup")
    for quick in ([], ["--quick"]):
        code, stdout, heavy = _child(RUN_CLI, "check-data", str(data), *quick)
        assert code == 0 and "ok" in stdout, stdout[-2000:]
        heavy = [m for m in heavy if m not in READERS]  # check-data reads images
        assert heavy == [], f"iumask check-data {' '.join(quick)} imports {heavy}"


def test_import_iumask_keeps_the_core_api():
    """The core's names are imported on first use, from ``iumask`` and ``iumask.core`` alike."""
    code, _, heavy = _child(f"import json, sys, iumask\n"
                            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)")
    assert code == 0 and heavy == []
    import iumask
    import iumask.core
    from iumask.core.entropy import pixel_entropy

    assert iumask.pixel_entropy is pixel_entropy is iumask.core.pixel_entropy
    assert set(iumask.__all__) <= set(dir(iumask)) and iumask.__all__ == iumask.core.__all__
    namespace: dict = {}
    exec("from iumask import *", namespace)
    assert {name for name in namespace if not name.startswith("__")} == set(iumask.__all__)
    with pytest.raises(AttributeError):
        iumask.no_such_name  # noqa: B018


@pytest.mark.slow
def test_a_make_masks_cache_hit_imports_no_heavy_library(tiny_baseline, tmp_path):
    """A rerun of a finished store is decided from manifests, headers and the data's fingerprint:
    no torch (issue 28 §5: a cache hit at 20k images spent most of its seconds importing)."""
    data, baseline = tiny_baseline(tmp_path)
    args = ["make-masks", "--ensemble", str(baseline), "--data", str(data), "--store", str(tmp_path / "m.zarr"),
            "--device", "cpu", "--workers", "0"]
    code, stdout, heavy = _child(RUN_CLI, *args)
    assert code == 0 and "torch" in heavy, stdout[-2000:]  # the first run computes the masks
    code, stdout, heavy = _child(RUN_CLI, *args)  # exit 0 without torch: computing masks would need it
    assert code == 0, stdout[-2000:]
    assert [m for m in heavy if m not in ("zarr", *READERS)] == [], f"a make-masks cache hit imports {heavy}"
