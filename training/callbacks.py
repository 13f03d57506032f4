"""The callbacks that YAML settings add to the Trainer: early stopping, a checkpoint at the last step when
consolidation takes the last one, and hub pushes of checkpoints."""

from __future__ import annotations

from transformers import TrainerCallback

from tune_launch.training.schema import TrainingConfig


def settings_callbacks(cfg: TrainingConfig) -> list[TrainerCallback]:
    from tune_launch.training.best import EarlyStopping, FinalStepSave

    found: list[TrainerCallback] = []
    stopping = cfg.eval.early_stopping
    if stopping is not None and cfg.has_eval:
        found.append(EarlyStopping(stopping.patience, stopping.threshold))
    if cfg.consolidate.enabled and cfg.consolidate.checkpoint == "last":
        found.append(FinalStepSave())
    if cfg.hub is not None and cfg.hub.strategy != "end":
        from tune_launch.training.hub import HubCheckpointPush

        found.append(HubCheckpointPush(cfg.hub))
    return found
