"""``iumask experiment`` end to end on tiny synthetic data: a real SIGKILL mid-way and a resume that
gives the very results of an uninterrupted run, ``results.csv`` reproducing ``report.md`` (means,
stds and scipy p-values recomputed here), a domain-shift evaluation, an online arm, the dry run,
spec errors as one line naming the file, the table and the key; and ``--worker`` processes sharing
one folder (issue 20 §5): three at once give the single process's results.csv with every model
trained once, a worker skips a training whose folder lock a live process holds and leaves the report
to the last worker, a SIGKILLed worker's training is taken by the next one, and ``--report-only``
reports what is done."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_store_reliability import killed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SPEC = """
name = "tiny"
encoders = ["mobilenet_v2"]
seeds = [0, 1]
rare_classes = 3

[data]
root = "{data}"
size = "32x32"

[train]
epochs = 2
batch_size = 4
lr = 1e-3
backbone_lr_factor = 1.0
checkpoint_every = 1

[masks]
encoders = ["mobilenet_v2"]
seed = 50
images_per_shard = 2

[[arms]]
name = "regular"

[[arms]]
name = "iu"
iu = "offline"
exponent = 2.0

[[evaluations]]
split = "val"

[[evaluations]]
name = "shifted"
root = "{shifted}"
split = "val"
"""


@pytest.fixture(scope="module")
def datasets(make_synthetic):
    data = make_synthetic("experiment", num_train=8, num_val=3)
    shifted = make_synthetic("shifted", num_train=2, num_val=3, domain="shifted")
    return data, shifted


def write_spec(folder: Path, datasets, extra: str = "", text: str = SPEC) -> Path:
    data, shifted = datasets
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "spec.toml"
    spec.write_text(text.format(data=data, shifted=shifted) + extra)
    return spec


@pytest.fixture(scope="module")
def straight(datasets, tmp_path_factory):
    """The experiment run once, uninterrupted."""
    from cli_runner import iumask

    folder = tmp_path_factory.mktemp("straight")
    spec = write_spec(folder, datasets)
    iumask("experiment", spec, "--out", folder / "out")
    return folder / "out"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def values(rows, **where) -> dict[int, float]:
    return {int(r["seed"]): float(r["value"]) for r in rows
            if all(r[k] == v for k, v in where.items()) and not np.isnan(float(r["value"]))}


def without_cost(report: str) -> str:
    """A report without the overview's last column, the training minutes (wall-clock time)."""
    lines, in_overview = [], False
    for line in report.splitlines():
        in_overview = line.startswith("|") and (in_overview or "training min per run" in line)
        lines.append(line.rstrip("|").rsplit("|", 1)[0] + "|" if in_overview else line)
    return "\n".join(lines)


def test_killed_experiment_resumes_to_the_uninterrupted_results(datasets, straight, tmp_path, cli, capsys):
    spec = write_spec(tmp_path, datasets)
    out = tmp_path / "out"
    # SIGKILL while the second seed of the IU arm writes its first mid-epoch checkpoint.
    killed(["experiment", spec, "--out", out], "open", r"runs/iu/mobilenet_v2/seed-1/mobilenet_v2/checkpoint")
    assert (out / "runs" / "regular" / "mobilenet_v2" / "seed-1" / "ensemble.json").is_file()
    assert not (out / "runs" / "iu" / "mobilenet_v2" / "seed-1" / "ensemble.json").exists()
    assert not (out / "report.md").exists()

    capsys.readouterr()
    cli("experiment", spec, "--out", out, "--dry-run")
    plan = capsys.readouterr().out
    assert re.search(r"iu mobilenet_v2 seed 1\s*│\s*to train", plan) or "partial" in plan
    assert re.search(r"regular mobilenet_v2 seed 0\s*│\s*done", plan)
    assert "5 models trained in 5 training runs: 4 done, 1 to go" in plan

    cli("experiment", spec, "--out", out)
    assert (out / "results.csv").read_text() == (straight / "results.csv").read_text()
    # The same report but for the wall-clock cost column (a loaded machine takes longer).
    assert without_cost((out / "report.md").read_text()) == without_cost((straight / "report.md").read_text())
    assert "training min per run" in (out / "report.md").read_text()

    # A finished experiment reruns as cache hits and only rebuilds the report.
    (out / "report.md").unlink()
    capsys.readouterr()
    cli("experiment", spec, "--out", out)
    captured = capsys.readouterr()
    assert "epoch" not in captured.err and (out / "report.md").is_file()
    assert captured.out.count("cache hit") + captured.err.count("cache hit") >= 5


