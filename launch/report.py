"""`tune-launch plan` output: the table of every profile, and the same as JSON."""

from __future__ import annotations

from typing import Any

from tune_launch.launch.hardware import Hardware
from tune_launch.units import GIB
from tune_launch.launch.model_facts import ModelFacts
from tune_launch.launch.plan import LaunchPlan
from tune_launch.training.settings import RESOLVED_KEYS


def plan_table(plan: LaunchPlan, facts: ModelFacts | None, hw: Hardware) -> str:
    lines = []
    if facts is not None:
        lines.append(f"model     {facts.model_type}: {facts.num_params:,} parameters ({facts.num_params / 1e9:.2f}B)"
                     + (", tied embeddings" if facts.tied_embeddings else "")
                     + (f", {facts.lora_params:,} LoRA parameters" if facts.lora_params else ""))
    if plan.device == "cuda":
        lines.append(f"hardware  {plan.nodes} node(s) x {plan.processes_per_node} x {hw.gpu_name or 'GPU'} "
                     f"{hw.gpu_memory_gib:.0f} GiB, {hw.cpu_ram_gib:.0f} GiB CPU RAM per node; budget {plan.budget_gib:.1f} GiB per GPU")
    if plan.table:
        lines.append("")
        w = plan.workload
        if w is not None:
            mb = plan.settings.micro_batch_size
            chosen_mb = f" (chosen row: {mb})" if mb != w.micro_batch_size else ""
            lines.append(f"rows      micro batch {w.micro_batch_size}{chosen_mb} x {w.seq_len} tokens, {w.precision}, "
                         f"{w.finetune} fine-tune; states = weights + gradients + optimizer")
        lines.append(f"{'profile':<20} {'GiB/GPU':>8} {'states':>8} {'activ.':>8} {'logits':>8} {'CPU RAM':>8}  {'fits':<4} {'speed':>5}")
        for row in sorted(plan.table, key=lambda r: -r.speed):
            e = row.estimate
            mark = " <-" if plan.chosen is not None and row == plan.chosen else ""
            fits = "yes" if row.fits else ("RAM" if row.fits_gpu else "no")
            lines.append(f"{row.label:<20} {e.total_gib:>8.1f} {e.model_states / GIB:>8.1f} {e.activations / GIB:>8.1f} "
                         f"{e.logits / GIB:>8.1f} {e.cpu_ram_gib:>8.0f}  {fits:<4} {row.speed:>5.2f}{mark}")
        lines.append("")
    if plan.device == "cpu":
        lines.append("hardware  no GPU here: the job runs on the CPU; `--hardware FILE` plans for a GPU machine "
                     "(write one with `tune-launch detect --json` there, or the flat form in the README)")
    lines.append(f"chosen    {plan.profile.name}: {plan.reason}")
    resolved = plan.settings.as_overrides()
    if resolved:
        lines.append(f"settings  {' '.join(resolved)}")
    lines += [f"note      {n}" for n in plan.notes]
    return "\n".join(lines)


def plan_json(plan: LaunchPlan, facts: ModelFacts | None, hw: Hardware) -> dict[str, Any]:
    rows = []
    for row in plan.table:
        e = row.estimate
        rows.append({
            "profile": row.profile.name, "gradient_checkpointing": e.gradient_checkpointing,
            "gib_per_gpu": round(e.total_gib, 3), "weights_gib": round(e.weights / GIB, 3),
            "gradients_gib": round(e.gradients / GIB, 3), "optimizer_gib": round(e.optimizer / GIB, 3),
            "gathered_gib": round(e.gathered / GIB, 3), "activations_gib": round(e.activations / GIB, 3),
            "logits_gib": round(e.logits / GIB, 3), "cpu_ram_gib": round(e.cpu_ram_gib, 3),
            "fits": row.fits, "fits_gpu": row.fits_gpu, "fits_cpu": row.fits_cpu, "relative_speed": round(row.speed, 4),
            "chosen": plan.chosen is not None and row == plan.chosen,
        })
    return {
        "profile": plan.profile.name,
        "reason": plan.reason,
        "device": plan.device,
        "nodes": plan.nodes,
        "processes_per_node": plan.processes_per_node,
        "world_size": plan.world_size,
        "budget_gib_per_gpu": round(plan.budget_gib, 3),
        "overrides": list(plan.overrides),
        "settings": {key: plan.settings.value_of(key) for key in RESOLVED_KEYS},
        "resolved_overrides": list(plan.settings.as_overrides()),
        "notes": list(plan.notes),
        "model": None if facts is None else {
            "model_type": facts.model_type, "num_params": facts.num_params, "lora_params": facts.lora_params,
            "tied_embeddings": facts.tied_embeddings, "num_layers": facts.num_layers, "hidden_size": facts.hidden_size,
        },
        "hardware": hw.to_json(),
        "table": rows,
    }
