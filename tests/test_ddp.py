"""Two-process DDP on CPU (gloo): the replicas must hold identical parameters after both training stages."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher() -> list[str]:
    """torchrun (a real 2-process gloo world; environment.md section 5), falling back to accelerate launch."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun:
        return [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def test_ddp_two_processes_keep_replicas_in_sync(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(launcher() + [str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == r1["world"] == 2 and {r0["rank"], r1["rank"]} == {0, 1}
    for stage in ("stage1", "stage2"):
        assert r0[stage].keys() == r1[stage].keys() and r0[stage]
        for name in r0[stage]:
            assert torch.equal(r0[stage][name], r1[stage][name]), f"{stage} {name} differs between ranks"
    moved = max((r0["stage1"][n] - r0["initial"][n]).abs().max().item() for n in r0["initial"])
    assert moved > 0, "stage 1 did not change the parameters"
    assert any(n.endswith("lora_B.default.weight") and r0["stage2"][n].abs().max() > 0 for n in r0["stage2"])