def test_results_csv_reproduces_the_report(straight):
    rows = read_rows(straight / "results.csv")
    assert list(rows[0]) == ["arm", "encoder", "seed", "dataset", "split", "metric", "class", "value"]
    report = (straight / "report.md").read_text()
    summary = json.loads((straight / "summary.json").read_text())
    classes = summary["classes"]
    # 2 arms × 1 encoder × 2 seeds × 2 evaluations, each with per-class IoU and whole-split metrics
    assert {(r["arm"], r["seed"], r["dataset"]) for r in rows} == {
        (a, s, d) for a in ("regular", "iu") for s in ("0", "1") for d in ("train-data", "shifted")}
    sections = report.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections][:2] == ["train-data val, mobilenet_v2", "shifted val, mobilenet_v2"]
    for section, dataset in zip(sections, ("train-data", "shifted")):
        for metric, label in [("iou", c) for c in classes] + [("miou", "**mIoU**")]:
            cells = []
            for arm in ("regular", "iu"):
                where = dict(arm=arm, dataset=dataset, metric=metric, **({"class": label} if metric == "iou" else {}))
                v = list(values(rows, **where).values())
                cells.append("—" if not v else f"{np.mean(v):.3f}" if len(v) < 2
                             else f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}")
            assert f"| {label} | {cells[0]} | {cells[1]} |" in section, (dataset, label)
        # the mIoU comparison: difference of means and both p-values, recomputed with scipy
        ref, iu = values(rows, arm="regular", dataset=dataset, metric="miou"), values(rows, arm="iu",
                                                                                     dataset=dataset, metric="miou")
        diff = np.mean(list(iu.values())) - np.mean(list(ref.values()))
        welch = stats.ttest_ind(list(iu.values()), list(ref.values()), equal_var=False).pvalue
        paired = stats.ttest_rel([iu[s] for s in (0, 1)], [ref[s] for s in (0, 1)]).pvalue
        fmt = lambda p: "n/a" if np.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")  # noqa: E731
        holm = lambda p, fmt=fmt: fmt(p) if np.isnan(p) else f"{fmt(p)} ({fmt(p)})"  # noqa: E731 (one-arm family)
        line = next(x for x in section.splitlines() if x.startswith("| **mIoU** |") and "±" in x and x.count("|") > 5)
        assert f"| {diff:+.3f} | {holm(welch)} | {holm(paired)} |" in line
        overview = section.split("### Which method? Overview")[1].split("###")[0]
        iu_row = next(x for x in overview.splitlines() if x.startswith("| iu |"))
        assert f"| {diff:+.3f} ({fmt(paired)}) |" in iu_row
    # uncertainty table: PAvPU and ECE per arm
    for arm in ("regular", "iu"):
        for metric in ("pavpu", "ece"):
            v = list(values(rows, arm=arm, dataset="train-data", metric=metric).values())
            assert f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" in sections[0]
    for name in ("class_histogram.png", "masks.png", "iou-train-data-val-mobilenet_v2.png",
                 "reliability-shifted-val-mobilenet_v2.png"):
        assert (straight / "figures" / name).stat().st_size > 1000, name
    assert summary["training_runs"] == 5 and summary["reference"] == "regular"


def test_report_says_what_the_seeds_can_detect(straight):
    """The "What these seeds can detect" table of a small experiment, recomputed: the MDE from the
    per-seed mIoU differences of results.csv with statsmodels' power, Δ of the bootstrap from the
    evaluations' per-image counts equal to the results' Δ, and the report's cells as summary.json."""
    power = pytest.importorskip("statsmodels.stats.power").TTestPower()
    rows = read_rows(straight / "results.csv")
    summary = json.loads((straight / "summary.json").read_text())
    report = (straight / "report.md").read_text()
    for group, section in zip(summary["groups"], report.split("\n## ")[1:]):
        dataset = group["dataset"]
        ref, iu = (values(rows, arm=arm, dataset=dataset, metric="miou") for arm in ("regular", "iu"))
        differences = [iu[s] - ref[s] for s in (0, 1)]
        c = group["comparisons"]["iu"]["miou"]
        assert c["paired_sd"] == pytest.approx(np.std(differences, ddof=1), rel=1e-9)
        # one arm compared: Holm's α/m is 0.05; the power at the MDE is 80 % (far tail below 1e-6)
        assert c["alpha_holm"] == 0.05
        assert power.power(c["mde"] / c["paired_sd"], 2, 0.025, alternative="larger") == pytest.approx(0.8, abs=1e-6)
        boot = c["bootstrap"]
        assert boot["difference"] == pytest.approx(np.mean(differences), abs=1e-12)
        assert boot["resamples"] == 10000 and boot["pairs"] == 2
        for interval in (boot["images"], boot["seeds_and_images"]):
            assert interval[0] <= interval[1]
        table = section.split("### What these seeds can detect")[1].split("###")[0]
        line = next(x for x in table.splitlines() if x.startswith("| mIoU | iu |"))
        needed = str(c["seeds_needed"]) if c["seeds_needed"] is not None else (
            f"more than {c['seeds_needed_beyond']}" if c["seeds_needed_beyond"] else "n/a")
        interval = "[{:+.3f}, {:+.3f}]"
        assert line == (f"| mIoU | iu | {c['difference']:+.3f} | {c['paired_p_holm']:.3f} | {c['mde']:.3f} | {needed} "
                        f"| {interval.format(*boot['images'])} | {interval.format(*boot['seeds_and_images'])} |"), line


