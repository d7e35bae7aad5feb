"""A real crash test: ``linearize.py recipe=tiny`` runs in a subprocess that is killed with SIGKILL at random
moments (one of them in the middle of a checkpoint write), resumed each time, and must end with exactly the
parameters of an uninterrupted run, with no temp file left behind.

The kill moments are drawn from a seed (printed on failure; set LOLA_CRASH_SEED to replay one). Progress is read
from what the run writes (metrics.jsonl rows, checkpoint temp files), so the kills land in training whatever the
machine's speed. LoRA dropout is on, so the RNG state must survive the kills too."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lola_train.pipeline import run
from lola_train.recipe import load_recipe
from lola_train.train.checkpoint import PAUSE_HOOK_ENV

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
ARGS = ["recipe=tiny", "stages=[transfer,finetune,export]", "finetune.lora_dropout=0.1",
        *[f"{stage}.{key}={value}" for stage in ("transfer", "finetune")
          for key, value in (("max_steps", STEPS), ("eval_every", 3), ("save_every", 1), ("log_every", 1))]]
TIMEOUT = 300


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process on one thread (the subprocesses run with OMP_NUM_THREADS=1)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(load_recipe([*ARGS, f"output_dir={out}"]))
    finally:
        torch.set_num_threads(threads)
    return out


class Launch:
    """One ``linearize.py`` process writing to ``out``; its output goes to ``log``."""

    def __init__(self, out: Path, log: Path, **env):
        self.out, self.metrics = out, out / "metrics.jsonl"
        self.offset = self.metrics.stat().st_size if self.metrics.exists() else 0
        full_env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
                        PYTHONUNBUFFERED="1", **env)
        full_env.pop("LOLA_TEST_EXIT_AFTER_STEP", None)
        with open(log, "a") as f:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "linearize.py"), *ARGS, f"output_dir={out}"],
                                         cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)

    def wait_until(self, condition) -> bool:
        """True once ``condition()`` holds; False if the process ends first."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return condition()
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"no progress within {TIMEOUT} s")

    def trained(self, stage: str, step: int) -> bool:
        """This process has logged the train loss of ``stage`` step ``step`` (or a later one)."""
        if not self.metrics.exists():
            return False
        with open(self.metrics, "rb") as f:
            f.seek(self.offset)
            lines = f.read().decode(errors="replace").split("\n")[:-1]  # complete lines only
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by an earlier kill
                continue
        return any(r["stage"] == stage and r["split"] == "train" and r["step"] >= step for r in rows)

    def kill(self) -> bool:
        """SIGKILL; True if the process was still running."""
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return alive


def saved_step(out: Path, stage: str) -> int:
    """The step of the stage's last complete checkpoint (STEPS once the stage is done)."""
    if (out / stage / "done.json").exists():
        return STEPS
    ckpt = out / stage / "ckpt.pt"
    return torch.load(ckpt, weights_only=False)["step"] if ckpt.exists() else 0


def rng_step(folder: Path) -> int | None:
    """The step of the RNG file the loop writes just before ckpt.pt (atomically, so always complete)."""
    path = folder / "rng-rank0.pt"
    return torch.load(path, weights_only=False)["step"] if path.exists() else None


def paused_write(folder: Path) -> bool:
    """A temp file of ckpt.pt holds bytes: the hook has written half of the checkpoint and hangs."""
    return any(p.stat().st_size > 0 for p in folder.glob(".ckpt.pt.*.tmp"))


def temp_files(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob(".*"))


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(reference, tmp_path):
    seed = int(os.environ.get("LOLA_CRASH_SEED", random.randrange(1_000_000)))
    rng = random.Random(seed)
    out, log = tmp_path / "run", tmp_path / "log.txt"
    kills, story = 0, []

    def context() -> str:
        return f"seed {seed} (LOLA_CRASH_SEED={seed} replays it); {'; '.join(story)}\n" + log.read_text()[-3000:]

    # 1. at a random moment after a random stage-1 step
    step = rng.randint(1, STEPS - 2)
    launch = Launch(out, log)
    launch.wait_until(lambda: launch.trained("transfer", step))
    time.sleep(rng.uniform(0.0, 0.25))
    kills += launch.kill()
    story.append(f"killed after transfer step {step}: saved transfer {saved_step(out, 'transfer')}")

    # 2. in the middle of a stage-2 checkpoint write (random step after the first, so that an older checkpoint
    #    exists): half of ckpt.pt is in its temp file when the kill lands, and this step's RNG file is already
    #    written (dropout makes stage 2 depend on the RNG)
    stage, step = "finetune", rng.randint(2, STEPS - 1)
    launch = Launch(out, log, **{PAUSE_HOOK_ENV: f"{stage}/ckpt.pt:{step}"})
    assert launch.wait_until(lambda: rng_step(out / stage) == step and paused_write(out / stage)), context()
    kills += launch.kill()
    assert saved_step(out, stage) == step - 1, context()  # the half-written checkpoint never replaced the last
    story.append(f"killed writing {stage}/ckpt.pt of step {step}: temp files {temp_files(out)}")

    # 3. at a random moment after a random stage-2 step (may land in stage 2, its eval, or the export)
    step = rng.randint(saved_step(out, "finetune") + 1, STEPS - 1)
    launch = Launch(out, log)
    launch.wait_until(lambda: launch.trained("finetune", step))
    time.sleep(rng.uniform(0.0, 0.4))
    kills += launch.kill()
    story.append(f"killed after finetune step {step}: saved finetune {saved_step(out, 'finetune')}")

    # 4. resume to the end
    launch = Launch(out, log)
    assert launch.proc.wait(timeout=TIMEOUT) == 0, context()
    assert kills >= 2, context()

    for stage in ("transfer", "finetune"):
        for name in ("final.pt", "ckpt.pt"):  # the best and the last parameters
            a = torch.load(reference / stage / name, weights_only=False)["params"]
            b = torch.load(out / stage / name, weights_only=False)["params"]
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), f"{stage}/{name} {key}: max diff " \
                    f"{(a[key] - b[key]).abs().max():.3g}; {context()}"
    a = load_file(str(reference / "export" / "model" / "model.safetensors"))
    b = load_file(str(out / "export" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), context()
    assert temp_files(out) == [], context()  # no temp file or temp folder left anywhere


def test_stale_temp_files_of_every_stage_folder_are_swept(tmp_path):
    """A kill during any atomic write leaves '.<name>.<random>.tmp' in the folder written: the sweep at the start of
    a run covers output_dir and every folder a stage writes (export/done.json included: seed 784621 of the test
    above was killed there), and leaves a user's files and deeper folders alone."""
    from lola_train.pipeline import run_folders
    from lola_train.recipe import STAGES
    from lola_train.train.checkpoint import remove_stale_temp_files

    stale = [tmp_path / ".recipe.json.ab12.tmp", tmp_path / "data" / ".train.pt.tmp"]
    stale += [tmp_path / stage / ".done.json.x7y8.tmp" for stage in STAGES if stage != "convert"]
    keep = [tmp_path / "export" / "notes.txt", tmp_path / "export" / "model" / ".config.json.q1.tmp"]
    for path in stale + keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert sorted(remove_stale_temp_files(tmp_path, run_folders())) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
