"""Per-GPU peak memory of a training step, for every profile. Pure arithmetic on `ModelFacts`.

Model states (bytes per parameter, N = world size, Psi = parameters):
- Single GPU, DDP, FSDP in bf16: the training script loads weights in bf16 (pure bf16, as torchtune does), so
  weights 2, grads 2, AdamW moments 4. With fp32 master weights (fp32 or fp16 precision, or model.dtype float32):
  4 / 4 / 8. FSDP divides all three by N and adds the blocks being gathered.
- DeepSpeed bf16/fp16: 16-bit weights 2, 16-bit grads 2, fp32 master + AdamW 12 (the ZeRO paper's K=12).
  ZeRO-2 divides grads and the 12 by N, ZeRO-3 all of them. fp32 training: 4 / 4 / 8.
- LoRA: frozen base weights in the compute dtype (2 bytes; QLoRA about 0.516 for 4-bit NF4 with double quant;
  8-bit LLM.int8 1 byte, its per-row fp32 scales are under 0.1%) plus 16 bytes per adapter parameter. Quantized
  weights are those of the blocks' linear layers; embeddings, norms and the LM head stay in the compute dtype.
  8-bit weights cannot be sharded (FSDP flattens one dtype per unit, ZeRO-3 partitions floating-point parameters):
  `supports` keeps those profiles out of the table.
Activations (HF Llama-style block, SDPA/flash attention so no s^2 term), bytes per token per layer:
  28 h + 6 kv + 8 i in 16-bit; with gradient checkpointing only the 2 h block input per layer is kept plus one
  block being recomputed. Logits: 12 bytes per token per vocabulary entry (16-bit logits, fp32 upcast, its
  gradient), unless a fused linear cross-entropy is used.
"""

from __future__ import annotations

from dataclasses import dataclass

from tune_launch.launch.model_facts import ModelFacts
from tune_launch.units import GIB
from tune_launch.profiles import Profile

FIXED_OVERHEAD_BYTES = int(1.25 * GIB)  # CUDA context, cuBLAS workspace, allocator slack
QLORA_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + 8-bit absmax per 64 + fp32 per 256 absmax
INT8_BYTES_PER_PARAM = 1.0  # LLM.int8: int8 weights (+ one fp32 scale per output row, negligible)
QUANTIZED_BYTES = {"qlora": QLORA_BYTES_PER_PARAM, "lora-int8": INT8_BYTES_PER_PARAM}
CPU_BASE_BYTES_PER_PROCESS = int(2.5 * GIB)  # python, torch, CUDA host side, data pipeline
ZERO2_BUCKET_ELEMENTS = 200_000_000  # allgather_bucket_size in deepspeed_configs/zero2*.json


@dataclass(frozen=True)
class Workload:
    """The per-step shape of the job, from the YAML (micro batch already resolved to a number)."""

    micro_batch_size: int
    seq_len: int
    precision: str = "bf16"  # bf16 | fp16 | fp32
    master_weights: bool = False  # fp32 weights under autocast (fp16, fp32, or model.dtype float32)
    finetune: str = "full"  # full | lora | qlora (4-bit base) | lora-int8 (8-bit base)
    gradient_checkpointing: bool = False
    fused_cross_entropy: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    profile: str
    gradient_checkpointing: bool
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    gathered: float  # unsharded blocks held during forward/backward (FSDP / ZeRO-3) or comm buckets
    activations: float
    logits: float
    overhead: float
    cpu_ram: float  # bytes per node: offloaded states (or FSDP's rank-0 load) + one process base per GPU

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.gathered + self.activations + self.logits + self.overhead

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    @property
    def cpu_ram_gib(self) -> float:
        return self.cpu_ram / GIB


def supports(profile: Profile, workload: Workload) -> bool:
    """False where the profile cannot hold the workload's weights at all (8-bit weights under sharding)."""
    if workload.finetune == "lora-int8":
        return profile.strategy != "fsdp" and profile.zero_stage != 3
    return True


