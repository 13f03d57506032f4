"""Benchmark: the data path at about 25M and 250M tokens, against its ceiling and the previous in-memory path.

    .venv/bin/python -m bench.data [--tokens 25e6,250e6] [--work bench/.data] [--quick]

Generates jsonl corpora with the repo's own generator (training/synthetic.py: CorpusGenerator) on local disk,
trains one 32k byte-level BPE tokenizer on a bounded sample, then for each size, in this one run:
  prepare    `tune-launch prepare` into an empty cache: wall time, tokens/s, peak RSS (wait4), padding
  ceiling    the same tokenizer on the same texts, batched, timing only the tokenizer calls (reading excluded):
             `encode_batch_fast` + ids (what preparation calls) and the usual `tokenizer(texts)["input_ids"]`
  previous   the in-memory path as it was (bench/legacy_data.py: to_list, per-document calls, list packing,
             Dataset.from_list), small size only
  second run `tune-launch train.yaml` with the cache in place (a hit): command to first step, data phase
  rehearsal `tune-launch --cpu --num-processes 2 --profile ddp` into an empty cache: CPU seconds of the whole
             job, each rank's peak RSS (VmHWM, sampled), and how many ranks prepared
Every measurement runs in a fresh process. The machine is shared: the load average is recorded around each one.
Writes bench/results/data.json and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from bench import common as C  # run as `python -m bench.data` from the repository root

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MAX_LENGTH = 2048
VOCAB = 32_000
TOKENS_PER_WORD = 1.45  # measured for this generator and tokenizer; corpora are sized by words, tokens reported


# --------------------------------------------------------------------------- inputs

def ensure_corpus(work: Path, words: int, seed: int) -> tuple[Path, dict]:
    from tune_launch.training.synthetic import GENERATOR_VERSION, write_corpus

    path = work / f"corpus-{words // 1000}kw-s{seed}-g{GENERATOR_VERSION}.jsonl"
    meta = path.with_suffix(".json")
    if not (path.is_file() and meta.is_file()):
        t0 = time.perf_counter()
        stats = write_corpus(path, words, seed)
        stats["generate_seconds"] = time.perf_counter() - t0
        meta.write_text(json.dumps(stats))
    return path, json.loads(meta.read_text())


def ensure_tokenizer(work: Path, corpus: Path, sample_bytes: int) -> Path:
    folder = work / f"tokenizer-{VOCAB}"
    if not (folder / "tokenizer.json").is_file():
        from tune_launch.training.schema import DataSource
        from tune_launch.training.sources import sample_texts
        from tune_launch.training.synthetic import train_tokenizer

        tok = train_tokenizer(sample_texts(DataSource(path=str(corpus)), sample_bytes), VOCAB)
        tok.save_pretrained(str(folder))
    return folder


def train_yaml(work: Path, name: str, corpus: Path, tok: Path, cache: Path) -> Path:
    cfg = {"model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": MAX_LENGTH}},
           "tokenizer": {"name_or_path": str(tok)}, "task": "pretrain", "max_length": MAX_LENGTH, "packing": True,
           "data": {"train": [{"path": str(corpus)}], "cache_dir": str(cache)},
           "train": {"micro_batch_size": 1, "max_steps": 1, "precision": "fp32", "gradient_checkpointing": False},
           "logging": {"logging_steps": 1, "log_level_replica": "info"},  # rank 1 says when it has the data
           "checkpoint": {"save_steps": 1000, "save_final_model": False},
           "output_dir": str(work / "runs" / name), "seed": 0}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    return path


# --------------------------------------------------------------------------- measuring a child process

def run_child(argv: list[str], watch: tuple[str, ...] = (), on_line=None) -> dict:
    """Run argv; wall time, CPU seconds and peak RSS of the process tree it waited for (wait4), its output, and,
    with `watch`, the peak VmHWM of each process whose command line contains every string of `watch` (the
    machine is shared: other jobs run the same module)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    env.pop("OMP_NUM_THREADS", None)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    done = threading.Event()
    sampler = threading.Thread(target=_sample_hwm, args=(watch, peaks, done), daemon=True) if watch else None
    if sampler:
        sampler.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        if on_line:
            on_line(line, time.perf_counter() - t0)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    if sampler:
        sampler.join()
    code = os.waitstatus_to_exitcode(status)
    text = "".join(out)
    if code != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed ({code}):\n{text[-4000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "rank_peak_rss_gib": sorted(v / 2**20 for v in peaks.values()), "load_before": load0,
            "load_after": os.getloadavg(), "output": text}


def _sample_hwm(watch: tuple[str, ...], peaks: dict[int, int], done: threading.Event, once: bool = False) -> None:
    import psutil

    while once or not done.is_set():
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                line = " ".join(p.info["cmdline"] or [])
                launchers = ("accelerate.commands.launch", "tune_launch.launch.cli", "torchrun")
                if all(w in line for w in watch) and not any(x in line for x in launchers):
                    text = Path(f"/proc/{p.pid}/status").read_text()
                    kib = int(re.search(r"VmHWM:\s+(\d+)", text).group(1))
                    peaks[p.pid] = max(peaks.get(p.pid, 0), kib)
            except (OSError, AttributeError, psutil.Error):
                pass
        if once:
            return
        done.wait(0.2)


def last_json(text: str) -> dict:
    start = text.rfind("\n{\n")
    return json.loads(text[start + 1:] if start >= 0 else text[text.index("{"):])


# --------------------------------------------------------------------------- the measurements

def measure_prepare(work: Path, corpus: Path, tok: Path, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    cfg = train_yaml(work, "prepare", corpus, tok, cache)
    r = run_child([PY, "-m", "tune_launch.launch.cli", "prepare", "--json", str(cfg)])
    info = last_json(r.pop("output"))["info"]
    train = info["splits"]["train"]
    return {**r, "tokens": info["tokenized"], "packed_tokens": train["tokens"], "rows": train["rows"],
            "documents": train["documents"], "padding": train["padding"], "tokenize_pack_write_s": info["seconds"],
            "tokens_per_s": info["tokenized"] / r["wall_s"]}


def measure_ceiling(corpus: Path, tok: Path, hf_every: int) -> dict:
    r = run_child([PY, "-m", "bench.data", "_ceiling", str(corpus), str(tok), str(hf_every)])
    return {**last_json(r.pop("output")), "load_before": r["load_before"], "load_after": r["load_after"]}


def mean_ceiling(a: dict, b: dict) -> dict:
    keys = ("encode_batch_fast_ids_s", "hf_call_s", "encode_batch_fast_ids_cpu_s", "hf_call_cpu_s")
    out = {k: statistics.mean(x[k] for x in (a, b) if x.get(k)) for k in keys}
    out.update(tokens=a["tokens"], documents=a["documents"], samples=[a, b],
               tokens_per_s_fast=a["tokens"] / out["encode_batch_fast_ids_s"], tokens_per_s_hf=a["tokens"] / out["hf_call_s"])
    return out


def measure_previous(corpus: Path, tok: Path) -> dict:
    r = run_child([PY, "-m", "bench.data", "_previous", str(corpus), str(tok)])
    return {**r, **last_json(r.pop("output"))}


def measure_second_run(work: Path, corpus: Path, tok: Path, cache: Path) -> dict:
    cfg = train_yaml(work, "second", corpus, tok, cache)
    seen: dict[str, float] = {}

    def on_line(line: str, t: float) -> None:
        if "data cache hit" in line:
            seen.setdefault("hit", t)
            m = re.search(r"verified in ([\d.]+) s", line)
            seen["data_phase_s"] = float(m.group(1)) if m else -1
        if "data cache miss" in line:
            seen.setdefault("miss", t)
        if re.search(r"step 1/1 ", line):
            seen.setdefault("first_step", t)

    r = run_child([PY, "-m", "tune_launch.launch.cli", str(cfg)], on_line=on_line)
    r.pop("output")
    return {"command_to_first_step_s": seen.get("first_step"), "data_phase_s": seen.get("data_phase_s"),
            "cache_hit": "hit" in seen and "miss" not in seen, "wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"]}


def measure_rehearsal(work: Path, corpus: Path, tok: Path, cache: Path) -> dict:
    """Two ranks into an empty cache. Each rank's peak RSS is also taken when both have their data (before the
    model exists), since a training step's logits (2048 x 32k vocabulary) dominate the final peak."""
    shutil.rmtree(cache, ignore_errors=True)
    cfg = train_yaml(work, "rehearsal", corpus, tok, cache)
    watch = ("tune_launch.training.train", str(cfg))
    at_data: dict[str, list] = {}

    def on_line(line: str, t: float) -> None:
        if re.search(r"\] INFO tune_launch: (data prepared|data: ready after)", line):
            at_data.setdefault("events", []).append(t)
            if len(at_data["events"]) == 2:
                at_data["rss"] = _hwm_now(watch)

    r = run_child([PY, "-m", "tune_launch.launch.cli", "--cpu", "--num-processes", "2", "--profile", "ddp", str(cfg)],
                  watch=watch, on_line=on_line)
    text = r.pop("output")
    preparers = sorted(set(re.findall(r"\[node\d+ rank(\d+)\] INFO tune_launch: data cache miss", text)))
    return {**r, "rank_peak_rss_after_data_gib": at_data.get("rss"), "data_ready_at_s": at_data.get("events"),
            "preparing_ranks": [int(x) for x in preparers], "tokenized_once": preparers == ["0"]}


def _hwm_now(watch: tuple[str, ...]) -> list[float]:
    peaks: dict[int, int] = {}
    done = threading.Event()
    done.set()
    _sample_hwm(watch, peaks, done, once=True)
    return sorted(v / 2**20 for v in peaks.values())


# --------------------------------------------------------------------------- children

def child_ceiling(corpus: str, tok_dir: str, hf_every: str = "1") -> None:
    """Time only the tokenizer calls, batch by batch, over every text of the corpus (the HF call on every
    `hf_every`-th batch, scaled to the whole corpus by tokens: at 250M tokens it would double the run)."""
    from transformers import AutoTokenizer

    from tune_launch.training.schema import DataSource
    from tune_launch.training.sources import source_batches

    tok = AutoTokenizer.from_pretrained(tok_dir)
    backend = tok.backend_tokenizer
    fast = hf = 0.0
    tokens = docs = 0
    cpu = {"fast": 0.0, "hf": 0.0}

    def timed(fn, texts):
        t0, c0 = time.perf_counter(), time.process_time()  # process time: every thread, the Rust pool's too
        out = fn(texts)
        cpu["fast" if fn is fast_ids else "hf"] += time.process_time() - c0
        return out, time.perf_counter() - t0

    def fast_ids(texts):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def hf_ids(texts):
        return tok(texts, add_special_tokens=False)["input_ids"]

    every = int(hf_every)
    hf_tokens = 0
    for i, batch in enumerate(source_batches(DataSource(path=corpus))):
        t_hf = 0.0
        if i % every:
            ids, t_fast = timed(fast_ids, batch.texts)
        elif i % (2 * every):  # alternate which call goes first, so neither always meets the warmer caches
            _, t_hf = timed(hf_ids, batch.texts)
            ids, t_fast = timed(fast_ids, batch.texts)
        else:
            ids, t_fast = timed(fast_ids, batch.texts)
            _, t_hf = timed(hf_ids, batch.texts)
        n = sum(map(len, ids))
        fast, hf, tokens, docs = fast + t_fast, hf + t_hf, tokens + n, docs + len(ids)
        hf_tokens += n if t_hf else 0
    scale = tokens / max(hf_tokens, 1)
    hf, cpu["hf"] = hf * scale, cpu["hf"] * scale
    print(json.dumps({"encode_batch_fast_ids_s": fast, "hf_call_s": hf, "hf_sampled_every": every, "tokens": tokens,
                      "encode_batch_fast_ids_cpu_s": cpu["fast"], "hf_call_cpu_s": cpu["hf"],
                      "documents": docs, "tokens_per_s_fast": tokens / fast, "tokens_per_s_hf": tokens / hf}, indent=1))


def child_previous(corpus: str, tok_dir: str) -> None:
    from transformers import AutoTokenizer

    from bench.legacy_data import prepare_old
    from tune_launch.training.config import validate_config

    cfg = validate_config({"model": {"name_or_path": tok_dir}, "task": "pretrain", "max_length": MAX_LENGTH,
                           "data": {"train": [{"path": corpus}]}})
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    ds = prepare_old(cfg, tok)
    print(json.dumps({"seconds_in_process": time.perf_counter() - t0, "rows": len(ds)}, indent=1))


# --------------------------------------------------------------------------- report

def summarize(size: dict) -> dict:
    p, c = size["prepare"], size["ceiling"]
    out = {"prepare_over_ceiling_fast": p["wall_s"] / c["encode_batch_fast_ids_s"],
           "prepare_over_ceiling_hf": p["wall_s"] / c["hf_call_s"],
           # CPU seconds: what the machine's other jobs change least (the wall ratio moves with their load)
           "prepare_over_ceiling_fast_cpu": p["cpu_s"] / c["encode_batch_fast_ids_cpu_s"]}
    if "previous" in size:
        out["previous_over_prepare_wall"] = size["previous"]["wall_s"] / p["wall_s"]
        out["previous_over_prepare_rss"] = size["previous"]["peak_rss_gib"] / p["peak_rss_gib"]
    out["targets"] = {"prepare <= 1.5x ceiling (wall)": out["prepare_over_ceiling_fast"] <= 1.5,
                      "prepare <= 1.5x ceiling (CPU s)": out["prepare_over_ceiling_fast_cpu"] <= 1.5,
                      "peak RSS <= 1.5 GiB": p["peak_rss_gib"] <= 1.5, "padding < 1%": p["padding"] < 0.01,
                      "2-process run tokenizes once": size["rehearsal"]["tokenized_once"],
                      "second run's data phase <= 5 s": (size["second_run"]["data_phase_s"] or 99) <= 5}
    return out


def table(sizes: dict) -> str:
    rows = []
    for name, s in sizes.items():
        p, c, sr, rh = s["prepare"], s["ceiling"], s["second_run"], s["rehearsal"]
        rows.append({"size": f"{p['tokens'] / 1e6:.0f}M tokens", "path": "tune-launch prepare", "wall": p["wall_s"],
                     "tps": p["tokens_per_s"] / 1e6, "rss": p["peak_rss_gib"], "pad": 100 * p["padding"],
                     "note": f"{s['ratios']['prepare_over_ceiling_fast']:.2f}x the fast ceiling's wall, "
                             f"{s['ratios']['prepare_over_ceiling_fast_cpu']:.2f}x its CPU s ({p['cpu_s']:.0f} CPU s)"})
        rows.append({"size": "", "path": "ceiling: encode_batch_fast + ids", "wall": c["encode_batch_fast_ids_s"],
                     "tps": c["tokens_per_s_fast"] / 1e6,
                     "note": f"tokenizer calls only, mean of before and after ({c['encode_batch_fast_ids_cpu_s']:.0f} CPU s)"})
        rows.append({"size": "", "path": "ceiling: tokenizer(texts)", "wall": c["hf_call_s"],
                     "tps": c["tokens_per_s_hf"] / 1e6, "note": "tokenizer calls only"})
        if "previous" in s:
            v = s["previous"]
            rows.append({"size": "", "path": "previous in-memory path", "wall": v["wall_s"],
                         "tps": p["tokens"] / v["wall_s"] / 1e6, "rss": v["peak_rss_gib"], "note": "one process"})
        rows.append({"size": "", "path": "second run (cache hit)", "wall": sr["command_to_first_step_s"],
                     "note": f"data phase {sr['data_phase_s']:.2f} s; wall = command to first step"})
        after_data = ", ".join(f"{x:.2f}" for x in rh["rank_peak_rss_after_data_gib"] or [])
        rows.append({"size": "", "path": "2-process rehearsal", "wall": rh["wall_s"],
                     "rss": max(rh["rank_peak_rss_gib"] or [0]),
                     "note": f"{rh['cpu_s']:.0f} CPU s (prepare alone: {p['cpu_s']:.0f}); ranks' peaks {after_data} GiB "
                             f"with the data ready, {', '.join(f'{x:.2f}' for x in rh['rank_peak_rss_gib'])} GiB after "
                             f"a 2048-token step; preparing ranks {rh['preparing_ranks']}"})
    return C.markdown_table(rows, [("size", "corpus", ""), ("path", "what", ""), ("wall", "wall (s)", ".1f"),
                                   ("tps", "M tokens/s", ".2f"), ("rss", "peak RSS (GiB)", ".2f"),
                                   ("pad", "padding %", ".2f"), ("note", "", "")])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ceiling":
        child_ceiling(*argv[1:4])
        return 0
    if argv and argv[0] == "_previous":
        child_previous(*argv[1:3])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="25e6,250e6", help="corpus sizes in tokens (about), comma-separated")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".data", help="corpora, tokenizer, caches (local disk)")
    p.add_argument("--previous-max", type=float, default=30e6, help="run the previous path only up to this size")
    p.add_argument("--out", type=Path, default=C.RESULTS / "data.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark itself")
    args = p.parse_args(argv)
    sizes = [1e6, 2e6] if args.quick else [float(x) for x in args.tokens.split(",")]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    result = {**C.header("cpu"), "cpu_count": os.cpu_count(), "load_at_start": os.getloadavg(), "max_length": MAX_LENGTH,
              "vocab": VOCAB, "sizes": {}}
    small, _ = ensure_corpus(work, int(sizes[0] / TOKENS_PER_WORD), seed=1)
    tok = ensure_tokenizer(work, small, 20_000_000 if args.quick else 50_000_000)
    for target in sizes:
        corpus, stats = ensure_corpus(work, int(target / TOKENS_PER_WORD), seed=1)
        name = f"{target / 1e6:g}M"
        print(f"[bench.data] {name}: {corpus.name} ({stats['bytes'] / 1e6:.0f} MB)", flush=True)
        s: dict = {"corpus": {**stats, "path": str(corpus)}}
        cache = work / "cache" / name
        every = 1 if target <= 50e6 else 4
        before = measure_ceiling(corpus, tok, every)  # the machine is shared: the ceiling before and after, averaged
        s["prepare"] = measure_prepare(work, corpus, tok, cache)
        after = measure_ceiling(corpus, tok, every)
        s["ceiling"] = mean_ceiling(before, after)
        if target <= args.previous_max:
            s["previous"] = measure_previous(corpus, tok)
        s["second_run"] = measure_second_run(work, corpus, tok, cache)
        s["rehearsal"] = measure_rehearsal(work, corpus, tok, work / "cache" / f"{name}-rehearsal")
        s["ratios"] = summarize(s)
        result["sizes"][name] = s
        print(json.dumps({k: s[k] for k in ("ratios",)}, indent=1), flush=True)
        shutil.rmtree(work / "cache" / f"{name}-rehearsal", ignore_errors=True)
    result["load_at_end"] = os.getloadavg()
    C.write_result(args.out, result)
    print(table(result["sizes"]))
    print(f"[bench.data] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
