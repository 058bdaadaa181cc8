"""rdkd.streaming: train-student --stream over webdataset shards beside their cache shards.

The data: 8 shards of 6 samples; sample 000013 is not an image (extraction rejects it, so
the cache holds 47 samples) and sample 000030 has an empty caption (rejected while
indexing: not a dataset entry). Tiny models, a few steps on CPU; processes are bounded in
time.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import builders
from builders import run_cli
from rdkd import runtime
from rdkd.streaming import ShardStream, emission_order, round_robin

UNDECODABLE, CAPTIONLESS = "000013", "000030"


@pytest.fixture(scope="module")
def stream_data(tmp_path_factory):
    samples = builders.standard_samples(49)
    bad = {UNDECODABLE: dict(data=b"not an image"), CAPTIONLESS: dict(captions=("  ",))}
    samples = [dataclasses.replace(s, **bad.get(s.key, {})) for s in samples]
    # 49 samples, one of which is not an entry: 8 shards, 6 entries each (shard 5 has 7 samples)
    shards = [samples[i:i + 6] for i in range(0, 30, 6)] + [samples[30:37]] + [samples[37:43], samples[43:49]]
    root = tmp_path_factory.mktemp("wds-stream")
    for s, members in enumerate(shards):
        builders.write_tar(root / f"{s:05d}.tar", [m for sample in members for m in builders.sample_members(sample)])
    from rdkd.data import DataSpec

    return DataSpec(f"{root}/{{00000..00007}}.tar")


@pytest.fixture(scope="module")
def stream_cache(tmp_path_factory, tiny_teacher, stream_data) -> Path:
    from rdkd.cache import ViewConfig
    from rdkd.stages.extract_teacher import extract_teacher

    out = tmp_path_factory.mktemp("stream-cache") / "cache"
    extract_teacher(stream_data, tiny_teacher, out, views=ViewConfig(count=3), batch_size=8, workers=0,
                    storage_dtype="float32", progress=False, max_reject_fraction=0.1)
    return out


def _stream(stream_data, stream_cache, tiny_vit, batch, rank=0, world=1, workers=0, buffer=5,
            pieces=1) -> ShardStream:
    from rdkd.cache import TeacherCache
    from rdkd.models import create_student
    from rdkd.streaming import streaming_layout
    from rdkd.training import ImageCfg, PairBuilder

    cache = TeacherCache.open(stream_cache)
    student = create_student(tiny_vit)
    builder = PairBuilder(student.tokenizer, ImageCfg.of_model(student.model), seed=3, caches=[cache])
    return ShardStream(streaming_layout(True, stream_data, [cache]), builder, batch, seed=3, rank=rank,
                       world=world, workers=workers, shuffle_buffer=buffer, pieces=pieces)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _usable_entries(stream_data, stream_cache) -> dict[int, str]:
    """Dataset entry -> key of every sample the cache holds (from the index: an independent reference)."""
    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset

    dataset, cache = open_dataset(stream_data), TeacherCache.open(stream_cache)
    return {i: k for i, k in enumerate(dataset.keys) if cache.find(k) is not None}


# --- the stream's building blocks ---------------------------------------------------------------


def test_shuffle_buffer_order_is_a_permutation_holding_at_most_the_buffer():
    order = emission_order(1000, 64, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    held_max = max(int(order[:t + 1].max()) + 1 - (t + 1) for t in range(1000))  # read minus emitted
    assert held_max <= 64
    assert not np.array_equal(order, np.arange(1000))
    assert np.array_equal(emission_order(300, 16, np.random.default_rng(7)),
                          emission_order(300, 16, np.random.default_rng(7)))


def test_round_robin_skips_lanes_that_ran_out():
    # lanes with 2, 4 and 1 batches: A B C A B B B
    assert round_robin([2, 4, 1], 0) == ([0, 0, 0], 0)
    assert round_robin([2, 4, 1], 3) == ([1, 1, 1], 0)
    assert round_robin([2, 4, 1], 5) == ([2, 2, 1], 2)  # the next comes from B (C is done)
    assert round_robin([2, 4, 1], 7) == ([2, 4, 1], 2)


def test_auto_streams_big_webdataset_data_with_an_aligned_cache(monkeypatch, stream_data, stream_cache,
                                                                 csv_dataset):
    import rdkd.streaming as streaming
    from rdkd.cache import TeacherCache

    cache = TeacherCache.open(stream_cache)
    assert streaming.streaming_layout(None, stream_data, [cache]) is None  # 48 entries: the index
    assert streaming.streaming_layout(False, stream_data, [cache]) is None
    monkeypatch.setattr(streaming, "STREAM_AUTO_MIN_ENTRIES", 40)
    layout = streaming.streaming_layout(None, stream_data, [cache])
    assert layout.counts.tolist() == [6, 6, 5, 6, 6, 6, 6, 6] and layout.samples == 47
    assert streaming.streaming_layout(None, csv_dataset, [cache]) is None  # not webdataset
    assert streaming.streaming_layout(None, stream_data, []) is None  # no cache


def test_batches_come_in_equal_pieces_that_divide_them(stream_data, stream_cache, tiny_vit):
    """Pieces: the fewest equal ones that divide the local batch, at least as many as asked;
    a lane's pieces hold consecutive samples of its order, so 2 pieces of 2 are a batch of 4."""
    sizes = [(_stream(stream_data, stream_cache, tiny_vit, batch=12, pieces=p).piece_size) for p in (1, 5, 20)]
    assert sizes == [12, 2, 1]
    whole = _stream(stream_data, stream_cache, tiny_vit, batch=4)
    halves = _stream(stream_data, stream_cache, tiny_vit, batch=4, pieces=2)
    assert whole.steps_per_epoch(epochs=1) == halves.steps_per_epoch(epochs=1) == 11
    pieces = halves.batches(0, 11)
    for batch in itertools.islice(whole.batches(0, 11), 11):
        joined = runtime.join_batches([next(pieces), next(pieces)])
        assert torch.equal(batch["index"], joined["index"]) and torch.equal(batch["image"], joined["image"])


