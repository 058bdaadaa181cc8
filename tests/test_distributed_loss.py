"""The loss over a gathered global batch: 2 gloo processes equal 1 process on the same batch.

The ranks are started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment), each a subprocess with a bounded timeout.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rdkd import distributed

WORKER = Path(__file__).with_name("_dist_worker_loss.py")
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_worker():
    spec = importlib.util.spec_from_file_location("_dist_worker_loss", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ranks(out: Path, world_size: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world_size)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world_size)
    ]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = load_worker().run_all(distributed.DistInfo(0, 1, 0, torch.device("cpu")))
    return one, run_ranks(tmp_path_factory.mktemp("dist_loss") / "two.pt", 2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain_loss", "ddp_loss", "ensemble_ddp_loss"])
def test_two_gloo_ranks_equal_one_process(runs, variant):
    one, two = runs
    assert one["world_size"] == 1 and two["world_size"] == 2
    a, b = one[variant], two[variant]
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b["total"], a["total"], **tol)
    assert b["parts"].keys() == a["parts"].keys() == {"task", "crd", "fd", "icl", "vrd", "xrd"}
    for name in a["parts"]:
        torch.testing.assert_close(b["parts"][name], a["parts"][name], **tol)
    # the student's gradients after DDP's averaging, and the loss module's own (heads, scales)
    for group in ("student_grads", "loss_grads"):
        assert b[group].keys() == a[group].keys() and a[group]
        for name in a[group]:
            assert a[group][name].abs().max() > 0, f"{group} {name} has no gradient to compare"
            torch.testing.assert_close(b[group][name], a[group][name], **tol, msg=f"{group} {name}")


def test_single_process_setup_and_gather_are_identity(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    info = distributed.setup(device="cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    x, y = torch.ones(3, 2, requires_grad=True), torch.zeros(3, 2)
    gx, gy = distributed.gather_batch(x, y)
    assert gx is x and gy is y
    assert float(distributed.all_reduce_mean(torch.tensor(2.5))) == 2.5
    distributed.barrier()
    distributed.cleanup()
