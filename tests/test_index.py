"""Start-up at scale: the columnar dataset index (one builder for all formats, the index
cache, the fingerprint), the collective open under torchrun, the vectorised join with a
teacher cache and the column-wise ``index.arrow``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rdkd.data as data_module
from builders import Sample, sample_members, standard_samples, write_tar, write_wds_dataset
from rdkd.cache import TeacherCache
from rdkd.cache import format as fmt
from rdkd.cache import writer
from rdkd.data import DataSpec, Keys, open_dataset
from rdkd.training import ImageCfg, PairDataset
from test_cache import write_cache
from test_extract import REFERENCE, _bad_webdataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _index_cache_in_tmp(tmp_path, monkeypatch):
    """Entries that cannot go beside the data land in this test's folder, not in ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv(data_module.INDEX_CACHE_ENV, raising=False)


# --- one builder, every format -----------------------------------------------------------------

# Candidates in dataset order: (key, captions). A blank caption is an empty one.
RULE_CANDIDATES = [
    ("k1", ["one"]),
    ("k2", [" "]),       # no usable caption: rejected, and k2 is not taken
    ("k1", ["again"]),   # k1 was kept: duplicate
    ("k3", [""]),        # no usable caption
    ("k3", ["three"]),   # no earlier k3 was kept: kept
    ("k2", ["two"]),     # the earlier k2 was rejected: kept
    ("k3", [" "]),       # an earlier k3 was kept: duplicate, whatever its caption
]
RULE_KEYS = ["k1", "k3", "k2"]
RULE_REJECTS = [("k2", "empty caption"), ("k1", "duplicate key"), ("k3", "empty caption"), ("k3", "duplicate key")]


def _write_rule_dataset(root: Path, format: str) -> DataSpec:
    """RULE_CANDIDATES in ``format``: two units (tar shards / Parquet files) split after the 4th."""
    root.mkdir(parents=True)
    image = standard_samples(1)[0].data
    units = [RULE_CANDIDATES[:4], RULE_CANDIDATES[4:]]
    if format == "csv":  # one image file per candidate, the key in a column
        lines = ["filepath\ttitle\tkey"]
        for i, (key, captions) in enumerate(RULE_CANDIDATES):
            (root / f"{i}.jpg").write_bytes(image)
            lines += [f"{i}.jpg\t{caption}\t{key}" for caption in captions]
        (root / "d.tsv").write_text("\n".join(lines) + "\n")
        return DataSpec(str(root / "d.tsv"), key_column="key")
    if format == "webdataset":
        for u, unit in enumerate(units):
            write_tar(root / f"{u:05d}.tar", [m for key, captions in unit
                                              for m in sample_members(Sample(key, image, tuple(captions)), False)])
        return DataSpec(f"{root}/{{00000..00001}}.tar")
    for u, unit in enumerate(units):
        pq.write_table(pa.table({"image": [image] * len(unit), "caption": [c for _, c in unit],
                                 "key": [k for k, _ in unit]}), root / f"part-{u}.parquet")
    return DataSpec(str(root))


@pytest.mark.parametrize("format", ["csv", "webdataset", "parquet"])
def test_every_format_keeps_rejects_and_dedupes_by_the_same_rule(tmp_path, format):
    ds = open_dataset(_write_rule_dataset(tmp_path / "d", format))
    assert ds.format == format
    assert ds.keys == RULE_KEYS
    assert [ds.captions(i) for i in range(len(ds))] == [("one",), ("three",), ("two",)]
    assert [(r.key, r.reason) for r in ds.index_rejects] == RULE_REJECTS
    assert all(r.source for r in ds.index_rejects)
    if format == "webdataset":
        assert ds.shard_ranges == [range(0, 1), range(1, 3)]
        assert ds.source(2).endswith("00001.tar") and ds.index_rejects[0].source.endswith("00000.tar")
    if format == "parquet":
        assert ds.source(1).endswith("part-1.parquet#0") and ds.index_rejects[1].source.endswith("part-0.parquet#2")


