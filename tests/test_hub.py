"""hub: pushes tested at the network edge (this machine has no hub): the upload calls and the files they are given.

`FakeApi` stands where huggingface_hub.HfApi would: it records create_repo / upload_folder with the files present
at upload time. Everything else (what is pushed, when, from where, what a failure does) is the real code.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_launch.training.hub import HubCheckpointPush, checkpoint_upload, final_upload, make_api, push
from tune_launch.training.schema import HubConfig, TrainingConfig

TOKEN = "hf_" + "Q" * 34


class FakeApi:
    def __init__(self, fail: Exception | None = None, gate: threading.Event | None = None) -> None:
        self.calls: list[dict] = []
        self.fail, self.gate = fail, gate

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kw):
        self.calls.append({"op": "create_repo", "repo_id": repo_id, "private": private, "exist_ok": exist_ok})

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, delete_patterns=None, **kw):
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail is not None:
            raise self.fail
        root = Path(folder_path)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        self.calls.append({"op": "upload_folder", "repo_id": repo_id, "path_in_repo": path_in_repo,
                           "commit_message": commit_message, "delete_patterns": delete_patterns, "files": files})


def _model_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "tokenizer.json").write_text("{}")
    return root


def test_final_push_uploads_the_whole_folder_to_the_repository_root(tmp_path):
    folder = _model_folder(tmp_path / "final")
    api = FakeApi()
    assert push(api, HubConfig(model_id="me/model"), final_upload(folder, 120)) is None
    assert api.calls[0] == {"op": "create_repo", "repo_id": "me/model", "private": True, "exist_ok": True}
    upload = api.calls[1]
    assert upload["repo_id"] == "me/model" and upload["path_in_repo"] is None and upload["delete_patterns"] is None
    assert upload["commit_message"] == "tune-launch: final model after 120 steps"
    assert upload["files"] == {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\x00" * 64,
                               "tokenizer.json": b"{}"}


def test_a_failed_push_is_one_line_and_keeps_the_local_files(tmp_path):
    import httpx2 as httpx  # huggingface_hub 2 speaks httpx2
    from huggingface_hub.errors import HfHubHTTPError

    folder = _model_folder(tmp_path / "final")
    response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))
    error = HfHubHTTPError(f"401 Client Error: Unauthorized for token {TOKEN}\nInvalid credentials in Authorization header",
                           response=response)
    line = push(FakeApi(fail=error), HubConfig(model_id="me/model"), final_upload(folder, 3))
    assert line is not None and "\n" not in line
    assert line.startswith(f"hub: pushing {folder} to me/model failed (HfHubHTTPError: 401 Client Error")
    assert line.endswith(f"the local copy is kept at {folder}") and TOKEN not in line and "hf_***" in line
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("strategy,where,delete", [("checkpoint", "last-checkpoint", ["*"]),
                                                   ("all_checkpoints", "checkpoint-2", None)])
def test_checkpoint_pushes_run_in_the_background_from_a_snapshot(tmp_path, strategy, where, delete):
    """Training goes on while the upload runs, and rotating the checkpoint away meanwhile loses nothing."""
    checkpoint = _model_folder(tmp_path / "checkpoint-2")
    gate = threading.Event()
    api = FakeApi(gate=gate)
    pusher = HubCheckpointPush(HubConfig(model_id="me/model", strategy=strategy), api=api)
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=2)
    t0 = time.perf_counter()
    pusher.on_save(args, state, None)
    assert time.perf_counter() - t0 < 5 and not any(c["op"] == "upload_folder" for c in api.calls)  # not blocking
    import shutil

    shutil.rmtree(checkpoint)  # rotation deletes the checkpoint while its upload waits
    gate.set()
    pusher.on_train_end(args, state, None)
    upload = [c for c in api.calls if c["op"] == "upload_folder"]
    assert len(upload) == 1 and upload[0]["path_in_repo"] == where and upload[0]["delete_patterns"] == delete
    assert set(upload[0]["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert upload[0]["files"]["model.safetensors"] == b"\x00" * 64
    assert not (tmp_path / ".hub-snapshots").exists() and pusher.errors == []


def test_strategy_end_pushes_no_checkpoints(tmp_path):
    assert checkpoint_upload("end", tmp_path / "checkpoint-5") is None
    pusher = HubCheckpointPush(HubConfig(model_id="me/model", strategy="end"), api=FakeApi())
    _model_folder(tmp_path / "checkpoint-5")
    pusher.on_save(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True, global_step=5), None)
    pusher.on_train_end(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(is_world_process_zero=True), None)
    assert pusher.api.calls == []


def test_token_comes_only_from_the_environment():
    from huggingface_hub import HfApi

    api = make_api({"HF_TOKEN": TOKEN})
    assert isinstance(api, HfApi) and api.token == TOKEN
    assert make_api({}).token is False  # never a cached login or a token from elsewhere


def _finished_run(tmp_path: Path, **extra) -> TrainingConfig:
    import json

    out = tmp_path / "out"
    _model_folder(out / "final")
    (out / "run_report.json").write_text(json.dumps({"final_model": str(out / "final"), "steps": 7}))
    return TrainingConfig.model_validate({"model": {"name_or_path": "org/m"}, "data": {"generate": {"kind": "pretrain"}},
                                          "output_dir": str(out), "hub": {"model_id": "me/model"}, **extra})


def test_the_launcher_pushes_the_final_model_after_the_ranks_exit(tmp_path):
    from tune_launch.launch.finish import finish_run

    cfg = _finished_run(tmp_path)
    api, stream = FakeApi(), io.StringIO()
    assert finish_run(cfg, started_at=0.0, env={"HF_TOKEN": TOKEN}, stream=stream, api=api) is None
    assert [c["op"] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1]["commit_message"] == "tune-launch: final model after 7 steps"
    assert f"hub: pushing {tmp_path / 'out' / 'final'} to me/model" in stream.getvalue() and TOKEN not in stream.getvalue()
    late = FakeApi()
    assert finish_run(cfg, started_at=time.time() + 60, env={}, stream=io.StringIO(), api=late) is None
    assert late.calls == []  # a run that did not finish in this launch (stopped for a requeue) pushes nothing


def test_the_launcher_reports_a_failed_push_in_one_line(tmp_path):
    from tune_launch.launch.finish import finish_run

    cfg = _finished_run(tmp_path)
    stream = io.StringIO()
    line = finish_run(cfg, 0.0, {}, stream=stream, api=FakeApi(fail=ConnectionError("Name or service not known")))
    printed = stream.getvalue().strip().splitlines()
    assert printed[-1].startswith("tune-launch: warning: hub: pushing") and "ConnectionError" in printed[-1]
    assert printed[-1].endswith("run the same command again to retry") and line in printed[-1]
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
