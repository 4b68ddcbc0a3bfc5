"""The one inference loop of make-masks, evaluate and predict (iumask.inference.shape_batches and
probability_batches): batches of one shape, every image once, and per image the probabilities the
source gives that image alone, whatever the batching; evaluate's --batch-size changes no number."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_runner import iumask
from torch.utils.data import Dataset, default_collate

from iumask.data.dataset import shape_batches
from iumask.device import Precision
from iumask.inference import EnsembleSource, pixel_maps, probability_batches
from iumask.models import build_model
from tests.testdata import camvid_labels, downsample


def _reference_batches(indices, shape_of, size):
    """shape_batches written the slow way: for each shape in order of first appearance, walk all
    images and close a batch when it is full."""
    shapes_seen = []
    for i in indices:
        if shape_of(i) not in shapes_seen:
            shapes_seen.append(shape_of(i))
    out = []
    for shape in shapes_seen:
        current = []
        for i in indices:
            if shape_of(i) == shape:
                current.append(i)
                if len(current) == size:
                    out.append(current)
                    current = []
        if current:
            out.append(current)
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_shape_batches_group_by_shape_in_order_and_cut_at_size(size):
    rng = np.random.default_rng(size)
    shapes = [tuple(s) for s in rng.choice([(32, 32), (48, 64), (64, 48)], size=23)]
    order = list(rng.permutation(23))
    batches = shape_batches(order, lambda i: shapes[i], size)
    assert batches == _reference_batches(order, lambda i: shapes[i], size)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert all(len({shapes[i] for i in b}) == 1 and 1 <= len(b) <= size for b in batches)
    counts = {s: shapes.count(s) for s in set(shapes)}
    assert len(batches) == sum(math.ceil(n / size) for n in counts.values())


def test_shape_batches_of_one_shape_are_consecutive_runs():
    assert shape_batches(range(10), lambda i: (8, 8), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert shape_batches([], lambda i: (8, 8), 4) == []


class _Images(Dataset):
    """Real CamVid labels of several sizes turned into 3-channel float images (their values
    scaled), so neighbouring pixels differ as in a real scene."""

    def __init__(self):
        labels = camvid_labels(6)
        sizes = [(32, 48), (40, 40), (32, 48), (32, 48), (40, 40), (24, 32)]
        self.images = []
        for label, (h, w) in zip(labels, sizes):
            small = downsample(label, h, w).astype(np.float32) / 11.0
            self.images.append(torch.from_numpy(np.stack([small, small ** 2, 1 - small])))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"index": i, "image": self.images[i]}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    nets = [build_model(encoder, 11).eval() for encoder in ("mobilenet_v2", "resnet18")]
    return EnsembleSource(nets, size=(32, 32))


@pytest.mark.parametrize("size", [1, 3])
def test_probability_batches_give_each_image_its_own_probabilities(source, size):
    dataset = _Images()
    batches = shape_batches(range(len(dataset)), lambda i: tuple(dataset[i]["image"].shape[-2:]), size)
    seen = []
    for batch in probability_batches(source, dataset, batches, torch.device("cpu"), Precision.resolve("off", "cpu")):
        assert batch.probs.dtype == torch.float32 and batch.probs.shape[0] == len(batch.indices)
        alone = torch.cat([source.probs(dataset[i]["image"][None]) for i in batch.indices])
        torch.testing.assert_close(batch.probs, alone, rtol=0, atol=1e-5)
        maps = pixel_maps(batch.probs)
        assert torch.equal(batch.maps.entropy, maps.entropy) and torch.equal(batch.maps.prediction, maps.prediction)
        assert batch.items["index"].tolist() == batch.indices
        seen += batch.indices
    assert seen == [i for b in batches for i in b] and sorted(seen) == list(range(len(dataset)))


def test_a_batch_without_images_comes_through_without_probabilities(source):
    dataset = _Images()

    def drop_odd(items):
        even = [item for item in items if item["index"] % 2 == 0]
        return [default_collate(even) if even else {"index": torch.tensor([items[0]["index"]]), "skipped": True}]

    out = list(probability_batches(source, dataset, [[0], [1], [4]], torch.device("cpu"),
                                   Precision.resolve("off", "cpu"), collate=drop_odd))
    assert [b.indices for b in out] == [[0], [1], [4]]
    assert out[1].probs is None and out[1].maps is None and out[1].items["skipped"]
    assert out[0].probs is not None and out[2].probs.shape[-2:] == (40, 40)


def test_evaluate_results_do_not_depend_on_the_batch_size(tiny_baseline, tmp_path):
    data, baseline = tiny_baseline(tmp_path)
    outputs = []
    for size in (1, 3):
        out = tmp_path / f"b{size}.json"
        iumask("evaluate", "--model", baseline / "ensemble.json", "--data", data, "--output", out,
               "--device", "cpu", "--workers", "0", "--batch-size", size, "--pavpu-threshold", "0.5")
        outputs.append(json.loads(out.read_text())["results"][0])
    first, second = outputs
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, float):
            assert value == pytest.approx(second[key], rel=1e-5, abs=1e-6), key
        elif not isinstance(value, (dict, list)):
            assert value == second[key], key
    assert first["iou"] == pytest.approx(second["iou"], abs=1e-6)


def test_evaluate_refuses_a_batch_size_below_one(tiny_baseline, tmp_path, capsys):
    data, baseline = tiny_baseline(tmp_path)
    iumask("evaluate", "--model", baseline / "ensemble.json", "--data", data, "--output", tmp_path / "r.json",
           "--batch-size", "0", "--device", "cpu", expect=2)
    assert "--batch-size" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


class _Labelled(_Images):
    """_Images with their CamVid labels, as a validation set of several sizes."""

    def __init__(self):
        super().__init__()
        self.labels = [torch.from_numpy(downsample(label, *image.shape[-2:]).astype(np.int64))
                       for label, image in zip(camvid_labels(6), self.images)]

    def sample_shape(self, i):
        return tuple(self.images[i].shape[-2:])

    def __getitem__(self, i):
        return {**super().__getitem__(i), "label": self.labels[i]}


def test_training_validation_batches_images_of_several_sizes_by_size(source):
    from iumask.config import TrainConfig
    from iumask.core.metrics import ConfusionMatrix
    from iumask.engine import validate_members
    from iumask.models import predict_logits

    val_set, cpu = _Labelled(), torch.device("cpu")
    results = [validate_members(source.models, val_set, TrainConfig(batch_size=size, num_workers=0), 11, 11, cpu,
                                Precision.resolve("off", cpu)) for size in (1, 3)]
    # Each image alone through each member (smp pads to a multiple of 16 in predict_logits).
    for m, model in enumerate(source.models):
        matrix = ConfusionMatrix(11, 11)
        for i in range(len(val_set)):
            with torch.no_grad():
                matrix.update(predict_logits(model, val_set[i]["image"][None]).argmax(1), val_set[i]["label"][None])
        expected = matrix.compute()["miou"]
        for result in results:
            assert result.mious[m] == pytest.approx(expected, abs=1e-6)
