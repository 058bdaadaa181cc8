"""rdkd.data: the three dataset formats, multi-caption grouping, bad input, decoding."""

from __future__ import annotations

import pickle

from rdkd.data import open_dataset


def test_each_format_reads_all_samples(any_dataset, samples):
    ds = open_dataset(any_dataset)
    assert len(ds) == len(samples)
    assert [ds.captions(i) for i in range(len(ds))] == [s.captions for s in samples]
    assert not ds.index_rejects
    for i, sample in enumerate(samples):
        assert ds.read_image_bytes(i) == sample.data
    pickle.loads(pickle.dumps(ds))