def _sequential_reference(candidates: list[tuple[str, str | None, list[str], list[str]]]):
    """The rule of the readers before the shared builder: one pass, a set of kept keys."""
    kept, rejects, drops, seen = [], [], [], set()
    for key, problem, captions, dropped in candidates:
        if problem:
            rejects.append((key, problem))
        elif key in seen:
            rejects.append((key, "duplicate key"))
        elif not captions:
            rejects.append((key, dropped[0] if dropped else "empty caption"))
        else:
            seen.add(key)
            kept.append((key, tuple(captions)))
            drops += [(key, reason) for reason in dropped]
    return kept, rejects, drops


def test_builder_equals_the_sequential_rule_on_random_candidates():
    rng = np.random.default_rng(0)
    for trial in range(20):
        units = []
        for _ in range(int(rng.integers(1, 4))):
            rows = []
            for _ in range(int(rng.integers(0, 30))):
                key = f"k{rng.integers(12)}"
                problem = "broken tar member: x" if rng.random() < 0.1 else None
                captions = [f"c{rng.integers(5)}" for _ in range(int(rng.integers(0, 3)))] if not problem else []
                dropped = ["empty caption"] * int(rng.integers(0, 2)) if not problem else []
                rows.append((key, problem, captions, dropped))
            units.append(rows)
        tables = []
        for rows in units:
            candidates = data_module._Candidates(where=pa.int64())
            for i, (key, problem, captions, dropped) in enumerate(rows):
                candidates.add(key, problem, captions, dropped, where=i)
            tables.append(candidates.table())
        index = data_module._build_index(tables, lambda unit, row: f"unit {unit} row {row['where']}")
        kept, rejects, drops = _sequential_reference([row for rows in units for row in rows])
        assert list(zip(index.entries.column("key").to_pylist(),
                        map(tuple, index.entries.column("captions").to_pylist()))) == kept, trial
        assert [(r.key, r.reason) for r in index.rejects] == rejects, trial
        assert [(r.key, r.reason) for r in index.drops] == drops, trial
        assert [len(r) for r in index.ranges] == [int((index.unit == u).sum()) for u in range(len(units))]


# --- the index cache ------------------------------------------------------------------------------


@pytest.fixture
def count_scans(monkeypatch):
    """Counts tar shards scanned in this process (the scanner's inner reader, so entries keep their name)."""
    scanned = Counter()
    original = data_module.iter_samples

    def counting(shard, *args, **kwargs):
        scanned[Path(shard).name] += 1
        return original(shard, *args, **kwargs)

    monkeypatch.setattr(data_module, "iter_samples", counting)
    return scanned


def _view(ds) -> tuple:
    return (list(ds.keys), [ds.captions(i) for i in range(len(ds))], ds.index_rejects, ds.shard_ranges,
            ds.fingerprint, [ds.read_image_bytes(i) for i in range(len(ds))])


