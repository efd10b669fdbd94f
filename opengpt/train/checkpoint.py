"""Training checkpoints: atomic, checksummed, resumable exactly and on a different process count.

Layout: OUT_DIR/checkpoints/step-00000100/ holds the model and optimizer state written by
`torch.distributed.checkpoint` (DCP: each rank writes its own shards, and loading reshards them for
any process count, FSDP2 or not), one `extra-rank{r}.pt` per rank with the step, the data position
and the RNG states, and a `manifest.json` with the SHA-256 of every file. It is written under a
`.tmp` name, every file fsynced, then renamed in one step, so a crash never leaves a half-written
checkpoint under a real name. The last `keep_last` are kept.

On resume the newest checkpoint whose manifest and checksums verify and that loads is used; a
corrupt one is reported with a warning and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

log = logging.getLogger(__name__)


class CheckpointCorrupt(RuntimeError):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, newest first (unfinished `.tmp` directories are ignored)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def save_checkpoint(ckpt_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], keep_last: int = 2) -> Path:
    """Every rank calls this. Returns the final directory."""
    final = ckpt_dir / f"step-{step:08d}"
    tmp = ckpt_dir / f"step-{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that one process without a process group saves alone: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))  # fsyncs its files
    world = dist.get_world_size() if dist.is_initialized() else 1
    extra_path = tmp / f"extra-rank{_rank()}.pt"
    with open(extra_path, "wb") as f:
        torch.save({**extra, "step": step, "rng": rng_state(), "world_size": world}, f)
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    if _rank() == 0:
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {"step": step, "world_size": world, "files": {p.name: _sha256(p) for p in files}}
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step (resumed after a crash right after saving)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(ckpt_dir)
        for old in list_checkpoints(ckpt_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointCorrupt(f"{path} has no manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointCorrupt(f"{manifest_path} is not valid JSON ({e})") from e
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointCorrupt(f"{f} is missing")
        if _sha256(f) != digest:
            raise CheckpointCorrupt(f"{f} does not match its checksum (truncated or overwritten)")
    return manifest


def load_checkpoint(ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                    ) -> dict[str, Any] | None:
    """Load the newest valid checkpoint into model and optimizer (in place); returns its extra state with
    the RNG states restored, or None when there is none. Corrupt checkpoints are skipped with a warning."""
    for path in list_checkpoints(ckpt_dir):
        try:
            manifest = verify_checkpoint(path)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(path))
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                           options=StateDictOptions(strict=True))
            own = path / f"extra-rank{_rank()}.pt"
            extra = torch.load(own if own.is_file() else path / "extra-rank0.pt", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure means: fall back to the previous checkpoint
            log.warning("checkpoint %s is unusable (%s: %s); falling back to the previous one",
                        path, type(e).__name__, e)
            continue
        if manifest["world_size"] == extra["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
            set_rng_state(extra["rng"])  # other process counts: the data order does not depend on RNG state
        log.info("resumed from %s (step %d)", path, extra["step"])
        return extra
    return None
