"""An exported folder loads like a stock checkpoint: ``AutoTokenizer.from_pretrained(dir)`` (no trust_remote_code)
neither prompts nor warns, ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` prints no
model-type warning, and ``tokenizer_config.json`` carries the model's maximum length and no load-time arguments.
The loads run in a fresh process whose stdin stays open (as an interactive shell's would) and whose output is
captured."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lola_train.convert import convert
from lola_train.export import LOAD_TIME_KEYS, clean_tokenizer_config, export_model
from lola_train.models import load_model
from lola_train.recipe import load_recipe

SEPARATOR = "=== model ==="


def word_tokenizer(folder: Path):
    """A small stock fast tokenizer, saved and loaded back with AutoTokenizer (as a teacher's tokenizer is), so
    its init_kwargs hold the load-time arguments transformers adds (is_local, local_files_only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in "the quick brown fox jumps over lazy dog".split():
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.init_kwargs.get("is_local") is True  # what made the old exports carry load-time arguments
    return tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_clean")
    recipe = load_recipe(["recipe=tiny"])
    model, _ = load_model(random=recipe.model.random)
    convert(model, recipe.attention)
    return export_model(model, word_tokenizer(root / "teacher_tokenizer"), root / "model")


def test_tokenizer_config_has_the_model_length_and_no_load_time_arguments(exported):
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 2048  # the tiny recipe's max_position_embeddings, not int(1e30)
    assert not set(LOAD_TIME_KEYS) & set(config), sorted(set(LOAD_TIME_KEYS) & set(config))


def test_config_keeps_the_base_model_type_and_points_at_the_remote_classes(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and config["lola_base_model_type"] == "llama"
    assert config["auto_map"] == {"AutoConfig": "configuration_lola.LolaLlamaConfig",
                                  "AutoModelForCausalLM": "modeling_lola.LolaLlamaForCausalLM"}


def test_clean_tokenizer_config_keeps_a_smaller_limit(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"model_max_length": 512, "is_local": True, "local_files_only": True,
                                "tokenizer_class": "TokenizersBackend"}))
    clean_tokenizer_config(path, 8192)
    assert json.loads(path.read_text()) == {"model_max_length": 512, "tokenizer_class": "TokenizersBackend"}


def test_loads_print_no_prompt_and_no_warnings(exported, tmp_path):
    code = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(exported)!r})
print("tokenizer", type(tok).__name__, tok.model_max_length, flush=True)
print({SEPARATOR!r}, file=sys.stderr, flush=True)
model = AutoModelForCausalLM.from_pretrained({str(exported)!r}, trust_remote_code=True)
print("model", type(model).__name__, type(model.config).__name__, model.config.model_type, flush=True)
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning",
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    # stdin is a pipe that stays open: a "[y/N]" prompt would wait on it (15 s), as in an interactive shell
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines() == ["tokenizer TokenizersBackend 2048",
                                "model LolaLlamaForCausalLM LolaLlamaConfig llama"], out + err
    tokenizer_err, model_err = err.split(SEPARATOR + "\n")
    assert tokenizer_err == "", tokenizer_err  # no prompt, no warning: nothing at all
    # the model load may draw transformers' weight-loading progress bar; nothing else
    lines = [x for x in model_err.replace("\r", "\n").splitlines() if x.strip() and "Loading weights" not in x]
    assert lines == [], lines
