"""Streaming in one process: the share each rank reads, exact positions across a save/restore, refusals.

The end-to-end run killed mid-epoch and resumed is in tests/test_data_runs.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tune_launch.training.config import validate_config
from tune_launch.training.sources import DataError
from tune_launch.training.stream_units import all_units, rank_units, read_unit
from tune_launch.training.streaming import PackedStream


@pytest.fixture(scope="module")
def stream_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "corpus.jsonl"
    rng = np.random.default_rng(0)
    lines = [json.dumps({"text": f"doc {i} " + " ".join(["the cat sees the dog ."] * int(rng.integers(1, 12)))})
             for i in range(600)]
    path.write_text("\n".join(lines) + "\n")
    return path


def stream_cfg(path, tok_dir, **data):
    return validate_config({"model": {"name_or_path": str(tok_dir)}, "task": "pretrain", "max_length": 64,
                            "data": {"train": [{"path": str(path)}], "streaming": True, "stream_buffer_rows": 4, **data},
                            "train": {"max_steps": 10}, "output_dir": "unused"})


def test_ranks_read_disjoint_blocks_that_cover_every_document(stream_corpus, tiny_model_dir):
    cfg = stream_cfg(stream_corpus, tiny_model_dir)
    units = all_units(cfg, 2)
    assert len(units) >= 8 and all(u.kind == "lines" for u in units)
    seen = []
    for rank in (0, 1):
        mine = [t for u in rank_units(units, rank, 2) for _, t in read_unit(u, None, cfg, rank, 2)]
        assert mine, rank
        seen.append(mine)
    all_docs = [json.loads(line)["text"] for line in stream_corpus.read_text().splitlines()]
    assert sorted(seen[0] + seen[1]) == sorted(all_docs) and not set(seen[0]) & set(seen[1])


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_a_restored_stream_continues_with_exactly_the_next_rows(stream_corpus, tiny_model_dir, tmp_path):
    """Save after 12 consumed rows while 20 were already produced (prefetch), restore, read on across epochs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = stream_cfg(stream_corpus, tiny_model_dir)
    whole = _take(iter(PackedStream(cfg, tok, 0, 2)), 400)  # rank 0's half of 600 short docs: several epochs
    first = PackedStream(cfg, tok, 0, 2)
    it = iter(first)
    _take(it, 20)
    first.save_position(tmp_path, consumed=12, batch=4, accumulation=3)
    it.close()
    resumed = PackedStream(cfg, tok, 0, 2)
    resumed.load_position(tmp_path, batch=4, accumulation=3)
    again = _take(iter(resumed), 388)
    for a, b in zip(whole[12:], again):
        assert all(np.array_equal(a[k], b[k]) for k in ("input_ids", "position_ids", "labels"))
    meta = json.loads((tmp_path / "data_position" / "rank0.json").read_text())
    assert meta["consumed"] == 12 and meta["world_size"] == 2
    tokens = sum(int((r["labels"] != -100).sum()) for r in whole[:60])
    assert tokens > 0 and all(len(r["input_ids"]) == 64 for r in whole)
    with pytest.raises(DataError, match="saved with world_size 2, this run has 4"):
        PackedStream(cfg, tok, 0, 4).load_position(tmp_path, batch=4, accumulation=3)
    with pytest.raises(DataError, match="saved with batch 4, this run has 8"):
        PackedStream(cfg, tok, 0, 2).load_position(tmp_path, batch=8, accumulation=3)


def test_a_stream_with_a_bad_row_names_the_file_and_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a b c"}\n' * 50 + '{"txt": "oops"}\n')
    stream = PackedStream(stream_cfg(path, tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir), 0, 1)
    with pytest.raises(DataError, match=r"c.jsonl: line 51: no field 'text' \(fields: txt\)"):
        _take(iter(stream), 100)


def test_more_ranks_than_blocks_is_one_clear_line(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "a b c"}\n')
    with pytest.raises(DataError, match="rank 1 of 2 gets no part of the data"):
        PackedStream(stream_cfg(path, tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir), 1, 2)


def test_streaming_schema_rules():
    from tune_launch.training.config import ConfigError, validate_config as v

    base = {"model": {"name_or_path": "x"}, "data": {"train": {"path": "a.jsonl"}, "streaming": True},
            "train": {"max_steps": 5}}
    v(base)
    cases = [({"train": {"max_steps": -1}}, "train.max_steps: a stream has no length"),
             ({"task": "sft", "completion_only_loss": False}, "data.streaming: streams task pretrain"),
             ({"data": {**base["data"], "eval_fraction": 0.1}}, "data.eval_fraction: a stream has no known size"),
             ({"train": {"max_steps": 5, "dataloader_num_workers": 2}}, "train.dataloader_num_workers")]
    for change, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            v({**base, **change})


def test_a_dataset_by_name_is_streamed_and_split_between_ranks(stream_corpus, tiny_model_dir, tmp_path):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(stream_corpus.read_text())
    cfg = validate_config({"model": {"name_or_path": str(tiny_model_dir)}, "task": "pretrain", "max_length": 64,
                           "data": {"train": {"name": str(folder)}, "streaming": True}, "train": {"max_steps": 3}})
    units = all_units(cfg, 2)
    assert [u.kind for u in units] == ["hub"]
    texts = [[t for _, t in read_unit(units[0], None, cfg, r, 2)] for r in (0, 1)]
    assert len(texts[0]) + len(texts[1]) == 600 and not set(texts[0]) & set(texts[1])
    position, _ = next(iter(read_unit(units[0], None, cfg, 0, 2)))  # the stream's own resumable state
    rest = [t for _, t in read_unit(units[0], position, cfg, 0, 2)]
    assert rest == texts[0][1:]
