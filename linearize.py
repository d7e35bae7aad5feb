#!/usr/bin/env python
"""Entry point: ``python linearize.py recipe=NAME [key.sub=value ...]`` or
``accelerate launch linearize.py recipe=llama8b``. The recipe (recipes/NAME.yaml or a YAML path) describes the
whole run; overrides use OmegaConf dot-list syntax. Everything that can be checked before the first training
step is (lola_train.preflight): a bad recipe, model, data source, output_dir or disk is one line on stderr and
exit code 2."""
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    from lola_train.modeling.attention_config import ConfigError
    from lola_train.pipeline import run
    from lola_train.recipe import load_recipe

    try:  # a bad recipe or input (checked before any work) is one line naming the key, and exit code 2
        run(load_recipe(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"linearize.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
