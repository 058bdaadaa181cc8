"""--decode device, run on CPU tensors: the stages hand encoded images to rdkd.pixels.DeviceDecoder
and get the fast path's pixels back (within a stated tolerance), bad images rejected or skipped
as in the workers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import builders
from rdkd.cache import TeacherCache, ViewConfig
from rdkd.errors import UserError
from rdkd.stages.extract_teacher import extract_teacher
from rdkd.training import ImageCfg, PairDataset

TINY_STUDENT = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory):
    """The standard samples (JPEG, PNG, WebP) as larger images, and one JPEG whose header reads
    but whose data is cut short: the workers reject it on decoding, the device path after."""
    samples = []
    for i, sample in enumerate(builders.standard_samples(8)):
        image = builders.make_image(i, (160 + 8 * i, 120 + 4 * i))
        samples.append(dataclasses.replace(sample, data=builders.image_bytes(image, builders._EXT_FORMAT[sample.ext])))
    cut = builders.image_bytes(builders.make_image(99, (200, 150)), "JPEG")
    samples.append(builders.Sample("000099", cut[: len(cut) // 2], ("a cut image",), "jpg"))
    return builders.write_csv_dataset(tmp_path_factory.mktemp("photos"), samples)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, photo_dataset, tiny_teacher) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    made = {}
    for decode in ("workers", "device"):
        made[decode] = root / decode
        extract_teacher(photo_dataset, tiny_teacher, made[decode], views=ViewConfig(count=3), batch_size=4,
                        workers=0, storage_dtype="float32", preprocess="fast", decode=decode, progress=False,
                        max_reject_fraction=0.5)
    return made


def _image_table(root: Path):
    cache = TeacherCache.open(root)
    rows = np.arange(cache.num_image_rows)
    return cache, cache.image_keys(rows), cache.image_embeddings(rows).numpy()


def test_device_extraction_matches_the_workers_fast_cache(caches):
    """Same keys, boxes, flips, captions and rejects; image embeddings at cosine >= 0.999
    (the pixels differ by at most a level or so: two libjpeg builds, float against uint8 resize)."""
    workers, keys_w, emb_w = _image_table(caches["workers"])
    device, keys_d, emb_d = _image_table(caches["device"])
    assert list(keys_w) == list(keys_d) and workers.manifest["image_preprocess"] == "fast"
    rows = np.arange(workers.num_image_rows)
    for a, b in zip(workers.view_params(rows), device.view_params(rows)):
        assert np.array_equal(a, b)
    assert np.array_equal(workers.text_embeddings(np.arange(workers.texts.num_rows)).numpy(),
                          device.text_embeddings(np.arange(device.texts.num_rows)).numpy())
    assert (emb_w * emb_d).sum(1).min() >= 0.999
    rejected = {decode: [r["key"] for p in sorted((root / "parts").glob("*.json"))
                         for r in json.loads(p.read_text())["rejects"]] for decode, root in caches.items()}
    assert rejected["device"] == rejected["workers"] and len(rejected["device"]) == 1  # the cut JPEG


def test_device_replay_gives_the_workers_pixels(caches, photo_dataset, tiny_teacher):
    """A student's batch with --decode device: encoded images and views from the workers,
    decoded on the device to the workers' pixels within a mean of 3 levels of 255 per image
    (the workers decode the larger JPEG boxes at reduced size, the device never does)."""
    from rdkd.data import open_dataset
    from rdkd.models import load_clip
    from rdkd.pixels import DeviceDecoder
    from rdkd.stages.train_student import _decode_images

    loaded = load_clip(tiny_teacher)
    cfg = ImageCfg(size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    cache = TeacherCache.open(caches["workers"])
    dataset = open_dataset(photo_dataset)
    items = [(0, p) for p in range(8)]
    on_workers = PairDataset(dataset, loaded.tokenizer, cfg, 0, caches=[cache])[items]
    encoded = PairDataset(dataset, loaded.tokenizer, cfg, 0, caches=[cache], decode="device")
    batch = encoded[items]
    assert isinstance(batch["image"][0], bytes) and torch.equal(batch["t_img"], on_workers["t_img"])

    class Run:  # what _decode_images reads of a run
        decoder = DeviceDecoder(encoded.builder.renderer, torch.device("cpu"))

    from rdkd.runtime import HostSyncCounter

    with HostSyncCounter() as counter:  # the main process's decode stays free of host-device syncs
        _decode_images(Run, batch)
    assert counter.count == 0, counter.ops
    gap = (batch["image"].int() - on_workers["image"].int()).abs().float()
    assert gap.mean(dim=(1, 2, 3)).max() <= 3.0


def test_train_and_evaluate_run_with_device_decoding(tmp_path, caches, photo_dataset, tiny_teacher):
    from rdkd.stages.evaluate import evaluate
    from rdkd.stages.train_student import train_student

    student = tmp_path / "tiny.json"
    student.write_text(json.dumps(TINY_STUDENT))
    summary = train_student(photo_dataset, str(student), "cliprd", caches["device"], steps=2, batch_size=4,
                            workers=0, device="cpu", decode="device", out=str(tmp_path / "run"), progress=False)
    assert summary["image_preprocess"] == "fast" and summary["decode"] == "device"
    assert summary["device_decode_fallbacks"] >= 1  # the PNGs and WebPs of the dataset
    from rdkd.models import parse_model_spec

    model = parse_model_spec(str(tmp_path / "run" / "export"))
    scores = {decode: evaluate(tmp_path / decode / "metrics.json", data=photo_dataset, model=model,
                               teacher_cache=caches["device"], workers=0, device="cpu", decode=decode,
                               progress=False) for decode in ("workers", "device")}
    assert scores["device"]["retrieval/skipped"] == scores["workers"]["retrieval/skipped"] == 1
    info = json.loads((tmp_path / "device" / "evaluation.json").read_text())
    assert info["device_decode_fallbacks"] == 5 and info["image_preprocess"] == "fast"  # 2 PNG, 2 WebP, the cut JPEG
    assert "device_decode_fallbacks" not in json.loads((tmp_path / "workers" / "evaluation.json").read_text())
    assert abs(scores["device"]["retrieval/i2t_r1"] - scores["workers"]["retrieval/i2t_r1"]) <= 1 / 8


def test_device_decoding_needs_the_fast_views(tmp_path, csv_dataset, tiny_teacher):
    with pytest.raises(UserError, match="--preprocess fast"):
        extract_teacher(csv_dataset, tiny_teacher, tmp_path / "c", decode="device", workers=0, progress=False)
    with pytest.raises(UserError, match="unknown --decode"):
        extract_teacher(csv_dataset, tiny_teacher, tmp_path / "c", decode="gpu", workers=0, progress=False)