# --- one epoch, every usable sample once --------------------------------------------------------


EPOCH_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from rdkd import distributed
from rdkd.data import DataSpec
import test_streaming as t
info = distributed.setup("cpu")
stream = t._stream(DataSpec({data!r}), {cache!r}, {student!r}, batch=2, rank=info.rank,
                   world=info.world_size, workers=2)
steps = stream.steps_per_epoch(epochs=2)
epochs = []
batches = stream.batches(0, steps)
for epoch in range(2):
    epochs.append([next(batches)["index"].tolist() for _ in range(steps)])
json.dump({{"steps": steps, "epochs": epochs}}, open(sys.argv[1] + f"/rank{{info.rank}}.json", "w"))
distributed.cleanup()
"""


@pytest.mark.parametrize("world,left_out", [(1, 1), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_one_epoch_shows_every_usable_sample_once_across_ranks(
        world, left_out, tmp_path, stream_data, stream_cache, tiny_vit):
    """2 DataLoader workers per rank, local batch 2. Each rank's 2 lanes hold 12 and 12 or
    12 and 11 usable samples (every shard holds 6, one holds 5), so every lane makes full
    batches of all but an odd sample and the ranks step equally at the poorer rank's count.
    Known answers: 1 rank: 23 steps, 46 of the 47 usable samples, each once; 2 ranks:
    11 steps each, 44 samples, each once: the odd sample and the richer rank's spare batch
    are left out of that epoch."""
    script = tmp_path / "epoch.py"
    script.write_text(EPOCH_SCRIPT.format(tests=str(Path(__file__).parent), data=stream_data.path,
                                          cache=str(stream_cache), student=tiny_vit))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(tmp_path)] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
        "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(command, timeout=240, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    usable = _usable_entries(stream_data, stream_cache)
    assert len(usable) == 47
    expected_steps = 23 if world == 1 else 11
    assert [r["steps"] for r in ranks] == [expected_steps] * world
    for epoch in range(2):
        seen = [i for r in ranks for batch in r["epochs"][epoch] for i in batch]
        assert all(len(batch) == 2 for r in ranks for batch in r["epochs"][epoch])
        assert all(len(r["epochs"][epoch]) == expected_steps for r in ranks)
        assert len(seen) == len(set(seen)), "a sample came twice in one epoch"
        assert set(seen) <= set(usable)
        assert len(usable) - len(set(seen)) == left_out
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new order every epoch


def _indices(batches, steps: int) -> list[list[int]]:
    return [next(batches)["index"].tolist() for _ in range(steps)]


def test_each_rank_reads_other_shards_every_epoch(stream_data, stream_cache, tiny_vit):
    """2 ranks: the shards dealt to a rank change with the epoch, so the data shards a rank's
    samples come from in epoch 1 are not those of epoch 0 (the same shards reshuffled would
    show the same samples, less a different few left over)."""
    from rdkd.cache import TeacherCache

    ranges = [range(*shard["entries"]) for shard in TeacherCache.open(stream_cache).manifest["shards"]]
    for rank in (0, 1):
        stream = _stream(stream_data, stream_cache, tiny_vit, batch=2, rank=rank, world=2)
        steps = stream.steps_per_epoch(epochs=2)
        batches = stream.batches(0, steps)
        first, second = ({j for batch in _indices(batches, steps) for i in batch for j, r in enumerate(ranges)
                          if i in r} for _ in range(2))
        assert len(first) == len(second) == 4 and first != second, (rank, first, second)


def test_every_rank_resumes_at_any_step_where_the_uninterrupted_stream_is(stream_data, stream_cache, tiny_vit):
    """2 ranks x 3 workers (lanes), pieces of 2 samples: a rank's first lane reads 2
    shards, the others 1 (6 or 5 usable samples: 3 or 2 pieces), so the short lanes run out
    before the epoch ends and the ranks' lanes differ. Started at any step of the first two
    epochs, each rank yields the pieces the uninterrupted stream yields from that step on
    (what a resume after a checkpoint there gets)."""
    streams = [_stream(stream_data, stream_cache, tiny_vit, batch=2, rank=rank, world=2, workers=3)
               for rank in (0, 1)]
    steps = streams[0].steps_per_epoch(epochs=2)
    # the case this test is for: a rank whose lanes, counted as another rank's, would resume elsewhere
    lanes = [stream.lane_pieces(epoch) for epoch in range(2) for stream in streams[:1]]
    assert any(round_robin(counts[1].tolist(), k) != round_robin(counts[0].tolist(), k)
               for counts in lanes for k in range(steps)), "no rank's lanes differ where a resume reads them"
    for rank, stream in enumerate(streams):
        straight = _indices(stream.batches(0, steps), 2 * steps)
        for start in range(1, 2 * steps):
            resumed = _indices(stream.batches(start, steps), min(2 * steps - start, 2))
            assert resumed == straight[start:start + len(resumed)], (rank, start)


# --- same samples as the indexed path ----------------------------------------------------------


def test_a_sample_gets_the_same_view_and_caption_streamed_or_indexed(stream_data, stream_cache, tiny_vit):
    from rdkd.cache import TeacherCache
    from rdkd.data import open_dataset
    from rdkd.models import create_student
    from rdkd.training import ImageCfg, PairDataset

    stream = _stream(stream_data, stream_cache, tiny_vit, batch=4, workers=0)
    student = create_student(tiny_vit)
    pairs = PairDataset(open_dataset(stream_data), student.tokenizer, ImageCfg.of_model(student.model), seed=3,
                        caches=[TeacherCache.open(stream_cache)])
    position = {int(e): p for p, e in enumerate(pairs.entries)}
    steps = stream.steps_per_epoch(epochs=2)
    batches = stream.batches(0, steps)
    compared, views = 0, set()
    for epoch in range(2):
        for _ in range(steps):
            batch = next(batches)
            indexed = pairs[[(epoch, position[int(i)]) for i in batch["index"]]]
            for name in ("index", "image_row", "text_row", "text", "image", "t_img", "t_txt"):
                assert torch.equal(batch[name], indexed[name]), name
            compared += len(batch["index"])
            views |= set(batch["image_row"].remainder(3).tolist())
    assert compared == 2 * 11 * 4 and views == {0, 1, 2}  # every view is replayed


# --- train-student --stream --------------------------------------------------------------------


RUN_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(1)
import rdkd.stages.train_student as stage
from rdkd.data import DataSpec
stage.PIECE_BYTES = 8000  # a tiny sample is 3,456 bytes: local batches of 4 come in 2 pieces
kill_at = int(sys.argv[2])
real_save = stage.save_checkpoint
def save(path, state):
    real_save(path, state)
    if state["position"]["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, workers orphaned: as a preempted node
stage.save_checkpoint = save
resume = sys.argv[3] if len(sys.argv) > 3 else None
stage.train_student(DataSpec({data!r}), {student!r}, "cliprd", {cache!r}, stream=True, steps=14,
                    batch_size=4, workers=2, save_every=3, shuffle_buffer=5, seed=1, progress=False,
                    lr=2e-3, warmup=1, log_every=1, device="cpu", out=sys.argv[1], resume=resume)
"""


