"""data.train[].template: prompts of one's own over the row's fields, loss on the completion only."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from tune_launch.training.config import ConfigError
from tune_launch.training.data import to_sft_row
from tune_launch.training.prepare_sft import format_sft
from tune_launch.training.schema import DataSource
from tune_launch.training.templates import parse_template

ES = "### Instrucción:\n{instruction}\n\n### Entrada:\n{input}\n\n### Respuesta:\n"
ROW = {"instruction": "Resume el texto.", "input": "La IA cambia la educación.", "output": "La IA transforma la enseñanza."}


def _src(template: str, **kw) -> DataSource:
    return DataSource(path="rows.jsonl", format="alpaca", template=template, **kw)


def test_format_string_reproduces_the_tutorials_formatting_func():
    row = to_sft_row(ROW, "alpaca", _src(ES))
    # what the TRL tutorial's formatting_prompts_func builds for the same row, as prompt + completion
    tutorial = f"### Instrucción:\n{ROW['instruction']}\n\n### Entrada:\n{ROW['input']}\n\n### Respuesta:\n{ROW['output']}"
    assert row["prompt"] + row["completion"] == tutorial
    assert row["completion"] == ROW["output"]


def test_chinese_template_and_other_field_names():
    src = _src("### 指令:\n{question}\n\n### 响应:\n", completion_field="answer")
    row = to_sft_row({"question": "说出秘鲁的首都。", "answer": "利马"}, "alpaca", src)
    assert row == {"prompt": "### 指令:\n说出秘鲁的首都。\n\n### 响应:\n", "completion": "利马"}


def test_jinja_template_with_an_optional_input():
    src = _src("### Instrucción:\n{{ instruction }}\n\n{% if input %}### Entrada:\n{{ input }}\n\n{% endif %}### Respuesta:\n")
    assert parse_template(src.template).engine == "jinja"
    with_input = to_sft_row(ROW, "alpaca", src)["prompt"]
    without = to_sft_row({**ROW, "input": None}, "alpaca", src)["prompt"]  # JSON null renders as empty
    assert "### Entrada:\nLa IA cambia la educación.\n\n" in with_input
    assert without == "### Instrucción:\nResume el texto.\n\n### Respuesta:\n"


def test_null_field_renders_empty_in_a_format_string():
    assert to_sft_row({**ROW, "input": None}, "alpaca", _src(ES))["prompt"].endswith("### Entrada:\n\n\n### Respuesta:\n")


@pytest.mark.parametrize("template", [ES, "{{ instrucción }} {{ input }}"])
def test_missing_field_names_file_row_and_field(template, tmp_path):
    src = _src(template.replace("{instruction}", "{instrucción}"))
    with pytest.raises(ConfigError) as err:
        to_sft_row(ROW, "alpaca", src, index=17)
    text = str(err.value)
    assert text.startswith("data: rows.jsonl row 17: the template needs field 'instrucción', which the row lacks")
    assert '(did you mean "instruction"?)' in text and "its fields: input, instruction, output" in text
    assert "\n" not in text


def test_missing_completion_names_the_completion_field():
    with pytest.raises(ConfigError, match=r"row 3: the completion_field needs field 'answer'"):
        to_sft_row(ROW, "alpaca", _src(ES, completion_field="answer"), index=3)


def test_dataset_names_the_row_position_in_its_file(tmp_path):
    rows = [ROW, ROW, {"instruction": "x", "output": "y"}]
    src = DataSource(name="org/dataset", format="alpaca", template=ES)
    with pytest.raises(ConfigError, match=r"data: org/dataset row 2: the template needs field 'input'"):
        to_sft_row(rows[2], "alpaca", src, index=2)
    ok = format_sft(Dataset.from_list(rows), src)  # in a dataset, a key only some rows have reads as null: empty
    assert ok.column_names == ["prompt", "completion"] and ok[0]["completion"] == ROW["output"]
    assert "### Entrada:\n\n\n### Respuesta" in ok[2]["prompt"]  # {input} rendered empty
    with pytest.raises(ConfigError, match=r"data: org/dataset row 0: the template needs field 'input'"):
        format_sft(Dataset.from_list(rows[2:]), src)  # a field no row has


def test_sft_trainer_masks_the_templated_prompt(tiny_model_dir, tmp_path):
    """The SFTTrainer batch of a templated row: labels only on the completion (and EOS)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = {"instruction": "add the two numbers .", "input": "one two", "output": "three"}
    src = _src("### Instrucción:\n{instruction}\n\n### Entrada:\n{input}\n\n### Respuesta:\n")
    ds = format_sft(Dataset.from_list([row]), src)
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_length=512, completion_only_loss=True,
                     per_device_train_batch_size=1)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=ds,
                         processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"][0].tolist()
    answer = tok("three", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [x for x in labels if x != -100] == answer
    prompt_ids = tok(ds[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist()[: len(prompt_ids)] == prompt_ids


@pytest.mark.slow
def test_run_with_a_template_field_the_data_lacks_stops_with_one_line(tiny_model_dir, tmp_path):
    """A real launch: the rank refuses the data before training; the launcher exits 2 with the rank's one line.
    (A key missing from only some JSON rows reads as null, datasets fills the column, and renders empty.)"""
    from conftest import launch, tiny_config, write_yaml

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": "a", "input": "b", "output": "c"}) + "\n" for _ in range(4)))
    cfg = tiny_config(tiny_model_dir, tmp_path / "out", task="sft", train={"max_steps": 2}, checkpoint={"save_steps": 2})
    cfg["data"] = {"train": [{"path": str(data), "format": "alpaca", "template": ES.replace("{input}", "{entrada}")}]}
    proc = launch(write_yaml(tmp_path / "t.yaml", cfg))
    assert proc.returncode == 2, proc.stderr[-3000:]
    final = proc.stderr.strip().splitlines()[-1]
    assert "rows.jsonl row 0: the template needs field 'entrada', which the row lacks" in final, final
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "checkpoint-2").exists()
