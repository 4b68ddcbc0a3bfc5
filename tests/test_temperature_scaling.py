"""Post-hoc temperature scaling (``evaluate --temperature-scale``): the fit recovers the temperature
that generated the labels, and on the split it was fitted on it never makes the NLL worse; the
results carry the calibration before and after."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from cli_runner import iumask

from iumask.core.metrics import fit_temperature, scale_temperature


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_recovers_the_temperature_that_generated_the_labels(true_temperature):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200_000, 6, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=generator)[:, 0]
    fitted = fit_temperature(torch.log_softmax(logits, 1), labels)
    assert fitted == pytest.approx(true_temperature, rel=0.03)
    nll = lambda t: float(F.cross_entropy(torch.log_softmax(logits, 1) / t, labels))  # noqa: E731
    assert nll(fitted) <= min(nll(fitted * 1.05), nll(fitted / 1.05))  # a minimum


def test_scale_temperature_is_a_softmax_of_log_probabilities():
    probs = torch.softmax(torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1)), 1)
    scaled = scale_temperature(probs, 2.0)
    assert torch.allclose(scaled, torch.softmax(torch.log(probs) / 2.0, 1), atol=1e-6)
    assert torch.equal(scaled.argmax(1), probs.argmax(1))  # the prediction does not change


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_evaluate_reports_calibration_before_and_after_a_fitted_temperature(make_synthetic, tmp_path):
    data = make_synthetic("temperature", num_train=4, num_val=2)
    iumask("train-baseline", "--data", data, "--out", tmp_path / "model", "--encoder", "mobilenet_v2", "--epochs",
           "1", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--no-augment")
    output = tmp_path / "r.json"
    iumask("evaluate", "--model", tmp_path / "model", "--data", data, "--output", output, "--device", "cpu",
           "--pavpu-threshold", "1", "--temperature-scale")
    result = json.loads(output.read_text())["results"][0]
    assert result["temperature_split"] == "val" and 0.05 <= result["temperature"] <= 20
    assert not math.isclose(result["temperature"], 1.0, rel_tol=1e-3)  # an untrained model is miscalibrated
    # fitted on every labelled pixel of the very split it is scored on: the NLL can only go down
    assert result["nll_scaled"] <= result["nll"] + 1e-6
    header = output.with_suffix(".csv").read_text().splitlines()[0].split(",")
    assert {"temperature", "ece_scaled", "brier_scaled", "nll_scaled"} <= set(header)
