"""tune-launch: one training YAML, run well on a laptop CPU, one GPU, eight GPUs or many SLURM nodes.

One import package, three parts (the folders at the repository root, mapped by setup.py):

- `tune_launch` itself (this folder): small leaf modules both halves share (errors, redaction, durable
  file helpers, profile traits, the launcher<->rank protocol). They import nothing else of the project.
- `tune_launch.launch` (`launch/`): the launcher: plan (hardware -> estimate -> profile -> command), run.
- `tune_launch.training` (`training/`): the per-rank training script, started as
  `accelerate launch -m tune_launch.training.train`. It imports the leaf modules, never the launcher.
- `tune_launch.accelerate_configs`, `tune_launch.deepspeed_configs`, `tune_launch.slurm_scripts`: the shipped
  config files and SLURM scripts (`accelerate_configs/`, `deepspeed_configs/`, `slurm/`).
"""

__version__ = "0.1.0"
