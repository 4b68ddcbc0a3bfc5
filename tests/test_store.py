"""Tests for the zarr mask store."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import numpy as np
import pytest

from iumask.errors import IumaskError, StoreMismatchError
from iumask.store import MaskStore
from iumask.store_layout import IDENTITY_KEYS, STORE_FORMAT_VERSION

SHAPES = [(40, 60), (64, 48), (33, 17), (64, 64), (20, 50), (50, 20)]


def make_identity(shapes=SHAPES, **changes):
    identity = {
        "image_ids": [f"img_{i:03d}" for i in range(len(shapes))],
        "image_shapes": [list(s) for s in shapes],
        "class_names": ["background", "road", "car"],
        "options": {"connectivity": 8, "instances_from": "prediction", "normalize": True, "image_size": [64, 64]},
        "member_sha256": ["a" * 64, "b" * 64, "c" * 64],
        "dataset_fingerprint": "f00d",
    }
    identity.update(changes)
    return identity


def smooth_field(shape, seed, scale=8.0):
    """A smooth random field in [0, 1] (low-pass filtered noise)."""
    rng = np.random.default_rng(seed)
    noise = np.fft.rfft2(rng.standard_normal(shape))
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    field = np.fft.irfft2(noise * np.exp(-(fy**2 + fx**2) * (2 * np.pi * scale) ** 2 / 2), shape)
    return (field - field.min()) / (np.ptp(field) + 1e-12)


def sample(index, shape):
    """Entropy-like smooth field, per-region constant IU and a piecewise-constant prediction."""
    entropy = np.log(19) * smooth_field(shape, seed=index) ** 2
    regions = (smooth_field(shape, seed=1000 + index, scale=16.0) * 7.999).astype(np.int64)
    iu = np.random.default_rng(index).random(8)[regions]
    return entropy.astype(np.float32), iu.astype(np.float32), regions.astype(np.uint8)


def fill(store, indices):
    for i in indices:
        store.write(i, *sample(i, store.image_shapes[i]))


def assert_same_values(store, other):
    """Every image of ``store`` reads as in ``other``, array for array, bit for bit."""
    assert store.completed().all() and other.num_images == store.num_images
    for i in range(store.num_images):
        a, b = store.read(i), other.read(i)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_round_trip_different_sizes(tmp_path):
    store = MaskStore.create(tmp_path / "s", make_identity())
    fill(store, range(len(SHAPES)))
    again = MaskStore.open(tmp_path / "s")
    assert again.num_images == len(SHAPES)
    assert again.image_shapes == SHAPES
    for i, shape in enumerate(SHAPES):
        entropy, iu, pred = sample(i, shape)
        out = again.read(i)
        assert out["entropy"].dtype == np.float32 and out["entropy"].shape == shape
        np.testing.assert_allclose(out["entropy"], entropy, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(out["instance_uncertainty"], iu, rtol=1e-3, atol=1e-3)
        assert out["prediction"].dtype == np.uint8
        np.testing.assert_array_equal(out["prediction"], pred)
        np.testing.assert_array_equal(again.read_iu(i), out["instance_uncertainty"])
    assert again.index_of("img_002") == 2
    with pytest.raises(IumaskError, match="img_999.*s"):
        again.index_of("img_999")


def test_attrs_identity_and_chunks(tmp_path):
    store = MaskStore.create(tmp_path / "s", make_identity())
    identity = store.identity
    assert tuple(identity) == IDENTITY_KEYS
    assert identity["format_version"] == STORE_FORMAT_VERSION
    assert identity["image_shapes"] == [list(s) for s in SHAPES]
    store.set_attrs(mean_entropy=np.float32(0.25), num_complete=3, finished=False)
    attrs = MaskStore.open(tmp_path / "s").attrs
    assert attrs["mean_entropy"] == 0.25 and attrs["num_complete"] == 3 and attrs["finished"] is False
    with pytest.raises(ValueError):
        store.set_attrs(image_ids=[])
    # one image per chunk, so images are read/written independently
    for name in ("entropy", "instance_uncertainty", "prediction"):
        assert store._group[name].shape == (len(SHAPES), 64, 64)
        assert store._group[name].chunks == (1, 64, 64)
    assert store._group["complete"].chunks == (store.images_per_shard,)  # the flags of a shard: one chunk
    with pytest.raises(ValueError, match="shape"):
        store.write(0, *sample(0, (10, 10)))


def test_complete_flags_and_interrupted_write(tmp_path):
    store = MaskStore.create(tmp_path / "s", make_identity())
    assert not store.completed().any()
    fill(store, [1, 3])
    np.testing.assert_array_equal(store.completed(), [False, True, False, True, False, False])
    # Simulate a crash between writing the arrays and setting the flag.
    h, w = SHAPES[0]
    entropy, iu, pred = sample(0, SHAPES[0])
    store._group["entropy"][0, :h, :w] = entropy.astype(np.float16)
    store._group["instance_uncertainty"][0, :h, :w] = iu.astype(np.float16)
    store._group["prediction"][0, :h, :w] = pred
    reopened = MaskStore.open(tmp_path / "s")
    assert not reopened.is_complete(0) and reopened.is_complete(1)
    with pytest.raises(IumaskError, match=r"img_000.*not complete.*make-masks"):
        reopened.read(0)
    with pytest.raises(IumaskError, match="not complete"):
        reopened.read_iu(2)


def test_open_or_create_resumes_same_identity(tmp_path):
    path = tmp_path / "s"
    store = MaskStore.open_or_create(path, make_identity())
    fill(store, [0, 2])
    # tuples vs lists must not count as a difference
    identity = make_identity(image_shapes=[tuple(s) for s in SHAPES])
    identity["options"]["image_size"] = (64, 64)
    resumed = MaskStore.open_or_create(path, identity)
    np.testing.assert_array_equal(resumed.completed(), [True, False, True, False, False, False])
    np.testing.assert_array_equal(resumed.read(2)["prediction"], sample(2, SHAPES[2])[2])
    fill(resumed, [1])  # opened r+: can continue
    assert resumed.completed().sum() == 3


def test_open_or_create_mismatch_and_overwrite(tmp_path):
    path = tmp_path / "s"
    fill(MaskStore.open_or_create(path, make_identity()), [0])
    other = make_identity(options={**make_identity()["options"], "connectivity": 4})
    with pytest.raises(StoreMismatchError) as info:
        MaskStore.open_or_create(path, other)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "overwrite=True" in message
    assert "options.connectivity: stored 8, given 4" in message

    ids = make_identity()["image_ids"][:-1] + ["zzz"]
    with pytest.raises(StoreMismatchError, match=r"image_ids differ \(1 of 6"):
        MaskStore.open_or_create(path, make_identity(image_ids=ids))

    fresh = MaskStore.open_or_create(path, other, overwrite=True)
    assert not fresh.completed().any()
    assert fresh.identity["options"]["connectivity"] == 4


def test_check_identity_subset(tmp_path):
    store = MaskStore.create(tmp_path / "s", make_identity())
    store.check_identity({"dataset_fingerprint": "f00d", "image_shapes": [list(s) for s in SHAPES]})
    with pytest.raises(StoreMismatchError, match=r"dataset_fingerprint: stored \"f00d\", given \"beef\""):
        store.check_identity({"dataset_fingerprint": "beef"})


def test_create_existing_path(tmp_path):
    path = tmp_path / "s"
    MaskStore.create(path, make_identity())
    with pytest.raises(IumaskError, match=r"exists.*overwrite=True"):
        MaskStore.create(path, make_identity())
    MaskStore.create(path, make_identity(), overwrite=True)
    # create() starts afresh even over a finished store of the same identity (open_or_create would
    # keep it): the written images are gone.
    with MaskStore.open_or_create(path, make_identity()) as store:
        for i in range(store.num_images):
            store.write(i, *sample(i, store.image_shapes[i]))
        store.set_attrs(finished=True)
    assert MaskStore.open(path).completed().all()
    with MaskStore.create(path, make_identity(), overwrite=True) as store:
        assert not store.completed().any() and "finished" not in store.attrs
    assert not MaskStore.open(path).completed().any()
    empty = tmp_path / "empty"
    empty.mkdir()
    MaskStore.create(empty, make_identity(), overwrite=True)


def test_refuses_to_delete_non_store_directory(tmp_path):
    path = tmp_path / "precious"
    path.mkdir()
    (path / "thesis.tex").write_text("do not delete")
    with pytest.raises(IumaskError, match="not a mask store") as info:
        MaskStore.create(path, make_identity(), overwrite=True)
    assert str(path) in str(info.value)
    assert (path / "thesis.tex").exists()


def test_open_errors(tmp_path):
    with pytest.raises(IumaskError, match="does not exist"):
        MaskStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(IumaskError, match="plain"):
        MaskStore.open(tmp_path / "plain")

    path = tmp_path / "s"
    MaskStore.create(path, make_identity())
    meta = path / "zarr.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])  # truncated metadata
    with pytest.raises(IumaskError) as info:
        MaskStore.open(path)
    message = str(info.value)
    assert str(path) in message and "overwrite=True" in message and "\n" not in message
    # a corrupt store may still be replaced with overwrite=True
    MaskStore.create(path, make_identity(), overwrite=True)
    MaskStore.open(path)


def test_open_wrong_format_version_or_missing_array(tmp_path):
    path = tmp_path / "s"
    MaskStore.create(path, make_identity())._group.attrs["format_version"] = 99
    with pytest.raises(IumaskError, match="format_version 99"):
        MaskStore.open(path)
    path2 = tmp_path / "t"
    MaskStore.create(path2, make_identity())
    import shutil

    shutil.rmtree(path2 / "prediction")
    with pytest.raises(IumaskError, match="lacks the mask arrays"):
        MaskStore.open(path2)


def _write_shards(path, rank, world):
    """One rank's share: every world-th shard, its images through a buffered writer."""
    store = MaskStore.open(path, mode="r+")
    mine = [i for i in range(store.num_images) if store.shard_of(i) % world == rank]
    with store.writes(mine) as out:
        for i in mine:
            out.write(i, *sample(i, store.image_shapes[i]))


