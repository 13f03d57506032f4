"""`tune-launch status RUN_DIR [--json]`: where a run is, from its files alone (another shell, a login node).

Reads the ranks' heartbeats (output_dir/heartbeat/), the stall verdict if the launcher ended the run for a
stall, the run report of a finished run and the newest complete checkpoint. `describe_run` is pure (files
already read, the time given); the thin `run_from_args` reads and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tune_launch import heartbeat
from tune_launch.errors import TuneLaunchError

LIVE_WITHIN_S = 15.0  # a heartbeat written this recently (pulses come every 5 s) belongs to a live rank


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Where a run is: phase, step, loss, tokens/s, time left, last checkpoint, each rank's heartbeat."
    p.add_argument("run_dir", help="the run's output_dir (or its training YAML)")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _age(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else _clock(seconds)


def current_ranks(beats: dict[int, heartbeat.Heartbeat]) -> dict[int, heartbeat.Heartbeat | None]:
    """The ranks of the newest launch in the folder (an earlier, larger run may have left more files)."""
    if not beats:
        return {}
    newest = max(beats.values(), key=lambda b: b.started)
    started = min((b.started for b in beats.values() if b.attempt == newest.attempt), default=newest.started)
    world = newest.world_size
    return {r: (b if (b := beats.get(r)) is not None and b.started >= started - 3600 else None) for r in range(world)}


def run_state(ranks: dict[int, heartbeat.Heartbeat | None], stall: dict | None, now: float, alive: dict[int, bool]) -> str:
    seen = [b for b in ranks.values() if b is not None]
    phases = {b.phase for b in seen}
    if stall is not None:
        return "stalled (the launcher stopped it)"
    if seen and phases == {"done"} and len(seen) == len(ranks):
        return "finished"
    if "failed" in phases:
        return "failed"
    if phases and phases <= {"stopped", "done"}:
        return "stopped by a signal (run the same command to resume)"
    if any(alive.get(b.rank) is False for b in seen):
        return "not running (its processes are gone)"
    if seen and now - max(b.time for b in seen) < LIVE_WITHIN_S:
        return "running"
    return "not running? (no heartbeat for " + (_age(now - max(b.time for b in seen)) if seen else "ever") + ")"


def describe_run(run_dir: Path, beats: dict[int, heartbeat.Heartbeat], stall: dict | None, report: dict | None,
                 checkpoint: str | None, now: float, alive: dict[int, bool] | None = None) -> dict[str, Any]:
    """Everything status shows, as a dict (the --json output). Pure."""
    alive = alive or {}
    ranks = current_ranks(beats)
    newest_start = max((b.started for b in ranks.values() if b), default=0.0)
    if stall is not None and float(stall.get("time") or 0) < newest_start:
        stall = None  # from an earlier launch in this folder
    lead = ranks.get(0) or next((b for b in ranks.values() if b), None)
    out: dict[str, Any] = {"run_dir": str(run_dir), "state": run_state(ranks, stall, now, alive), "checkpoint": checkpoint}
    if lead is not None:
        left = (lead.max_steps - lead.step) * lead.step_s if lead.max_steps and lead.step_s and lead.phase == "train" else None
        out.update(phase=lead.where, step=lead.step, max_steps=lead.max_steps, loss=lead.loss, loss_step=lead.loss_step,
                   eval_loss=lead.eval_loss, tokens_per_s=lead.tokens_per_s, step_s=lead.step_s, seconds_left=left,
                   elapsed_s=now - lead.started if lead.started else None)
    out["ranks"] = [{"rank": r, **({"node": b.node, "host": b.host, "pid": b.pid, "where": b.where, "phase": b.phase,
                                    "step": b.step, "heartbeat_age_s": now - b.time, "progress_age_s": now - b.progress_time,
                                    "alive": alive.get(r), "error": b.error or None} if b else {"where": "no heartbeat"})}
                    for r, b in sorted(ranks.items())]
    if stall is not None:
        out["stall"] = list(stall.get("lines") or [])
    if report is not None and out["state"] == "finished":
        out["report"] = {k: report.get(k) for k in ("steps", "tokens_per_second", "wall_seconds", "final_train_loss", "final_model")}
    return out


def format_status(d: dict[str, Any]) -> str:
    lines = [f"run        {d['run_dir']}", f"state      {d['state']}"]
    if "phase" in d:
        lines.append(f"phase      {d['phase']} (rank 0)")
        if d.get("loss") is not None:
            ev = f", eval {d['eval_loss']:.4f}" if d.get("eval_loss") is not None else ""
            lines.append(f"loss       {d['loss']:.4f} at step {d['loss_step']}{ev}")
        if d.get("tokens_per_s"):
            lines.append(f"tokens/s   {d['tokens_per_s']:,.0f}")
        if d.get("seconds_left") is not None:
            lines.append(f"time left  {_clock(d['seconds_left'])} ({d['max_steps'] - d['step']} steps x {d['step_s']:.2f} s)")
        if d.get("elapsed_s") is not None:
            lines.append(f"elapsed    {_clock(d['elapsed_s'])}")
    lines.append(f"checkpoint {d.get('checkpoint') or 'none complete yet'}")
    for i, r in enumerate(d["ranks"]):
        head = "ranks      " if i == 0 else "           "
        if "node" not in r:
            lines.append(f"{head}rank {r['rank']}: no heartbeat")
            continue
        gone = "" if r.get("alive") is not False else ", process gone"
        err = f", {r['error']}" if r.get("error") else ""
        lines.append(f"{head}rank {r['rank']} node {r['node']} {r['host']} pid {r['pid']}: {r['where']}; heartbeat "
                     f"{_age(r['heartbeat_age_s'])} ago, progress {_age(r['progress_age_s'])} ago{gone}{err}")
    lines += [f"stall      {line}" for line in d.get("stall", [])]
    if "report" in d:
        rep = d["report"]
        lines.append(f"finished   {rep.get('steps')} steps, {rep.get('tokens_per_second') or 0:,.0f} tokens/s, "
                     f"{rep.get('wall_seconds') or 0:.0f} s; final model {rep.get('final_model') or 'not saved'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading (the only side effects)

def resolve_run_dir(arg: str) -> Path:
    path = Path(arg)
    if path.is_file():
        from tune_launch.training.config import load_config

        return Path(load_config(path, check_files=False).output_dir)
    if not path.is_dir():
        raise TuneLaunchError(f"{arg}: no such run folder; pass the output_dir of a run (or its training YAML)")
    return path


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive_here(beats: dict[int, heartbeat.Heartbeat]) -> dict[int, bool]:
    """For ranks on this machine: whether their process still exists (others are unknown)."""
    host = socket.gethostname()
    out = {}
    for r, b in beats.items():
        if b.host == host and b.pid and b.phase not in heartbeat.FINAL_PHASES:
            try:
                os.kill(b.pid, 0)
                out[r] = True
            except ProcessLookupError:
                out[r] = False
            except PermissionError:
                out[r] = True
    return out


def read_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    from tune_launch.training.checkpoint import find_resume_checkpoint

    beats = heartbeat.read_run(run_dir)
    report = _json(run_dir / "run_report.json")
    if not beats and report is None:
        raise TuneLaunchError(f"{run_dir}: no heartbeats in {heartbeat.folder(run_dir)}: not a tune-launch run folder, "
                              "or the run has not started yet")
    stall = _json(heartbeat.folder(run_dir) / heartbeat.STALL_FILE)
    stall = stall if stall and stall.get("state") == "done" else None
    ckpt = find_resume_checkpoint(run_dir, warn=False)
    return describe_run(run_dir, beats, stall, report, ckpt.name if ckpt else None, time.time() if now is None else now,
                        _alive_here(beats))


def run_from_args(args: argparse.Namespace) -> int:
    status = read_status(resolve_run_dir(args.run_dir))
    print(json.dumps(status, indent=2, sort_keys=True, default=str) if args.json else format_status(status))
    return 0
