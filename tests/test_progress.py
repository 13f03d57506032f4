"""What a user sees, in-process and fast: the step/eval/checkpoint line formats, metrics.jsonl and how resumes
are resolved in it, the terminal bar, where warnings go, and report.png drawn from real metrics files."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pytest
from transformers import TrainerState, TrainingArguments

from tune_launch.training.console import BarHandler, TerminalBar
from tune_launch.training.distributed import RankInfo
from tune_launch.training.logs import close_logging, plan_logging, setup_logging
from tune_launch.training.metrics_file import MetricsWriter, parse_events, read_run
from tune_launch.training.progress import (MetricsCallback, checkpoint_line, duration, eval_line, human_bytes,
                                           human_rate, step_line)

GIB = 1024**3


# --------------------------------------------------------------------------- formats

def test_step_line_on_cpu_has_no_memory_or_mfu():
    line = step_line(80, 150, loss=1.10265, lr=0.0015342, grad=0.600412, tokens_per_s=20083.8, eta_s=192.4)
    assert line == "step 80/150  loss 1.103  lr 1.5e-03  grad 0.60  20.1k tok/s  eta 0:03:12"


def test_step_line_on_gpu_has_memory_and_mfu():
    line = step_line(80, 150, loss=1.103, lr=1.5e-3, grad=0.6, tokens_per_s=20100, memory=(12.3 * GIB, 80 * GIB),
                     mfu=0.412, eta_s=192)
    assert line == "step 80/150  loss 1.103  lr 1.5e-03  grad 0.60  20.1k tok/s  mem 12.3/80.0 GiB  mfu 41%  eta 0:03:12"


def test_unknown_fields_are_left_out_in_the_same_order():
    assert step_line(1, 10, loss=6.1, lr=None, grad=None, tokens_per_s=None) == "step 1/10  loss 6.100"
    assert eval_line(50, 150, loss=1.43552, seconds=0.158) == "eval step 50/150  loss 1.436  ppl 4.20  0.16 s"
    assert eval_line(0, 150, loss=31.0, seconds=None) == "eval step 0/150  loss 31.000"  # no ppl overflow


@pytest.mark.parametrize("value,text", [(850, "850"), (1466.7, "1.47k"), (20083.8, "20.1k"), (123456, "123k"),
                                        (1.234e6, "1.23M"), (2.5e9, "2.50G")])
def test_human_rate(value, text):
    assert human_rate(value) == text


def test_durations_and_sizes():
    assert (duration(0), duration(192.4), duration(3725), duration(90061)) == ("0:00:00", "0:03:12", "1:02:05", "1d 1:01:01")
    assert checkpoint_line("checkpoint-100", 12_400_000, 0.3149) == "checkpoint-100 saved: 12.4 MB in 0.31 s"
    assert (human_bytes(999), human_bytes(1_230_000_000)) == ("999 B", "1.23 GB")


# --------------------------------------------------------------------------- the callback and metrics.jsonl

def _state(step: int, max_steps: int, tokens: int) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps, state.num_input_tokens_seen = step, max_steps, tokens
    return state


def test_callback_logs_one_line_per_event_and_every_metric_unrounded(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    cb = MetricsCallback(tmp_path, "cpu", 1)
    cb.on_train_begin(args, _state(0, 20, 0), None)
    logs = {"loss": 5.643084208170573, "grad_norm": 1.5993036031723022, "learning_rate": 0.0027, "epoch": 0.11,
            "num_input_tokens_seen": 9995}
    with caplog.at_level(logging.INFO, logger="tune_launch"):
        cb.on_log(args, _state(10, 20, 9995), None, logs=dict(logs))
        cb.on_log(args, _state(10, 20, 9995), None, logs={"eval_loss": 5.5, "eval_runtime": 0.25})
        cb.on_train_end(args, _state(20, 20, 20000), None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[1] == "eval step 10/20  loss 5.500  ppl 244.69  0.25 s"
    assert lines[0].startswith("step 10/20  loss 5.643  lr 2.7e-03  grad 1.60  ") and " tok/s  eta " in lines[0]
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "train", "eval"]
    assert {k: events[1][k] for k in logs} == logs  # unrounded
    assert events[1]["tokens_per_second"] > 0 and events[1]["time"] > 1.7e9
    assert cb.train_losses == [(10, logs["loss"])] and cb.eval_losses == [(10, 5.5)]


def _event(kind: str, step: int, **values) -> str:
    return json.dumps({"event": kind, "step": step, "time": 0, **values})


def test_a_resume_supersedes_the_steps_logged_past_its_checkpoint():
    lines = [_event("start", 0), _event("train", 10, loss=3.0), _event("eval", 10, eval_loss=3.1),
             _event("train", 20, loss=2.0), '{"event": "train", "st',  # killed mid-write
             _event("start", 10), _event("eval", 10, eval_loss=3.2), _event("train", 20, loss=1.9),
             _event("end", 20)]
    run = parse_events(lines)
    assert run.series("train", "loss") == ([10.0, 20.0], [3.0, 1.9])
    assert run.series("eval", "eval_loss") == ([10.0], [3.2])  # logged again at the same step: the later one
    assert [s["step"] for s in run.starts] == [0, 10] and run.end is not None


# --------------------------------------------------------------------------- the terminal's bar

def test_bar_shows_step_lines_as_its_text_and_prints_other_lines_above():
    out = io.StringIO()
    bar = TerminalBar(out)
    handler = BarHandler(bar)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lg = logging.getLogger("tune_launch.test_bar")
    lg.propagate, lg.handlers = False, [handler]
    lg.setLevel(logging.INFO)
    bar.start(0, 20)
    bar.advance(10, 20)
    lg.info("step 10/20  loss 5.643", extra={"tl_progress": "step"})
    lg.info("checkpoint-10 saved: 1.6 MB in 0.10 s", extra={"tl_progress": "event"})
    lg.warning("not for the bar")  # stays on stderr
    bar.close()
    text = out.getvalue()
    assert "step 10/20 |" in text and "| loss 5.643" in text and "checkpoint-10 saved" in text
    assert "not for the bar" not in text and "step 10/20  loss" not in text


def test_only_rank_zero_with_a_terminal_gets_the_bar():
    r0, r1 = RankInfo(rank=0, world_size=2), RankInfo(rank=1, local_rank=1, world_size=2)
    assert plan_logging(r0, "passive", "warning", True, None, "auto", True).bar
    assert not plan_logging(r0, "passive", "warning", True, None, "auto", False).bar
    assert not plan_logging(r1, "passive", "warning", True, None, "bar", True).bar
    assert not plan_logging(r0, "passive", "warning", True, None, "lines", True).bar


# --------------------------------------------------------------------------- warnings

def test_library_deprecations_go_once_to_the_log_file_and_never_to_the_console(tmp_path, capsys):
    logger = setup_logging(plan_logging(RankInfo(), "passive", "warning", True, str(tmp_path)))
    try:
        for _ in range(3):
            warnings.warn_explicit("`all_gather_into_tensor` is deprecated", FutureWarning, "c10d_logger.py", 83)
        warnings.warn_explicit("padding side is right", UserWarning, "tokenization.py", 10)
        logging.getLogger("transformers").warning("`torch_dtype` is deprecated! Use `dtype` instead!")
        logger.info("step 1/2  loss 6.100")
    finally:
        close_logging(logger)
    console = capsys.readouterr().err
    log_file = (tmp_path / "logs" / "node0.log").read_text()
    assert "deprecated" not in console
    assert "padding side is right" in console and "step 1/2  loss 6.100" in console
    assert log_file.count("all_gather_into_tensor") == 1 and "FutureWarning" in log_file
    assert "`torch_dtype` is deprecated" in log_file and "padding side is right" in log_file


# --------------------------------------------------------------------------- report.png

def _fake_run(folder, lr: float, steps: int = 20, memory: bool = False):
    """A metrics.jsonl as MetricsWriter writes it, for the picture tests (no training needed)."""
    w = MetricsWriter(folder / "metrics.jsonl")
    w.append({"event": "start", "step": 0, "max_steps": steps})
    w.append({"event": "eval", "step": 0, "eval_loss": 6.1, "num_input_tokens_seen": 0})
    for s in range(2, steps + 1, 2):
        rec = {"event": "train", "step": s, "loss": 6.0 / (1 + lr * s), "learning_rate": lr, "grad_norm": 1.0 / s,
               "num_input_tokens_seen": 1000 * s, "tokens_per_second": 9000 + s}
        if memory:
            rec["memory"] = [{"rank": r, "reserved": (10 + 4 * r + s / 10 + 10 * lr) * GIB, "allocated": 9 * GIB, "total": 80 * GIB}
                             for r in range(2)]
        w.append(rec)
    w.append({"event": "eval", "step": steps, "eval_loss": 6.0 / (1 + lr * steps), "num_input_tokens_seen": 1000 * steps})
    w.close()


def colour_pixels(png, box, rgb, tol=40) -> int:
    """Pixels within `tol` of `rgb` inside box = (left, top, right, bottom) as fractions of the image."""
    import numpy as np
    from matplotlib.image import imread

    img = (imread(png)[..., :3] * 255).astype(int)
    h, w = img.shape[:2]
    part = img[int(box[1] * h):int(box[3] * h), int(box[0] * w):int(box[2] * w)]
    return int((np.abs(part - np.array(rgb)).sum(axis=-1) < tol).sum())


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1
LOSS_PANEL, MEMORY_PANEL = (0.0, 0.05, 0.33, 0.5), (0.67, 0.5, 1.0, 1.0)


def test_report_png_overlays_two_runs_with_every_panel_drawn(tmp_path):
    from tune_launch.training.report_png import SIZE_PX, draw_report, load_runs

    for name, lr in (("lr-a", 0.1), ("lr-b", 0.5)):
        (tmp_path / name).mkdir()
        _fake_run(tmp_path / name, lr, memory=True)
    out = tmp_path / "cmp.png"
    points = draw_report(load_runs([tmp_path / "lr-a", tmp_path / "lr-b"]), out)
    assert all(n > 0 for n in points.values()), points
    assert points["loss by step"] == 2 * (10 + 2) and points["GPU memory per rank"] == 2 * 2 * 10
    from matplotlib.image import imread

    assert imread(out).shape[:2] == (SIZE_PX[1], SIZE_PX[0])
    assert colour_pixels(out, LOSS_PANEL, BLUE) > 100 and colour_pixels(out, LOSS_PANEL, ORANGE) > 100
    assert colour_pixels(out, MEMORY_PANEL, BLUE) > 50
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically


def test_report_command_one_line_errors_and_default_output(tmp_path, capsys):
    from tune_launch.launch.cli import dispatch

    assert dispatch(["report", str(tmp_path / "missing")], {}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing: no metrics.jsonl" in err[0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(_event("start", 0) + "\n")
    assert dispatch(["report", str(tmp_path / "empty")], {}) == 2
    assert "no step logged yet" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    _fake_run(tmp_path / "run", 0.2)
    assert dispatch(["report", str(tmp_path / "run")], {}) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'run' / 'report.png'}" in out and "run: 20 steps, train loss" in out
    assert read_run(tmp_path / "run").series("train", "loss")[0][-1] == 20


def test_mfu_from_parameters_and_the_peak_table():
    from tune_launch.gpus import model_flops_utilization, peak_bf16_flops

    peak = peak_bf16_flops("NVIDIA H100 80GB HBM3")
    assert peak == 989e12 and peak_bf16_flops("NVIDIA H100 PCIe") == 756e12 and peak_bf16_flops("Mystery GPU") is None
    # 1.1B parameters at 400k tokens/s on 8 H100s: 6 * 1.1e9 * 4e5 / (8 * 989e12)
    assert model_flops_utilization(1_100_000_000, 400_000, 8, peak) == pytest.approx(0.3337, abs=1e-4)
    assert model_flops_utilization(1_100_000_000, 400_000, 8, None) is None