def state_bytes_per_param(profile: Profile, precision: str, master_weights: bool = False) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per trainable parameter before sharding."""
    if precision == "fp32":
        return 4.0, 4.0, 8.0
    if profile.strategy == "deepspeed":
        return 2.0, 2.0, 12.0  # DeepSpeed keeps an fp32 master copy next to Adam's moments
    if master_weights or precision == "fp16":
        return 4.0, 4.0, 8.0
    return 2.0, 2.0, 4.0


def activation_bytes_per_token(facts: ModelFacts, checkpointing: bool, precision: str) -> float:
    """Stored activations per token for the whole stack of blocks (see module docstring)."""
    scale = 2.0 if precision == "fp32" else 1.0
    h, kv, i, layers = facts.hidden_size, facts.kv_size, facts.intermediate_size, facts.num_layers
    per_layer = (28 * h + 6 * kv + 8 * i) * scale
    if checkpointing:
        return layers * 2 * h * scale + per_layer
    return layers * per_layer


def logits_bytes_per_token(facts: ModelFacts, workload: Workload) -> float:
    if workload.fused_cross_entropy:
        return 4.0 * facts.hidden_size  # chunked: a few hidden-size rows, not the vocabulary
    return 12.0 * facts.vocab_size


def estimate_memory(profile: Profile, facts: ModelFacts, world_size: int, gpus_per_node: int,
                    workload: Workload) -> MemoryEstimate:
    """Per-GPU peak bytes of `profile` training `facts` with `world_size` processes."""
    n = max(world_size, 1)
    psi = facts.num_params
    w_b, g_b, o_b = state_bytes_per_param(profile, workload.precision, workload.master_weights)
    compute_bytes = 4.0 if workload.precision == "fp32" else 2.0

    if workload.finetune == "full":
        trainable = psi
        frozen_bytes = 0.0
    else:
        trainable = facts.lora_params
        if workload.finetune in QUANTIZED_BYTES:
            quantized = facts.layer_linear_params
            frozen_bytes = quantized * QUANTIZED_BYTES[workload.finetune] + (psi - quantized) * compute_bytes
        else:
            frozen_bytes = psi * compute_bytes
        w_b, g_b, o_b = 4.0, 4.0, 8.0  # adapters stay fp32 with their AdamW states

    shard_w = n if profile.shards_params else 1
    shard_g = n if profile.shards_gradients else 1
    shard_o = n if profile.shards_optimizer else 1

    weights = trainable * w_b / shard_w + frozen_bytes / shard_w
    gradients = trainable * g_b / shard_g
    optimizer = trainable * o_b / shard_o
    cpu_states = 0.0
    if profile.offload_optimizer:
        # DeepSpeed keeps fp32 master, Adam moments and fp32 grads on the CPU; FSDP offload keeps its fp32 params too.
        cpu_states += optimizer + trainable * 4.0 / shard_g
        optimizer = 0.0
        if profile.strategy == "deepspeed":
            gradients = min(gradients, facts.layer_params * g_b * 2)  # only the reduce buckets stay on the GPU
    if profile.offload_params:
        cpu_states += weights + gradients
        weights = 0.0
        gradients = 0.0

    gathered = 0.0
    if profile.shards_params and n > 1 or profile.offload_params:
        # FSDP prefetches the next block; ZeRO-3 keeps the live-parameter window. Count two blocks, 16-bit,
        # plus their gradients before reduce-scatter.
        per_param = QUANTIZED_BYTES.get(workload.finetune, compute_bytes)
        gathered = 2 * facts.layer_params * per_param
        if workload.finetune == "full":
            gathered += facts.layer_params * compute_bytes
    elif profile.strategy == "deepspeed" and profile.zero_stage == 2 and n > 1:
        gathered = min(ZERO2_BUCKET_ELEMENTS, psi) * compute_bytes

    tokens = workload.micro_batch_size * workload.seq_len
    activations = tokens * activation_bytes_per_token(facts, workload.gradient_checkpointing, workload.precision)
    logits = tokens * logits_bytes_per_token(facts, workload)

    # transformers loads safetensors lazily (mmap, shard by shard) straight to each rank's device; only FSDP's
    # cpu_ram_efficient_loading materialises the full state dict once, on local rank 0, before broadcasting it.
    load_bytes = psi * compute_bytes if profile.strategy == "fsdp" else 0.0
    cpu_ram = max(cpu_states * gpus_per_node, load_bytes) + CPU_BASE_BYTES_PER_PROCESS * max(gpus_per_node, 1)

    return MemoryEstimate(
        profile=profile.name,
        gradient_checkpointing=workload.gradient_checkpointing,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        gathered=gathered,
        activations=activations,
        logits=logits,
        overhead=FIXED_OVERHEAD_BYTES,
        cpu_ram=cpu_ram,
    )


def gpu_budget_bytes(gpu_memory_gib: float) -> float:
    """Usable memory per GPU: about min(0.9 x HBM, HBM - 2 GiB)."""
    hbm = gpu_memory_gib * GIB
    return max(0.0, min(0.9 * hbm, hbm - 2 * GIB))