def test_index_cache_is_reused_and_follows_changed_shards(tmp_path, samples, count_scans):
    spec = write_wds_dataset(tmp_path / "d", samples, per_shard=5)  # 00000..00002
    first = _view(open_dataset(spec))
    assert count_scans == {"00000.tar": 1, "00001.tar": 1, "00002.tar": 1}
    entries = sorted(p.name for p in (tmp_path / "d" / ".rdkd-index").iterdir())
    assert len(entries) == 3 and entries[0].startswith("00000.tar.")
    assert _view(open_dataset(spec)) == first and sum(count_scans.values()) == 3  # read, not scanned

    # a shard rewritten with other content (another size): only it is scanned again
    changed = list(samples[5:10])
    changed[1] = Sample(changed[1].key, changed[1].data, ("a new caption for this one",), changed[1].ext)
    write_tar(tmp_path / "d" / "00001.tar", [m for s in changed for m in sample_members(s)])
    again = open_dataset(spec)
    assert count_scans["00001.tar"] == 2 and sum(count_scans.values()) == 4
    assert again.captions(6) == ("a new caption for this one",) and again.fingerprint != first[4]
    assert len(list((tmp_path / "d" / ".rdkd-index").iterdir())) == 3  # the stale entry was replaced
    # the same size and a new mtime (touched, or copied over with the same bytes): scanned again
    stat = os.stat(tmp_path / "d" / "00002.tar")
    os.utime(tmp_path / "d" / "00002.tar", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert _view(open_dataset(spec))[4] == again.fingerprint and count_scans["00002.tar"] == 2


def test_index_cache_falls_back_to_the_user_folder_and_can_be_turned_off(tmp_path, samples, count_scans,
                                                                        monkeypatch):
    spec = write_wds_dataset(tmp_path / "d", samples[:4], per_shard=2)
    (tmp_path / "d" / ".rdkd-index").write_text("not a folder")  # stands in for a read-only dataset folder
    first = _view(open_dataset(spec))
    assert len(list((tmp_path / "user-cache" / "rdkd" / "index").iterdir())) == 2
    assert _view(open_dataset(spec)) == first and sum(count_scans.values()) == 2
    monkeypatch.setenv(data_module.INDEX_CACHE_ENV, "off")
    assert _view(open_dataset(spec)) == first and sum(count_scans.values()) == 4


def test_fingerprint_is_the_documented_hash_of_the_unit_fingerprints(tmp_path, samples):
    """Recomputed from FORMAT.md's definition with plain hashlib, rejects included."""
    members = [m for s in samples[:3] for m in sample_members(s)] + [("bad.jpg", samples[0].data),
                                                                        ("bad.txt", b"\xff")]
    write_tar(tmp_path / "00000.tar", members)
    write_tar(tmp_path / "00001.tar", [m for s in samples[3:5] for m in sample_members(s)])
    ds = open_dataset(DataSpec(f"{tmp_path}/{{00000..00001}}.tar"))

    def strings(digest, values: list[str]) -> None:
        encoded = [v.encode() for v in values]
        digest.update(np.packbits(np.ones(len(values), bool)).tobytes())
        digest.update(np.array([len(e) for e in encoded], "<i8").tobytes() + b"".join(encoded))

    def unit(candidates: list[tuple[str, str | None, list[str], list[str]]]) -> bytes:
        digest = hashlib.sha256(b"rdkd-index-unit-v1\0")
        strings(digest, [c[0] for c in candidates])
        problems = [c[1] for c in candidates]
        digest.update(np.packbits([p is not None for p in problems]).tobytes())
        digest.update(np.array([len((p or "").encode()) for p in problems], "<i8").tobytes())
        digest.update(b"".join((p or "").encode() for p in problems))
        for column in (2, 3):
            digest.update(np.array([len(c[column]) for c in candidates], "<i8").tobytes())
            strings(digest, [v for c in candidates for v in c[column]])
        return digest.digest()

    shard0 = [(s.key, None, list(s.captions), []) for s in samples[:3]] + [("bad", None, [], ["caption not UTF-8"])]
    shard1 = [(s.key, None, list(s.captions), []) for s in samples[3:5]]
    want = hashlib.sha256(b"rdkd-dataset-v2\0webdataset\0" + unit(shard0) + unit(shard1)).hexdigest()
    assert ds.fingerprint == want


# --- the Dataset API ---------------------------------------------------------------------------------


def test_keys_behave_as_a_read_only_list_backed_by_arrow(wds_dataset, samples):
    ds = open_dataset(wds_dataset)
    keys = [s.key for s in samples]
    assert isinstance(ds.keys, Keys) and len(ds.keys) == 12
    assert ds.keys[0] == keys[0] and ds.keys[-1] == keys[-1] and ds.keys[np.int64(3)] == keys[3]
    assert list(ds.keys) == keys and ds.keys == keys and ds.keys == tuple(keys) and ds.keys != keys[:-1]
    assert ds.keys[2:5] == keys[2:5] and isinstance(ds.keys[2:5], Keys)
    assert keys[4] in ds.keys and "nope" not in ds.keys
    assert pa.array(ds.keys).to_pylist() == keys and pa.array(ds.keys, pa.string()).type == pa.string()
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.keys == ds.keys and copy.captions(7) == ds.captions(7) and copy.source(7) == ds.source(7)


# --- torchrun: one scan for all ranks ---------------------------------------------------------------

_RANK_SCRIPT = """
import json, sys
from collections import Counter
from pathlib import Path
import rdkd.data as data
from rdkd import distributed

scanned = Counter()
original = data.iter_samples
def counting(shard, *args, **kwargs):
    scanned[Path(shard).name] += 1
    return original(shard, *args, **kwargs)
data.iter_samples = counting
info = distributed.setup("cpu")
ds = data.open_dataset(data.DataSpec(sys.argv[1]))
print(json.dumps({"rank": info.rank, "scanned": sum(scanned.values()), "keys": list(ds.keys),
                  "fingerprint": ds.fingerprint}))
distributed.cleanup()
"""


@pytest.mark.slow
def test_ranks_under_torchrun_scan_the_dataset_once(tmp_path, samples):
    spec = write_wds_dataset(tmp_path / "d", samples, per_shard=4)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         spec.path], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["scanned"] for r in ranks] == [3, 0]  # rank 0 scanned the 3 shards; rank 1 read the cache
    assert ranks[0]["keys"] == ranks[1]["keys"] == [s.key for s in samples]
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]


