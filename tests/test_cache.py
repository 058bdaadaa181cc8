"""The teacher-embedding cache: writer/reader round trips, lookup, checks, and FORMAT.md's snippet."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rdkd.cache import TeacherCache
from rdkd.cache import format as fmt
from rdkd.cache import writer
from rdkd.errors import UserError

FORMAT_MD = Path(__file__).resolve().parents[1] / "cache" / "FORMAT.md"


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run ``rdkd ARGS`` in-process as the console script does; (exit code, stdout, stderr)."""
    from rdkd import cli

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.argv", ["rdkd", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_cache(root: Path, storage_dtype: str = "float16", dim: int = 16, views: int = 2,
                shard_sizes=(3, 0, 4), seed: int = 0) -> dict:
    """A synthetic cache: per shard, images with `views` rows and 1-3 captions each.

    Returns the float32 embeddings written, keyed by (key, view) and (key, caption index).
    """
    rng = np.random.default_rng(seed)
    parts, truth = [], {"images": {}, "texts": {}, "crops": {}, "order": []}
    entry = 0
    for shard, size in enumerate(shard_sizes):
        keys = [f"img-{entry + i:04d}" for i in range(size)]
        image_keys = [k for k in keys for _ in range(views)]
        image_emb = _unit(rng, len(image_keys), dim)
        crops = rng.uniform(0, 100, size=(len(image_keys), 4)).astype(np.float32)
        flips = rng.random(len(image_keys)) < 0.5
        n_caps = [1 + (entry + i) % 3 for i in range(size)]
        text_keys = [k for k, n in zip(keys, n_caps) for _ in range(n)]
        caption_index = [c for n in n_caps for c in range(n)]
        captions = [f"{k} caption {c}" for k, c in zip(text_keys, caption_index)]
        text_emb = _unit(rng, len(text_keys), dim)
        images = writer.image_table(image_keys, np.tile(np.arange(views), size), crops, flips,
                                    fmt.to_storage(image_emb, storage_dtype), storage_dtype)
        texts = writer.text_table(text_keys, np.array(caption_index), captions,
                                  fmt.to_storage(text_emb, storage_dtype), storage_dtype)
        rejects = [{"key": f"bad-{shard}", "source": f"shard {shard}", "reason": "not an image"}]
        parts.append(writer.write_shard(root, shard, range(entry, entry + size + 1), "test-id", images, texts, rejects))
        for row, key in enumerate(image_keys):
            truth["images"][(key, row % views)] = image_emb[row]
            truth["crops"][(key, row % views)] = (crops[row], flips[row])
        for row, (key, c) in enumerate(zip(text_keys, caption_index)):
            truth["texts"][(key, c)] = text_emb[row]
        truth["order"].extend(keys)
        entry += size + 1
    header = {"cache_id": "test-id", "rdkd_version": "test", "dim": dim, "storage_dtype": storage_dtype,
              "views": {"count": views}, "teacher": {"logit_scale": 42.0},
              "dataset": {"fingerprint": "data-fp"}}
    writer.finalize(root, header, parts, [{"key": "dup", "source": "index", "reason": "duplicate key"}])
    return truth


TOLERANCE = {"float32": 0.0, "float16": 1e-3, "bfloat16": 8e-3}


@pytest.mark.parametrize("storage_dtype", fmt.STORAGE_DTYPES)
def test_round_trip(tmp_path, storage_dtype):
    truth = write_cache(tmp_path, storage_dtype)
    cache = TeacherCache.open(tmp_path)
    assert cache.verify() == []
    assert (cache.dim, cache.views, cache.logit_scale, cache.dataset_fingerprint) == (16, 2, 42.0, "data-fp")
    assert cache.num_images == 7 and cache.num_image_rows == 14 and cache.num_texts == len(truth["texts"])
    assert cache.rejected_keys == ["dup", "bad-0", "bad-1", "bad-2"]
    for key in truth["order"]:
        entry = cache.find(key)
        assert entry is not None and len(entry.image_rows) == 2
        got = cache.image_embeddings(np.array(entry.image_rows))
        assert got.dtype == torch.float32
        want = np.stack([truth["images"][(key, v)] for v in range(2)])
        np.testing.assert_allclose(got.numpy(), want, atol=TOLERANCE[storage_dtype], rtol=0)
        # exactly the cast the writer documents
        np.testing.assert_array_equal(got.numpy(), fmt.from_storage(fmt.to_storage(want, storage_dtype), storage_dtype))
        texts = cache.text_embeddings(np.array(entry.text_rows)).numpy()
        want_t = np.stack([truth["texts"][(key, c)] for c in range(len(entry.text_rows))])
        np.testing.assert_allclose(texts, want_t, atol=TOLERANCE[storage_dtype], rtol=0)
        assert cache.captions(entry.text_rows) == [f"{key} caption {c}" for c in range(len(entry.text_rows))]
        crop, flip = cache.view_params(np.array(entry.image_rows))
        for v in range(2):
            np.testing.assert_array_equal(crop[v], truth["crops"][(key, v)][0])
            assert flip[v] == truth["crops"][(key, v)][1]
    assert cache.find("img-9999") is None and cache.find("bad-0") is None
    # iteration in order, shard by shard (the empty shard included)
    keys = [k for shard_keys, _ in cache.iter_images() for k in shard_keys[::2]]
    assert keys == truth["order"]
    # rows of several shards, in any order, in one gather
    rows = np.array([13, 0, 7, 6])
    np.testing.assert_array_equal(cache.image_embeddings(rows)[1], cache.image_embeddings([0])[0])
    assert cache.image_keys(rows) == ["img-0008", "img-0000", "img-0005", "img-0005"]