@pytest.mark.parametrize("images_per_shard", [1, 2])
def test_two_processes_write_disjoint_shards(tmp_path, images_per_shard):
    identity = make_identity()
    shared = tmp_path / "shared"
    MaskStore.create(shared, identity, images_per_shard=images_per_shard)  # rank 0 creates, then every rank opens r+
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shards, args=(str(shared), rank, 2)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = MaskStore.create(tmp_path / "single", identity, images_per_shard=1)
    fill(single, range(len(SHAPES)))
    multi = MaskStore.open(shared)
    assert multi.images_per_shard == images_per_shard
    assert_same_values(multi, single)


def test_compression(tmp_path):
    shape = (256, 256)
    store = MaskStore.create(tmp_path / "s", make_identity(shapes=[shape] * 4))
    fill(store, range(4))
    assert store.nbytes_stored() > 0
    entropy_bytes = sum(
        os.path.getsize(os.path.join(root, f))
        for root, _, files in os.walk(tmp_path / "s" / "entropy")
        for f in files
        if f != "zarr.json"
    )
    pixels = 4 * shape[0] * shape[1]
    assert entropy_bytes / pixels < 2.0  # float16 is 2 bytes raw
    assert store.nbytes_stored() / pixels < 2.0  # all three arrays together


# ----------------------------------------------------------------------------- shards