def test_each_seed_trains_its_own_model(straight):
    """Every run is trained with its own seed (recorded in its manifest's train_options), so the two
    seeds of an arm give two different models: an experiment whose seeds all trained one model would
    report a spread and p-values of copies."""
    for arm in ("regular", "iu"):
        manifests = {seed: json.loads((straight / "runs" / arm / "mobilenet_v2" / f"seed-{seed}" / "mobilenet_v2"
                                       / "manifest.json").read_text()) for seed in (0, 1)}
        assert {s: m["train_options"]["seed"] for s, m in manifests.items()} == {0: 0, 1: 1}, arm
        assert manifests[0]["weights_sha256"] != manifests[1]["weights_sha256"], f"{arm}: both seeds trained one model"


def test_online_arm_and_its_plan(datasets, tmp_path, cli, capsys):
    extra = '\n[[arms]]\nname = "online"\niu = "online"\nonline_encoders = ["mobilenet_v2", "mobilenet_v2"]\n'
    text = SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("epochs = 2", "epochs = 1")
    text = text.replace('[[arms]]\nname = "iu"\niu = "offline"\nexponent = 2.0\n', "")
    spec = write_spec(tmp_path, datasets, extra, text)
    cli("experiment", spec, "--out", tmp_path / "out", "--dry-run")
    plan = capsys.readouterr().out
    assert "online online mobilenet_v2, mobilenet_v2 seed 0" in plan
    assert "make-masks" not in plan and "mask ensemble" not in plan  # no offline arm: no ensemble, no store
    assert "3 models trained in 2 training runs" in plan
    cli("experiment", spec, "--out", tmp_path / "out")
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert {r["arm"] for r in rows} == {"regular", "online"}
    manifest = json.loads((tmp_path / "out" / "runs" / "online" / "seed-0" / "mobilenet_v2" / "manifest.json")
                          .read_text())
    assert manifest["stage"] == "online" and manifest["members"] == ["mobilenet_v2", "mobilenet_v2-2"]
    assert "n/a" in (tmp_path / "out" / "report.md").read_text()  # one seed: no p-values


@pytest.mark.parametrize("change, message", [
    ('[[arms]]\nname = "regular"\n', "[arms #1] unknown key 'iu_mode'"),
    ('seeds = [0, 1]', "seeds = [0, 0]: give a number of seeds or a list of distinct integers"),
    ('iu = "offline"', "[arms #2] iu = 'sometimes': choose one of none, offline, online"),
    ('lr = 1e-3', "[train] unknown key 'learning_rate'; valid keys: epochs, batch_size, lr,"),
    ('encoders = ["mobilenet_v2"]\nseeds', "resnet9000"),
    ('split = "val"\n\n[[evaluations]]', "[evaluations #1] needs split"),
    ('root = "{shifted}"', "[evaluations #2] root"),
    ('[masks]\nencoders = ["mobilenet_v2"]', "give either path (a trained ensemble) or encoders"),
    ('epochs = 2', "[train] seed: each run's seed comes from the top-level seeds list"),
    ('rare_classes = 3', "bootstrap_resamples must be the bootstrap's resamples (an integer >= 100"),
])
def test_bad_specs_are_one_line_errors_before_any_work(datasets, tmp_path, change, message, capsys):
    from cli_runner import iumask

    replacement = {
        '[[arms]]\nname = "regular"\n': '[[arms]]\nname = "regular"\niu_mode = "x"\n',
        'seeds = [0, 1]': 'seeds = [0, 0]',
        'iu = "offline"': 'iu = "sometimes"',
        'lr = 1e-3': 'learning_rate = 1e-3',
        'encoders = ["mobilenet_v2"]\nseeds': 'encoders = ["resnet9000"]\nseeds',
        'split = "val"\n\n[[evaluations]]': 'name = "x"\n\n[[evaluations]]',
        'root = "{shifted}"': 'root = "{shifted}-missing"',
        '[masks]\nencoders = ["mobilenet_v2"]': f'[masks]\nencoders = ["mobilenet_v2"]\npath = "{tmp_path}"',
        'epochs = 2': 'epochs = 2\nseed = 4',
        'rare_classes = 3': 'rare_classes = 3\nbootstrap_resamples = 50',
    }[change]
    assert change in SPEC
    spec = write_spec(tmp_path, datasets, text=SPEC.replace(change, replacement))
    capsys.readouterr()
    iumask("experiment", spec, "--out", tmp_path / "out", expect=2)
    err = capsys.readouterr().err.replace("\n", "")
    assert message in err and str(spec) in err
    assert not (tmp_path / "out").exists()


