"""Atomic checkpoint files and RNG state capture.

Every file is written to a temp file in the same folder and then ``os.replace``d onto its name, so a crash or
kill leaves either the previous complete file or the new complete file, never a partial one.
"""
from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write


TEMP_PATTERN = ".*.tmp"
"""Temp files of atomic writes (``atomic_write``: ``.<name>.<random>.tmp``; data.py: ``.<name>.tmp``). A kill
between creating one and renaming it leaves it behind; :func:`remove_stale_temp_files` sweeps them on restart."""


PAUSE_HOOK_ENV = "LOLA_TEST_PAUSE_IN_CHECKPOINT"
"""Test hook: ``<stage>/<file>:<step>`` (e.g. ``finetune/ckpt.pt:4``) makes the save of that file for that step write
half of its bytes to the temp file, flush them to disk and hang, so that a test can kill the process in the middle
of a checkpoint write (tests/test_crash_resume.py)."""


def atomic_torch_save(obj: Any, path: Path) -> None:
    if _pause_here(path, obj):
        atomic_write(path, lambda f: _write_half_and_hang(obj, f))
    atomic_write(path, lambda f: torch.save(obj, f))


def _pause_here(path: Path, obj: Any) -> bool:
    hook = os.environ.get(PAUSE_HOOK_ENV, "")
    if not hook:
        return False
    target, _, step = hook.rpartition(":")
    path = Path(path)
    return (f"{path.parent.name}/{path.name}" == target and isinstance(obj, dict)
            and str(obj.get("step")) == step)


def _write_half_and_hang(obj: Any, f) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    while True:  # until killed
        time.sleep(60)


def remove_stale_temp_files(out: Path, subfolders: list[str]) -> list[Path]:
    """Delete temp files left by a killed run in ``out`` and its ``subfolders`` (not recursive: only the folders
    lola-train writes, never a user's files elsewhere). Call before any process of this run writes."""
    removed = []
    for folder in [Path(out)] + [Path(out) / s for s in subfolders]:
        for path in folder.glob(TEMP_PATTERN) if folder.is_dir() else ():
            if path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def rng_state() -> dict:
    """Python, numpy (if installed) and torch CPU/CUDA generator states of this process."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_record(step: int, previous: dict | None) -> dict:
    """Content of a process's RNG file for the checkpoint of ``step``: this process's RNG state now and, from the
    ``previous`` record, the state at the previous checkpoint. The RNG file is written just before ckpt.pt, so a
    kill between the two leaves ckpt.pt at the previous step, whose state the new file still holds."""
    states = {step: rng_state()}
    if previous is not None and previous["step"] != step:
        states[previous["step"]] = previous["rng"]
    return {"step": step, "rng": states[step], "states": states}


def rng_for_step(record: dict | None, step: int) -> dict | None:
    """The RNG state an RNG file holds for ``step`` (files written before ``states`` existed hold one step)."""
    if record is None:
        return None
    return (record.get("states") or {record["step"]: record["rng"]}).get(step)


def load_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(named_params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the trainable parameters, by name."""
    return {n: p.detach().cpu().clone() for n, p in named_params}


def load_named(named_params: list[tuple[str, torch.nn.Parameter]], state: dict[str, torch.Tensor],
               what: str) -> None:
    """Copy ``state`` into the given parameters; the names must match exactly."""
    names = {n for n, _ in named_params}
    missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
    if missing or unexpected:
        raise ValueError(f"{what}: parameter names do not match the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); was it written by a run with another recipe?")
    with torch.no_grad():
        for n, p in named_params:
            p.copy_(state[n].to(p.device, p.dtype))
