"""The launcher's side of hang detection that touches files and processes; the judgement is `launch/stall.py`.

- Heartbeats: each node's launcher reads its own ranks' files (only those its own launch wrote: the attempt
  id it passes to the ranks); node 0's launcher also reads every other rank's, which count once they change
  after this launch began (a file left by an earlier run never changes).
- A stall on node 0 of a multi-node run: node 0 announces it in output_dir/heartbeat/stall.json; every other
  node's launcher captures its own ranks' stacks, posts their summary (stacks-node<N>.json) and stops its
  ranks; node 0 waits a few seconds for those summaries, then gives the verdict for the whole job. A node
  that does not answer is named as such. A node other than 0 that sees its ranks stall without hearing from
  node 0 (node 0 frozen) acts on its own after the limit plus `REMOTE_SLACK_S`.
- The stall report: output_dir/logs/stall-<time>-node<N>.txt holds the verdict and every rank's stacks.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tune_launch import heartbeat
from tune_launch.launch.stacks import RankStack, StackTarget, capture
from tune_launch.launch.stall import Limits, Stall, StallTracker, stall_lines

READ_EVERY_S = 1.0  # at least; node 0 of a large job reads its ~world_size files at most 500 a second
REMOTE_STACKS_WAIT_S = 10.0  # node 0 waits this long for the other nodes' stack summaries
CONCLUSION_WAIT_S = 20.0  # another node waits this long for node 0's verdict before it exits on its own
REMOTE_SLACK_S = 30.0  # another node acts on its own stall this much later than node 0 would


@dataclass(frozen=True)
class StallOutcome:
    """What the verdict says about a stall, and whether node 0 requeues the job."""

    lines: tuple[str, ...]
    requeue: bool = False
    stall_id: str = ""


def new_attempt_id() -> str:
    return uuid.uuid4().hex[:12]


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class HangWatch:
    """One node's heartbeat reading, stall coordination and stack capture for `launch/run.py`'s loop."""

    def __init__(self, run_dir: str | os.PathLike, node_rank: int, nodes: int, processes_per_node: int,
                 watchdog: Any, attempt: str, started_at: float) -> None:
        self.run_dir, self.node_rank, self.nodes = Path(run_dir), node_rank, nodes
        self.watchdog, self.attempt = watchdog, attempt
        self.own = range(node_rank * processes_per_node, (node_rank + 1) * processes_per_node)
        watched = range(nodes * processes_per_node) if node_rank == 0 else self.own
        node_of = {r: r // max(processes_per_node, 1) for r in watched}
        self.tracker = StallTracker(Limits.from_config(watchdog), watched, node_of, started_at)
        self.remote = [r for r in watched if r not in self.own]
        self.read_every_s = max(READ_EVERY_S, len(watched) / 500)
        self._last_read = 0.0
        heartbeat.folder(self.run_dir).mkdir(parents=True, exist_ok=True)
        for r in self.own:  # this node's ranks start from a clean slate; nobody else writes them
            heartbeat.rank_file(self.run_dir, r).unlink(missing_ok=True)
        self._baseline = {r: (b.signature if b else None) for r, b in
                          ((r, heartbeat.read(heartbeat.rank_file(self.run_dir, r))) for r in self.remote)}
        self._board = Path(heartbeat.folder(self.run_dir)) / heartbeat.STALL_FILE
        if node_rank == 0:
            self._board.unlink(missing_ok=True)
        self._board_baseline = _signature(self._board)
        self.beats: dict[int, heartbeat.Heartbeat] = {}

    # ------------------------------------------------------------------ reading

    def read(self, now: float) -> dict[int, heartbeat.Heartbeat] | None:
        """This launch's heartbeats (at most once a second; None in between)."""
        if now - self._last_read < self.read_every_s:
            return None
        self._last_read = now
        fresh = {}
        for r in self.own:
            b = heartbeat.read(heartbeat.rank_file(self.run_dir, r))
            if b is not None and (not self.attempt or b.attempt == self.attempt):
                fresh[r] = b
        for r in self.remote:
            b = heartbeat.read(heartbeat.rank_file(self.run_dir, r))
            if b is not None and b.signature != self._baseline.get(r):
                self._baseline[r] = None  # from now on every version of this file is this launch's
                fresh[r] = b
        self.beats.update(fresh)
        return fresh

    def announced(self) -> dict[str, Any] | None:
        """On a node other than 0: node 0's announcement of a stall, once it appears."""
        if self.node_rank == 0 or _signature(self._board) in (None, self._board_baseline):
            return None
        data = _read_json(self._board)
        return data if data and data.get("id") else None

    def targets(self, pids: dict[int, int]) -> dict[int, StackTarget]:
        """This node's ranks to ask for stacks: pids the loop found, else the ones their heartbeats give."""
        host = socket.gethostname()
        out = {}
        for r in self.own:
            b = self.beats.get(r)
            pid = pids.get(r) or (b.pid if b is not None and b.host == host else 0)
            if pid:
                out[r] = StackTarget(r, pid, b.main_thread if b else 0, b.stack_file if b else "")
        return out

    # ------------------------------------------------------------------ acting on a stall

    def on_stall(self, stall: Stall, pids: dict[int, int], checkpoint: str | None, reason: str | None = None) -> StallOutcome:
        """Node 0 (or a node acting alone): capture, gather the other nodes' summaries, write the report.
        `reason`: why the job is ended when it is not the stall limit (a stop signal a stopped rank cannot answer)."""
        stall_id = new_attempt_id()
        multi = self.nodes > 1 and self.node_rank == 0
        if multi:
            heartbeat.write_json(self._board, {"id": stall_id, "by_node": 0, "time": time.time(), "state": "capturing"})
        stacks = self._capture(pids)
        notes: list[str] = []
        if multi:
            stacks.update(self._collect(stall_id, notes))
        requeue = self.watchdog.on_stall == "requeue" and self.node_rank == 0
        report = self._report_path()
        lines = stall_lines(stall, stacks, str(report), checkpoint, requeue, reason)
        lines = (*lines[:-1], *(f"[tune-launch] {n}" for n in notes), lines[-1])
        self._write_report(report, lines, stacks)
        return StallOutcome(lines, requeue, stall_id)

    def conclude(self, outcome: StallOutcome) -> None:
        """Node 0's last word on a stall, once it printed the verdict and requeued (the other nodes exit on it;
        `tune-launch status` shows it)."""
        if self.node_rank == 0 and outcome.stall_id:
            try:
                heartbeat.write_json(self._board, {"id": outcome.stall_id, "by_node": 0, "time": time.time(),
                                                   "state": "done", "lines": list(outcome.lines)})
            except OSError:
                pass

    def on_announcement(self, announcement: dict[str, Any], pids: dict[int, int]) -> StallOutcome:
        """A node other than 0: node 0 found the job stalled; capture this node's stacks and post them."""
        stacks = self._capture(pids)
        report = self._report_path()
        summary = {str(r): {"pid": s.pid, "state": s.state, "where": s.where(), "stopped": s.stopped,
                            "waiting": s.waiting, "report": str(report)} for r, s in stacks.items()}
        heartbeat.write_json(heartbeat.node_stacks_file(self.run_dir, self.node_rank),
                             {"id": announcement["id"], "node": self.node_rank, "ranks": summary})
        head = f"[tune-launch] node 0 found the job stalled; this node's stacks: {report}"
        self._write_report(report, (head,), stacks)
        return StallOutcome((head,))

    def conclusion(self, announcement: dict[str, Any]) -> tuple[str, ...]:
        """Node 0's verdict lines, once it wrote them (waits up to CONCLUSION_WAIT_S)."""
        deadline = time.monotonic() + CONCLUSION_WAIT_S
        while time.monotonic() < deadline:
            data = _read_json(self._board)
            if data and data.get("id") == announcement.get("id") and data.get("state") == "done":
                return tuple(data.get("lines") or ())
            time.sleep(0.5)
        return ("tune-launch: error: node 0 announced a stall but gave no verdict within "
                f"{CONCLUSION_WAIT_S:.0f} s; see its log",)

    # ------------------------------------------------------------------ helpers

    def _capture(self, pids: dict[int, int]) -> dict[int, RankStack]:
        if not self.watchdog.capture_stacks:
            return {}
        return capture(self.targets(pids))

    def _collect(self, stall_id: str, notes: list[str]) -> dict[int, RankStack]:
        """The other nodes' summaries as RankStacks (state and where only); nodes that did not answer noted."""
        waiting_for = set(range(1, self.nodes))
        got: dict[int, RankStack] = {}
        deadline = time.monotonic() + REMOTE_STACKS_WAIT_S
        while waiting_for and time.monotonic() < deadline:
            for node in sorted(waiting_for):
                data = _read_json(heartbeat.node_stacks_file(self.run_dir, node))
                if data and data.get("id") == stall_id:
                    waiting_for.discard(node)
                    for r, s in (data.get("ranks") or {}).items():
                        got[int(r)] = RemoteStack.from_summary(int(r), s)
            time.sleep(0.3)
        for node in sorted(waiting_for):
            notes.append(f"node {node}'s launcher did not answer within {REMOTE_STACKS_WAIT_S:.0f} s "
                         "(the node is frozen, gone, or its output_dir is not this one)")
        return got

    def _report_path(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        return self.run_dir / "logs" / f"stall-{stamp}-node{self.node_rank}.txt"

    def _write_report(self, path: Path, lines: tuple[str, ...], stacks: dict[int, RankStack]) -> None:
        parts = [*lines, ""]
        for r, s in sorted(stacks.items()):
            if isinstance(s, RemoteStack):
                parts.append(f"=== rank {r} (pid {s.pid}): {s.state}; stacks in {s.report}")
                continue
            parts.append(f"=== rank {r} (pid {s.pid}): process {s.state}; stacks from {', '.join(s.sources) or 'nothing'}"
                         + (f" ({s.note})" if s.note else "") + (f"; faulthandler's dumps: {s.stack_file}" if s.stack_file else ""))
            parts.append(s.text or "  (no stack)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(parts) + "\n", encoding="utf-8")
        except OSError:
            pass


@dataclass(frozen=True)
class RemoteStack(RankStack):
    """A rank of another node, as that node's launcher summarized it."""

    report: str = ""
    remote_where: str = ""
    remote_waiting: bool | None = None

    @classmethod
    def from_summary(cls, rank: int, s: dict[str, Any]) -> RemoteStack:
        return cls(rank, int(s.get("pid") or 0), str(s.get("state") or "?"), report=str(s.get("report") or ""),
                   remote_where=str(s.get("where") or ""), remote_waiting=s.get("waiting"))

    @property
    def waiting(self) -> bool | None:  # type: ignore[override]
        return self.remote_waiting

    def where(self) -> str:
        return self.remote_where
