"""`tune-launch`: subcommands are thin adapters over library functions; every TuneLaunchError is one line, exit 2.

    tune-launch [--profile P] [--gpus N] [--dry-run] train.yaml [key.sub=value ...]   launch (default)
    tune-launch plan train.yaml [--gpus N] [--nodes N] [--hardware F] [--json]       memory plan per profile
    tune-launch detect [--json]                                                       this machine
    tune-launch profiles                                                              shipped profiles
    tune-launch submit train.yaml --nodes N ...                                       SLURM via submitit
    tune-launch consolidate CHECKPOINT OUT ...                                        shards -> safetensors
    tune-launch prepare train.yaml [key.sub=value ...]                                tokenize + pack once, cached
    tune-launch report RUN_DIR [RUN_DIR ...]                                          report.png of runs
    tune-launch status RUN_DIR [--json]                                               a run's phase, step, ranks
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tune_launch.errors import TuneLaunchError

if TYPE_CHECKING:  # the subcommands import what they need when they run: `tune-launch profiles` stays instant
    from tune_launch.launch.hardware import Hardware
    from tune_launch.launch.model_facts import ModelFacts
    from tune_launch.launch.plan import LaunchPlan, LaunchRequest
    from tune_launch.training.schema import TrainingConfig

EXTERNAL = {"submit": "tune_launch.launch.submit", "consolidate": "tune_launch.launch.consolidate",
            "prepare": "tune_launch.launch.prepare", "report": "tune_launch.launch.runs_report",
            "status": "tune_launch.launch.status"}
SUBCOMMANDS = ("detect", "profiles", "plan", *EXTERNAL, "run")


def add_launch_arguments(p: argparse.ArgumentParser, *, planning: bool = False) -> None:
    p.add_argument("config", help="training YAML (see examples/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override YAML values, e.g. optim.learning_rate=1e-4")
    p.add_argument("--profile", default="auto", help="auto (default: fastest that fits), or one of `tune-launch profiles`")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: all detected)")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (default: 1, or the SLURM allocation)")
    p.add_argument("--hardware", type=Path, default=None, help="plan for this hardware JSON instead of detecting")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if planning:
        p.add_argument("--json", action="store_true", help="machine-readable plan")
        return
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: 0, or SLURM_NODEID)")
    p.add_argument("--main-process-ip", default=None, help="address of node 0 (multi-node)")
    p.add_argument("--main-process-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--cpu", action="store_true", help="run on CPU processes (gloo): development and rehearsals")
    p.add_argument("--num-processes", type=int, default=None, help="with --cpu: processes to start (rehearse a profile with 2)")
    p.add_argument("--strict", action="store_true", help="refuse to fall back when fewer GPUs are here than asked")
    p.add_argument("--dry-run", action="store_true", help="print the command and environment for every node, run nothing")


def build_parser(command: str) -> argparse.ArgumentParser:
    prog = "tune-launch" if command == "run" else f"tune-launch {command}"
    p = argparse.ArgumentParser(prog=prog, description=__doc__ if command == "run" else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "run":
        add_launch_arguments(p)
    elif command == "plan":
        add_launch_arguments(p, planning=True)
    elif command == "detect":
        p.add_argument("--json", action="store_true")
        p.add_argument("--output-dir", default=".", help="where checkpoints go (free disk is measured there)")
        p.add_argument("--debug", action="store_true")
    elif command == "profiles":
        p.add_argument("--debug", action="store_true")
    else:
        importlib.import_module(EXTERNAL[command]).add_arguments(p)
        if not any(a.dest == "debug" for a in p._actions):
            p.add_argument("--debug", action="store_true")
    return p


# --------------------------------------------------------------------------- inputs (the only side-effect readers)

@dataclass(frozen=True)
class Planned:
    """A plan with the inputs it was made from (the subcommands print or check them)."""

    plan: LaunchPlan
    facts: ModelFacts | None
    hw: Hardware
    cfg: TrainingConfig


def _hardware(args: argparse.Namespace, env: Mapping[str, str], output_dir: str = ".") -> Hardware:
    from tune_launch.launch.hardware import detect_hardware, load_hardware

    if args.hardware is not None:
        return load_hardware(args.hardware)
    return detect_hardware(output_dir, env)


def _request(args: argparse.Namespace, planning: bool) -> LaunchRequest:
    from tune_launch.launch.plan import LaunchRequest

    return LaunchRequest(
        config_path=Path(args.config), overrides=tuple(args.overrides), profile=args.profile, gpus=args.gpus,
        nodes=args.nodes, node_rank=getattr(args, "node_rank", None), main_process_ip=getattr(args, "main_process_ip", None),
        main_process_port=getattr(args, "main_process_port", None), cpu=getattr(args, "cpu", False),
        num_processes=getattr(args, "num_processes", None), strict=getattr(args, "strict", False),
        hardware_given=args.hardware is not None, planning=planning,
    )


def _make_plan(args: argparse.Namespace, env: Mapping[str, str], planning: bool, placeholder_rendezvous: bool = False) -> Planned:
    from tune_launch.launch.plan import make_plan
    from tune_launch.profiles import get_profile
    from tune_launch.training.config import check_device, load_config

    if args.profile != "auto":
        get_profile(args.profile)  # unknown names fail before anything slow
    request = _request(args, planning)
    if placeholder_rendezvous:  # --dry-run: plan a multi-node launch without node 0's address (reported as a finding)
        request = replace(request, planning=True)
    cfg = load_config(request.config_path, list(request.overrides))
    hw = _hardware(args, env, cfg.output_dir)
    if planning and not hw.has_gpu:
        if args.hardware is not None:
            raise TuneLaunchError(f"--hardware {args.hardware}: describes no GPU (gpus_per_node 0); nothing to plan per GPU")
        request = replace(request, cpu=True)  # plan what would run here; --hardware plans for a GPU machine
    needs_facts = planning or (not request.cpu and hw.has_gpu)
    from tune_launch.launch.model_facts import check_model_config, model_facts
    from tune_launch.training.reshard import resume_facts

    if not planning:  # every launch, also on CPU: a bad model config stops here, in one line (cached). A plan
        check_model_config(cfg.model)  # counts with the formula or the meta build, which refuse bad sizes themselves
    facts = model_facts(cfg.model) if needs_facts else None
    plan = make_plan(request, cfg, hw, facts, resume_facts(cfg))  # the checkpoint the ranks will continue, if any
    check_device(cfg, plan.device, str(request.config_path))
    return Planned(plan, facts, hw, cfg)


# --------------------------------------------------------------------------- subcommands

def cmd_detect(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from tune_launch.launch.hardware import describe, detect_hardware, detect_json

    hw = detect_hardware(args.output_dir, env)
    print(json.dumps(detect_json(hw), indent=2, sort_keys=True) if args.json else describe(hw))
    return 0


def cmd_profiles(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from tune_launch.profiles import describe_profiles

    print(describe_profiles())
    return 0


def cmd_plan(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from tune_launch.launch.report import plan_json, plan_table

    from tune_launch.launch.preflight import format_findings, run_preflight

    p = _make_plan(args, env, planning=True)
    plan, facts, hw = p.plan, p.facts, p.hw
    findings = run_preflight(p.cfg, plan, hw, env, facts)
    if args.json:
        data = plan_json(plan, facts, hw)
        data["preflight"] = [{"check": f.check, "severity": f.severity, "message": f.message, "fix": f.fix} for f in findings]
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(plan_table(plan, facts, hw))
        print(format_findings(findings))
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        print(f"tune-launch: error: {len(errors)} preflight check(s) failed (above); fix them before launching", file=sys.stderr)
        return 2
    return 0


def cmd_dry_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """The commands and environment for every node, always; preflight findings beside them; errors exit 2."""
    from tune_launch.launch.dry_run import dry_run_report, rendezvous_findings
    from tune_launch.launch.preflight import PreflightError, raise_on_errors, run_preflight
    from tune_launch.launch.run import with_port

    p = _make_plan(args, env, planning=False, placeholder_rendezvous=True)
    plan = with_port(p.plan) if p.plan.nodes == 1 or p.plan.main_process_port is not None else p.plan
    findings = rendezvous_findings(plan, args.main_process_ip, args.main_process_port, p.hw.slurm is not None)
    findings = sorted(findings + run_preflight(p.cfg, plan, p.hw, env, p.facts), key=lambda f: f.severity != "error")
    print(dry_run_report(plan, env, findings))
    try:
        raise_on_errors(findings)
    except PreflightError as e:
        print(f"tune-launch: error: {e} (the commands are printed above)", file=sys.stderr)
        return e.exit_code
    return 0


def cmd_run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from tune_launch.launch.preflight import raise_on_errors, run_preflight
    from tune_launch.launch.run import execute, with_port

    if args.dry_run:
        return cmd_dry_run(args, env)
    p = _make_plan(args, env, planning=False)
    plan, cfg = with_port(p.plan), p.cfg
    warnings = raise_on_errors(run_preflight(cfg, plan, p.hw, env, p.facts))
    for finding in warnings:
        print(f"tune-launch: warning: {finding.line()}", file=sys.stderr)
    started_at = time.time()
    code = execute(plan, env, watchdog=cfg.watchdog)
    if code == 0 and plan.node_rank == 0 and (cfg.consolidate.enabled or cfg.hub is not None):
        from tune_launch.launch.finish import finish_run

        finish_run(cfg, started_at, env)  # consolidate, then push to the hub
    return code


def dispatch(argv: list[str], env: Mapping[str, str]) -> int:
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "run"
    rest = argv[1:] if argv and argv[0] in SUBCOMMANDS else argv
    parser = build_parser(command)
    # intermixed: `tune-launch train.yaml --gpus 8 optim.learning_rate=1e-4` as well as options first
    args = parser.parse_intermixed_args(rest)
    try:
        if command in EXTERNAL:
            return importlib.import_module(EXTERNAL[command]).run_from_args(args)
        handler = {"detect": cmd_detect, "profiles": cmd_profiles, "plan": cmd_plan, "run": cmd_run}[command]
        return handler(args, env)
    except TuneLaunchError as e:
        if getattr(args, "debug", False):
            raise
        print(f"tune-launch: error: {e}", file=sys.stderr)
        return e.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(argv, os.environ)
    except KeyboardInterrupt:
        print("tune-launch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