def test_evaluation_with_other_classes_is_refused_before_training(datasets, make_synthetic, tmp_path, capsys):
    from cli_runner import iumask

    other = make_synthetic("other", num_train=2, num_val=2)
    names = json.loads((other / "classes.json").read_text())
    names["names"] = [f"x{i}" for i in range(len(names["names"]))] if "names" in names else names
    (other / "classes.json").write_text(json.dumps(names))
    spec = write_spec(tmp_path, datasets, text=SPEC.replace('root = "{shifted}"', f'root = "{other}"'))
    iumask("experiment", spec, "--out", tmp_path / "out", expect=2)
    assert "has other classes than the training data (class 0: 'x0' vs" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "out" / "runs").exists()


def test_each_encoder_gets_its_own_weights_file(datasets, tmp_path, cli, capsys):
    """``encoder_weights`` as a table: every member (of the mask ensemble too) starts from its own
    encoder's file; a file of the wrong encoder would not load, and a missing entry is refused."""
    import torch

    from iumask.models import build_model

    files = {}
    for encoder in ("mobilenet_v2", "resnet18"):
        files[encoder] = tmp_path / f"{encoder}.pt"
        torch.save(build_model(encoder, 10).encoder.state_dict(), files[encoder])
    table = f'encoder_weights = {{ mobilenet_v2 = "mobilenet_v2.pt", resnet18 = "{files["resnet18"]}" }}\n'
    text = SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("epochs = 2", "epochs = 1")
    text = text.replace('[masks]\nencoders = ["mobilenet_v2"]', '[masks]\nencoders = ["mobilenet_v2", "resnet18"]')
    text = table + text.format(data=datasets[0], shifted=datasets[1])
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    cli("experiment", spec, "--out", tmp_path / "out")
    for member, encoder in (("ensemble/resnet18", "resnet18"), ("ensemble/mobilenet_v2", "mobilenet_v2"),
                            ("runs/iu/mobilenet_v2/seed-0/mobilenet_v2", "mobilenet_v2")):
        manifest = json.loads((tmp_path / "out" / member / "manifest.json").read_text())
        assert manifest["encoder_weights"] == str(files[encoder])
        assert len(manifest["encoder_weights_sha256"]) == 64

    spec.write_text(text.replace(', resnet18 = "', ', resnet50 = "'))
    capsys.readouterr()
    cli("experiment", spec, "--out", tmp_path / "again", expect=2)
    assert "no entry for resnet18" in capsys.readouterr().err.replace("\n", "")


def test_the_papers_spec_is_valid(tmp_path):
    """examples/paper/acdc-cityscapes.toml parses into the paper's plan (its data and weights
    replaced by empty stand-ins: only the spec is checked)."""
    from iumask.experiment.spec import load_spec

    source = Path(__file__).resolve().parents[1] / "examples" / "paper" / "acdc-cityscapes.toml"
    for folder in ("data/acdc", "data/cityscapes", "weights"):
        (tmp_path / folder).mkdir(parents=True)
    for name in ("mobilenet_v2", "resnet50", "resnet101"):
        (tmp_path / "weights" / f"{name}-imagenet.pt").write_bytes(b"")
    (tmp_path / "spec.toml").write_text(source.read_text())
    spec = load_spec(tmp_path / "spec.toml")
    assert [a.name for a in spec.arms] == ["regular", "inverse", "iu", "iu-online"]
    assert spec.seeds == (0, 1, 2, 3, 4) and spec.data.size == (768, 768) and spec.train.epochs == 60
    assert [(e.name, e.data.format, e.split) for e in spec.evaluations] == [("acdc", "acdc", "val"),
                                                                          ("cityscapes", "cityscapes", "val")]
    assert spec.training_runs == 63
    assert spec.model(("resnet50",)).weights_for("resnet50") == str(tmp_path / "weights" / "resnet50-imagenet.pt")
    assert not spec.arm("regular").augment.enabled and spec.arm("iu").loss.exponent == 2.0


