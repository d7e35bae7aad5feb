"""The 'eval' stage of a recipe (``stages: [..., export, eval]``): the evaluation suite on the exported checkpoint.

It runs ``python -m lola_eval.suite`` in-process with the recipe's ``eval`` section: teacher = ``model.name_or_path``,
linearized = ``<output_dir>/export/model``, results under ``<output_dir>/eval`` (each part resumable).
"""
from __future__ import annotations

from pathlib import Path


def suite_argv(recipe) -> list[str]:
    """The lola_eval.suite arguments for a recipe (validated by lola_train.recipe.validate_eval)."""
    e = recipe.eval
    out = Path(recipe.output_dir)
    model_dir = out / "export" / "model"
    if recipe.model.name_or_path is None:
        raise ValueError("stage eval needs a model with a tokenizer: model.name_or_path (the teacher); a random "
                         "model (model.random) cannot be evaluated on text tasks")
    argv = ["--teacher", recipe.model.name_or_path, "--linearized", str(model_dir),
            "--caches", ",".join(e.caches), "--teacher-caches", ",".join(e.teacher_caches),
            "--parts", ",".join(e.parts),
            "--passkey-lengths", ",".join(str(x) for x in e.passkey_lengths), "--passkey-n", str(e.passkey_n),
            "--tasks", ",".join(e.tasks), "--limit", str(e.limit), "--out", str(out / "eval")]
    return argv + (["--quick"] if e.quick else [])


def stage_eval(recipe) -> dict:
    """Run the suite; returns {'results_md': path, 'argv': [...]} for the stage's done.json."""
    from . import suite

    argv = suite_argv(recipe)
    model_dir = Path(argv[argv.index("--linearized") + 1])
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"stage eval: no exported checkpoint at {model_dir}; run the export stage first "
                                "(stages: [..., export, eval])")
    suite.main(argv)
    return {"results_md": str(Path(recipe.output_dir) / "eval" / "results.md"), "argv": argv}
