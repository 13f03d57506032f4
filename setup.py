"""The one import package, `tune_launch`, assembled from the repository's top-level folders.

pyproject.toml holds the metadata; this file only says which folder is which part of the package, so the
folders stay where users and tutorials expect them (`launch/`, `training/`, `accelerate_configs/`, ...)
while the installed wheel has a single top-level name that cannot collide with ROS 2's `launch` or a
user's own `training/`. Subpackages are found, never listed by hand.
"""

from setuptools import find_packages, setup

CODE = {"tune_launch.launch": "launch", "tune_launch.training": "training"}  # packages with their subpackages
DATA = {  # shipped files, carried beside the code (launch/profiles.py finds them at the same relative place)
    "tune_launch.accelerate_configs": ("accelerate_configs", ["*.yaml"]),
    "tune_launch.deepspeed_configs": ("deepspeed_configs", ["*.json"]),
    "tune_launch.slurm_scripts": ("slurm", ["*.sh"]),
}


def packages_and_dirs() -> tuple[list[str], dict[str, str]]:
    packages, dirs = ["tune_launch"], {"tune_launch": "tune_launch"}
    for name, folder in CODE.items():
        packages.append(name)
        dirs[name] = folder
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    for name, (folder, _patterns) in DATA.items():
        packages.append(name)
        dirs[name] = folder
    return packages, dirs


PACKAGES, PACKAGE_DIR = packages_and_dirs()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR,
      package_data={name: patterns for name, (_folder, patterns) in DATA.items()})