@pytest.mark.parametrize("mode", [[], ["--worker"]], ids=["plain", "worker"])
def test_experiment_under_torchrun(datasets, tmp_path, mode):
    """Two Gloo processes: every training is data-parallel (world size 2 in the manifests), the
    masks are shared out, and rank 0 alone evaluates and writes the report; with --worker the job is
    one worker (rank 0 claims each training for both ranks)."""
    from test_engine import torchrun

    text = SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("epochs = 2", "epochs = 1")
    spec = write_spec(tmp_path, datasets, text=text.replace("batch_size = 4", "batch_size = 2"))
    result = torchrun("experiment", spec, "--out", tmp_path / "out", "--device", "cpu", *mode)
    assert result.stdout.count("per-class IoU, mean ± std") == 1
    for member in ("ensemble/mobilenet_v2", "runs/regular/mobilenet_v2/seed-0/mobilenet_v2",
                   "runs/iu/mobilenet_v2/seed-0/mobilenet_v2"):
        assert json.loads((tmp_path / "out" / member / "manifest.json").read_text())["world_size"] == 2
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert {(r["arm"], r["dataset"]) for r in rows} == {(a, d) for a in ("regular", "iu")
                                                         for d in ("train-data", "shifted")}


def test_masks_from_a_given_model_with_mc_dropout(datasets, straight, tmp_path, cli, capsys):
    """``[masks] path`` + ``source = "mc-dropout"``: no ensemble is trained; the store's masks come
    from the given model's dropout passes."""
    from iumask.store import MaskStore

    text = SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("epochs = 2", "epochs = 1")
    given = straight / "ensemble" / "mobilenet_v2"
    text = text.replace('[masks]\nencoders = ["mobilenet_v2"]\nseed = 50',
                        f'[masks]\npath = "{given}"\nsource = "mc-dropout"\npasses = 2')
    spec = write_spec(tmp_path, datasets, text=text)
    capsys.readouterr()
    cli("experiment", spec, "--out", tmp_path / "out", "--dry-run")
    plan = capsys.readouterr().out
    assert "mask ensemble" not in plan and "2 models trained in 2 training runs" in plan
    cli("experiment", spec, "--out", tmp_path / "out")
    assert not (tmp_path / "out" / "ensemble").exists()
    options = MaskStore.open(tmp_path / "out" / "masks" / "prediction-c8.zarr").identity["options"]
    assert options["source"] == "mc-dropout" and options["passes"] == 2
    assert (tmp_path / "out" / "figures" / "masks.png").is_file()


def test_every_json_file_written_is_strict_json(straight):
    """Manifests, ensembles, results, summary and the stores' metadata parse with a strict parser
    (undefined values are null: bare NaN is not JSON)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    files = list(straight.rglob("*.json"))
    assert len(files) > 20
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)


def test_data_option_replaces_the_specs_root(datasets, tmp_path, cli, capsys):
    """A spec written on another machine (its root does not exist here) runs with --data DIR; the
    evaluations without a root of their own follow it."""
    data, shifted = datasets
    spec = write_spec(tmp_path, (tmp_path / "elsewhere" / "camvid", shifted))
    capsys.readouterr()
    cli("experiment", spec, "--out", tmp_path / "out", "--dry-run", expect=2)
    assert "pass --data DIR" in capsys.readouterr().err
    cli("experiment", spec, "--out", tmp_path / "out", "--dry-run", "--data", tmp_path / "missing", expect=2)
    assert "--data" in capsys.readouterr().err
    cli("experiment", spec, "--out", tmp_path / "out", "--dry-run", "--data", data)
    assert "to train" in capsys.readouterr().out
    from iumask.experiment.spec import load_spec

    loaded = load_spec(spec, data)
    assert loaded.data.root == Path(data).resolve()
    assert [e.data.root for e in loaded.evaluations] == [Path(data).resolve(), Path(shifted).resolve()]


# ----------------------------------------------------------------------------- workers

# Wide lines, so that a step's rule ("[3/6] regular mobilenet_v2 seed 0") is never wrapped.
ENV = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
RULE = re.compile(r"─ \[\d+/\d+\] (.+?) ─")


def worker(spec: Path, out: Path, log: Path, *extra) -> subprocess.Popen:
    """``iumask experiment SPEC --out OUT --worker`` in a new process, its output into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "iumask", "experiment", spec, "--out", out, "--worker",
                                 *extra], stdout=f, stderr=subprocess.STDOUT, env=ENV)


