"""The experiment's statistics against independent computations: Welch's and the paired t-test
written out from their formulas (only the t distribution's tail from scipy), sample std, the
rarest classes of CamVid's training labels counted here with numpy, undefined IoUs left out, and
the pooled reliability bins."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from scipy.stats import t as student_t
from testdata import camvid_label_files, skip_without_camvid

from iumask.experiment.report import merged_bins
from iumask.experiment.significance import compare, mean_std, rarest_classes, result_rows, summarize


def welch_p(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (b.mean() - a.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * student_t.sf(abs(t), df)


def paired_p(a, b) -> float:
    d = np.asarray(b, float) - np.asarray(a, float)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    return 2 * student_t.sf(abs(t), len(d) - 1)


def test_p_values_match_the_formulas():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 8):
        ref = {s: float(v) for s, v in enumerate(rng.normal(0.50, 0.03, n))}
        other = {s: float(v) for s, v in enumerate(rng.normal(0.53, 0.05, n))}
        got = compare(ref, other)
        assert got["difference"] == pytest.approx(np.mean(list(other.values())) - np.mean(list(ref.values())))
        assert got["welch_p"] == pytest.approx(welch_p(list(ref.values()), list(other.values())), rel=1e-9)
        assert got["paired_p"] == pytest.approx(paired_p(list(ref.values()), list(other.values())), rel=1e-9)
        assert got["pairs"] == n


def test_paired_test_uses_only_common_seeds_and_needs_two():
    ref = {0: 0.40, 1: 0.42, 2: 0.45}
    other = {1: 0.47, 2: 0.49, 7: 0.30}
    got = compare(ref, other)
    assert got["pairs"] == 2
    assert got["paired_p"] == pytest.approx(paired_p([0.42, 0.45], [0.47, 0.49]), rel=1e-9)
    one = compare({0: 0.4}, {0: 0.5})
    assert math.isnan(one["welch_p"]) and math.isnan(one["paired_p"]) and one["difference"] == pytest.approx(0.1)


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx({"mean": 7 / 3, "std": float(np.std([1, 2, 4], ddof=1)),
                                                       "n": 3})
    single = mean_std([0.3])
    assert single["mean"] == 0.3 and math.isnan(single["std"]) and single["n"] == 1


def test_undefined_iou_is_left_out_of_the_mean():
    classes = ["a", "b"]
    rows = []
    for seed, (a, b) in enumerate([(0.5, math.nan), (0.7, 0.2), (0.6, 0.4)]):
        result = {"classes": classes, "iou": [a, b], "miou": np.nanmean([a, b])}
        rows += result_rows("regular", "enc", seed, "d", "val", result)
        better = dict(result, iou=[a + 0.1, b], miou=np.nanmean([a + 0.1, b]))
        rows += result_rows("iu", "enc", seed, "d", "val", better)
    summary = summarize(rows, ["regular", "iu"], "regular", classes, [{"class": "b", "pixels": 1, "share": 0.1}])
    group = summary["groups"][0]
    assert group["metrics"]["iou/b"]["regular"]["n"] == 2
    assert group["metrics"]["iou/b"]["regular"]["mean"] == pytest.approx(0.3)
    assert group["comparisons"]["iu"]["b"]["pairs"] == 2 and group["comparisons"]["iu"]["b"]["difference"] == 0
    assert group["comparisons"]["iu"]["miou"]["difference"] == pytest.approx(np.mean([0.1, 0.05, 0.05]))


def test_rarest_classes_of_camvid_match_numpy_counts():
    skip_without_camvid()
    from testdata import camvid_root

    from iumask.data.formats import open_dataset
    from iumask.dataset_stats import label_statistics

    files = camvid_label_files()
    counts = np.zeros(256, dtype=np.int64)
    for path in files:
        counts += np.bincount(cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ravel(), minlength=256)
    dataset = open_dataset(camvid_root(), "train", "camvid")
    names = list(dataset.classes.names)
    expected = sorted(range(len(names)), key=lambda c: (counts[c], names[c]))[:5]
    stats = label_statistics(dataset)
    rare = rarest_classes(dict(zip(names, stats["per_class"]["pixels"])), 5)
    assert [r["class"] for r in rare] == [names[c] for c in expected]
    labelled = counts[:len(names)].sum()
    for r, c in zip(rare, expected):
        assert r["pixels"] == counts[c] and r["share"] == pytest.approx(counts[c] / labelled)
    assert all(r["share"] < 0.02 for r in rare)  # CamVid's rare classes are rare


def test_merged_reliability_bins_pool_pixels_and_fold_confidence_one():
    edges = np.linspace(0, 1, 4).tolist()  # 3 bins + the bin of confidence exactly 1
    first = {"calibration_bins": {"edges": edges, "pixels": [10, 0, 5, 5], "confidence": [0.1, None, 0.8, 1.0],
                                  "accuracy": [0.2, None, 0.6, 1.0]}}
    second = {"calibration_bins": {"edges": edges, "pixels": [30, 4, 0, 0], "confidence": [0.2, 0.5, None, None],
                                   "accuracy": [0.1, 0.25, None, None]}}
    pooled = merged_bins([first, second])
    assert pooled["pixels"] == [40, 4, 10]
    assert pooled["accuracy"] == pytest.approx([(2 + 3) / 40, 1 / 4, (3 + 5) / 10])
    assert merged_bins([{"iou": []}]) is None


def test_run_table_puts_each_weighted_model_beside_its_baseline_with_the_difference(capsys):
    from iumask.tables import print_results

    def result(model, iou, miou):
        return {"model": model, "classes": ["road", "pole"], "iou": iou, "miou": miou, "pavpu": 0.5}

    results = [result("baseline mobilenet_v2", [0.80, 0.00], 0.40), result("baseline ensemble", [0.9, 0.1], 0.5),
               result("weighted mobilenet_v2", [0.75, 0.12], 0.435)]
    print_results(results, compare=True)
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in next(x for x in lines if "┃" in x and "baseline" in x).split("┃")[2:-1]]
    assert header == ["baseline", "weighted", "Δ", "baseline"]
    road = next(x for x in lines if "IoU road" in x).split("│")[2:-1]
    pole = next(x for x in lines if "IoU pole" in x).split("│")[2:-1]
    miou = next(x for x in lines if x.startswith("│ mIoU")).split("│")[2:-1]
    assert [c.strip() for c in road] == ["0.800", "0.750", "-0.050", "0.900"]
    assert [c.strip() for c in pole] == ["0.000", "0.120", "+0.120", "0.100"]
    assert [c.strip() for c in miou] == ["0.400", "0.435", "+0.035", "0.500"]


def test_holm_adjustment_by_hand_and_in_the_comparisons():
    import math

    from iumask.experiment.significance import add_holm, holm

    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    # m = 3 known values: 0.01·3 = 0.03, then max(0.03, 0.03·2) = 0.06, then max(0.06, 0.04·1) = 0.06
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    comparisons = {"a": {"miou": {"welch_p": 0.01, "paired_p": 0.2}},
                   "b": {"miou": {"welch_p": 0.02, "paired_p": math.nan}}}
    add_holm(comparisons)
    assert comparisons["a"]["miou"]["welch_p_holm"] == pytest.approx(0.02)
    assert comparisons["b"]["miou"]["welch_p_holm"] == pytest.approx(0.02)
    assert comparisons["a"]["miou"]["paired_p_holm"] == pytest.approx(0.2)  # the only known paired p
