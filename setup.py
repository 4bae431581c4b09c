"""Build hook for Apache Beam workers: `--setup_file=./setup.py` ships etbert-jax to remote runners.

Beam builds an sdist of the repository with `python setup.py sdist` and installs it on every
Dataflow, Flink or Spark worker. All metadata and dependencies live in pyproject.toml, so this file
only hands over to setuptools.
"""

import setuptools

setuptools.setup()