def trained_steps(text: str) -> list[str]:
    """The steps of one worker's output that trained (printed epochs), not found done (cache hits)."""
    parts = RULE.split(text)  # [before, step, its output, step, its output, ...]
    return [parts[i] for i in range(1, len(parts), 2) if "epoch " in parts[i + 1]]


def holder(folder: Path) -> subprocess.Popen:
    """Another live process holding ``folder``'s writer lock (as a worker training there does) until
    its stdin closes."""
    code = ("import sys; from iumask.files import folder_writer_lock\n"
            f"with folder_writer_lock({str(folder)!r}, 'model folder', 'wait'):\n"
            "    print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=ENV)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_three_workers_give_one_process_results_training_each_model_once(datasets, straight, tmp_path):
    spec = write_spec(tmp_path, datasets)
    out = tmp_path / "out"
    procs = [worker(spec, out, tmp_path / f"worker{i}.log", "--device", "cpu") for i in range(3)]
    for proc in procs:
        assert proc.wait(timeout=600) == 0
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(3)]
    assert (out / "results.csv").read_text() == (straight / "results.csv").read_text()
    # The ensemble and the four runs trained once in all, the store written once: the other workers
    # waited for them, then found cache hits (or skipped what another worker held).
    trained = sorted(step for log in logs for step in trained_steps(log))
    assert trained == ["iu mobilenet_v2 seed 0", "iu mobilenet_v2 seed 1", "mask ensemble: mobilenet_v2",
                       "regular mobilenet_v2 seed 0", "regular mobilenet_v2 seed 1"], trained
    assert sum(log.count("make-masks: 8/8") for log in logs) == 1
    assert any("report: " in log for log in logs)


def test_a_held_training_is_skipped_and_a_killed_workers_training_is_taken_again(datasets, straight, tmp_path, cli,
                                                                                 capsys):
    spec = write_spec(tmp_path, datasets)
    out = tmp_path / "out"
    runs = out / "runs"
    held = holder(runs / "regular" / "mobilenet_v2" / "seed-0")
    try:
        # A worker skips the held training and is SIGKILLed while training iu seed 1 (before its
        # first checkpoint is written).
        killed(["experiment", spec, "--out", out, "--worker"], "open",
               r"runs/iu/mobilenet_v2/seed-1/mobilenet_v2/checkpoint")
        assert not (runs / "regular" / "mobilenet_v2" / "seed-0" / "ensemble.json").exists()
        assert (runs / "iu" / "mobilenet_v2" / "seed-0" / "ensemble.json").is_file()
        assert not (runs / "iu" / "mobilenet_v2" / "seed-1" / "ensemble.json").exists()

        # --report-only: the runs evaluated so far (iu seed 0, regular seed 1), training nothing.
        capsys.readouterr()
        cli("experiment", spec, "--out", out, "--report-only")
        assert "report from 4 of 8 evaluations" in capsys.readouterr().err
        assert {(r["arm"], r["seed"]) for r in read_rows(out / "results.csv")} == {("iu", "0"), ("regular", "1")}

        # The next worker takes the killed worker's training (its lock died with it), skips the
        # held one and leaves the report to the worker that will finish it.
        (out / "report.md").unlink()
        cli("experiment", spec, "--out", out, "--worker")
        captured = capsys.readouterr().err  # iumask's messages and progress go to stderr
        assert trained_steps(captured) == ["iu mobilenet_v2 seed 1"]
        assert "1 of 4 trainings are being run by other workers" in captured
        assert (runs / "iu" / "mobilenet_v2" / "seed-1" / "ensemble.json").is_file()
        assert not (out / "report.md").exists()
    finally:
        held.stdin.close()
        held.wait(timeout=60)
    # The last worker trains what was held and writes the report: the single process's results.
    cli("experiment", spec, "--out", out, "--worker")
    assert trained_steps(capsys.readouterr().err) == ["regular mobilenet_v2 seed 0"]
    assert (out / "results.csv").read_text() == (straight / "results.csv").read_text()
    assert (out / "report.md").is_file()


def test_workers_and_a_plain_experiment_exclude_each_other(datasets, tmp_path, cli, capsys):
    """A plain experiment owns its folder: beside a worker it stops at once, naming the worker."""
    spec = write_spec(tmp_path, datasets)
    out = tmp_path / "out"
    code = ("import sys; from iumask.files import WriterLock\n"
            f"with WriterLock({str(out)!r}, 'experiment folder', 'wait', shared=True):\n"
            "    print('held', flush=True); sys.stdin.read()")
    out.mkdir()
    worker_like = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   text=True, env=ENV)
    try:
        assert worker_like.stdout.readline() == "held\n"
        capsys.readouterr()
        cli("experiment", spec, "--out", out, expect=2)
        err = capsys.readouterr().err.replace("\n", "")
        assert f"experiment folder {out} is being written by another process (pid {worker_like.pid}" in err
        assert "--worker" in err and not (out / "runs").exists()
    finally:
        worker_like.stdin.close()
        worker_like.wait(timeout=60)


