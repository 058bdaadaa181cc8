"""The demo world: determinism, layout and counts, captions true to the drawn scene, readers."""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rdkd.stages import demo_world
from rdkd.data import DataSpec, decode_image, open_dataset
from rdkd.stages.demo_world import WorldConfig
from rdkd.errors import UserError
from rdkd.stages.demo_data import demo_data

# Small enough to write in well under a second, big enough for 2 shards and 2 render jobs.
TINY = dict(pretrain=40, train=25, test=12, test_captions=5, zeroshot_per_class=3, shard_size=20)


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world") / "data"
    return out, demo_data(out, "quick", workers=1, progress=False, **TINY)


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_same_bytes_for_any_worker_count(world, tmp_path):
    out, _ = world
    again = demo_data(tmp_path / "again", "quick", workers=2, progress=False, **TINY)
    assert "seconds" in again
    assert tree_hash(tmp_path / "again") == tree_hash(out)


def test_different_seed_different_bytes(world, tmp_path):
    out, _ = world
    demo_data(tmp_path / "other", "quick", seed=1, workers=1, progress=False, **TINY)
    assert tree_hash(tmp_path / "other") != tree_hash(out)
    # Every split differs, not just world.json.
    for split in ("pretrain/00000.tar", "train/00000.tar", "test/test.csv", "zeroshot/shape/scenes.jsonl"):
        assert (tmp_path / "other" / split).read_bytes() != (out / split).read_bytes(), split


def test_splits_are_independent_streams():
    cfg = WorldConfig()
    pretrain = demo_world.make_sample(cfg, "pretrain", 0)
    train = demo_world.make_sample(cfg, "train", 0)
    assert pretrain.png != train.png


# --- layout and counts -------------------------------------------------------------------------


