"""Several caches, one student: the feed, the config and the records of an ensemble.

Two tiny teachers of different widths (32 and 40) are extracted separately over the same
data, cut into shards differently, so that a sample's rows differ between the caches and
only a per-cache join by key finds them. The loss terms of an ensemble are checked against
a float64 reference in test_losses.py, 1 = 2 processes in test_distributed_loss.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from builders import TINY_CLIP_CONFIG, TRAIN_FAST, run_cli, write_tiny_clip

WIDE_TEACHER = {**TINY_CLIP_CONFIG, "embed_dim": 40}


@pytest.fixture(scope="module")
def two_caches(tmp_path_factory, tiny_teacher, csv_dataset) -> tuple[Path, Path]:
    """Cache A: the tiny teacher, one shard; cache B: a wider teacher, shards of 5 images."""
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    root = tmp_path_factory.mktemp("ensemble")
    wide = write_tiny_clip(root / "wide-teacher", seed=1, config=WIDE_TEACHER)
    a, b = root / "teacher-a" / "cache", root / "teacher-b" / "cache"
    extract_teacher(csv_dataset, tiny_teacher, a, views=ViewConfig(count=3), batch_size=8, workers=0,
                    storage_dtype="float32", progress=False)
    extract_teacher(csv_dataset, wide, b, views=ViewConfig(count=3), batch_size=8, workers=0,
                    storage_dtype="float32", progress=False, rows_per_shard=5)
    return a, b


def test_each_cache_gives_its_own_rows_of_the_same_view_and_caption(two_caches, csv_dataset, tiny_vit):
    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset
    from rdkd.models import create_student
    from rdkd.training import ImageCfg, PairDataset, teacher_keys

    a, b = (TeacherCache.open(p) for p in two_caches)
    assert a.num_shards == 1 and b.num_shards == 3 and (a.dim, b.dim) == (32, 40)
    student = create_student(tiny_vit)
    data = open_dataset(csv_dataset)
    pairs = PairDataset(data, student.tokenizer, ImageCfg.of_model(student.model), seed=3, caches=[a, b])
    single = PairDataset(data, student.tokenizer, ImageCfg.of_model(student.model), seed=3, caches=[a])
    items = [(epoch, p) for epoch in (0, 1) for p in range(len(pairs))]
    batch, alone = pairs[items], single[items]
    # the first cache's part of the batch is the one-teacher batch, byte for byte
    for name, value in alone.items():
        assert torch.equal(batch[name], value) if isinstance(value, torch.Tensor) else batch[name] == value
    # the second cache's rows are those of the same key, view and caption in that cache
    keys = [data.keys[i] for i in batch["index"].tolist()]
    for i, key in enumerate(keys):
        entry_a, entry_b = a.find(key), b.find(key)
        view = int(batch["image_row"][i]) - entry_a.image_rows.start
        caption = int(batch["text_row"][i]) - entry_a.text_rows.start
        image_key, text_key = teacher_keys(1)
        assert torch.equal(batch[image_key][i], b.image_embeddings(np.asarray([entry_b.image_rows.start + view]))[0])
        assert torch.equal(batch[text_key][i], b.text_embeddings(np.asarray([entry_b.text_rows.start + caption]))[0])
    assert len({int(batch["image_row"][i]) - a.find(k).image_rows.start for i, k in enumerate(keys)}) > 1
    # what the workers ship grows by the second teacher's two rows per sample and nothing else
    def shipped(b: dict) -> int:
        return sum(v.element_size() * v.numel() for v in b.values() if isinstance(v, torch.Tensor))

    assert batch.keys() - alone.keys() == set(teacher_keys(1))
    assert shipped(batch) - shipped(alone) == len(items) * 2 * 40 * 4  # float32 storage, 40-d


def test_two_caches_train_one_student_from_the_cli(two_caches, csv_dataset, tiny_vit, tmp_path, capsys):
    a, b = two_caches
    out = tmp_path / "run"
    code, err = run_cli(["train-student", "--data", csv_dataset.path, "--student", tiny_vit, "--loss", "cliprd",
                         "--cache", str(a), "--cache", str(b), "--cache-weight", "3", "--cache-weight", "1",
                         "--steps", "3", "--batch-size", "4", "--workers", "0", "--no-progress",
                         "--out", str(out)], capsys)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["cache"] == [str(a), str(b)] and run["teacher_dim"] == [32, 40]
    assert run["teacher_weights"] == [0.75, 0.25] and len(run["cache_fingerprint"]) == 2
    assert run["teachers"].endswith("+wide-teacher") and run["teachers"].count("+") == 1  # labels by folder
    assert run["teacher_forwards"] == 0 and np.isfinite(run["final_loss"])
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    heads = {k: tuple(v.shape) for k, v in state["loss"].items() if k.endswith("head_img.weight")}
    assert sorted(heads.values()) == [(32, 24), (40, 24)]  # one projection head per teacher width


def test_one_cache_records_what_it_recorded_before_ensembles(two_caches, csv_dataset, tiny_vit, tmp_path):
    from rdkd.stages.train_student import train_student

    summary = train_student(csv_dataset, tiny_vit, "cliprd", two_caches[0], steps=2, out=tmp_path / "run",
                            **TRAIN_FAST)
    assert summary["cache"] == str(two_caches[0]) and summary["teacher_dim"] == 32
    assert summary["teacher_weights"] is None and isinstance(summary["cache_fingerprint"], str)
    assert summary["teachers"] == "tiny-teacher0"  # labelled by its teacher's folder
    no_kd = train_student(csv_dataset, tiny_vit, "clip", two_caches[0], steps=1, out=tmp_path / "clip", **TRAIN_FAST)
    assert no_kd["teachers"] is None  # given a cache, the clip preset learns from the data alone


@pytest.mark.parametrize("args, message", [
    (["--cache-weight", "1"], "1 --cache-weight values for 2 --cache"),
    (["--cache-weight", "0", "--cache-weight", "0"], "must be finite, >= 0 and not all 0"),
])
def test_bad_cache_weights_are_refused_with_one_line(two_caches, csv_dataset, tiny_vit, tmp_path, capsys,
                                                     args, message):
    a, b = two_caches
    code, err = run_cli(["train-student", "--data", csv_dataset.path, "--student", tiny_vit, "--cache", str(a),
                         "--cache", str(b), *args, "--steps", "1", "--workers", "0", "--no-progress",
                         "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_caches_of_other_views_or_data_are_refused(two_caches, csv_dataset, wds_dataset, tiny_teacher, tiny_vit,
                                                   tmp_path, capsys):
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    one_view = tmp_path / "one-view"
    extract_teacher(csv_dataset, tiny_teacher, one_view, views=ViewConfig(count=1), batch_size=8, workers=0,
                    progress=False)
    other_data = tmp_path / "other-data"
    extract_teacher(wds_dataset, tiny_teacher, other_data, views=ViewConfig(count=3), batch_size=8, workers=0,
                    progress=False)
    for other, message in ((one_view, "hold other views of the images (views differ)"),
                           (other_data, "was made from another dataset")):
        code, err = run_cli(["train-student", "--data", csv_dataset.path, "--student", tiny_vit,
                             "--cache", str(two_caches[0]), "--cache", str(other), "--steps", "1", "--workers", "0",
                             "--no-progress", "--out", str(tmp_path / "run")], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err


def test_a_streamed_ensemble_reads_each_cache_beside_the_data_shards(tmp_path, wds_dataset, tiny_teacher, tiny_vit):
    from rdkd.cache import TeacherCache, ViewConfig
    from rdkd.models import create_student
    from rdkd.stages.extract_teacher import extract_teacher
    from rdkd.streaming import ShardStream, streaming_layout
    from rdkd.training import ImageCfg, PairBuilder, teacher_keys

    wide = write_tiny_clip(tmp_path / "wide-teacher", seed=1, config=WIDE_TEACHER)
    roots = [tmp_path / "a", tmp_path / "b"]
    for teacher, root in zip((tiny_teacher, wide), roots):
        extract_teacher(wds_dataset, teacher, root, views=ViewConfig(count=2), batch_size=4, workers=0,
                        storage_dtype="float32", progress=False)
    caches = [TeacherCache.open(root) for root in roots]
    student = create_student(tiny_vit)
    cfg = ImageCfg.of_model(student.model)

    def first_batches(used: list) -> list[dict]:
        builder = PairBuilder(student.tokenizer, cfg, seed=3, caches=used)
        stream = ShardStream(streaming_layout(True, wds_dataset, used), builder, 4, seed=3, rank=0, world=1,
                             workers=0, shuffle_buffer=3)
        batches = stream.batches(0, stream.steps_per_epoch(epochs=1))
        return [next(batches) for _ in range(stream.steps_per_epoch(epochs=1))]

    for both, alone in zip(first_batches(caches), first_batches(caches[:1])):
        assert torch.equal(both["t_img"], alone["t_img"]) and torch.equal(both["index"], alone["index"])
        image_key, text_key = teacher_keys(1)
        image_rows = both["image_row"].numpy()  # the two caches hold the same rows here (same shards)
        assert torch.equal(both[image_key], caches[1].image_embeddings(image_rows))
        assert torch.equal(both[text_key], caches[1].text_embeddings(both["text_row"].numpy()))
        assert both[image_key].shape[1] == 40
