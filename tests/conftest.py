"""Session fixtures every test module shares: a tiny open_clip teacher and tiny datasets.

The builders live in tests/builders.py so that tests can make their own variants
(bad samples, other separators, broken shards).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests never reach the Hugging Face Hub: a spec that would download fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

import builders  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    """Path to a model-config JSON of a tiny open_clip CLIP (embed_dim 32, 32 px, 16 tokens)."""
    import json

    path = tmp_path_factory.mktemp("tiny-config") / "tiny-clip.json"
    path.write_text(json.dumps(builders.TINY_CLIP_CONFIG, indent=2))
    return path


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """Model-config JSON of a tiny open_clip ViT student (embed_dim 24: the loss's heads project)."""
    return builders.write_model_config(tmp_path_factory.mktemp("students"), "tiny-vit", builders.TINY_VIT)


@pytest.fixture(scope="session")
def tiny_vit_patch_dropout(tmp_path_factory) -> str:
    """The tiny ViT with patch dropout: it draws from torch's RNG at every training step."""
    return builders.write_model_config(tmp_path_factory.mktemp("students"), "tiny-vit-patch-dropout",
                                       builders.TINY_VIT_PATCH_DROPOUT)


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> str:
    """Model-config JSON of a tiny open_clip ModifiedResNet student (embed_dim 24)."""
    return builders.write_model_config(tmp_path_factory.mktemp("students"), "tiny-resnet", builders.TINY_RESNET)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """ModelSpec(config=<tiny json>, pretrained=<torch.save'd state_dict>), seed 0."""
    return builders.write_tiny_clip(tmp_path_factory.mktemp("tiny-teacher"), seed=0)


@pytest.fixture(scope="session")
def samples() -> list[builders.Sample]:
    """The 12 standard samples the dataset fixtures hold (keys 000000..000011)."""
    return builders.standard_samples()


@pytest.fixture(scope="session")
def csv_dataset(tmp_path_factory, samples):
    """DataSpec of an open_clip TSV (filepath, title; multi-caption rows spread through the file)."""
    return builders.write_csv_dataset(tmp_path_factory.mktemp("csv"), samples)


@pytest.fixture(scope="session")
def wds_dataset(tmp_path_factory, samples):
    """DataSpec of two img2dataset-style shards given as ``{00000..00001}.tar``."""
    return builders.write_wds_dataset(tmp_path_factory.mktemp("wds"), samples)


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory, samples):
    """DataSpec of a folder of two Parquet files (image bytes, list-of-captions, key)."""
    return builders.write_parquet_dataset(tmp_path_factory.mktemp("parquet"), samples)


@pytest.fixture(scope="session", params=["csv", "webdataset", "parquet"])
def any_dataset(request):
    """Each of the three standard datasets in turn."""
    name = {"csv": "csv_dataset", "webdataset": "wds_dataset", "parquet": "parquet_dataset"}[request.param]
    return request.getfixturevalue(name)