def files_of(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), path) for root, _, names in os.walk(path) for f in names)


def test_a_sharded_store_holds_the_values_of_an_unsharded_one_in_a_file_per_shard(tmp_path):
    identity = make_identity()
    flat = MaskStore.create(tmp_path / "flat", identity, images_per_shard=1)
    sharded = MaskStore.create(tmp_path / "sharded", identity, images_per_shard=4)
    fill(flat, range(len(SHAPES)))
    with sharded.writes(range(len(SHAPES))) as out:
        for i in range(len(SHAPES)):
            out.write(i, *sample(i, SHAPES[i]))
    chunks = [f for f in files_of(tmp_path / "sharded") if "/c/" in f]
    assert len(chunks) == 4 * 2  # 4 arrays x 2 shards (images 0-3, 4-5), where unsharded has 4 x 6
    assert len([f for f in files_of(tmp_path / "flat") if "/c/" in f]) == 4 * 6
    # Plain zarr reads it: the chunk is one image, the shard four.
    import zarr
    group = zarr.open_group(tmp_path / "sharded", mode="r")
    assert group["entropy"].chunks == (1, 64, 64) and group["entropy"].shards == (4, 64, 64)
    assert group.attrs["format_version"] == 3 and flat._group.attrs["format_version"] == 1
    assert sharded.identity == flat.identity  # the content version: either is a cache hit
    again = MaskStore.open(tmp_path / "sharded")
    assert again.images_per_shard == 4
    assert_same_values(again, flat)


