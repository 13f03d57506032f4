"""`--dry-run` always prints every node's command and environment; preflight findings are listed beside them and
errors still exit 2 with one line on stderr (the line a real launch would refuse with)."""

from __future__ import annotations

import json

from launch_helpers import HARDWARE, training_yaml

from tune_launch.launch import cli


def _hw(tmp_path, name="2x8x80"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(HARDWARE[name]))
    return path


def test_two_node_dry_run_on_a_local_disk_prints_the_commands_and_the_error(tmp_path, capsys):
    yaml_path = training_yaml(tmp_path, "llama-2-7b")  # output_dir under tmp_path: a local filesystem here
    code = cli.dispatch(["--dry-run", "--hardware", str(_hw(tmp_path)), "--profile", "fsdp", "--main-process-ip", "10.0.0.1",
                         "--main-process-port", "29555", str(yaml_path)], {"PATH": "/usr/bin", "HF_TOKEN": "hf_" + "x" * 30})
    captured = capsys.readouterr()
    out, err = captured.out, captured.err.strip().splitlines()
    assert code == 2
    assert "# node 0 of 2 (this node)" in out and "# node 1 of 2" in out
    assert out.count("accelerate.commands.launch") == 2 and "--machine_rank 1" in out
    commands, findings = out.split("\n# preflight\n")
    assert "error   preflight output-dir:" in findings and "shared filesystem" in findings
    assert len(err) == 1 and err[0].startswith("tune-launch: error: preflight output-dir:") and "printed above" in err[0]
    assert "x" * 30 not in out  # secrets stay masked


def test_missing_rendezvous_is_listed_beside_placeholder_commands(tmp_path, capsys):
    env = {"PATH": "/usr/bin", "TUNE_LAUNCH_SHARED_FS": "1"}
    code = cli.dispatch(["--dry-run", "--hardware", str(_hw(tmp_path)), "--profile", "zero3", str(training_yaml(tmp_path, "llama-2-7b"))], env)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out.count("--main_process_ip 127.0.0.1 --main_process_port 0") == 2
    findings = captured.out.split("\n# preflight\n")[1]
    assert "--main-process-ip: a multi-node launch needs the address of node 0" in findings
    assert "--main-process-port" in findings
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "2 preflight checks failed" in err[0]


def test_warnings_are_listed_with_the_commands_and_exit_0(tmp_path, capsys):
    hw = tmp_path / "hw.json"
    hw.write_text(json.dumps({**HARDWARE["2x8x80"], "disk_free_gib": 200}))  # one 7B checkpoint fits, four do not
    env = {"PATH": "/usr/bin", "TUNE_LAUNCH_SHARED_FS": "1"}
    code = cli.dispatch(["--dry-run", "--hardware", str(hw), "--profile", "fsdp", "--main-process-ip", "10.0.0.1",
                         "--main-process-port", "29555", str(training_yaml(tmp_path, "llama-2-7b"))], env)
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    commands, findings = captured.out.split("\n# preflight\n")
    assert "# node 1 of 2" in commands
    assert findings.startswith("warning preflight disk:") and "save_total_limit" in findings
