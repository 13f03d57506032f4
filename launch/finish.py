"""What node 0's launcher does once every rank of a run that finished has exited: consolidate
(consolidate.enabled), then publish to the Hugging Face Hub (hub). A failed or signal-stopped run does neither.

Here, not on the ranks: a long upload would hold the other ranks in a barrier until the collective timeout.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from tune_launch.launch.consolidate import consolidate_finished_run, finished_report


def finish_run(cfg, started_at: float, env: Mapping[str, str], stream: TextIO = sys.stderr, api=None) -> str | None:
    """Consolidate and push as the YAML asks; returns the push's one-line failure, if any (the run still succeeded:
    every local file is kept, and running the same command again retries the push)."""
    consolidated = consolidate_finished_run(cfg, started_at, stream) if cfg.consolidate.enabled else None
    if cfg.hub is None:
        return None
    report = finished_report(cfg, started_at)
    if report is None:
        return None
    final = Path(report["final_model"]) if report.get("final_model") else None
    folder = consolidated or (final if final is not None and final.is_dir() else None)
    if folder is None:
        line = f"hub: nothing to push to {cfg.hub.model_id}: the run left no final or consolidated model"
        print(f"tune-launch: warning: {line}", file=stream, flush=True)
        return line
    from tune_launch.training.hub import final_upload, make_api, push

    print(f"[tune-launch] hub: pushing {folder} to {cfg.hub.model_id}", file=stream, flush=True)
    error = push(api or make_api(env), cfg.hub, final_upload(folder, int(report.get("steps") or 0)))
    if error:
        print(f"tune-launch: warning: {error}; run the same command again to retry", file=stream, flush=True)
    else:
        print(f"[tune-launch] hub: pushed to https://huggingface.co/{cfg.hub.model_id}", file=stream, flush=True)
    return error