# --- the vectorised join -----------------------------------------------------------------------------


def _rows_by_scanning(cache: TeacherCache) -> dict[str, tuple[int, int, int, int]]:
    """key -> (image row, views, text row, captions), read off the shard files row by row."""
    def runs(keys: list[str]) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for row, key in enumerate(keys):
            start, count = found.get(key, (row, 0))
            found[key] = (start, count + 1)
        return found

    images = runs([k for keys, _ in cache.iter_images() for k in keys])
    texts = runs([k for keys, _ in cache.iter_texts() for k in keys])
    return {key: (*images[key], *texts[key]) for key in images}


def _per_key_join(keys: list[str], cache: TeacherCache):
    """The join key by key: ``find``, and for a key without rows whether the cache rejected it."""
    rejected = set(cache.rejected_keys)
    entries, rows, skipped = [], [], Counter()
    for i, key in enumerate(keys):
        entry = cache.find(key)
        if entry is None:
            skipped["rejected by the cache" if key in rejected else "not in the cache"] += 1
            continue
        entries.append(i)
        rows.append((entry.image_rows.start, len(entry.image_rows), entry.text_rows.start, len(entry.text_rows)))
    return entries, rows, dict(skipped)


def _assert_lookup_matches(cache: TeacherCache, keys: list[str], result) -> None:
    truth = _rows_by_scanning(cache)
    for i, key in enumerate(keys):
        entry = cache.find(key)
        if key not in truth:
            assert entry is None and not result.found[i], key
            continue
        assert result.found[i] and entry is not None, key
        got = (result.image_row[i], result.image_count[i], result.text_row[i], result.text_count[i])
        assert got == truth[key] == (entry.image_rows.start, len(entry.image_rows), entry.text_rows.start,
                                     len(entry.text_rows)), key


def test_lookup_aligned_and_hashed_equal_find(tmp_path):
    write_cache(tmp_path, "float32", shard_sizes=(3, 0, 4))
    cache = TeacherCache.open(tmp_path)
    # the dataset the shards were made from: each shard's images, then its rejected sample
    keys = ["img-0000", "img-0001", "img-0002", "bad-0", "bad-1", "img-0005", "img-0006", "img-0007",
            "img-0008", "bad-2"]
    aligned, hashed = cache._aligned_lookup(pa.array(keys, pa.large_string())), cache._hash_lookup(
        pa.array(keys, pa.large_string()))
    assert aligned is not None
    for name in ("found", "image_row", "image_count", "text_row", "text_count"):
        np.testing.assert_array_equal(getattr(aligned, name), getattr(hashed, name), err_msg=name)
    _assert_lookup_matches(cache, keys, cache.lookup(keys))
    # not the cache's dataset (reordered within a shard, unknown keys, fewer entries): the hash join
    for other in (keys[:1] + keys[2:3] + keys[1:2] + keys[3:], ["nope"] + keys[1:], keys[:-1]):
        assert cache._aligned_lookup(pa.array(other, pa.large_string())) is None
        _assert_lookup_matches(cache, other, cache.lookup(other))
    assert cache.lookup([]).found.shape == (0,)


