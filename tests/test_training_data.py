"""Packing, collators, formats and the generated data: pure functions, no processes."""

from __future__ import annotations

import pytest
import torch

from tune_launch.training import synthetic
from tune_launch.training.config import ConfigError
from tune_launch.training.schema import DataSource
from tune_launch.training.data import IGNORE, CausalLMCollator, alpaca_prompt, check_batch, to_sft_row
from tune_launch.training.packing import pack_best_fit


def test_packing_restarts_positions_and_masks_padding_and_document_starts():
    rows = pack_best_fit([[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12]], max_length=6, pad_id=0)
    # a document longer than max_length is cut; every piece restarts its positions
    assert rows[0]["input_ids"] == [6, 7, 8, 9, 10, 11] and rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5]
    assert rows[1] == {"input_ids": [1, 2, 3, 4, 5, 0], "position_ids": [0, 1, 2, 0, 1, 0],
                       "labels": [IGNORE, 2, 3, IGNORE, 5, IGNORE]}
    assert len(rows) == 2  # the 1-token tail [12] has nothing to predict: dropped
    assert all(len(r["input_ids"]) == 6 for r in rows)


def test_packed_position_ids_keep_attention_inside_documents():
    """transformers turns restarted position_ids into a block-diagonal mask: a token never sees the previous doc.
    (Only without a KV cache, as in training: the Trainer sets config.use_cache=False.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    row = pack_best_fit([[5, 6, 7], [8, 9, 10]], max_length=6, pad_id=0)[0]
    packed = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                   use_cache=False).logits
    alone = model(input_ids=torch.tensor([[8, 9, 10]]), use_cache=False).logits
    assert torch.allclose(packed[0, 3:], alone[0], atol=1e-5)


def test_unpacked_collator_builds_labels_with_padding_ignored():
    batch = CausalLMCollator(pad_id=0)([{"input_ids": [3, 4, 5]}, {"input_ids": [6, 7]}])
    assert batch["labels"].tolist() == [[3, 4, 5], [6, 7, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    check_batch(batch)
    with pytest.raises(ConfigError, match="carry no labels"):
        check_batch({"input_ids": batch["input_ids"]})


def test_sft_formats():
    src = DataSource(path="x.jsonl", format="alpaca")
    row = to_sft_row({"instruction": "add", "input": "one two", "output": "three"}, "alpaca", src)
    assert row["completion"] == "three" and row["prompt"].endswith("### Input:\none two\n\n### Response:\n")
    assert "### Input" not in alpaca_prompt("say hi", "")
    chat = to_sft_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                      "chat", DataSource(path="x.jsonl", format="chat"))
    assert chat == {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}
    with pytest.raises(ValueError, match="must end with an assistant message"):
        to_sft_row({"messages": [{"role": "user", "content": "q"}]}, "chat", DataSource(path="x.jsonl", format="chat"))


def test_generated_data_is_deterministic_and_held_out():
    a = synthetic.generate("pretrain", 50, 10, seed=3)
    assert a == synthetic.generate("pretrain", 50, 10, seed=3)
    assert a != synthetic.generate("pretrain", 50, 10, seed=4)
    assert set(r["text"] for r in a[1]).isdisjoint(r["text"] for r in a[0]) or len(a[1]) == 10
    for kind in ("alpaca", "chat"):
        train, ev = synthetic.generate(kind, 20, 5, seed=0)
        assert len(train) == 20 and len(ev) == 5


def test_local_tokenizer_covers_the_generated_text():
    tok = synthetic.train_tokenizer([r["text"] for r in synthetic.pretrain_texts(100, 0)], vocab_size=400)
    text = synthetic.pretrain_texts(1, 99)[0]["text"]
    assert tok.decode(tok(text)["input_ids"]) == text and tok.unk_token_id not in tok(text)["input_ids"]
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|>hi<|end|><|assistant|>"