def test_option_errors_and_the_plan(datasets, tmp_path, cli, capsys):
    """Conflicting options are one line before any work (from --config too); --dry-run --worker
    prints the plan."""
    spec = write_spec(tmp_path, datasets)
    out = tmp_path / "out"
    for extra, other in ((["--worker"], "--worker"), (["--dry-run"], "--dry-run"), (["--overwrite"], "--overwrite")):
        capsys.readouterr()
        cli("experiment", spec, "--out", out, "--report-only", *extra, expect=2)
        err = capsys.readouterr().err.strip()
        assert "--report-only only writes the report" in err and f"drop {other} or --report-only" in err, err
    config = tmp_path / "options.toml"
    config.write_text("[experiment]\nreport-only = true\n")
    cli("experiment", spec, "--out", out, "--worker", "--config", config, expect=2)
    assert "drop --worker or --report-only" in capsys.readouterr().err
    cli("experiment", spec, "--out", out, "--report-only", expect=2)
    assert f"--report-only: no run in {out} is evaluated yet" in capsys.readouterr().err.replace("\n", "")
    cli("experiment", spec, "--out", out, "--worker", "--dry-run")
    assert "5 models trained in 5 training runs: 0 done, 5 to go" in capsys.readouterr().out
    assert not out.exists()


# ----------------------------------------------------------------------------- one spec per folder (issue 26 §1)

ONE_ARM = (SPEC.replace("epochs = 2", "epochs = 1")
           .replace('[[arms]]\nname = "iu"\niu = "offline"\nexponent = 2.0\n', "")
           .replace('\n[[evaluations]]\nname = "shifted"\nroot = "{shifted}"\nsplit = "val"\n', ""))


def test_a_folder_belongs_to_one_spec(datasets, tmp_path, cli, capsys):
    """The first process records its spec in the folder; a worker, a plain run, a dry run or a report
    of a spec whose options differ is refused in one line naming the keys, before any training; more
    seeds and another arm are the same spec grown."""
    spec = write_spec(tmp_path / "a", datasets, text=ONE_ARM.replace("seeds = [0, 1]", "seeds = [0]"))
    out = tmp_path / "out"
    cli("experiment", spec, "--out", out)
    record = json.loads((out / "experiment.json").read_text())
    assert record["identity"]["arms"]["regular"]["train"]["epochs"] == 1
    weights_file = out / "runs" / "regular" / "mobilenet_v2" / "seed-0" / "mobilenet_v2" / "model.safetensors"
    weights = weights_file.read_bytes()
    other = write_spec(tmp_path / "b", datasets,
                       text=ONE_ARM.replace("seeds = [0, 1]", "seeds = [0, 1]").replace("epochs = 1", "epochs = 2"))
    for mode in (["--worker"], [], ["--dry-run"], ["--report-only"]):
        capsys.readouterr()
        cli("experiment", other, "--out", out, *mode, expect=2)
        err = capsys.readouterr().err.replace("\n", "")
        assert f"{out} holds the models of another spec ({spec})" in err, (mode, err)
        assert "arms.regular.train.epochs (1 → 2)" in err and "use another --out" in err
        assert not (out / "runs" / "regular" / "mobilenet_v2" / "seed-1").exists(), mode
    assert weights_file.read_bytes() == weights
    # Grown, not changed: another seed and another arm are accepted (the finished run a cache hit).
    grown = write_spec(tmp_path / "c", datasets, '\n[[arms]]\nname = "focal"\nloss = "focal"\n', ONE_ARM)
    capsys.readouterr()
    cli("experiment", grown, "--out", out, "--dry-run")
    assert "4 models trained in 4 training runs: 1 done, 3 to go" in capsys.readouterr().out
    assert json.loads((out / "experiment.json").read_text()) == record  # the first spec's record stays


