"""Corrupted TFRecords: the statistics key notices a same-size overwrite, the trainer's data iterator names the
damaged file, and ``RLDSSource(ignore_errors=True)`` skips the damage with one warning."""

import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlax.data import file_digest
from vlax.data.pipeline import DataConfig, build_pipeline
from vlax.data.rlds_reader import CorruptedDataError, RLDSSource
from vlax.train.data_iterator import DataIterator

EPISODES, LENGTH = 6, 5


class TinyRlds(tfds.core.GeneratorBasedBuilder):
    """6 episodes of 5 steps: 8x8 images, a 3-d state, a 2-d action and an instruction."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        steps = tfds.features.Dataset({
            "observation": tfds.features.FeaturesDict({
                "image_top": tfds.features.Image(shape=(8, 8, 3)),
                "state": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            }),
            "action": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "language_instruction": tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"steps": steps}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(EPISODES):
            yield i, {"steps": [{
                "observation": {"image_top": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                                "state": rng.normal(size=3).astype(np.float32)},
                "action": rng.uniform(-1, 1, 2).astype(np.float32),
                "language_instruction": f"task {i % 2}",
            } for _ in range(LENGTH)]}


@pytest.fixture(scope="module")
def tiny_rlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rlds")
    builder = TinyRlds(data_dir=str(root))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=2))
    return builder.data_dir


@pytest.fixture
def damaged(tiny_rlds, tmp_path):
    """A copy whose first shard has one byte flipped in place (same size, mtime restored)."""
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_rlds, copy)
    shard = os.path.join(copy, sorted(f for f in os.listdir(copy) if ".tfrecord-" in f)[0])
    before = RLDSSource(copy).fingerprint()
    stat = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(stat.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(shard) == stat.st_size and os.stat(shard).st_mtime_ns == stat.st_mtime_ns
    return copy, shard, before


def test_fingerprint_notices_same_size_same_mtime_overwrite(damaged):
    copy, _, before = damaged
    assert RLDSSource(copy).fingerprint() != before  # names + sizes + mtimes are all unchanged


def test_fingerprint_is_content_only_and_memoised(tiny_rlds, tmp_path, monkeypatch):
    copy = str(tmp_path / "elsewhere")
    shutil.copytree(tiny_rlds, copy)
    # The same bytes elsewhere give the same fingerprint (a recorded dataset_hash survives moving the dataset).
    assert RLDSSource(copy).fingerprint() == RLDSSource(tiny_rlds).fingerprint()
    calls = []
    monkeypatch.setattr(file_digest, "hash_file", lambda p: calls.append(p) or "0" * 64)
    RLDSSource(copy).fingerprint()
    assert calls == []  # unchanged files are not read again
    shard = sorted(p for p in os.listdir(copy) if ".tfrecord-" in p)[0]
    os.utime(os.path.join(copy, shard))
    RLDSSource(copy).fingerprint()
    assert [os.path.basename(p) for p in calls] == [shard]


def test_data_iterator_names_the_corrupted_file(damaged, tmp_path):
    copy, shard, _ = damaged
    config = DataConfig(batch_size=4, image_size=8, shuffle_buffer=4, stats_cache_dir=str(tmp_path / "stats"))
    # Statistics of the damaged files are not cached, so building a strict pipeline reads them and fails first,
    # naming the file (the changed fingerprint is what forces that pass).
    with pytest.raises(CorruptedDataError, match=rf"Corrupted TFRecord file\(s\): {shard}"):
        build_pipeline([RLDSSource(copy)], config, process_index=0, process_count=1)
    # Cache them through a tolerant source (same fingerprint), so that the strict one fails only while training.
    build_pipeline([RLDSSource(copy, ignore_errors=True)], config, process_index=0, process_count=1)
    pipeline = build_pipeline([RLDSSource(copy)], config, process_index=0, process_count=1)
    for iterator in (DataIterator(pipeline), DataIterator(pipeline.dataset, files=pipeline.files)):
        with pytest.raises(CorruptedDataError, match=rf"Corrupted TFRecord file\(s\): {shard} \(after \d+ good "
                                                     r"records.*ignore_errors=True"):
            for _ in range(20):
                next(iterator)
    with pytest.raises(CorruptedDataError, match=r"corrupted record.*pass files= to DataIterator"):
        iterator = DataIterator(pipeline.dataset)
        for _ in range(20):
            next(iterator)


def test_ignore_errors_skips_damage_with_one_warning(damaged, tmp_path, caplog):
    copy, shard, _ = damaged
    source = RLDSSource(copy, ignore_errors=True)
    with caplog.at_level(logging.WARNING):
        episodes = list(source.trajectories(0, 1, shuffle=False).as_numpy_iterator())
    warnings = [r.getMessage() for r in caplog.records if "ignore_errors" in r.getMessage()]
    assert len(warnings) == 1 and "skipping unreadable records in 1 of 2 files" in warnings[0] and shard in warnings[0]
    good, error = source.read_report[shard]
    assert source.num_corrupted_files == 1 and error is not None
    assert EPISODES // 2 + good == len(episodes) < EPISODES  # the intact shard plus the records before the damage
    config = DataConfig(batch_size=4, image_size=8, shuffle_buffer=4, stats_cache_dir=str(tmp_path / "stats"))
    iterator = DataIterator(build_pipeline([source], config, process_index=0, process_count=1))
    assert next(iterator)["action"].shape[0] == 4
