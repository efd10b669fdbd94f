"""The training loop: loss falls, exact resume after SIGKILL, corrupt-checkpoint fallback, export parity."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opengpt.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from opengpt.train.trainer import build_optimizer, enable_grad_checkpointing, lr_at, train
from tests.model.test_transformer import build
from tests.train.conftest import tiny_args, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    recs = [json.loads(line) for line in lines if line.endswith("\n")]  # a line being written is skipped
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def run30(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = train(tiny_config(corpus_dir, out), progress=False)
    return out, summary


def test_loss_falls_and_artefacts_are_written(run30):
    out, _ = run30
    seq = losses(out)
    assert sorted(seq) == list(range(1, 31))
    first, last = seq[1], sum(seq[s] for s in range(26, 31)) / 5
    assert last < first - 1.0, (first, last)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [r["step"] for r in evals] == [0, 10, 20, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-2])
    assert len(rec["expert_util"]) == 2 and all(abs(sum(row) - 1) < 1e-3 for row in rec["expert_util"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000030", "step-00000020"]


def test_exported_checkpoint_opens_in_our_loader_and_transformers(run30):
    import transformers

    from opengpt.weights.load import load_model

    _, summary = run30
    _, ours, tok, _ = load_model(summary["checkpoint"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["checkpoint"]).eval()
    ids = torch.tensor([tok.encode("the king speaks to the queen")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits.float(), atol=1e-4, rtol=1e-4)


def test_resume_after_sigkill_reproduces_losses_exactly(corpus_dir, tmp_path, run30):
    ref_out, _ = run30
    reference = losses(ref_out)
    out = tmp_path / "out"
    args = tiny_args(corpus_dir, out, save_interval=4, data_dir=ref_out.parent / "data")
    code = "import sys; from opengpt.__main__ import main; sys.argv = ['opengpt', 'train', *sys.argv[1:]]; main()"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # kill once past the checkpoint at step 8
            if (out / "metrics.jsonl").is_file() and max(losses(out) or [0]) >= 9:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    killed_at = max(losses(out))
    assert 9 <= killed_at < 30
    summary = train(tiny_config(corpus_dir, out, save_interval=4, data_dir=ref_out.parent / "data"), resume=True,
                    progress=False)
    assert summary["step"] == 30
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 31))
    assert [resumed[s] for s in range(1, 31)] == [reference[s] for s in range(1, 31)]  # bit-exact


def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
    model = build("moe-shared").train()
    opt = build_optimizer(model, tiny_config(tmp_path, tmp_path), "cpu")
    ckpts = tmp_path / "ckpt"
    for step in (1, 2):
        model(torch.randint(0, 80, (1, 6))).logits.sum().backward()
        opt.step()
        save_checkpoint(ckpts, step, model, opt, {"position": step * 10}, keep_last=2)
    data = next((ckpts / "step-00000002").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle of the tensors
    data.write_bytes(bytes(raw))
    fresh = build("moe-shared").train()
    with caplog.at_level(logging.WARNING):
        extra = load_checkpoint(ckpts, fresh, build_optimizer(fresh, tiny_config(tmp_path, tmp_path), "cpu"))
    assert extra["step"] == 1 and extra["position"] == 10
    assert any("step-00000002" in r.message and "falling back" in r.message for r in caplog.records)
    # a half-written (.tmp) directory is never taken for a checkpoint
    (ckpts / "step-00000003.tmp").mkdir()
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002", "step-00000001"]


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = build("moe-shared").train()
        if ckpt:
            enable_grad_checkpointing(model)
        model(ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_schedule_warms_up_then_decays_to_min(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:])) and lr_at(100, cfg) == pytest.approx(0.1)
