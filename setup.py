"""Package list for setuptools (metadata lives in pyproject.toml).

``conf/`` is shipped inside the wheel as the package data ``bbuqc_lightning/conf`` so that an installed
(non-editable) package finds its Hydra configs; from a checkout, ``bbuqc_lightning.config.config_dir``
finds ``<repo>/conf`` first.

The Lightning callbacks live in the repository's top-level ``callbacks/`` folder (the project layout) and are
imported and installed as ``bbuqc_lightning.callbacks`` only: ``bbuqc_lightning/callbacks`` is a link to that
folder, so nothing named ``callbacks`` lands in site-packages.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["bbuqc_lightning", "bbuqc_lightning.*"]),
        "bbuqc_lightning.conf",
    ],
    package_dir={"bbuqc_lightning.conf": "conf"},
    package_data={"bbuqc_lightning.conf": ["*.yaml", "**/*.yaml"]},
)
