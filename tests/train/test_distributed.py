"""FSDP2 under torchrun on gloo (CPU): 2 processes take the same steps as 1 with the same global batch, and
their sharded (DCP) checkpoint resumes in 1 process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from opengpt.train.trainer import train
from tests.train.conftest import tiny_args, tiny_config
from tests.train.test_trainer import losses

ROOT = Path(__file__).resolve().parents[2]
# fp32 sums in a different order (reduce-scatter vs one process): equal to ~1e-6 relative per step
REL_TOL = 1e-4


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo")
def test_fsdp2_two_processes_match_one_and_resume_on_one(corpus_dir, tmp_path):
    common = dict(max_steps=8, save_interval=3, keep_last=3, eval_interval=4, data_dir=tmp_path / "data")
    one = tmp_path / "one"
    train(tiny_config(corpus_dir, one, **common), progress=False)
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "opengpt",
           "train", *tiny_args(corpus_dir, two, **common)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    ref, fsdp = losses(one), losses(two)
    assert sorted(fsdp) == list(range(1, 9))
    for s in ref:
        assert fsdp[s] == pytest.approx(ref[s], rel=REL_TOL), (s, fsdp[s], ref[s])
    assert (two / "final" / "model.safetensors").is_file()  # rank 0 gathered and exported the full model

    # the sharded checkpoint of step 6 (written by 2 ranks) resumes in 1 process
    shutil.rmtree(two / "checkpoints" / "step-00000008")
    summary = train(tiny_config(corpus_dir, two, **common), resume=True, progress=False)
    assert summary["step"] == 8
    resumed = losses(two)
    for s in (7, 8):
        assert resumed[s] == pytest.approx(ref[s], rel=REL_TOL), (s, resumed[s], ref[s])