def test_embeddings_are_zero_copy_views_of_the_mapped_files(tmp_path):
    write_cache(tmp_path, "bfloat16")
    cache = TeacherCache.open(tmp_path)
    shard = next(cache.image_shards())
    assert not shard.embeddings.flags.owndata and not shard.embeddings.flags.writeable
    view = cache.torch_view(shard)
    assert view.dtype == torch.bfloat16 and view.data_ptr() == shard.embeddings.ctypes.data
    np.testing.assert_array_equal(view.float().numpy(), cache.image_embeddings(np.arange(len(view))).numpy())


def test_shards_are_opened_lazily_and_a_bounded_number_stay_open(tmp_path):
    truth = write_cache(tmp_path, "float32")
    cache = TeacherCache.open(tmp_path)
    assert len(cache.images._open) == 0  # opening reads the manifest and the index only
    cache.images.max_open = 1
    rows = [cache.find(key).image_rows[0] for key in truth["order"]]  # rows of shards 0 and 2
    got = cache.image_embeddings(np.array(rows[::-1])).numpy()[::-1]
    np.testing.assert_array_equal(got, np.stack([truth["images"][(k, 0)] for k in truth["order"]]))
    assert len(cache.images._open) == 1


def test_hash_collisions_are_resolved_by_key(tmp_path, monkeypatch):
    monkeypatch.setattr(fmt, "key_hashes", lambda keys: np.full(len(keys), 7, np.uint64))  # every key collides
    truth = write_cache(tmp_path, "float32")
    cache = TeacherCache.open(tmp_path)
    for key in truth["order"]:
        entry = cache.find(key)
        np.testing.assert_array_equal(cache.image_embeddings([entry.image_rows[1]])[0], truth["images"][(key, 1)])
    assert cache.find("other") is None
    rows = cache.lookup(["other"] + truth["order"][::-1])  # in bulk: every key tried against all 7 slots
    assert not rows.found[0] and rows.found[1:].all()
    assert [cache.image_keys([r])[0] for r in rows.image_row[1:]] == truth["order"][::-1]