def test_an_unsharded_store_is_resumed_as_it_is(tmp_path):
    """An older, unsharded store of the same inputs is resumed (and a cache hit), not replaced."""
    path = tmp_path / "s"
    fill(MaskStore.create(path, make_identity(), images_per_shard=1), [0, 1])
    with MaskStore.open_or_create(path, make_identity(), images_per_shard=4) as store:
        assert store.images_per_shard == 1 and store.completed().tolist() == [True, True] + [False] * 4
        with store.writes([2, 3, 4, 5]) as out:
            for i in range(2, 6):
                out.write(i, *sample(i, SHAPES[i]))
    assert MaskStore.open(path).completed().all()


def test_a_shard_is_written_once_its_pending_images_are_all_there(tmp_path):
    store = MaskStore.create(tmp_path / "s", make_identity(), images_per_shard=3)
    with store.writes([0, 1, 2, 4]) as out:  # shard 0: images 0-2; shard 1: image 4 of 3-5
        out.write(1, *sample(1, SHAPES[1]))
        out.write(0, *sample(0, SHAPES[0]))
        assert not MaskStore.open(tmp_path / "s").completed().any()  # buffered: nothing on disk yet
        assert not (tmp_path / "s" / "entropy" / "c").exists()
        out.write(2, *sample(2, SHAPES[2]))
        assert MaskStore.open(tmp_path / "s").completed().tolist() == [True] * 3 + [False] * 3
        out.write(4, *sample(4, SHAPES[4]))
    assert MaskStore.open(tmp_path / "s").completed().tolist() == [True] * 3 + [False, True, False]


def test_threads_writing_through_one_writer_give_the_serial_store(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    shapes = [(16 + i % 5, 20 + i % 3) for i in range(40)]
    identity = make_identity(shapes=shapes)
    serial = MaskStore.create(tmp_path / "serial", identity, images_per_shard=1)
    fill(serial, range(len(shapes)))
    store = MaskStore.create(tmp_path / "threads", identity, images_per_shard=6)
    order = np.random.default_rng(0).permutation(len(shapes)).tolist()
    with store.writes(order) as out, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: out.write(i, *sample(i, shapes[i])), order))
    assert_same_values(store, serial)


def test_an_error_keeps_the_buffered_images_and_a_rewrite_keeps_the_shards_others(tmp_path):
    store = MaskStore.create(tmp_path / "s", make_identity(), images_per_shard=3)
    with pytest.raises(RuntimeError, match="inference failed"):
        with store.writes(range(6)) as out:
            out.write(0, *sample(0, SHAPES[0]))
            out.write(4, *sample(4, SHAPES[4]))
            raise RuntimeError("inference failed")
    assert store.completed().tolist() == [True, False, False, False, True, False]  # finished ones kept
    before = store.read(0)
    store.write(1, *sample(7, SHAPES[1]))  # one image into a shard with a finished one: it stays
    assert store.completed().tolist() == [True, True, False, False, True, False]
    for key, value in store.read(0).items():
        np.testing.assert_array_equal(value, before[key])
    np.testing.assert_array_equal(store.read(1)["prediction"], sample(7, SHAPES[1])[2])
    with pytest.raises(ValueError, match="not all in shard 0"):
        store.write_shard(0, {4: store.checked_arrays(4, *sample(4, SHAPES[4]))})


def test_a_store_whose_version_and_layout_disagree_is_refused(tmp_path):
    path = tmp_path / "s"
    MaskStore.create(path, make_identity(), images_per_shard=1)._group.attrs["format_version"] = 3
    with pytest.raises(IumaskError, match=r"format_version 3 but arrays sharded otherwise.*overwrite=True"):
        MaskStore.open(path)


@pytest.mark.parametrize("images_per_shard", [1, 4])
def test_read_all_reads_what_read_reads_and_refuses_incomplete_images(tmp_path, images_per_shard):
    store = MaskStore.create(tmp_path / "s", make_identity(), images_per_shard=images_per_shard)
    fill(store, range(len(SHAPES)))
    seen = []
    for index, arrays in store.read_all():
        seen.append(index)
        for key, value in store.read(index).items():
            assert arrays[key].dtype == value.dtype
            np.testing.assert_array_equal(arrays[key], value)
    assert seen == list(range(len(SHAPES)))
    assert [set(arrays) for _, arrays in store.read_all(("entropy",))] == [{"entropy"}] * len(SHAPES)
    store._group["complete"][4:6] = [True, False]  # image 5 unfinished
    with pytest.raises(IumaskError, match=r"img_005.*not complete"):
        list(store.read_all())