def test_layout_and_counts(world):
    out, description = world
    assert json.loads((out / "world.json").read_text()) == {k: v for k, v in description.items() if k != "seconds"}
    splits = description["splits"]
    assert splits["pretrain"] == {
        "format": "webdataset", "path": "pretrain/{00000..00001}.tar", "shards": 2,
        "images": 40, "captions": 40, "captions_per_image": 1,
    }
    assert splits["train"]["path"] == "train/{00000..00001}.tar" and splits["train"]["images"] == 25
    assert splits["test"] == {"format": "csv", "path": "test/test.csv", "images": 12, "captions": 60, "captions_per_image": 5}

    with tarfile.open(out / "pretrain/00000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 3 * 20
    assert names[:3] == ["000000000.png", "000000000.txt", "000000000.json"]
    with tarfile.open(out / "train/00001.tar") as tar:
        names = tar.getnames()
    assert len(names) == 3 * 5 and names[0] == "000010000.png"  # img2dataset keys: shard + index

    assert len(list((out / "test/images").glob("*.png"))) == 12
    assert len((out / "test/scenes.jsonl").read_text().splitlines()) == 12
    for task, n_classes in (("shape", 6), ("colour", 8)):
        info = description["zeroshot"][task]
        assert info["images"] == 3 * n_classes
        assert len(list((out / info["path"]).glob("*/*.png"))) == 3 * n_classes


def test_quick_profile_counts(tmp_path):
    description = demo_data(tmp_path / "q", "quick", workers=1, progress=False)
    quick = demo_world.PROFILES["quick"]
    assert {s: description["splits"][s]["images"] for s in ("pretrain", "train", "test")} == {
        "pretrain": quick.pretrain, "train": quick.train, "test": quick.test,
    }
    assert quick.pretrain + quick.train + quick.test < 1000


def test_images_are_png_of_the_configured_size(world):
    out, _ = world
    with tarfile.open(out / "pretrain/00000.tar") as tar:
        data = tar.extractfile("000000003.png").read()
    image = decode_image(data)
    assert image.size == (32, 32) and data.startswith(b"\x89PNG")


def test_multi_caption_test_rows(world):
    out, _ = world
    with open(out / "test/test.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0]) == ["filepath", "title"]
    by_image = collections.defaultdict(list)
    for row in rows:
        by_image[row["filepath"]].append(row["title"])
    assert len(by_image) == 12
    for filepath, titles in by_image.items():
        assert (out / "test" / filepath).is_file()
        assert len(titles) == 5 and len(set(titles)) == 5  # paraphrases, not copies
    # The rows of one image are consecutive.
    order = [row["filepath"] for row in rows]
    assert order == sorted(order, key=order.index) and all(order[i] == order[i - i % 5] for i in range(len(order)))


# --- captions true to the drawn scene ----------------------------------------------------------


def _pattern(words_by_name: dict[str, tuple[str, ...]]) -> tuple[re.Pattern, dict[str, str]]:
    canonical = {w: name for name, words in words_by_name.items() for w in words}
    alternatives = sorted(canonical, key=len, reverse=True)  # "five-pointed star" before "star"
    return re.compile(r"\b(" + "|".join(map(re.escape, alternatives)) + r")\b"), canonical


PARSERS = {
    "shape": _pattern(demo_world.SHAPES),
    "colour": _pattern({k: w for k, (_, w) in demo_world.COLOURS.items()}),
    "size": _pattern({k: w for k, (_, w) in demo_world.SIZES.items()}),
    "position": _pattern({k: w for k, (_, _, w) in demo_world.POSITIONS.items()}),
    "relation": _pattern(demo_world.RELATIONS),
    "generic": _pattern({"generic": demo_world.GENERIC_NOUNS}),
}


def words_in(text: str, attribute: str) -> list[str]:
    pattern, canonical = PARSERS[attribute]
    return sorted(canonical[m] for m in pattern.findall(text))


def check_caption(scene: demo_world.Scene, caption: demo_world.Caption) -> None:
    objects = scene.objects
    assert sorted(m.object for m in caption.mentions) == list(range(len(objects))), "every object once"
    for m in caption.mentions:
        obj = objects[m.object]
        for attr in ("shape", "colour", "size", "position"):
            assert getattr(m, attr) in (None, getattr(obj, attr)), (caption.text, attr)
        assert m.shape is not None or m.colour is not None, "an object is never left as a bare noun"
    text = caption.text
    for attr in ("shape", "colour", "size", "position"):
        said = sorted(getattr(m, attr) for m in caption.mentions if getattr(m, attr) is not None)
        assert words_in(text, attr) == said, (text, attr)
    assert len(words_in(text, "generic")) == sum(m.shape is None for m in caption.mentions), text
    if caption.relation is None:
        assert words_in(text, "relation") == []
    else:
        rel = caption.relation
        assert words_in(text, "relation") == [rel.relation], text
        a, b = objects[rel.subject], objects[rel.object]
        assert rel.relation in demo_world.valid_relations(a, b)
        # ... and it holds for the drawn (jittered) centres too, not only for the regions.
        holds = {"left of": a.cx < b.cx, "right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}
        assert holds[rel.relation], (text, a, b)
    if caption.background:
        bg = scene.background
        assert re.search(r"\bon a (\w+) (\w+) background", text)
        tone, kind = re.search(r"\bon a (\w+) (\w+) background", text).groups()
        assert tone in demo_world.TONES[bg.tone] and kind in demo_world.BACKGROUNDS[bg.kind]
    else:
        assert "background" not in text


def test_captions_mention_what_was_drawn():
    cfg = WorldConfig(noise=0.0)
    relations = 0
    for index in range(300):
        sample = demo_world.make_sample(cfg, "test", index, captions=5)
        pixels = np.asarray(Image.open(io.BytesIO(sample.png)).convert("RGB"), dtype=np.int64)
        for obj in sample.scene.objects:
            # The object's own colour is drawn at its centre (no noise in this config).
            y, x = int(obj.cy * cfg.image_size), int(obj.cx * cfg.image_size)
            assert np.abs(pixels[y, x] - np.array(obj.rgb)).max() <= 3, (index, obj)
            named = np.array(demo_world.COLOURS[obj.colour][0])
            assert np.abs(np.array(obj.rgb) - named).max() <= 15
        for caption in sample.captions:
            check_caption(sample.scene, caption)
            relations += caption.relation is not None
    assert relations > 100  # relations really occur


def test_written_records_match_written_captions(world):
    out, _ = world
    csv_rows = collections.defaultdict(list)
    with open(out / "test/test.csv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            csv_rows[row["filepath"]].append(row["title"])
    for line in (out / "test/scenes.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert [c["text"] for c in record["captions"]] == csv_rows[record["filepath"]]
    with tarfile.open(out / "train/00000.tar") as tar:
        record = json.loads(tar.extractfile("000000007.json").read())
        text = tar.extractfile("000000007.txt").read().decode()
    assert record["caption"] == text == record["captions"][0]["text"]
    assert record["key"] == "000000007" and record["status"] == "success"


def test_relations_off_and_object_range():
    cfg = WorldConfig(relations=False, min_objects=2, max_objects=2)
    for index in range(50):
        sample = demo_world.make_sample(cfg, "train", index, captions=3)
        assert len(sample.scene.objects) == 2
        assert all(c.relation is None and not words_in(c.text, "relation") for c in sample.captions)


# --- zero-shot tasks ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["shape", "colour"])
def test_zeroshot_task_files(world, task):
    out, description = world
    root = out / description["zeroshot"][task]["path"]
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "templates.txt").read_text().splitlines()
    assert sorted(classnames) == sorted(demo_world.ZEROSHOT_VOCAB[task])
    # Line i names the i-th class folder in sorted order (torchvision ImageFolder's indices).
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [demo_world.class_folder(c) for c in classnames]
    assert templates and all(t.count("{}") == 1 for t in templates)
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == description["zeroshot"][task]["images"]
    records = [json.loads(line) for line in (root / "scenes.jsonl").read_text().splitlines()]
    for row, record in zip(rows, records, strict=True):
        assert row["label"] in classnames and (root / row["filepath"]).is_file()
        assert row["filepath"].split("/")[0] == demo_world.class_folder(row["label"])
        (obj,) = record["scene"]["objects"]
        assert obj[task] == row["label"]


def test_position_and_size_tasks(tmp_path):
    description = demo_data(
        tmp_path / "w", "quick", pretrain=0, train=0, test=0, zeroshot_tasks=["position", "size"],
        zeroshot_per_class=2, workers=1, progress=False,
    )
    assert description["splits"] == {}
    root = tmp_path / "w/zeroshot/position"
    assert (root / "classnames.txt").read_text().splitlines() == [
        "bottom left", "bottom right", "center", "top left", "top right",
    ]
    assert sorted(p.name for p in root.iterdir() if p.is_dir())[0] == "bottom_left"
    templates = (root / "templates.txt").read_text().splitlines()
    assert templates[0].format("top left") == "a photo of a shape in the top left."


# --- readers -----------------------------------------------------------------------------------


def test_readable_by_rdkd_data(world):
    out, description = world
    splits = description["splits"]
    pretrain = open_dataset(DataSpec(str(out / splits["pretrain"]["path"])))
    assert pretrain.format == "webdataset" and len(pretrain) == 40 and not pretrain.index_rejects
    assert pretrain.shard_ranges == [range(0, 20), range(20, 40)]
    with tarfile.open(out / "pretrain/00001.tar") as tar:
        assert pretrain.read_image_bytes(21) == tar.extractfile("000010001.png").read()
        assert pretrain.captions(21) == (tar.extractfile("000010001.txt").read().decode(),)
    assert open_dataset(DataSpec(str(out / "train"))).keys == open_dataset(DataSpec(str(out / splits["train"]["path"]))).keys

    test = open_dataset(DataSpec(str(out / splits["test"]["path"])))
    assert test.format == "csv" and len(test) == 12 and test.num_captions == 60
    records = [json.loads(line) for line in (out / "test/scenes.jsonl").read_text().splitlines()]
    for i, record in enumerate(records):
        assert test.captions(i) == tuple(c["text"] for c in record["captions"])
        assert test.read_image_bytes(i) == (out / "test" / record["filepath"]).read_bytes()


def test_multi_caption_webdataset_test_split(tmp_path):
    demo_data(tmp_path / "w", "quick", pretrain=0, train=0, test=6, test_captions=4, test_format="webdataset",
              zeroshot_per_class=0, shard_size=4, workers=1, progress=False)
    ds = open_dataset(DataSpec(str(tmp_path / "w/test/{00000..00001}.tar")))
    assert len(ds) == 6 and all(len(ds.captions(i)) == 4 for i in range(6))


def test_csv_pretrain_split(tmp_path):
    description = demo_data(tmp_path / "w", "quick", pretrain=15, train=0, test=0, pretrain_format="csv",
                            zeroshot_per_class=0, workers=1, progress=False)
    ds = open_dataset(DataSpec(str(tmp_path / "w" / description["splits"]["pretrain"]["path"])))
    assert len(ds) == 15 and ds.num_captions == 15


# --- destination and bad input -----------------------------------------------------------------


def test_rerun_is_a_noop_and_other_settings_need_overwrite(world, tmp_path):
    out = tmp_path / "w"
    demo_data(out, "quick", workers=1, progress=False, **TINY)
    before = tree_hash(out)
    assert "seconds" not in demo_data(out, "quick", workers=1, progress=False, **TINY)
    (out / "train/00001.tar").unlink()  # same settings but damaged: written again
    assert "seconds" in demo_data(out, "quick", workers=1, progress=False, **TINY)
    assert tree_hash(out) == before
    with pytest.raises(UserError, match="other settings"):
        demo_data(out, "quick", seed=3, workers=1, progress=False, **TINY)
    assert tree_hash(out) == before  # nothing lost
    demo_data(out, "quick", seed=3, overwrite=True, workers=1, progress=False, **TINY)
    assert tree_hash(out) != before
    assert not list(tmp_path.glob(".w.*"))  # no partial or replaced folders left behind

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a demo world"):
        demo_data(foreign, "quick", workers=1, progress=False, **TINY)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(min_objects=3, max_objects=2), "objects per scene"),
        (dict(train_format="parquet"), "format"),
        (dict(zeroshot_tasks=["texture"]), "zero-shot task"),
        (dict(image_size=8), "image size"),
        (dict(shard_size=20000), "shard size"),
    ],
)
def test_bad_options_are_user_errors(tmp_path, options, message):
    with pytest.raises(UserError, match=message):
        demo_data(tmp_path / "w", "quick", workers=1, progress=False, **options)
    assert not (tmp_path / "w").exists()


def test_cli_one_line_error_and_success(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "rdkd.cli", "demo-data", "--profile", "huge", "-o", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "profile" in bad.stderr
    good = subprocess.run(
        [sys.executable, "-m", "rdkd.cli", "demo-data", "--profile", "quick", "-o", str(tmp_path / "w"),
         "--pretrain", "10", "--train", "5", "--test", "4", "--zeroshot-per-class", "1", "--workers", "1",
         "--zeroshot-task", "size"],
        capture_output=True, text=True, timeout=120,
    )
    assert good.returncode == 0, good.stderr
    assert "pretrain 10" in good.stdout and "size 2" in good.stdout
    assert json.loads((tmp_path / "w/world.json").read_text())["config"]["zeroshot_tasks"] == ["size"]