@pytest.fixture(scope="module")
def bad_wds_cache(tmp_path_factory, tiny_teacher):
    """A webdataset with index and decode rejects, and its cache (cache shard j = data shard j)."""
    from rdkd.stages.extract_teacher import extract_teacher

    root = tmp_path_factory.mktemp("bad-wds")
    spec, _, _ = _bad_webdataset(root / "wds")
    extract_teacher(spec, tiny_teacher, root / "cache", batch_size=4, workers=0, max_reject_fraction=1.0,
                    progress=False)
    return spec, root / "cache"


@pytest.fixture(scope="module")
def csv_cache(tmp_path_factory, csv_dataset, tiny_teacher):
    """The CSV dataset's cache, shards of 4 rows, 2 views."""
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("csv-cache") / "cache"
    extract_teacher(csv_dataset, tiny_teacher, out, **REFERENCE)
    return csv_dataset, out


@pytest.mark.parametrize("which", ["bad_wds_cache", "csv_cache"])
def test_pair_dataset_join_equals_the_per_key_join(which, request):
    spec, root = request.getfixturevalue(which)
    cache = TeacherCache.open(root)
    data = open_dataset(spec)
    keys = pa.array(data.keys)
    assert cache._aligned_lookup(keys) is not None  # the shard-by-shard path is the one taken
    pairs = PairDataset(data, None, ImageCfg(size=(32, 32), mean=(0, 0, 0), std=(1, 1, 1)), seed=0, caches=[cache])
    entries, rows, skipped = _per_key_join(list(data.keys), cache)
    assert pairs.entries.tolist() == entries and pairs.skipped_at_join == skipped
    [cache_rows] = pairs.cache_rows  # one cache: [entries, (first image row, views, first caption row)]
    assert [(i, v, t) for i, v, t, _ in rows] == [tuple(r) for r in cache_rows.tolist()]
    assert pairs.entries.dtype == np.int64
    if which == "bad_wds_cache":  # decode rejects are dataset entries the cache holds no rows for
        assert skipped == {"rejected by the cache": 4}
        # the kept copy of a duplicated key trains, though its key is in the rejects (the later copy)
        assert "000000" in cache.rejected_keys and list(data.keys).index("000000") in entries
    _assert_lookup_matches(cache, list(data.keys), cache.lookup(data.keys))
    # another order of the same keys, and keys the cache never saw: the hash join, same answers
    shuffled = list(np.random.default_rng(0).permutation(list(data.keys)))
    _assert_lookup_matches(cache, shuffled + ["never-seen"], cache.lookup(shuffled + ["never-seen"]))
    # the same keys permuted, as many as the shards' entries: each shard's keys must be
    # compared (a reject-free shard holds as many keys as its entries, in another order)
    _assert_lookup_matches(cache, shuffled, cache.lookup(shuffled))


# --- index.arrow -----------------------------------------------------------------------------------


def test_finalize_writes_the_index_a_row_by_row_build_would(tmp_path):
    write_cache(tmp_path, "float16", views=3, shard_sizes=(5, 0, 2, 7))
    cache = TeacherCache.open(tmp_path)
    index = pa.ipc.open_file(pa.memory_map(str(tmp_path / fmt.INDEX))).read_all()
    truth = _rows_by_scanning(cache)
    want = sorted(((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big"), *rows)
                   for k, rows in truth.items()), key=lambda r: r[0])
    assert [tuple(r.values()) for r in index.to_pylist()] == want
    assert index.schema == fmt.INDEX_SCHEMA and cache.manifest["index"]["rows"] == 14 == cache.num_images
    assert cache.verify() == []
    parts = [writer.read_part(tmp_path, j) for j in range(4)]
    assert writer.build_index(tmp_path, parts).equals(index)  # the same again from the shard records