def test_stream_trains_end_to_end_and_a_sigkilled_run_resumes_exactly(tmp_path, stream_data, stream_cache, tiny_vit):
    """14 steps of 4, each batch shipped in 2 pieces (11 steps per epoch: the run crosses an
    epoch) straight, and SIGKILLed right after its step-6 checkpoint then resumed: the same
    weights, optimizer state and losses."""
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(data=stream_data.path, student=tiny_vit, cache=str(stream_cache)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(script), str(straight), "0"], timeout=240, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(script), str(killed), "6"], timeout=240, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-00000003.pt", "step-00000006.pt"]
    assert not (killed / "run.json").exists()
    proc = subprocess.run([sys.executable, str(script), str(killed), "0", str(killed)], timeout=240, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = json.loads((straight / "run.json").read_text())
    assert run["stream"] == {"world_size": 1, "workers": 2, "local_batch": 4, "piece_size": 2, "shuffle_buffer": 5}
    assert run["steps_per_epoch"] == 11 and run["samples"] == 47 and run["teacher_forwards"] == 0
    assert run["skipped"] == {"rejected by the cache": 1} and np.isfinite(run["final_loss"])
    assert json.loads((killed / "run.json").read_text())["resumed_from_step"] == 6
    a = torch.load(straight / "checkpoints" / "step-00000014.pt", weights_only=False)
    b = torch.load(killed / "checkpoints" / "step-00000014.pt", weights_only=False)
    for part in ("model", "loss"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    losses = [[json.loads(line)["loss"] for line in (r / "logs" / "metrics.jsonl").read_text().splitlines()]
              for r in (straight, killed)]
    assert len(losses[0]) == 14 and losses[0] == losses[1]


@pytest.mark.slow
def test_two_processes_stream_train_through_an_epoch_end(tmp_path, stream_data, stream_cache, tiny_vit):
    """torchrun, 2 gloo processes, 2 workers each, local batch 2: the ranks step together
    across the epoch boundary (a rank that stepped more would hang the gather) and finish."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from rdkd.data import DataSpec\n"
        "from rdkd.stages.train_student import train_student\n"
        f"train_student(DataSpec({stream_data.path!r}), {tiny_vit!r}, 'cliprd', {str(stream_cache)!r}, stream=True,\n"
        "    steps=13, batch_size=4, workers=2, progress=False, lr=2e-3, warmup=1, device='cpu', out=sys.argv[1])\n")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), str(tmp_path / "run")],
        timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["world_size"] == 2 and run["steps"] == 13 and run["steps_per_epoch"] == 11
    assert run["stream"]["world_size"] == 2 and np.isfinite(run["final_loss"])


TORCHRUN_RESUME_SCRIPT = """
import os, signal, sys, torch
signal.alarm(200)
torch.set_num_threads(1)
import rdkd.stages.train_student as stage
from rdkd.data import DataSpec
out, kill_at, stream = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "stream"
real_save = stage.save_checkpoint
def save(path, state):
    real_save(path, state)
    if state["position"]["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # rank 0 dies; torchrun ends rank 1
stage.save_checkpoint = save
stage.train_student(DataSpec({data!r}), {student!r}, "cliprd", {cache!r}, stream=stream, steps=22,
                    batch_size=4, workers=3 if stream else 2, save_every=5, shuffle_buffer=5, seed=1,
                    progress=False, lr=2e-3, warmup=1, log_every=1, device="cpu", out=out,
                    resume=sys.argv[4] if len(sys.argv) > 4 else None)
"""


@pytest.mark.slow
@pytest.mark.parametrize("feed", ["indexed", "stream"])
def test_two_processes_killed_and_resumed_train_like_an_uninterrupted_run(feed, tmp_path, stream_data, stream_cache,
                                                                          tiny_vit_patch_dropout):
    """torchrun, 2 gloo processes, a student that draws from torch's RNG every step (patch
    dropout), 22 steps straight against SIGKILLed after the step-20 checkpoint and resumed:
    the same weights, optimizer state and RNG state of each rank, to the bit. Streamed, each
    rank has 3 lanes of 6, 3 and 3 (or 2) pieces in an epoch of 11 steps: in epoch 1 the
    short lanes ran out before step 20, and rank 1's lanes (6, 3, 3) resume elsewhere than
    rank 0's (6, 3, 2) would."""
    from test_train import assert_same_training_state

    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_RESUME_SCRIPT.format(data=stream_data.path, student=tiny_vit_patch_dropout,
                                                    cache=str(stream_cache)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(_free_port()), str(script), *args],
                              timeout=240, env=env, capture_output=True, text=True)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = torchrun(str(straight), "0", feed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(str(killed), "20", feed)
    assert proc.returncode != 0 and not (killed / "run.json").exists(), proc.stderr[-3000:]
    # killed after writing step 20's checkpoint, before pruning the oldest of three
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "step-00000010.pt", "step-00000015.pt", "step-00000020.pt"]
    proc = torchrun(str(killed), "0", feed, str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((killed / "run.json").read_text())
    assert run["resumed_from_step"] == 20 and run["world_size"] == 2
    if feed == "stream":
        assert run["steps_per_epoch"] == 11 and run["stream"]["workers"] == 3
    assert_same_training_state(torch.load(straight / "checkpoints" / "step-00000022.pt", weights_only=True),
                               torch.load(killed / "checkpoints" / "step-00000022.pt", weights_only=True))


def test_resume_with_another_stream_shape_is_refused(tmp_path, capsys, stream_data, stream_cache, tiny_vit):
    args = ["train-student", "--data", stream_data.path, "--cache", str(stream_cache), "--student", tiny_vit,
            "--stream", "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu"]
    assert run_cli([*args, "--out", str(tmp_path / "run")], capsys)[0] == 0
    code, err = run_cli([*args, "--resume", str(tmp_path / "run"), "--shuffle-buffer", "7"], capsys)
    assert code == 2 and "differs in stream" in err and len(err.strip().splitlines()) == 1


def _changed_copy(stream_data, root: Path, key: str, member: str, data: bytes):
    """The stream data with one member of sample ``key`` replaced (the data changed after
    the cache was made)."""
    import shutil
    import tarfile

    from rdkd.data import DataSpec, expand_shards

    root.mkdir()
    for shard in expand_shards(stream_data.path):
        with tarfile.open(shard) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]
        if any(name.startswith(key + ".") for name, _ in members):
            builders.write_tar(root / Path(shard).name,
                               [(n, data if n == f"{key}.{member}" else d) for n, d in members])
        else:
            shutil.copy(shard, root)
    return DataSpec(f"{root}/{{00000..00007}}.tar")


def test_an_image_that_no_longer_decodes_is_skipped_and_its_slot_refilled(
        tmp_path, stream_data, stream_cache, tiny_vit):
    changed = _changed_copy(stream_data, tmp_path / "data", "000020", "jpg", b"\xff\xd8 truncated")
    reference = _stream(stream_data, stream_cache, tiny_vit, batch=4)
    stream = _stream(changed, stream_cache, tiny_vit, batch=4)
    steps = stream.steps_per_epoch(epochs=1)
    for want, got in zip(reference.batches(0, steps), stream.batches(0, steps)):
        index = got["index"].tolist()
        if got["skipped"]:
            assert [tuple(skip) for skip in got["skipped"]] == [("000020", "not an image")]
            assert 20 not in index and len(index) == 4 and len(set(index)) == 3
            slot = want["index"].tolist().index(20)
            assert index[slot] == want["index"].tolist()[(slot + 1) % 4]  # the batch's next sample
            break
        assert torch.equal(want["image"], got["image"]) and want["index"].tolist() == index
    else:
        pytest.fail("the changed sample never came")


def test_data_that_changed_since_the_cache_stops_the_run_with_one_line(
        tmp_path, capsys, stream_data, stream_cache, tiny_vit):
    changed = _changed_copy(stream_data, tmp_path / "data", "000020", "txt", b"another caption")
    line = _refused(["train-student", "--data", changed.path, "--cache", str(stream_cache), "--student", tiny_vit,
                     "--stream", "--epochs", "1", "--batch-size", "4", "--workers", "2", "--no-progress",
                     "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
    assert "sample '000020': captions differ from cache shard 3's" in line, line


# --- refusals ------------------------------------------------------------------------------


def _refused(args, capsys) -> str:
    code, err = run_cli(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_cache_not_aligned_with_the_data_shards_is_refused(tmp_path, capsys, tiny_teacher, samples,
                                                            csv_dataset, stream_data, tiny_vit):
    from rdkd.stages.extract_teacher import extract_teacher

    def cache_of(spec, name):
        extract_teacher(spec, tiny_teacher, tmp_path / f"cache-{name}", batch_size=8, workers=0, progress=False)
        return str(tmp_path / f"cache-{name}")

    # the same 12 samples in 3 shards of 4, and the same 2 shards with the samples reversed
    three = builders.write_wds_dataset(tmp_path / "three", samples, per_shard=4)
    reversed_two = builders.write_wds_dataset(tmp_path / "reversed", samples[::-1], per_shard=6)
    two = builders.write_wds_dataset(tmp_path / "two", samples, per_shard=6)
    base = ["train-student", "--student", tiny_vit, "--stream", "--steps", "1", "--batch-size", "2",
            "--workers", "0", "--no-progress", "--device", "cpu"]
    cases = [
        (two.path, cache_of(csv_dataset, "rows"), "not shard-aligned with the data: it is cut into shards of"),
        (two.path, cache_of(three, "three"), "not shard-aligned with the data: 3 cache shards for 2 data shards"),
        (two.path, cache_of(reversed_two, "reversed"), "does not hold cache shard 0's first sample"),
    ]
    capsys.readouterr()
    for data, cache, says in cases:
        line = _refused([*base, "--data", data, "--cache", cache, "--out", str(tmp_path / "out")], capsys)
        assert says in line, line
    assert "webdataset" in _refused([*base, "--data", csv_dataset.path, "--cache", str(tmp_path / "cache-rows"),
                                     "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()