def test_two_workers_of_two_specs_starting_together_one_is_refused(datasets, tmp_path):
    """Two workers started at once on a new folder with specs that differ: exactly one records its
    spec, the other stops in one line before training anything."""
    out = tmp_path / "out"
    specs = [write_spec(tmp_path / name, datasets, text=ONE_ARM.replace("seeds = [0, 1]", "seeds = [0]")
                        .replace("epochs = 1", f"epochs = {epochs}")) for name, epochs in (("a", 1), ("b", 2))]
    procs = [worker(spec, out, tmp_path / f"w{i}.log", "--device", "cpu") for i, spec in enumerate(specs)]
    codes = [proc.wait(timeout=600) for proc in procs]
    logs = [(tmp_path / f"w{i}.log").read_text().replace("\n", "") for i in range(2)]
    assert sorted(codes) == [0, 2], (codes, logs)
    refused = codes.index(2)
    assert "holds the models of another spec" in logs[refused] and not trained_steps(logs[refused])
    recorded = json.loads((out / "experiment.json").read_text())
    assert recorded["spec"] == str(specs[1 - refused])


def test_report_leaves_out_a_model_of_other_options(datasets, tmp_path, cli, capsys):
    """A folder from before spec records (or whose record was deleted) that holds a run trained with
    other options: the report, --report-only included, leaves it out and says so, instead of
    reporting it as this spec's."""
    out = tmp_path / "out"
    two_epochs = write_spec(tmp_path / "b", datasets, text=ONE_ARM.replace("seeds = [0, 1]", "seeds = [1]")
                            .replace("epochs = 1", "epochs = 2"))
    cli("experiment", two_epochs, "--out", out)  # seed 1 trained and evaluated with 2 epochs
    (out / "experiment.json").unlink()
    spec = write_spec(tmp_path / "a", datasets, text=ONE_ARM.replace("seeds = [0, 1]", "seeds = [0]"))
    cli("experiment", spec, "--out", out)
    grown = write_spec(tmp_path / "c", datasets, text=ONE_ARM)  # seeds 0 and 1, 1 epoch
    capsys.readouterr()
    cli("experiment", grown, "--out", out, "--report-only")
    err = capsys.readouterr().err.replace("\n", "")
    assert "left out of the report" in err and "seed-1" in err and "train_options.epochs (2 → 1)" in err
    assert {(r["arm"], r["seed"]) for r in read_rows(out / "results.csv")} == {("regular", "0")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["groups"][0]["seeds"]["regular"] == [0]


def test_training_cost_counts_finished_runs_only(datasets, tmp_path, cli):
    """--report-only part-way: a run killed after some epochs (its metrics.csv there, no ensemble.json)
    adds nothing to the training cost; the finished run's epoch seconds are the cost."""
    from iumask.stages.experiment import training_seconds

    out = tmp_path / "out"
    spec = write_spec(tmp_path / "a", datasets, text=ONE_ARM.replace("seeds = [0, 1]", "seeds = [0]"))
    cli("experiment", spec, "--out", out)
    finished = out / "runs" / "regular" / "mobilenet_v2" / "seed-0" / "mobilenet_v2"
    partial = out / "runs" / "regular" / "mobilenet_v2" / "seed-1" / "mobilenet_v2"
    partial.mkdir(parents=True)
    (partial / "metrics.csv").write_text((finished / "metrics.csv").read_text())  # what a killed run leaves
    cli("experiment", write_spec(tmp_path / "c", datasets, text=ONE_ARM), "--out", out, "--report-only")
    cost = json.loads((out / "summary.json").read_text())["cost"]
    assert cost["runs"] == {"regular": [pytest.approx(training_seconds(finished))]}
    assert training_seconds(finished) > 0


def test_torchrun_worker_outlives_a_collective_timeout_shorter_than_an_evaluation(make_synthetic, tmp_path):
    """Under torchrun with --worker every rank evaluates its share of the images (as evaluate under
    torchrun does) instead of waiting in a collective while rank 0 evaluates alone: with a process
    group timeout of 8 s and an evaluation that takes one process well over that (sliding windows
    over 48 images of 256x256: about 20 s on one core), the job finishes and reports."""
    from test_engine import torchrun

    data = make_synthetic("slow-evaluation", num_train=4, num_val=48, height=256, width=256)
    text = (ONE_ARM.replace("seeds = [0, 1]", "seeds = [0]").replace("batch_size = 4", "batch_size = 2")
            .replace("[[evaluations]]", '[evaluation]\ninference = "slide"\n\n[[evaluations]]'))
    spec = write_spec(tmp_path, (data, data), text=text)
    result = torchrun("experiment", spec, "--out", tmp_path / "out", "--device", "cpu", "--worker",
                      env={"IUMASK_COLLECTIVE_TIMEOUT_S": "8"})
    assert result.returncode == 0 and (tmp_path / "out" / "report.md").is_file()
    rows = read_rows(tmp_path / "out" / "results.csv")
    assert {(r["arm"], r["seed"]) for r in rows} == {("regular", "0")}