def test_a_writer_keeps_at_most_two_shards_in_memory_whatever_the_order(tmp_path):
    """Images that come shard after shard out of order (predict batches by shape) or never (an
    unreadable image): the writer writes its oldest shard as it is beyond two, and the shard's
    finished images are kept when the rest comes."""
    from iumask.store_writer import MAX_BUFFERED_SHARDS

    shapes = [(16 + i % 2 * 8, 24 - i % 2 * 8) for i in range(30)]
    identity = make_identity(shapes=shapes)
    serial = MaskStore.create(tmp_path / "serial", identity, images_per_shard=1)
    fill(serial, range(len(shapes)))
    store = MaskStore.create(tmp_path / "s", identity, images_per_shard=3)
    order = [i for i in range(30) if i % 3 == 0] + [i for i in range(30) if i % 3 != 0 and i != 29]
    with store.writes(range(30)) as out:  # image 29 never comes
        for i in order:
            out.write(i, *sample(i, shapes[i]))
            assert len(out._buffered) <= MAX_BUFFERED_SHARDS
    assert store.completed().tolist() == [True] * 29 + [False]
    store.write(29, *sample(29, shapes[29]))
    assert_same_values(store, serial)


def counted_shard_writes(store) -> list[tuple[int, list[int]]]:
    """Record each whole-shard write of ``store`` (shard, its images) while it still writes."""
    calls = []
    write_shard = store.write_shard

    def counting(number, images):
        calls.append((number, sorted(images)))
        return write_shard(number, images)

    store.write_shard = counting
    return calls


def test_interleaved_shards_are_each_written_once(tmp_path):
    """Images of two shards arriving interleaved: each shard is written once, whole, when its last
    image comes (not per image, not twice), and the store holds every image."""
    store = MaskStore.create(tmp_path / "s", make_identity(), images_per_shard=3)
    calls = counted_shard_writes(store)
    with store.writes(range(6)) as out:
        for i in (0, 3, 1, 4, 5, 2):
            out.write(i, *sample(i, SHAPES[i]))
        assert calls == [(1, [3, 4, 5]), (0, [0, 1, 2])]
    assert calls == [(1, [3, 4, 5]), (0, [0, 1, 2])]  # the flush on leaving writes nothing again
    assert store.completed().all()
    for i in range(6):
        np.testing.assert_array_equal(store.read(i)["prediction"], sample(i, SHAPES[i])[2])


class _WaitingAfterDiscard(set):
    """A shard's pending set whose ``discard`` then waits (up to ``timeout``) for a second thread to
    discard too: without the writer's lock both threads would then find the shard complete."""

    def __init__(self, values, barrier):
        super().__init__(values)
        self.barrier = barrier

    def discard(self, value):
        super().discard(value)
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:  # the lock kept the other thread out: go on alone
            pass


def test_the_writers_lock_keeps_two_threads_from_finishing_one_shard_twice(tmp_path):
    """The race forced, not left to the GIL: two threads write the last two images of one shard and
    each waits inside the critical section for the other. The lock lets one in at a time (the first
    one's wait times out), so the shard is written once, with both images."""
    from concurrent.futures import ThreadPoolExecutor

    store = MaskStore.create(tmp_path / "s", make_identity(), images_per_shard=3)
    calls = counted_shard_writes(store)
    with store.writes(range(3)) as out:
        out.write(0, *sample(0, SHAPES[0]))
        barrier = threading.Barrier(2, timeout=1.0)
        out._waiting = {shard: _WaitingAfterDiscard(images, barrier) for shard, images in out._waiting.items()}
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(out.write, i, *sample(i, SHAPES[i])) for i in (1, 2)]
            for future in done:
                future.result()  # an error in a thread (e.g. a shard popped twice) fails here
    assert calls == [(0, [0, 1, 2])]
    assert store.completed().tolist() == [True, True, True, False, False, False]
