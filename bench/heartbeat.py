"""Benchmark: what the per-rank heartbeat (hang detection) costs a training step.

    .venv/bin/python -m bench.heartbeat [--repeats 7] [--work DIR]

Real training steps (forward, backward, AdamW) of two Llama shapes on this machine's CPU: the embedded
default's (~0.5M parameters, the shortest steps a user sees: the worst case for a per-step cost) and
examples/models/llama-125m. Each step is taken with the heartbeat on (the writer thread running, the
Trainer callback's `on_step_end` after every step, as in a run) and off, the two arms interleaved repeat
by repeat so that a busy moment of the shared machine hits both; the figures are the median step time per
arm and the median of the paired (same repeat) differences. Also timed alone: the callback's work after one
step and one report (what the training loop pays) and one write of the file (what the writer thread pays,
twice a second at most); "callback / step" is that cost over the step time.
Writes bench/results/heartbeat-<device>-<date>.json and prints a markdown table (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench import common as C

def _embedded_default() -> dict:
    import yaml

    cfg = yaml.safe_load((C.ROOT / "examples" / "pretrain-tiny.yaml").read_text())
    return {**cfg["model"]["config"], "vocab_size": cfg["tokenizer"]["train_vocab_size"]}


SHAPES = {  # name: (model config, micro batch, sequence length, steps per repeat and arm)
    "embedded default": (_embedded_default, 8, 128, 40),
    "llama-125m": (lambda: json.loads((C.ROOT / "examples" / "models" / "llama-125m" / "config.json").read_text()), 2, 256, 6),
}


def build(config: dict, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    hf = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), hf.vocab_size


def steps(model, opt, vocab: int, batch: int, seq: int, n: int, callback=None) -> list[float]:
    """n real optimizer steps; with `callback`, its on_step_end after each (what the Trainer calls)."""
    import torch

    ids = torch.randint(3, vocab, (batch, seq))
    state = SimpleNamespace(global_step=0, max_steps=10**6, num_input_tokens_seen=0)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.global_step += 1
        state.num_input_tokens_seen += batch * seq
        if callback is not None:
            callback.on_step_end(None, state, None)
        times.append(time.perf_counter() - t0)
    return times


def per_call(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--work", type=Path, default=None, help="folder for the heartbeat file (default: a temporary one)")
    args = p.parse_args(argv)

    import torch

    from tune_launch import heartbeat
    from tune_launch.training.heartbeat_callback import HeartbeatCallback

    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-heartbeat-"))
    writer = heartbeat.HeartbeatWriter(heartbeat.rank_file(work, 0), {"rank": 0, "pid": 0})
    report_s = per_call(lambda: writer.update(phase="train", step=1), 100_000)
    write_s = per_call(writer.flush, 2_000)
    heartbeat._writer = writer  # what the Trainer's callback does after every optimizer step
    cb, fake = HeartbeatCallback(), SimpleNamespace(global_step=0, max_steps=10**6, num_input_tokens_seen=0)
    cb.on_train_begin(None, fake, None)
    callback_s = per_call(lambda: cb.on_step_end(None, fake, None), 20_000)
    heartbeat._writer = None
    rows, samples = [], {}
    for name, (config, batch, seq, n) in SHAPES.items():
        model, opt, vocab = build(config())
        steps(model, opt, vocab, batch, seq, 3)  # warm-up
        arms: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.repeats):
            arms["off"].append(statistics.median(steps(model, opt, vocab, batch, seq, n)))
            heartbeat._writer = None
            w = heartbeat.start(heartbeat.rank_file(work, 1), {"rank": 1, "pid": 0})
            arms["on"].append(statistics.median(steps(model, opt, vocab, batch, seq, n, HeartbeatCallback())))
            w.close()
        off, on = statistics.median(arms["off"]), statistics.median(arms["on"])
        paired = statistics.median((b - a) / a * 100 for a, b in zip(arms["off"], arms["on"]))
        rows.append({"shape": name, "params_m": sum(q.numel() for q in model.parameters()) / 1e6, "tokens": batch * seq,
                     "off_ms": off * 1e3, "on_ms": on * 1e3, "paired_pct": paired,
                     "cost_pct": callback_s / off * 100})
        samples[name] = arms
    head = C.header("cpu")
    result = {**head, "benchmark": "heartbeat", "repeats": args.repeats, "report_us": report_s * 1e6,
              "write_us": write_s * 1e6, "callback_us": callback_s * 1e6, "heartbeat_folder": str(work), "rows": rows,
              "samples_s": samples}
    path = C.write_result(C.RESULTS / "heartbeat.json", result)
    print(C.markdown_table(rows, [("shape", "model", ""), ("params_m", "params (M)", ".1f"), ("tokens", "tokens/step", "d"),
                                  ("off_ms", "step, heartbeat off (ms)", ".1f"), ("on_ms", "step, on (ms)", ".1f"),
                                  ("paired_pct", "paired difference (%)", "+.1f"), ("cost_pct", "callback / step (%)", ".3f")]))
    print(f"callback per step {callback_s * 1e6:.1f} us; one report {report_s * 1e6:.2f} us; one file write "
          f"{write_s * 1e6:.0f} us (writer thread, at most 2 a second); {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
