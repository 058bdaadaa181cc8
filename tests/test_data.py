"""rdkd.data: the three dataset formats, multi-caption grouping, bad input, decoding."""

from __future__ import annotations

import hashlib
import pickle
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from builders import (DecodedImages, Sample, image_bytes, make_image, sample_members, write_csv_dataset,
                      write_parquet_dataset, write_tar, write_wds_dataset)
from rdkd.data import DataSpec, decode_image, open_dataset
from rdkd.errors import SampleError, UserError


def path_key(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()[:32]


def reasons(ds) -> dict[str, str]:
    return {r.key: r.reason for r in ds.index_rejects}


# --- the three formats ----------------------------------------------------------------------


def test_each_format_reads_every_sample(any_dataset, samples):
    ds = open_dataset(any_dataset)
    assert len(ds) == len(samples)
    assert [ds.captions(i) for i in range(len(ds))] == [s.captions for s in samples]
    assert ds.num_captions == sum(len(s.captions) for s in samples)
    assert not ds.index_rejects and not ds.caption_drops
    for i, sample in enumerate(samples):
        assert ds.read_image_bytes(i) == sample.data
        assert ds.read_image(i).mode == "RGB"
    assert len(set(ds.keys)) == len(ds)


def test_keys_per_format(csv_dataset, wds_dataset, parquet_dataset, samples):
    # webdataset: __key__; Parquet: the key column; CSV: a hash of the path as written.
    assert open_dataset(wds_dataset).keys == [s.key for s in samples]
    assert open_dataset(parquet_dataset).keys == [s.key for s in samples]
    assert open_dataset(csv_dataset).keys == [path_key(f"images/{s.key}.{s.ext}") for s in samples]


def test_formats_detected_from_path(csv_dataset, wds_dataset, parquet_dataset):
    assert open_dataset(csv_dataset).format == "csv"
    assert open_dataset(wds_dataset).format == "webdataset"
    assert open_dataset(parquet_dataset).format == "parquet"
    assert DataSpec(str(Path(wds_dataset.path).parent)).resolved_format() == "webdataset"
    assert DataSpec(str(Path(wds_dataset.path).parent / "00000.tar")).resolved_format() == "webdataset"


def test_csv_groups_rows_of_one_image(tmp_path, samples):
    # Rows of a multi-caption image are spread through the file; they still make one entry.
    spec = write_csv_dataset(tmp_path, samples)
    lines = Path(spec.path).read_text().splitlines()
    assert len(lines) - 1 == sum(len(s.captions) for s in samples)
    ds = open_dataset(spec)
    assert len(ds) == len(samples)
    assert ds.captions(0) == ("a picture number 0, caption 0", "a picture number 0, caption 1",
                              "a picture number 0, caption 2")


def test_csv_paths_relative_to_the_file_and_options(tmp_path, samples, monkeypatch):
    spec = write_csv_dataset(tmp_path / "d", samples[:4], separator=",", name="data.csv",
                             image_column="image", caption_column="caption", key_column="id")
    monkeypatch.chdir(tmp_path)  # elsewhere than the CSV's folder
    ds = open_dataset(spec)
    assert ds.keys == [s.key for s in samples[:4]]
    assert ds.read_image_bytes(1) == samples[1].data
    assert ds.source(1) == str(tmp_path / "d" / "images" / f"{samples[1].key}.{samples[1].ext}")


def test_csv_missing_column_is_a_user_error(tmp_path, samples):
    spec = write_csv_dataset(tmp_path, samples[:2], separator=",", name="data.csv")
    with pytest.raises(UserError, match="no column 'filepath'.*separator tab"):
        open_dataset(DataSpec(spec.path))  # the default separator is tab, as in open_clip
    with pytest.raises(UserError, match="no column 'url'"):
        open_dataset(DataSpec(spec.path, separator=",", image_column="url"))


def test_webdataset_brace_pattern_and_shard_ranges(tmp_path, samples):
    spec = write_wds_dataset(tmp_path, samples, per_shard=5)  # 00000..00002: 5, 5, 2 samples
    assert spec.path.endswith("{00000..00002}.tar")
    ds = open_dataset(spec)
    assert ds.shard_ranges == [range(0, 5), range(5, 10), range(10, 12)]
    assert ds.source(7).endswith("00001.tar")
    assert open_dataset(DataSpec(spec.path.replace("00002", "00001"))).keys == [s.key for s in samples[:10]]
    assert open_dataset(DataSpec(str(tmp_path))).keys == ds.keys  # a folder of shards
    with pytest.raises(UserError, match="shard not found: .*00003.tar"):
        open_dataset(DataSpec(spec.path.replace("00002", "00003")))


def test_webdataset_parallel_scan_equals_sequential(tmp_path, samples, monkeypatch):
    monkeypatch.setenv("RDKD_INDEX_CACHE", "off")  # both opens scan: the second does not read the first's
    bad = [Sample("000005", samples[0].data, ("a duplicate key in another shard",))]
    spec = write_wds_dataset(tmp_path, samples + bad, per_shard=3)  # 5 shards
    one, pool = open_dataset(spec, workers=0), open_dataset(spec, workers=2)
    assert pool.keys == one.keys and pool.fingerprint == one.fingerprint
    assert pool.shard_ranges == one.shard_ranges and pool.index_rejects == one.index_rejects
    assert [(r.key, r.reason) for r in pool.index_rejects] == [("000005", "duplicate key")]
    assert pool.read_image_bytes(10) == samples[10].data


def test_webdataset_reads_members_in_any_order_and_skips_extras(tmp_path, samples):
    members = []
    for s in samples[:3]:
        m = sample_members(s)
        members += [m[2], m[1], m[0]]  # json, txt, image
    members.append(("README", b"not a sample"))
    spec = DataSpec(str(write_tar(tmp_path / "a.tar", members)))
    ds = open_dataset(spec)
    assert ds.keys == [s.key for s in samples[:3]]
    assert [ds.read_image_bytes(i) for i in range(3)] == [s.data for s in samples[:3]]


def test_parquet_variants(tmp_path, samples):
    # A single caption column and no key column: keys are "<file stem>:<row>".
    spec = write_parquet_dataset(tmp_path / "a", samples, key_column=None, list_captions=False,
                                 image_column="jpg", caption_column="txt")
    ds = open_dataset(DataSpec(spec.path))
    assert ds.keys[:2] == ["part-00000:0", "part-00000:1"] and ds.keys[7] == "part-00001:0"
    assert ds.captions(0) == samples[0].captions[:1]
    assert ds.read_image_bytes(11) == samples[11].data
    # Nested folders (Hugging Face layout): found recursively, keys carry the relative path.
    write_parquet_dataset(tmp_path / "n" / "data", samples[:2], key_column=None)
    ds = open_dataset(DataSpec(str(tmp_path / "n")))
    assert ds.keys == ["data/part-00000:0", "data/part-00000:1"]
    # A brace pattern of Parquet files.
    pattern = DataSpec(str(tmp_path / "a" / "part-{00000..00001}.parquet"))
    assert pattern.resolved_format() == "parquet"
    assert open_dataset(pattern).keys == open_dataset(DataSpec(spec.path)).keys
    # Hugging Face datasets' image struct {bytes, path}, one file given directly.
    table = pa.table({
        "image": pa.array([{"bytes": s.data, "path": None} for s in samples[:3]],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "text": ["x", "y", "z"],
    })
    pq.write_table(table, tmp_path / "hf.parquet")
    ds = open_dataset(DataSpec(str(tmp_path / "hf.parquet")))
    assert ds.read_image_bytes(2) == samples[2].data and ds.captions(2) == ("z",)
    with pytest.raises(UserError, match="no column 'caption'"):
        open_dataset(DataSpec(str(tmp_path / "hf.parquet"), caption_column="caption"))


def test_parquet_reads_images_lazily_one_row_group_at_a_time(parquet_dataset, samples):
    ds = open_dataset(parquet_dataset)
    assert ds.read_image_bytes(4) == samples[4].data  # file 0, row group 1
    assert ds._row_group_cache[0] == (0, 1)
    assert ds.read_image_bytes(9) == samples[9].data  # file 1, row group 0
    assert ds._row_group_cache[0] == (1, 0)


# --- user errors ----------------------------------------------------------------------------


def test_missing_dataset_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="dataset not found"):
        open_dataset(DataSpec(str(tmp_path / "nope.csv")))
    with pytest.raises(UserError, match="dataset not found"):
        open_dataset(DataSpec(str(tmp_path / "nope")))
    with pytest.raises(UserError, match="unknown dataset format 'zip'"):
        open_dataset(DataSpec(str(tmp_path), format="zip"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="cannot tell the format"):
        open_dataset(DataSpec(str(tmp_path / "x.json")))
    with pytest.raises(UserError, match="no .parquet or .tar"):
        open_dataset(DataSpec(str(tmp_path)))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read Parquet file"):
        open_dataset(DataSpec(str(tmp_path / "bad.parquet")))


# --- bad samples ----------------------------------------------------------------------------


def test_csv_caption_not_utf8_and_empty(tmp_path, samples):
    (tmp_path / "images").mkdir()
    for name in ("latin1", "empty", "ok"):
        (tmp_path / "images" / f"{name}.jpg").write_bytes(samples[0].data)
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"filepath\ttitle\n"
                    b"images/latin1.jpg\tcaf\xe9 au lait\n"
                    b"images/empty.jpg\t \n"
                    b"images/ok.jpg\tok\n")
    ds = open_dataset(DataSpec(str(bad)))
    assert ds.keys == [path_key("images/ok.jpg")]
    assert reasons(ds) == {path_key("images/latin1.jpg"): "caption not UTF-8",
                           path_key("images/empty.jpg"): "empty caption"}


def test_csv_rejects_and_caption_drops(tmp_path, samples):
    (tmp_path / "images").mkdir()
    for s in samples[:3]:
        (tmp_path / "images" / f"{s.key}.jpg").write_bytes(s.data)
    path = tmp_path / "d.tsv"
    path.write_bytes(
        b"filepath\ttitle\tkey\n"
        b"images/000000.jpg\tfirst\tk0\n"
        b"images/000001.jpg\tsecond\tk0\n"       # duplicate key, another image: rejected
        b"images/000000.jpg\t\tk0\n"             # empty extra caption of a kept image: dropped
        b"images/000002.jpg\t\xff\xfe\tk2\n"     # its only caption is not UTF-8: rejected
        b"images/gone.jpg\tthere is no file\tk3\n"
    )
    ds = open_dataset(DataSpec(str(path), key_column="key"))
    assert ds.keys == ["k0", "k3"]
    assert ds.captions(0) == ("first",)
    assert [(r.key, r.reason) for r in ds.index_rejects] == [("k0", "duplicate key"), ("k2", "caption not UTF-8")]
    assert ds.index_rejects[0].source.endswith("000001.jpg")
    assert [(r.key, r.reason) for r in ds.caption_drops] == [("k0", "empty caption")]
    with pytest.raises(SampleError, match="image file not found"):
        ds.read_image_bytes(1)  # missing files surface at read time, not while indexing


def test_csv_short_row_and_empty_path_are_rejected_and_bom_is_ignored(tmp_path, samples):
    (tmp_path / "a.jpg").write_bytes(samples[0].data)
    path = tmp_path / "d.tsv"
    path.write_bytes("\ufefffilepath\ttitle\n".encode() + b"a.jpg\tfine\njust-one-column\n\tno path\n")
    ds = open_dataset(DataSpec(str(path)))
    assert ds.keys == [path_key("a.jpg")]
    assert [(r.key, r.reason) for r in ds.index_rejects] == [
        ("line 3", "malformed CSV row: 1 columns, the header has 2"), ("line 4", "empty image path")]


def test_csv_separator_names_and_long_captions(tmp_path, samples):
    (tmp_path / "a.jpg").write_bytes(samples[0].data)
    long_caption = "word " * 60_000  # 300 kB, above the csv module's default field limit
    (tmp_path / "d.tsv").write_text(f"filepath\ttitle\na.jpg\t{long_caption}\n")
    for typed in ("\t", "\\t", "tab"):  # a tab, or what a shell passes for '\t'
        assert open_dataset(DataSpec(str(tmp_path / "d.tsv"), separator=typed)).captions(0) == (long_caption.strip(),)
    with pytest.raises(UserError, match="separator must be one character"):
        open_dataset(DataSpec(str(tmp_path / "d.tsv"), separator="::"))


def test_webdataset_bad_samples(tmp_path, samples):
    good = samples[:4]
    members = [m for s in good[:2] for m in sample_members(s)]
    members += [("000099.jpg", good[2].data), ("000099.txt", b"  \n\n")]          # empty caption
    members += [("000098.jpg", good[2].data), ("000098.txt", b"caf\xe9")]         # not UTF-8
    members += [("000097.txt", b"a caption without an image")]                    # no image
    members += [("000096.png", good[1].data)]                                     # no caption
    members += [("000095.jpg", good[0].data), ("000095.txt", b"one\n\ntwo\n")]    # two captions
    write_tar(tmp_path / "00000.tar", members)
    write_tar(tmp_path / "00001.tar", sample_members(good[0]) + sample_members(good[3]))  # duplicate key
    ds = open_dataset(DataSpec(f"{tmp_path}/{{00000..00001}}.tar"))
    assert ds.keys == ["000000", "000001", "000095", "000003"]
    assert ds.captions(2) == ("one", "two")
    assert reasons(ds) == {"000099": "empty caption", "000098": "caption not UTF-8",
                           "000097": "no image in sample", "000096": "no caption in sample",
                           "000000": "duplicate key"}
    assert ds.shard_ranges == [range(0, 3), range(3, 4)]


def test_webdataset_broken_tar(tmp_path, samples):
    path = write_tar(tmp_path / "00000.tar", [m for s in samples[:4] for m in sample_members(s)])
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        offsets = {m.name: m for m in tar.getmembers()}
    last_image, third = offsets["000003.jpg"], offsets["000002.webp"]
    # Cut the file in the middle of the last image: the first three samples survive.
    path.write_bytes(data[:last_image.offset_data + last_image.size // 2])
    ds = open_dataset(DataSpec(str(path)))
    assert ds.keys == ["000000", "000001", "000002"]
    assert len(ds.index_rejects) == 1 and ds.index_rejects[0].reason.startswith("broken tar member")
    # A corrupt header in the middle: samples before it are kept, the rest of the shard is rejected.
    corrupt = bytearray(data)
    corrupt[third.offset:third.offset + 512] = b"\x07" * 512
    (tmp_path / "c.tar").write_bytes(bytes(corrupt))
    ds = open_dataset(DataSpec(str(tmp_path / "c.tar")))
    assert ds.keys == ["000000", "000001"]
    assert [r.reason.startswith("broken tar member") for r in ds.index_rejects] == [True]
    # A shard cut after indexing: the read fails for that sample only.
    write_tar(tmp_path / "d.tar", sample_members(samples[0]))
    ds = open_dataset(DataSpec(str(tmp_path / "d.tar")))
    (tmp_path / "d.tar").write_bytes(b"")
    with pytest.raises(SampleError, match="broken tar member"):
        ds.read_image_bytes(0)


def test_parquet_bad_rows(tmp_path, samples):
    table = pa.table({
        "image": [samples[0].data, samples[1].data, samples[2].data, None, samples[3].data],
        "caption": [["a", ""], [" "], None, ["no image"], ["dup"]],
        "key": ["k0", "k1", "k2", "k3", "k0"],
    })
    pq.write_table(table, tmp_path / "x.parquet")
    ds = open_dataset(DataSpec(str(tmp_path / "x.parquet")))
    assert ds.keys == ["k0", "k3"]
    assert ds.captions(0) == ("a",)
    assert reasons(ds) == {"k1": "empty caption", "k2": "empty caption", "k0": "duplicate key"}
    assert [(r.key, r.reason) for r in ds.caption_drops] == [("k0", "empty caption")]
    assert ds.index_rejects[-1].source.endswith("x.parquet#4")
    with pytest.raises(SampleError, match="empty image"):
        ds.read_image_bytes(1)


# --- decoding -------------------------------------------------------------------------------


def test_decode_bad_bytes():
    jpeg = image_bytes(make_image(1, (64, 64)))
    with pytest.raises(SampleError, match="empty image file"):
        decode_image(b"")
    with pytest.raises(SampleError, match="not an image"):
        decode_image(b"hello, this is text and no image at all")
    with pytest.raises(SampleError, match="truncated or corrupt"):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(SampleError, match="image too large: 64x64"):
        decode_image(jpeg, max_pixels=64 * 64 - 1)
    assert decode_image(jpeg, max_pixels=64 * 64).size == (64, 64)


def huge_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels with almost no data (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [20_000, 60_000])  # above our limit; above PIL's own bomb error too
def test_decompression_bomb_is_a_sample_error(side):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning escapes either
        with pytest.raises(SampleError, match="image too large"):
            decode_image(huge_png(side, side))


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P", "RGBA", "LA", "I;16", "I", "F"])
def test_decode_converts_modes_to_rgb(mode):
    source = make_image(3, (24, 20), mode="RGBA" if mode in ("RGBA", "LA") else "RGB")
    image = source.convert(mode) if mode not in ("RGBA",) else source
    fmt = {"CMYK": "JPEG", "I": "TIFF", "F": "TIFF"}.get(mode, "PNG")
    decoded = decode_image(image_bytes(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (24, 20)
    if mode == "L":
        assert np.array_equal(np.asarray(decoded)[..., 0], np.asarray(image))


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    decoded = np.asarray(decode_image(image_bytes(rgba, "PNG")))
    assert tuple(decoded[0, 0]) == (10, 20, 30)
    assert tuple(decoded[3, 3]) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    decoded = np.asarray(decode_image(image_bytes(palette, "PNG")))
    assert tuple(decoded[0, 0]) == (255, 255, 255) and tuple(decoded[1, 1]) == (200, 100, 50)


def test_sixteen_bit_greyscale_keeps_its_range():
    array = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    decoded = np.asarray(decode_image(image_bytes(Image.fromarray(array), "PNG")))
    assert decoded[..., 0].max() == 255 and decoded[..., 0].min() == 0
    assert len(np.unique(decoded[..., 0])) > 100


def test_decode_errors_surface_per_sample_from_the_dataset(tmp_path, samples):
    bad = [
        Sample("zero", b"", ("zero bytes",)),
        Sample("trunc", samples[0].data[:100], ("truncated jpeg",)),
        Sample("text", b"plain text, not an image", ("not an image",)),
        Sample("bomb", huge_png(20_000, 20_000), ("huge",), ext="png"),
        Sample("cmyk", image_bytes(make_image(5).convert("CMYK")), ("cmyk is fine",)),
    ]
    for spec in (write_csv_dataset(tmp_path / "c", bad), write_wds_dataset(tmp_path / "w", bad),
                 write_parquet_dataset(tmp_path / "p", bad)):
        ds = open_dataset(spec)
        assert len(ds) == 5 and not ds.index_rejects  # found at decode time, not indexing
        problems = []
        for i in range(4):
            with pytest.raises(SampleError) as err:
                ds.read_image(i)
            problems.append(err.value.reason.split(":")[0])
        assert problems == ["empty image file", "truncated or corrupt image", "not an image", "image too large"]
        assert ds.read_image(4).mode == "RGB"


# --- fingerprint and pickling ---------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive(tmp_path, samples):
    a = write_wds_dataset(tmp_path / "a", samples)
    b = write_wds_dataset(tmp_path / "b", samples)
    fa = open_dataset(a).fingerprint
    assert fa == open_dataset(a).fingerprint == open_dataset(b).fingerprint  # not path-dependent
    changed = list(samples)
    changed[5] = Sample(samples[5].key, samples[5].data, ("a different caption",), samples[5].ext)
    assert open_dataset(write_wds_dataset(tmp_path / "c", changed)).fingerprint != fa
    assert open_dataset(write_wds_dataset(tmp_path / "d", samples[:-1])).fingerprint != fa
    reordered = samples[1:] + samples[:1]
    assert open_dataset(write_wds_dataset(tmp_path / "e", reordered)).fingerprint != fa
    assert open_dataset(write_parquet_dataset(tmp_path / "f", samples)).fingerprint != fa  # format counts


def test_dataset_pickles_without_open_handles(any_dataset, samples):
    ds = open_dataset(any_dataset)
    ds.read_image_bytes(0)  # opens a handle / caches a row group in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the index only; no image bytes, no file objects
    copy = pickle.loads(blob)
    assert copy.keys == ds.keys and copy.fingerprint == ds.fingerprint
    assert copy.read_image_bytes(11) == samples[11].data


def test_torch_dataloader_workers_decode(wds_dataset, samples):
    import torch

    loader = torch.utils.data.DataLoader(DecodedImages(open_dataset(wds_dataset)), batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(samples)
