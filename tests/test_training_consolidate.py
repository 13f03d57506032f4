"""`consolidate.enabled: true`: FSDP training on 2 gloo ranks ends with a loadable HF folder streamed from the shards."""

from __future__ import annotations

import pytest
from conftest import check_ok, launch, tiny_config, write_yaml


@pytest.mark.slow
def test_fsdp_run_consolidates_its_last_checkpoint(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = tiny_config(tiny_model_dir, out, train={"max_steps": 5}, consolidate={"enabled": True, "dtype": "fp32"})
    check_ok(launch(write_yaml(tmp_path / "c.yaml", cfg), profile="fsdp", processes=2))
    last = out / "checkpoint-5"  # save_steps 2: the run saved step 4, consolidation needs the last step
    assert (last / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (last / "config.json").is_file() and (last / "tokenizer_config.json").is_file()
    consolidated = AutoModelForCausalLM.from_pretrained(out / "consolidated")
    final = AutoModelForCausalLM.from_pretrained(out / "final")  # FSDP's own full-state-dict gather
    got, want = consolidated.state_dict(), final.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ids = torch.arange(1, 17).unsqueeze(0)
    assert torch.equal(consolidated(ids).logits, final(ids).logits)
