"""The tiny recipe end to end: stage-1 and stage-2 losses fall, the export reloads in a fresh process without
lola_train (logits equal to the in-memory model), and kill-then-resume reaches the parameters of an uninterrupted
run. Also: finished stages are skipped, and a later stage without its input fails with a clear message."""
import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from lola_train.pipeline import run
from lola_train.recipe import load_recipe
from lola_train.train.checkpoint import load_named
from lola_train.train.metrics import read_metrics
from lola_train.train.student import add_lora, finetune_named_parameters, load_transferred

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["transfer.max_steps=6", "finetune.max_steps=6", "transfer.eval_every=3", "finetune.eval_every=3",
         "transfer.save_every=1", "finetune.save_every=1", "transfer.log_every=1", "finetune.log_every=1"]


def tiny(out, *extra):
    return load_recipe(["recipe=tiny", f"output_dir={out}", *SHORT, *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_full")
    results = run(tiny(out))
    return out, results


def val_losses(out, stage):
    return [r["loss"] for r in read_metrics(out) if r["stage"] == stage and r["split"] == "val"]


def test_stage_losses_fall(full_run):
    out, results = full_run
    for stage in ("transfer", "finetune"):
        losses = val_losses(out, stage)
        assert len(losses) == 3  # initial, step 3, step 6
        assert losses[-1] < losses[0], f"{stage} val loss did not fall: {losses}"
        assert results[stage]["best_val_loss"] < results[stage]["initial_val_loss"]
    t = results["transfer"]
    assert all(a < b for a, b in zip(t["mse_per_layer_last_eval"], t["mse_per_layer_before"]))
    train = [r["loss"] for r in read_metrics(out) if r["stage"] == "finetune" and r["split"] == "train"]
    assert train[-1] < train[0]


def merged_in_memory(recipe):
    model, _ = load_transferred(recipe, needed_by="test")
    peft_model = add_lora(model, recipe.finetune)
    final = torch.load(Path(recipe.output_dir) / "finetune" / "final.pt", weights_only=False)
    load_named(finetune_named_parameters(peft_model), final["params"], "test")
    return peft_model.merge_and_unload().eval()


def test_export_reloads_without_lola_train(full_run, tmp_path):
    out, results = full_run
    folder = Path(results["export"]["model_dir"])
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "lola_attention" in config  # base type: see configuration_lola
    assert (folder / "modeling_lola.py").exists() and (out / "export" / "adapter" / "adapter_config.json").exists()
    ids = torch.randint(1, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged_in_memory(tiny(out))(ids).logits
    torch.save({"ids": ids}, tmp_path / "ids.pt")
    code = f"""
import sys, importlib.util
sys.path.append({sysconfig.get_paths()['purelib']!r})
assert importlib.util.find_spec('lola_train') is None, 'lola_train must not be importable here'
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
ids = torch.load({str(tmp_path / 'ids.pt')!r})['ids']
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
torch.save({{'logits': logits, 'gen': gen, 'cls': type(model).__name__}}, {str(tmp_path / 'out.pt')!r})
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["cls"] == "LolaLlamaForCausalLM"
    assert torch.allclose(got["logits"], expected, atol=1e-5, rtol=0), (got["logits"] - expected).abs().max()
    assert got["gen"].shape == (1, 14)


def test_finished_stages_are_skipped(full_run, capsys):
    out, results = full_run
    before = (out / "transfer" / "final.pt").stat().st_mtime_ns
    again = run(tiny(out, "stages=[transfer,finetune]"))
    assert "already done" in capsys.readouterr().out
    assert (out / "transfer" / "final.pt").stat().st_mtime_ns == before
    assert again["transfer"]["best_val_loss"] == results["transfer"]["best_val_loss"]


def test_later_stage_without_its_input_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 'transfer'"):
        run(tiny(tmp_path, "stages=[finetune]"))


def run_cli(out, *extra, exit_after=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("LOLA_TEST_EXIT_AFTER_STEP", None)
    if exit_after:
        env["LOLA_TEST_EXIT_AFTER_STEP"] = exit_after
    args = ["recipe=tiny", f"output_dir={out}", "stages=[transfer,finetune]", *SHORT, *extra]
    return subprocess.run([sys.executable, str(ROOT / "linearize.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_kill_then_resume_matches_uninterrupted_run(full_run, tmp_path):
    reference, _ = full_run
    out = tmp_path / "resumed"
    crashed = run_cli(out, exit_after="transfer:4")
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    assert not (out / "transfer" / "done.json").exists()
    crashed = run_cli(out, exit_after="finetune:2")
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    assert "resumed from step 4" in crashed.stdout
    finished = run_cli(out)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resumed from step 2" in finished.stdout
    for stage in ("transfer", "finetune"):
        a = torch.load(reference / stage / "final.pt", weights_only=False)
        b = torch.load(out / stage / "final.pt", weights_only=False)
        assert a["best_step"] == b["best_step"]
        for name in a["params"]:
            assert torch.allclose(a["params"][name], b["params"][name], atol=1e-6, rtol=0), name
        last_a = torch.load(reference / stage / "ckpt.pt", weights_only=False)
        last_b = torch.load(out / stage / "ckpt.pt", weights_only=False)
        for name in last_a["params"]:  # the last (not only the best) parameters agree too
            assert torch.allclose(last_a["params"][name], last_b["params"][name], atol=1e-6, rtol=0), name


def test_export_of_the_stage1_model(full_run, tmp_path):
    """export.stage=transfer writes the stage-1 model (teacher q/k/v/o, trained feature maps; no LoRA, no adapter):
    its logits equal load_transferred's."""
    import shutil

    from transformers import AutoModelForCausalLM

    src, _ = full_run
    out = tmp_path / "run"
    out.mkdir()
    for name in ("transfer", "data"):
        if (src / name).exists():
            shutil.copytree(src / name, out / name)
    recipe = tiny(out, "stages=[export]", "export.stage=transfer")
    results = run(recipe)
    assert results["export"]["stage"] == "transfer" and "adapter_dir" not in results["export"]
    assert not (out / "export" / "adapter").exists()
    exported = AutoModelForCausalLM.from_pretrained(results["export"]["model_dir"], trust_remote_code=True).eval()
    stage1, _ = load_transferred(recipe, needed_by="test")
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids, use_cache=False).logits, stage1.eval()(ids, use_cache=False).logits,
                                   atol=1e-4, rtol=1e-4)


def test_training_with_cached_fraction_in_both_stages(tmp_path, monkeypatch):
    """transfer.cached_fraction / finetune.cached_fraction: both stages train with far keys drawn into the softmax
    set, their losses fall, and the exported model draws none."""
    from transformers import AutoModelForCausalLM

    from lola_train.modeling.hybrid_attention import HybridAttention

    draws = {True: 0, False: 0}  # by transfer_mode: stage 1, stage 2
    original = HybridAttention.draw_cached

    def counting(self, *args, **kwargs):
        draws[self.transfer_mode] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HybridAttention, "draw_cached", counting)
    results = run(tiny(tmp_path, "transfer.cached_fraction=0.5", "finetune.cached_fraction=0.5"))
    assert draws[True] > 0 and draws[False] > 0
    for name in ("transfer", "finetune"):
        assert results[name]["best_val_loss"] < results[name]["initial_val_loss"]
    exported = AutoModelForCausalLM.from_pretrained(results["export"]["model_dir"], trust_remote_code=True)
    layers = [m for m in exported.modules() if hasattr(m, "cached_fraction")]
    assert layers and all(m.cached_fraction == 0.0 for m in layers)


