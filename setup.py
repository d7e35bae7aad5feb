"""Package discovery that pyproject.toml cannot express; all other metadata is in pyproject.toml.

Installs every ``lola_train*`` package, plus ``lola_kernels`` from the folder ``kernels/``: the import name must
not be ``kernels``, which would shadow the PyPI package of that name (transformers probes it).
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["lola_train", "lola_train.*"]) + ["lola_kernels"],
      package_dir={"lola_kernels": "kernels"})
