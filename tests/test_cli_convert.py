"""linearize.py: recipe + overrides, the convert summary, and errors that name the key."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "linearize.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_convert_stage_prints_and_writes_summary(tmp_path):
    r = run("recipe=tiny", "stages=[convert]", f"output_dir={tmp_path}", "attention.window_size=8")
    assert r.returncode == 0, r.stderr
    assert "layers_converted" in r.stdout
    summary = json.loads((tmp_path / "convert_summary.json").read_text())
    assert summary["layers_converted"] == 2 and summary["attention"]["window_size"] == 8
    assert summary["finite"] and summary["params_added"] == summary["params_trainable_stage1"] > 0


def test_bad_override_names_the_key():
    r = run("recipe=tiny", "attention.windw=3")
    assert r.returncode == 2
    assert "attention.windw" in r.stderr and "window_size" in r.stderr
    r = run("recipe=tiny", "attention.window_layout=zz")
    assert r.returncode == 2 and "'sw', 'tk'" in r.stderr
    r = run("recipe=does_not_exist")
    assert r.returncode == 2 and "tiny" in r.stderr
