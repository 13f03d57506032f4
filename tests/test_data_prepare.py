"""Data preparation in one process: packing against the old algorithm, the cache key, corruption, bad input.

Everything here is real (files on disk, the fast tokenizer, numpy memory maps) and small: each preparation
takes well under a second. The multi-process and streaming-resume runs are in tests/test_data_runs.py.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re

import numpy as np
import pytest

from bench import legacy_data
from tune_launch.training.config import validate_config
from tune_launch.training.packing import IGNORE, best_fit_assign, pack_best_fit, row_arrays
from tune_launch.training.prepare import prepare_data
from tune_launch.training.sources import DataError
from tune_launch.training.synthetic import CorpusGenerator, pretrain_texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 short documents of the tiny world and 4 long real-looking ones (cut into several rows)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    gen = CorpusGenerator(seed=5, vocab=2000, median_words=300)
    rows = pretrain_texts(300, 0) + [{"text": gen.document()} for _ in range(4)]
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(corpus, tok_dir, cache, **data):
    return validate_config({"model": {"name_or_path": str(tok_dir)}, "task": "pretrain",
                            "data": {"train": [{"path": str(corpus)}], "cache_dir": str(cache), **data},
                            "max_length": 64, "output_dir": str(cache.parent / "out")})


# --------------------------------------------------------------------------- packing

def test_vectorized_best_fit_is_the_sequential_algorithm():
    """Same rows, same order, as the bisect implementation it replaces, on 300 random inputs."""
    rng = random.Random(0)
    for _ in range(300):
        cap = rng.choice([4, 7, 16, 64, 128])
        lengths = [rng.randint(1, cap) if rng.random() < 0.5 else max(1, min(cap, int(rng.lognormvariate(1.5, 1))))
                   for _ in range(rng.randrange(0, 300))]
        rows = best_fit_assign(np.array(lengths, dtype=np.int64), cap)
        got: dict[int, list[int]] = {}
        for i, r in enumerate(rows.tolist()):
            got.setdefault(r, []).append(i)
        assert got == {b: sorted(g) for b, g in enumerate(legacy_data.best_fit_bins(lengths, cap))}


def test_packed_rows_equal_the_old_rows_and_waste_under_one_percent():
    docs = [list(range(3, 3 + n)) for n in np.random.default_rng(1).lognormal(np.log(40), 1, 2000).astype(int) + 2]
    new = pack_best_fit(docs, 256, pad_id=0)
    assert new == legacy_data.pack_best_fit(docs, 256, pad_id=0)
    real = sum(min(len(d), 256) for d in docs)  # every token lands in a row (long ones as several pieces)
    assert 1 - sum(len(d) for d in docs) / (len(new) * 256) < 0.01 and real > 0


def test_row_layout_restarts_positions_and_masks_document_starts_and_padding():
    row = row_arrays(np.array([1, 2, 3, 4, 5, 0, 0]), np.array([3, 2]))
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1, 0, 1]
    assert row["labels"].tolist() == [IGNORE, 2, 3, IGNORE, 5, IGNORE, IGNORE]


# --------------------------------------------------------------------------- the prepared data

def test_prepared_rows_equal_the_old_in_memory_path(corpus, tiny_model_dir, tmp_path):
    """Same rows as `load_source(...).to_list()` + per-document tokenizer calls + list packing did, memory-mapped."""
    from transformers import AutoTokenizer

    cfg = make_cfg(corpus, tiny_model_dir, tmp_path / "cache")
    prepared = prepare_data(cfg, {}, bar=False)
    train, ev = prepared.datasets()
    old = legacy_data.prepare_old(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert ev is None and len(train) == len(old) and len(train) > 300 // 2
    for i in range(len(old)):
        got = train[i]
        assert {k: v.tolist() for k, v in got.items()} == old[i], i
    assert prepared.info["splits"]["train"]["padding"] < 0.05  # 64-token rows of ~30-token documents


def test_eval_fraction_holds_out_documents_spread_over_the_corpus(corpus, tiny_model_dir, tmp_path):
    cfg = make_cfg(corpus, tiny_model_dir, tmp_path / "cache", eval_fraction=0.1)
    s = prepare_data(cfg, {}, bar=False).info["splits"]
    assert s["eval"]["documents"] == 31 and s["train"]["documents"] == 304 - 31  # document 0, then every 10th
    from tune_launch.training.prepare_text import held_out

    assert held_out(0, 25, 0.1).nonzero()[0].tolist() == [0, 10, 20]
    assert held_out(0, 3, 0.001).tolist() == [True, False, False]  # at least one document


@pytest.mark.parametrize("change", ["nothing", "max_length", "packing", "tokenizer", "file touched", "text_field",
                                    "eval_fraction", "seed"])
def test_cache_hit_and_miss_for_each_part_of_the_key(change, corpus, tiny_model_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    data = tmp_path / "data.jsonl"
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    data.write_text("".join(json.dumps({"text": r["text"], "body": r["text"].upper()}) + "\n" for r in rows))
    base = dict(model={"name_or_path": str(tiny_model_dir)}, task="pretrain", max_length=64, output_dir=str(tmp_path),
                data={"train": [{"path": str(data)}], "cache_dir": str(cache)})
    first = prepare_data(validate_config(base), {}, bar=False)
    assert not first.hit
    changed = json.loads(json.dumps(base))
    if change == "max_length":
        changed["max_length"] = 96
    elif change == "packing":
        changed["packing"] = False
    elif change == "tokenizer":
        from tune_launch.training.synthetic import train_tokenizer

        other = train_tokenizer([r["text"] for r in pretrain_texts(100, 1)], vocab_size=320)
        other.save_pretrained(tmp_path / "other-tok")
        changed["tokenizer"] = {"name_or_path": str(tmp_path / "other-tok")}
    elif change == "file touched":
        with open(data, "a") as f:
            f.write(json.dumps({"text": "one more document ."}) + "\n")
    elif change == "text_field":
        changed["data"]["train"][0]["text_field"] = "body"
    elif change == "eval_fraction":
        changed["data"]["eval_fraction"] = 0.05
    elif change == "seed":
        changed["seed"] = 7
    with caplog.at_level(logging.INFO, logger="tune_launch"):
        second = prepare_data(validate_config(changed), {}, bar=False)
    if change == "nothing":
        assert second.hit and second.entry == first.entry
        assert f"data cache hit: key {first.key}" in caplog.text
    else:
        assert not second.hit and second.key != first.key and "data cache miss" in caplog.text
        assert first.entry.is_dir()  # the other entry stays for its own YAML


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no manifest"])
def test_a_corrupted_cache_is_detected_and_rebuilt(damage, corpus, tiny_model_dir, tmp_path, caplog):
    cfg = make_cfg(corpus, tiny_model_dir, tmp_path / "cache")
    first = prepare_data(cfg, {}, bar=False)
    want = [first.datasets()[0][i]["input_ids"].tolist() for i in range(5)]
    rows = first.entry / "train.rows.bin"
    if damage == "flipped byte":
        data = bytearray(rows.read_bytes())
        data[100] ^= 0xFF
        rows.write_bytes(bytes(data))
    elif damage == "truncated":
        with open(rows, "r+b") as f:
            f.truncate(rows.stat().st_size - 10)
    else:
        (first.entry / "manifest.json").unlink()
    with caplog.at_level(logging.INFO, logger="tune_launch"):
        again = prepare_data(cfg, {}, bar=False)
    reason = {"flipped byte": "fails its checksum", "truncated": "has", "no manifest": "no readable manifest.json"}[damage]
    assert not again.hit and again.entry == first.entry
    assert "is damaged" in caplog.text and reason in caplog.text and "rebuilding it, never training on it" in caplog.text
    assert [again.datasets()[0][i]["input_ids"].tolist() for i in range(5)] == want
    assert prepare_data(cfg, {}, bar=False).hit


def test_trained_tokenizer_uses_a_bounded_sample_and_is_cached(corpus, tmp_path, caplog):
    cfg = validate_config({"model": {"config": {"model_type": "llama"}}, "task": "pretrain",
                           "tokenizer": {"train_vocab_size": 300, "train_sample_bytes": 2000},
                           "data": {"train": [{"path": str(corpus)}], "cache_dir": str(tmp_path / "cache")},
                           "max_length": 64, "output_dir": str(tmp_path / "out")})
    with caplog.at_level(logging.INFO, logger="tune_launch"):
        first = prepare_data(cfg, {}, bar=False)
    info = json.loads((first.tokenizer_dir / "manifest.json").read_text())["info"]
    assert 2000 <= info["characters"] < 2000 + 20_000 and info["texts"] < 304  # a sample, not the corpus
    assert "tokenizer trained on" in caplog.text
    again = prepare_data(cfg, {}, bar=False)
    assert again.hit and again.tokenizer_dir == first.tokenizer_dir


def test_sample_windows_spread_over_a_large_file(tmp_path):
    from tune_launch.training.schema import DataSource
    from tune_launch.training.sources import sample_texts

    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i:05d} " + "x" * 90}) + "\n" for i in range(3000)))
    texts = sample_texts(DataSource(path=str(path)), 32 * 200, None)
    numbers = sorted(int(t.split()[1]) for t in texts)
    assert 32 <= len(texts) <= 3 * 32 and numbers[0] < 100 and numbers[-1] > 2800


# --------------------------------------------------------------------------- bad input: one line naming file and row

BAD = {
    "bad json": ('{"text": "fine"}\n{"text": "oops\n', "corpus.jsonl: line 2: not valid JSON"),
    "no text field": ('{"text": "a"}\n{"text": "b"}\n{"body": "c", "id": 3}\n',
                      "corpus.jsonl: line 3: no field 'text' (fields: body, id); set text_field"),
    "text not a string": ('{"text": 12}\n', "corpus.jsonl: line 1: field 'text' is int, expected a string"),
    "not an object": ('["a", "b"]\n', "corpus.jsonl: line 1: a JSON list, expected an object with a 'text' field"),
    "empty file": ("", "corpus.jsonl: empty file, no documents"),
    "blank lines only": ("\n\n  \n", "corpus.jsonl: no documents (only blank lines)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_rows_give_one_line_naming_the_file_and_row(case, tiny_model_dir, tmp_path, capsys):
    from tune_launch.launch.cli import main

    text, expected = BAD[case]
    (tmp_path / "corpus.jsonl").write_text(text)
    cfg = {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": {"path": "corpus.jsonl"},
           "cache_dir": str(tmp_path / "cache")}, "max_length": 64, "output_dir": str(tmp_path / "out")}
    (tmp_path / "t.yaml").write_text(json.dumps(cfg))
    assert main(["prepare", "--quiet", str(tmp_path / "t.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not re.match(r"\d\d:\d\d:\d\d \[", line)]
    assert len(err) == 1 and err[0].startswith("tune-launch: error: ") and expected in err[0], err  # no traceback
    assert str(tmp_path / "corpus.jsonl") in err[0]
    assert not any(p.name.startswith(".build") for p in (tmp_path / "cache").glob(".*"))  # nothing half built left


def test_unreadable_files_and_formats_name_the_file(tmp_path):
    import gzip

    from tune_launch.training.schema import DataSource
    from tune_launch.training.sources import source_batches

    broken = tmp_path / "corpus.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({"text": str(random.random())}) + "\n" for _ in range(5000)).encode())
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"corpus.jsonl.gz: cannot be read past byte"):
        list(source_batches(DataSource(path=str(broken))))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt: line 1: not UTF-8 text"):
        list(source_batches(DataSource(path=str(latin))))
    csv = tmp_path / "rows.csv"
    csv.write_text("id,body\n1,hello\n")
    with pytest.raises(DataError, match=r"rows.csv: no column 'text' \(columns: id, body\)"):
        list(source_batches(DataSource(path=str(csv))))


def test_every_format_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tune_launch.training.schema import DataSource
    from tune_launch.training.sources import source_batches

    texts = [f"document number {i}, with a comma" for i in range(2500)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "a.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "a.csv").write_text("text\n" + "".join(f'"{t}"\n' for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=700)
    for name in ("a.jsonl", "a.json", "a.txt", "a.csv", "a.parquet"):
        got = [t for b in source_batches(DataSource(path=str(tmp_path / name))) for t in b.texts]
        assert got == texts, name
    limited = [t for b in source_batches(DataSource(path=str(tmp_path / "a.jsonl"), max_samples=1200)) for t in b.texts]
    assert limited == texts[:1200]


# --------------------------------------------------------------------------- SFT: TRL prepares once, Arrow end to end

@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_sft_cache_holds_what_sfttrainer_itself_would_prepare(fmt, tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tune_launch.training import synthetic
    from tune_launch.training.data import to_sft_row
    from tune_launch.training.schema import DataSource

    cfg = validate_config({"model": {"name_or_path": str(tiny_model_dir)}, "task": "sft", "max_length": 128,
                           "data": {"generate": {"kind": fmt, "train_samples": 40, "eval_samples": 6},
                                    "cache_dir": str(tmp_path / "cache")}, "output_dir": str(tmp_path / "out")})
    args = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_length=128, packing=True,
                completion_only_loss=True, dataset_text_field="text")
    prepared = prepare_data(cfg, {}, sft_args=SFTConfig(**args, dataset_kwargs={"skip_prepare_dataset": True}))
    train, ev = prepared.datasets()
    rows, _ = synthetic.generate(fmt, 40, 6, 0)
    src = DataSource(name="synthetic", format=fmt)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    own = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=SFTConfig(**args),
                     train_dataset=Dataset.from_list([to_sft_row(r, fmt, src) for r in rows]), processing_class=tok)
    assert train.column_names == own.train_dataset.column_names and len(ev) > 0
    assert train.to_dict() == own.train_dataset.to_dict()
    assert (prepared.entry / "train" / "dataset_info.json").is_file()  # Arrow on disk, mapped by every rank
    assert prepare_data(cfg, {}, sft_args=SFTConfig(**args, dataset_kwargs={"skip_prepare_dataset": True})).hit


def test_sft_bad_row_names_the_file_and_row(tiny_model_dir, tmp_path):
    rows = [{"instruction": "add", "input": "one two", "output": "three"}] * 5 + [{"instruction": "add", "input": "x"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validate_config({"model": {"name_or_path": str(tiny_model_dir)}, "task": "sft", "max_length": 128,
                           "data": {"train": {"path": str(tmp_path / "a.jsonl"), "format": "alpaca"},
                                    "cache_dir": str(tmp_path / "cache")}, "output_dir": str(tmp_path / "out")})
    from trl import SFTConfig

    with pytest.raises(DataError, match=r"a.jsonl: row 5: no field 'output' \(fields: input, instruction\)"):
        prepare_data(cfg, {}, sft_args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, max_length=128))


# --------------------------------------------------------------------------- one preparer per job

def test_who_prepares_depends_on_whether_the_cache_is_shared():
    from tune_launch.training.coordinate import choose_role
    from tune_launch.training.distributed import RankInfo

    def rank(r, local, node):
        return RankInfo(rank=r, local_rank=local, world_size=4, local_world_size=2, node_rank=node, num_nodes=2)

    shared = [choose_role(rank(r, r % 2, r // 2), True) for r in range(4)]
    assert [x.prepares for x in shared] == [True, False, False, False] and {x.scope for x in shared} == {"job"}
    local = [choose_role(rank(r, r % 2, r // 2), False) for r in range(4)]
    assert [x.prepares for x in local] == [True, False, True, False]
    assert [x.scope for x in local] == ["node0", "node0", "node1", "node1"]
    assert local[3].preparer == "local rank 0 of node 1"
    assert [x.preparer_rank for x in local] == [0, 0, 2, 2] and {x.preparer_rank for x in shared} == {0}
    one_node = RankInfo(rank=1, local_rank=1, world_size=2, local_world_size=2)
    assert not choose_role(one_node, False).prepares and choose_role(one_node, False).scope == "job"


def test_a_waiting_rank_progresses_only_while_the_preparer_does(tmp_path, monkeypatch):
    """Another node's launcher watches only its own ranks: theirs must move while rank 0 tokenizes, and stop
    moving when rank 0 is stuck (real heartbeat writers and files)."""
    from tune_launch import heartbeat
    from tune_launch.heartbeat import HeartbeatWriter
    from tune_launch.training.coordinate import PreparerFollower

    monkeypatch.setattr(heartbeat, "_writer", None)
    preparer = HeartbeatWriter(heartbeat.rank_file(tmp_path, 0), {"rank": 0}, interval_s=0.01).start()
    mine = heartbeat.start(heartbeat.rank_file(tmp_path, 2), {"rank": 2}, interval_s=0.01)
    try:
        follower = PreparerFollower(heartbeat.rank_file(tmp_path, 0))

        def my_progress():
            mine.flush()
            return heartbeat.read(heartbeat.rank_file(tmp_path, 2)).progress

        before = my_progress()
        for done in (100, 200):
            preparer.update(phase="data", done=done, total=1000, detail="preparing: 3 documents")
            preparer.flush()
            follower.poll()
            follower.poll()  # the same heartbeat twice is one step of progress, not two
        mine.flush()
        after = heartbeat.read(heartbeat.rank_file(tmp_path, 2))
        assert after.progress == before + 2 and (after.done, after.total) == (200, 1000)
        assert after.detail == "waiting for rank 0: preparing: 3 documents"
        for _ in range(3):  # the preparer is stuck: the waiting rank shows no progress either
            follower.poll()
        assert my_progress() == after.progress
    finally:
        preparer.close(phase="done")
        mine.close(phase="done")


def test_looks_shared_reads_the_mount_table(tmp_path):
    from tune_launch.filesystems import looks_shared

    (tmp_path / "local").mkdir()
    mounts = f"/dev/vda / ext4 rw 0 0\nfs:/export {tmp_path} nfs4 rw 0 0\n/dev/vdb {tmp_path / 'local'} xfs rw 0 0\n"
    assert looks_shared(tmp_path / "cache" / "not-made-yet", {}, mounts)  # judged by the folder it will be made in
    assert not looks_shared(tmp_path / "local" / "cache", {}, mounts)
    assert looks_shared(tmp_path / "local" / "cache", {"TUNE_LAUNCH_SHARED_FS": "1"}, mounts)


def test_a_stuck_preparer_is_named_when_the_wait_runs_out(tmp_path):
    from tune_launch.training.coordinate import wait_for_signal, write_signal

    t0 = __import__("time").monotonic()
    with pytest.raises(DataError, match=r"waited \d+ s for rank 0 \(node 0\) to prepare the data "
                                        r"\(data.prepare_timeout 1 s\).*tune-launch prepare"):
        wait_for_signal(tmp_path / "s.json", 1, "rank 0 (node 0)", poll=0.05)
    assert __import__("time").monotonic() - t0 < 5
    write_signal(tmp_path / "s.json", {"status": "ready", "entry": "x"})
    assert wait_for_signal(tmp_path / "s.json", 1, "rank 0", poll=0.05)["entry"] == "x"


@pytest.mark.slow
def test_worker_processes_give_the_same_rows(corpus, tiny_model_dir, tmp_path):
    one = prepare_data(make_cfg(corpus, tiny_model_dir, tmp_path / "a"), {}, bar=False)
    two = prepare_data(make_cfg(corpus, tiny_model_dir, tmp_path / "b", num_proc=2), {}, bar=False)
    assert one.key == two.key  # data.num_proc does not change the result, so not the key either
    a, b = one.entry / "train.rows.bin", two.entry / "train.rows.bin"
    assert a.read_bytes() == b.read_bytes() and not (two.entry / "worker-tokenizer").exists()


def test_a_dataset_by_name_goes_through_datasets_and_is_keyed_by_its_fingerprint(corpus, tiny_model_dir, tmp_path):
    """`name:` sources (hub datasets) load through `datasets`; a local dataset folder stands in for the hub here."""
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(corpus.read_text())
    raw = {"model": {"name_or_path": str(tiny_model_dir)}, "task": "pretrain", "max_length": 64,
           "data": {"train": {"name": str(folder)}, "cache_dir": str(tmp_path / "cache")}, "output_dir": str(tmp_path)}
    cfg = validate_config(raw)
    by_name = prepare_data(cfg, {}, bar=False)
    by_path = prepare_data(make_cfg(folder / "train.jsonl", tiny_model_dir, tmp_path / "cache2"), {}, bar=False)
    assert (by_name.entry / "train.rows.bin").read_bytes() == (by_path.entry / "train.rows.bin").read_bytes()
    assert prepare_data(cfg, {}, bar=False).hit
    bad = validate_config({**raw, "data": {"train": {"name": str(tmp_path / "nope")}, "cache_dir": str(tmp_path / "cache")}})
    with pytest.raises(DataError, match=r"data source '.*nope': cannot be loaded"):
        prepare_data(bad, {}, bar=False)


def test_the_preparing_rank_gets_the_tokenizer_threads_back_for_the_preparation_only(monkeypatch):
    """The launcher sets TOKENIZERS_PARALLELISM=false for every rank; the one preparing may use every core."""
    from tune_launch.training.coordinate import tokenizer_threads

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with tokenizer_threads():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with pytest.raises(RuntimeError), tokenizer_threads():
        raise RuntimeError("a failed preparation")
    assert "TOKENIZERS_PARALLELISM" not in os.environ