def test_activation_checkpointing_trains_the_same_parameters(full_run, tmp_path):
    """<stage>.activation_checkpointing recomputes instead of storing; both stages end with the plain run's
    parameters (same data order and draws)."""
    src, _ = full_run
    run(tiny(tmp_path, "stages=[convert,transfer,finetune]", "transfer.activation_checkpointing=true",
             "finetune.activation_checkpointing=true"))
    for stage in ("transfer", "finetune"):
        ours = torch.load(tmp_path / stage / "final.pt", weights_only=False)["params"]
        plain = torch.load(src / stage / "final.pt", weights_only=False)["params"]
        assert ours.keys() == plain.keys()
        for name in plain:
            torch.testing.assert_close(ours[name], plain[name], atol=1e-5, rtol=1e-4, msg=f"{stage} {name}")


def test_transfer_init_from_continues_another_run(full_run, tmp_path):
    """transfer.init_from (a length curriculum): stage 1 starts from another run's result, so its initial eval is
    that run's best; a run with other attention or a missing folder fails before any work, naming the key."""
    from lola_train.modeling.attention_config import ConfigError

    src, results = full_run
    out = tmp_path / "continued"
    cont = run(tiny(out, "stages=[convert,transfer]", f"transfer.init_from={src}", "transfer.max_steps=1",
                    "transfer.eval_every=1"))["transfer"]
    assert cont["init_from"] == str(src / "transfer" / "final.pt")
    assert cont["initial_val_loss"] == pytest.approx(results["transfer"]["best_val_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match="attention.window_size"):
        run(tiny(tmp_path / "other", "stages=[convert,transfer]", f"transfer.init_from={src}",
                 "attention.window_size=8"))
    decay_fix = "attention.linear_decay=None, this recipe 16; set attention.linear_decay=null"
    with pytest.raises(ConfigError, match=decay_fix):
        run(tiny(tmp_path / "decay", "stages=[convert,transfer]", f"transfer.init_from={src}",
                 "attention.linear_decay=16"))
    with pytest.raises(ConfigError, match="transfer.init_from"):
        run(tiny(tmp_path / "missing", "stages=[convert,transfer]", f"transfer.init_from={tmp_path / 'nowhere'}"))


def test_decay_lr_scale_steps_the_decay_logits_faster(tmp_path):
    """transfer.decay_lr_scale: after one AdamW step (|update| ~ lr per parameter) the decay logits moved
    decay_lr_scale times as far as with the default, the feature maps as far as with the default; the summary
    reports the learned horizons; resuming with another scale fails naming the key."""
    from lola_train.modeling.attention_config import ConfigError

    one = ["stages=[convert,transfer]", "attention.linear_decay=16", "transfer.max_steps=1", "transfer.eval_every=1"]
    base = run(tiny(tmp_path / "base", *one))["transfer"]
    fast = run(tiny(tmp_path / "fast", *one, "transfer.decay_lr_scale=10"))["transfer"]
    init = torch.load(tmp_path / "base" / "transfer" / "final.pt", weights_only=False)
    ends = {k: torch.load(tmp_path / k / "transfer" / "final.pt", weights_only=False)["params"]
            for k in ("base", "fast")}
    start = math.log(16 - 1.0)
    decay = [n for n in ends["base"] if n.endswith("decay_factors")]
    assert decay and len(decay) < len(ends["base"])
    for n in decay:
        moved_base = (ends["base"][n] - start).abs()
        moved_fast = (ends["fast"][n] - start).abs()
        assert moved_base.max() > 0
        torch.testing.assert_close(moved_fast, 10 * moved_base, rtol=0.05, atol=1e-4)
    other = next(n for n in ends["base"] if "feature_map" in n)
    torch.testing.assert_close(ends["fast"][other], ends["base"][other])
    for summary in (base, fast):
        h = summary["decay_horizons_initial"]
        assert h["min"] == h["max"] == pytest.approx(16.0)
        assert summary["decay_horizons_final"]["max"] != pytest.approx(16.0)
    assert init["decay_horizons_final"] == base["decay_horizons_final"]
    for done in ("final.pt", "done.json"):  # resume the checkpoint of step 1 with the default scale
        (tmp_path / "fast" / "transfer" / done).unlink()
    with pytest.raises(ConfigError, match="transfer.decay_lr_scale"):
        run(tiny(tmp_path / "fast", *one, "transfer.max_steps=2"))
    with pytest.raises(ConfigError, match="transfer.decay_lr_scale"):
        tiny(tmp_path / "bad", "transfer.decay_lr_scale=0")
