"""Package discovery that pyproject.toml cannot express; all other metadata is in pyproject.toml.

Installs every ``lola_train*`` package, plus ``lola_kernels`` from the folder ``kernels/``: the import name must
not be ``kernels``, which would shadow the PyPI package of that name (transformers probes it). The evaluation
suite in ``eval/`` is installed as ``lola_eval`` (a bare ``eval`` reads like the builtin); its lm-eval task
YAMLs (``eval/tasks/``, data files, not a package) travel as package data.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["lola_train", "lola_train.*"]) + ["lola_kernels", "lola_eval"],
      package_dir={"lola_kernels": "kernels", "lola_eval": "eval"},
      package_data={"lola_eval": ["tasks/*.yaml", "tasks/*.py", "tasks/*_yaml"]})
