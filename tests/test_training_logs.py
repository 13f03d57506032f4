"""Logging with transformers' meaning of log_level / log_level_replica / log_on_each_node, tagged by rank."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, check_ok, launch, tiny_config, write_yaml
from tune_launch.training.distributed import RankInfo
from tune_launch.training.logs import plan_logging

TAG = re.compile(r"^\d\d:\d\d:\d\d \[node(\d+) rank(\d+)\] (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _info(rank: int, local_rank: int, node: int) -> RankInfo:
    return RankInfo(rank=rank, local_rank=local_rank, world_size=4, local_world_size=2, node_rank=node, num_nodes=2)


@pytest.mark.parametrize("on_each_node,expected", [(True, [True, False, True, False]), (False, [True, False, False, False])])
def test_which_processes_are_logging_main(on_each_node, expected):
    got = [plan_logging(_info(r, r % 2, r // 2), "info", "warning", on_each_node, None).is_log_main for r in range(4)]
    assert got == expected


def test_levels_follow_transformers():
    main = plan_logging(_info(0, 0, 0), "passive", "warning", True, "/o")
    replica = plan_logging(_info(1, 1, 0), "passive", "warning", True, "/o")
    assert (main.level, main.own_level) == (logging.WARNING, logging.INFO)  # passive: library defaults
    assert (replica.level, replica.own_level) == (logging.WARNING, logging.WARNING)
    assert plan_logging(_info(1, 1, 0), "info", "debug", True, None).level == logging.DEBUG
    assert str(replica.file) == "/o/logs/node0.log" and replica.tag == "node0 rank1"


def test_rank_info_from_environment():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "TUNE_LAUNCH_DEVICE": "cpu", "TUNE_LAUNCH_PROFILE": "fsdp", "TUNE_LAUNCH_NUM_NODES": "2"}
    info = RankInfo.from_environ(env)
    assert (info.rank, info.local_rank, info.node_rank, info.num_nodes, info.device, info.profile) == (3, 1, 1, 2, "cpu", "fsdp")
    assert RankInfo.from_environ({"TUNE_LAUNCH_DEVICE": "cpu"}) == RankInfo(device="cpu", profile="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_default_levels_replica_prints_no_info_and_every_line_is_tagged(tiny_model_dir, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(tiny_model_dir, tmp_path / "out", train={"max_steps": 2}))
    proc = launch(cfg, profile="ddp", processes=2)
    check_ok(proc)
    tagged = [line for line in proc.stderr.splitlines() if TAG.match(line)]
    assert any(TAG.match(line).group(2) == "0" and " INFO " in line for line in tagged)
    assert not [line for line in tagged if TAG.match(line).groups()[1:] == ("1", "INFO")]
    assert proc.stdout.count("done: 2 steps") == 1  # the summary once, from rank 0
    metric_lines = [line for line in tagged if "tune_launch: step 2/2  loss " in line]
    assert len(metric_lines) == 1 and "rank0" in metric_lines[0]
    log_file = tmp_path / "out" / "logs" / "node0.log"
    lines = log_file.read_text().splitlines()
    starts = [line for line in lines if re.match(r"^\d\d:\d\d:\d\d ", line)]
    assert starts and all(TAG.match(line) for line in starts), "an untagged line in the node log"


@pytest.mark.slow
@pytest.mark.parametrize("on_each_node", [False, True])
def test_log_on_each_node(tiny_model_dir, tmp_path, on_each_node):
    """Two nodes (1 process each, on this machine): with log_on_each_node false the second node prints no INFO."""
    cfg = write_yaml(tmp_path / "t.yaml", tiny_config(tiny_model_dir, tmp_path / "out", train={"max_steps": 2},
                                                       logging={"log_on_each_node": on_each_node, "log_level": "info"}))
    port = str(_free_port())
    env = {**os.environ, "TUNE_LAUNCH_SHARED_FS": "1"}  # both "nodes" share this disk
    procs = [subprocess.Popen([sys.executable, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "1", "--nodes", "2",
                               "--node-rank", str(r), "--main-process-ip", "127.0.0.1", "--main-process-port", port,
                               "--profile", "ddp", str(cfg)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-3000:] + outs[0][1][-3000:]
    node1 = [line for line in outs[1][1].splitlines() if TAG.match(line)]
    node1_file = (tmp_path / "out" / "logs" / "node1.log")
    node1_info = [line for line in node1 if " INFO " in line]
    if on_each_node:
        assert node1_info and all("[node1 rank1]" in line for line in node1_info)
        assert " INFO " in node1_file.read_text()
    else:
        assert node1_info == []
        assert not node1_file.exists() or " INFO " not in node1_file.read_text()
    assert " INFO " in (tmp_path / "out" / "logs" / "node0.log").read_text()


def test_secrets_are_redacted_in_console_and_node_log(tmp_path, capsys):
    from tune_launch.training.logs import close_logging, setup_logging

    logger = setup_logging(plan_logging(RankInfo(), "info", "warning", True, str(tmp_path)))
    try:
        logger.info("pushing with token %s to the hub", "hf_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3")
        logger.info("wandb key sk-%s", "x" * 24)
    finally:
        close_logging(logger)
    text = (tmp_path / "logs" / "node0.log").read_text() + capsys.readouterr().err
    assert "hf_a1B2c3D4e5F6g7H8i9J0k1L2m3" not in text and "x" * 24 not in text
    assert text.count("hf_***") == 2 and "sk-***" in text  # file + console