def test_open_refuses_missing_partial_and_foreign(tmp_path):
    with pytest.raises(UserError, match="no teacher cache"):
        TeacherCache.open(tmp_path / "nope")
    write_cache(tmp_path / "c")
    manifest = tmp_path / "c" / fmt.MANIFEST
    text = manifest.read_text()
    manifest.unlink()
    with pytest.raises(UserError, match="not a complete teacher cache"):
        TeacherCache.open(tmp_path / "c")
    manifest.write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        TeacherCache.open(tmp_path / "c")
    manifest.write_text(text.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(UserError, match="format version 99"):
        TeacherCache.open(tmp_path / "c")
    manifest.write_text(text)
    (tmp_path / "c" / "images" / "part-00002.arrow").unlink()
    with pytest.raises(UserError, match="part-00002.arrow is missing"):
        TeacherCache.open(tmp_path / "c")


def test_verify_finds_damage_and_the_cli_reports_it(tmp_path, run_cli):
    write_cache(tmp_path)
    code, out, err = run_cli("cache", "verify", str(tmp_path))
    assert code == 0 and "ok" in out
    code, out, err = run_cli("cache", "info", str(tmp_path))
    assert code == 0 and "test-id" in out and "exact:" in out  # no image_preprocess field: exact
    shard = tmp_path / "texts" / "part-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert TeacherCache.open(tmp_path).verify() == ["texts/part-00002.arrow: sha256 mismatch"]
    code, out, err = run_cli("cache", "verify", str(tmp_path))
    assert code == 2 and err.strip().count("\n") == 0 and "sha256 mismatch" in err and "Traceback" not in err
    # a count that disagrees with the files
    manifest = json.loads((tmp_path / fmt.MANIFEST).read_text())
    manifest["counts"]["captions"] += 1
    (tmp_path / fmt.MANIFEST).write_text(json.dumps(manifest))
    assert any("captions" in p for p in TeacherCache.open(tmp_path).verify())


def test_the_size_check_sees_a_file_of_another_size_and_nothing_else(tmp_path):
    write_cache(tmp_path)
    cache = TeacherCache.open(tmp_path)
    assert cache.verify(sizes_only=True) == []
    shard = tmp_path / "images" / "part-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: only the sha256 can tell
    shard.write_bytes(bytes(data))
    assert TeacherCache.open(tmp_path).verify(sizes_only=True) == []
    shard.write_bytes(bytes(data) + b"\0")
    size = len(data) + 1
    assert TeacherCache.open(tmp_path).verify(sizes_only=True) == [
        f"images/part-00000.arrow: {size} bytes, manifest says {size - 1}"]
    with pytest.raises(UserError, match=r"part-00000.arrow: \d+ bytes, manifest says .*; run `rdkd cache verify"):
        TeacherCache.open(tmp_path).require_intact(sizes_only=True)
    with pytest.raises(UserError, match=r"part-00000.arrow: sha256 mismatch .*; extract it again"):
        TeacherCache.open(tmp_path).require_intact()


def test_format_md_snippet_reads_a_cache_with_plain_pyarrow(tmp_path):
    truth = write_cache(tmp_path, "bfloat16")
    text = FORMAT_MD.read_text()
    code = re.search(r"## Reading without rdkd.*?```python\n(.*?)```", text, re.S).group(1)
    assert "rdkd" not in code.replace('"artifacts/cache/', "")  # the snippet needs no rdkd
    code = re.sub(r"^root = .*$", f"root = {str(tmp_path)!r}", code, flags=re.M)
    namespace: dict = {}
    exec(compile(code, str(FORMAT_MD), "exec"), namespace)
    first = namespace["first_key"]
    assert first == truth["order"][0]
    np.testing.assert_allclose(namespace["image_vectors"][0], truth["images"][(first, 0)], atol=8e-3)
    n_caps = namespace["similarity"].shape[0]
    want = np.stack([truth["texts"][(first, c)] for c in range(n_caps)]) @ truth["images"][(first, 0)]
    np.testing.assert_allclose(namespace["similarity"], want, atol=3e-2)
    assert namespace["crop"] == pytest.approx(truth["crops"][(first, 0)][0].tolist())
    assert len(namespace["rejects"]) == 4


def _anonymous_rss_bytes() -> int:
    """Resident memory that is the process's own (mapped file pages are page cache, not counted)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def _file_rss_bytes() -> int:
    """File-backed resident memory (mapped pages) of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads its memory from /proc")
def test_reader_memory_does_not_grow_with_cache_size(tmp_path):
    # 128 MiB of embeddings; opening, looking up and gathering rows must not copy them in,
    # nor fault in the mapped pages around each row (rows are read with pread).
    dim, rows = 1024, 16384
    emb = np.zeros((rows, dim), dtype=np.float32)
    emb[:, 0] = 1.0
    keys = [f"k{i}" for i in range(rows)]
    table = writer.image_table(keys, np.zeros(rows), np.zeros((rows, 4)), np.zeros(rows, bool), emb, "float32")
    texts = writer.text_table(keys, np.zeros(rows), keys, emb, "float32")
    part = writer.write_shard(tmp_path, 0, range(rows), "big", table, texts, [])
    del emb, table, texts
    writer.finalize(tmp_path, {"cache_id": "big", "dim": dim, "storage_dtype": "float32",
                               "views": {"count": 1}, "dataset": {"fingerprint": "x"}}, [part], [])
    before, file_before = _anonymous_rss_bytes(), _file_rss_bytes()
    cache = TeacherCache.open(tmp_path)
    entries = [cache.find(f"k{i}") for i in range(0, rows, 61)]
    got = cache.image_embeddings([e.image_rows[0] for e in entries])
    grown, file_grown = _anonymous_rss_bytes() - before, _file_rss_bytes() - file_before
    assert got.shape == (len(entries), dim) and float(got[:, 0].min()) == 1.0
    assert grown < 16 * 2**20, f"reader grew by {grown / 2**20:.1f} MiB for a 128 MiB cache"
    assert file_grown < 8 * 2**20, f"mapped pages grew by {file_grown / 2**20:.1f} MiB for {len(entries)} rows"
