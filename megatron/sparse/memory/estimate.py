"""Per-GPU memory and checkpoint size of each tool: :class:`MemoryConfig` -> :class:`MemoryEstimate`.

Parameter counts come from the model built on the meta device at the requested TP
(:mod:`megatron.sparse.memory.meta`); activations from :mod:`megatron.sparse.memory.activations`;
bytes per stored element from :mod:`megatron.sparse.memory.formats`. Data parallelism does not
change the per-GPU figures (the mask trainer replicates its AdamW state over DP ranks).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron.sparse.memory import activations as act
from megatron.sparse.memory import formats as fmt
from megatron.sparse.memory.meta import shard_counts
from megatron.sparse.memory.presets import preset
from megatron.sparse.model import LlamaArgs

TOOLS = ("convert", "prune", "train_mask", "train_ast", "eval", "export")
"""Tools with an estimate (``tools/convert_hf_to_megatron.py``, ``prune_oneshot.py``,
``train_mask.py``, ``train_ast.py``, ``eval_ppl.py``, ``export_hf.py``)."""
HOST_TOOLS = ("convert", "export")
"""Tools that run as one process on the host, on the whole (TP 1) model."""
OPTIMIZER_STATES = {"adamw": fmt.ADAMW_STATES, "sgd": 0}
"""fp32 optimizer tensors per trainable element."""


@dataclass
class MemoryConfig:
    """What to estimate: one tool on one model and parallel layout."""

    model: str | LlamaArgs
    """Preset name (``llama2-7b``, ...; see ``PRESETS``) or the architecture itself."""
    tool: str = "train_mask"
    """convert | prune | train_mask | train_ast | eval | export."""
    tp: int = 1
    """Tensor-parallel size."""
    dp: int = 1
    """Data-parallel size (world size = tp * dp); per-GPU figures do not depend on it."""
    micro_batch: int = 1
    """Sequences per forward (training, evaluation; pruning uses ``prune_micro_batch``)."""
    seq_length: int = 4096
    """Tokens per sequence."""
    dtype: str = "bf16"
    """Weights and activations: bf16 | fp16 | fp32 (logits and optimizer state are fp32)."""
    optimizer: str = "adamw"
    """adamw (two fp32 moments of the trainable logits) or sgd (none)."""
    recompute: bool = False
    """Full activation recomputation: keep each layer's input only, recompute one layer in
    backward (a what-if: the trainer does not recompute today)."""
    flash_attention: bool | None = None
    """Fused core attention without the ``s^2`` scores (TE on GPU); None: on unless ``cpu``."""
    cpu: bool = False
    """A CPU run: local attention, and the fused CPU mask kernel for fp32 (no soft-mask tensors
    kept for backward)."""
    regulariser: bool = True
    """Mask learning with the sparse-weight regulariser (lambda > 0), as the launchers run it."""
    legacy_format: bool = False
    """Checkpoints and every tool's model carry fp32 mask logits (the format before issue 15)."""
    prune_method: str = "sparsegpt"
    """magnitude | wanda | sparsegpt (what one-shot pruning accumulates)."""
    calib_samples: int = 128
    """Calibration sequences of ``seq_length`` tokens (pruning)."""
    prune_micro_batch: int = 4
    """Calibration sequences per layer forward (``prune_oneshot.py --micro-batch-size``)."""
    full_row_hessian: bool = True
    """SparseGPT under TP: gather the full Hessian of row-parallel inputs (the default)."""
    kd_teacher: bool = True
    """AST with distillation: a frozen dense teacher copy of the weights (``--kd-weight`` > 0)."""
    source_copies: int = 1
    """Copies of the HF weights conversion holds: 1 for a safetensors directory, 2 for the
    embedded GGUF model (the dequantised HF model is still alive when its state is cloned)."""

    def args(self) -> LlamaArgs:
        return preset(self.model) if isinstance(self.model, str) else self.model

    def validate(self) -> None:
        """One-line ValueError for an impossible configuration."""
        if self.tool not in TOOLS:
            raise ValueError(f"unknown tool {self.tool!r}; choose one of {', '.join(TOOLS)}")
        if self.optimizer not in OPTIMIZER_STATES:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adamw or sgd")
        if self.prune_method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"unknown prune method {self.prune_method!r}")
        for name in ("tp", "dp", "micro_batch", "seq_length", "calib_samples",
                     "prune_micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        fmt.dtype_bytes(self.dtype)
        self.args().validate(self.tp)

    def estimate(self) -> "MemoryEstimate":
        return estimate(self)

    build = estimate


@dataclass
class MemoryEstimate:
    """Bytes per GPU (per process for the host tools) and the checkpoint written."""

    tool: str
    parameters: int
    """Weights plus whatever mask state the tool's model holds (logits or 2:4 choices)."""
    gradients: int
    """Gradients of the trainable parameters (the fp32 logits in mask learning)."""
    optimizer: int
    """Optimizer state."""
    activations: int
    """Tensors kept for backward (training) or a forward's working set (no grad)."""
    buffers: int
    """Tool-specific memory: calibration activations and Hessians (pruning), cached eval masks,
    the source copy (conversion), the export copy, one layer's transient working set."""
    checkpoint: int
    """Bytes the tool writes to disk (0: it writes no checkpoint)."""
    load_transient: int = 0
    """Extra bytes while a checkpoint loads. ``checkpoint.load_into`` lets ``dist_checkpointing``
    fill the model's own tensors, so a weights-only load adds nothing; a legacy checkpoint's fp32
    logits are read whole before they are reduced to 2:4 choices."""
    save_transient: int = 0
    """Extra bytes while a checkpoint is written: megatron-core's writer clones the views it
    cannot write directly (the [gate; up] halves of ``linear_fc1``) before writing them."""
    per_gpu: bool = True
    """False for the host tools (whole model in one process)."""
    counts: dict = field(default_factory=dict)
    """Element counts behind the figures (per TP rank and whole model)."""

    @property
    def steady(self) -> int:
        """Everything held at once while the tool works."""
        return self.parameters + self.gradients + self.optimizer + self.activations + self.buffers

    @property
    def peak(self) -> int:
        """The largest of the working set, the checkpoint load and the checkpoint save."""
        return max(self.steady, self.parameters + self.load_transient,
                   self.parameters + self.save_transient)

    def to_dict(self) -> dict:
        return asdict(self) | {"steady": self.steady, "peak": self.peak}


def _fused_tensor_elems(args: LlamaArgs) -> int:
    """Elements of the tensors the HF->Megatron conversion concatenates (qkv, [gate; up])."""
    h, q, kv = args.hidden_size, args.num_attention_heads * args.kv_channels, \
        args.num_key_value_heads * args.kv_channels
    return args.num_layers * (h * (q + 2 * kv) + h * 2 * args.intermediate_size)


def _fc1_elems(args: LlamaArgs, tp: int) -> int:
    """Elements of every layer's ``linear_fc1`` ([gate; up]) on one TP rank."""
    return args.num_layers * 2 * args.intermediate_size // tp * args.hidden_size


def _hessian_bytes(args: LlamaArgs, cfg: MemoryConfig) -> int:
    """fp32 Hessians of one layer's four linears plus SparseGPT's work on the widest input."""
    h, t = args.hidden_size, cfg.tp
    q = args.num_attention_heads * args.kv_channels
    qkv_rows = (q + 2 * args.num_key_value_heads * args.kv_channels) // t
    gather = cfg.full_row_hessian and t > 1  # row-parallel inputs gathered to full width
    proj_in, fc2_in = (q, args.intermediate_size) if gather or t == 1 else \
        (q // t, args.intermediate_size // t)
    inputs = [(h, qkv_rows), (proj_in, h), (h, 2 * args.intermediate_size // t), (fc2_in, h)]
    hessians = act.FP32 * sum(cols * cols for cols, _ in inputs)
    cols, rows = max(inputs)
    work = act.FP32 * (2 * cols * cols + 2 * rows * cols)  # H^-1 factor, fp32 weight copies
    return hessians + work


def estimate(cfg: MemoryConfig) -> MemoryEstimate:
    """The memory and checkpoint-size estimate of ``cfg`` (see the module docstring)."""
    cfg.validate()
    args = cfg.args()
    d = fmt.dtype_bytes(cfg.dtype)
    host = cfg.tool in HOST_TOOLS
    shard = shard_counts(args, 1 if host else cfg.tp)
    whole = shard_counts(args, 1)
    tp = 1 if host else cfg.tp
    flash = (not cfg.cpu) if cfg.flash_attention is None else cfg.flash_attention
    weights, sparse = shard.weights * d, shard.sparse_weights
    logits = int(sparse * fmt.LOGIT_BYTES_PER_WEIGHT)
    choices = int(sparse * fmt.CHOICE_BYTES_PER_WEIGHT)
    mask_state = logits if cfg.legacy_format else choices
    total_w = whole.weights * d
    total_logits = int(whole.sparse_weights * fmt.LOGIT_BYTES_PER_WEIGHT)
    total_choices = int(whole.sparse_weights * fmt.CHOICE_BYTES_PER_WEIGHT)
    b = cfg.prune_micro_batch if cfg.tool == "prune" else cfg.micro_batch
    shape = act.Shape(seq=cfg.seq_length, batch=b, tp=tp, act_bytes=d, flash=flash)
    local_buffer = 0 if flash else (args.num_attention_heads * cfg.seq_length ** 2 * b * d // tp)
    grads = opt = acts = buffers = ckpt = 0
    if cfg.tool == "convert":
        params = weights + (logits if cfg.legacy_format else 0)
        buffers = cfg.source_copies * weights + _fused_tensor_elems(args) * d  # HF + fused
        ckpt = total_w + (total_logits if cfg.legacy_format else 0)
    elif cfg.tool == "export":
        params = weights + logits  # a mask-trained checkpoint
        buffers = weights + sparse * fmt.EVAL_MASK_BYTES_PER_WEIGHT \
            + int(sparse * fmt.PACKED_MASK_BYTES_PER_WEIGHT)
        ckpt = total_w + int(whole.sparse_weights * fmt.PACKED_MASK_BYTES_PER_WEIGHT)
    elif cfg.tool == "eval":
        params = weights + mask_state
        acts = max(act.working_set(args, shape), act.loss_bytes(
            args, shape, copies=fmt.LOSS_FP32_COPIES))
        buffers = sparse * fmt.EVAL_MASK_BYTES_PER_WEIGHT + 2 * d * shard.largest_sparse_linear \
            + local_buffer
    elif cfg.tool == "prune":
        params = weights + mask_state
        calib = 0 if cfg.prune_method == "magnitude" else cfg.calib_samples
        acts = calib * cfg.seq_length * args.hidden_size * d \
            + (act.working_set(args, shape) + local_buffer if calib else 0)
        buffers = calib * cfg.seq_length * fmt.TOKEN_BYTES \
            + sparse * fmt.EVAL_MASK_BYTES_PER_WEIGHT \
            + (_hessian_bytes(args, cfg) if cfg.prune_method == "sparsegpt" else 0)
        ckpt = total_w + (total_logits if cfg.legacy_format else total_choices)
    elif cfg.tool == "train_ast":
        # every weight trains: fp32 gradients and AdamW moments; each linear keeps weight * mask
        # for its input gradient; the teacher is a frozen dense copy and adds its logits
        params, grads = weights + choices, weights
        opt = OPTIMIZER_STATES[cfg.optimizer] * shard.weights * act.FP32
        acts = args.num_layers * act.saved_per_layer(args, shape) + sparse * d
        acts += act.loss_bytes(args, shape, copies=fmt.LOSS_FP32_COPIES + (2 if cfg.kd_teacher
                                                                          else 0))
        # cached boolean masks, the SR-STE step's two transients of the largest linear
        buffers = act.working_set(args, shape) + local_buffer \
            + sparse * fmt.EVAL_MASK_BYTES_PER_WEIGHT + 2 * d * shard.largest_sparse_linear \
            + (weights if cfg.kd_teacher else 0)
        ckpt = total_w + total_choices + OPTIMIZER_STATES[cfg.optimizer] * whole.weights * act.FP32
    else:  # train_mask
        params, grads = weights + logits, logits
        opt = OPTIMIZER_STATES[cfg.optimizer] * logits
        fused = cfg.cpu and d == act.FP32
        per_weight = d  # weight * mask, kept by each linear for its input gradient
        if not fused:
            per_weight += fmt.SOFT_MASK_SAVED_BYTES_PER_WEIGHT + (
                fmt.REGULARISER_SAVED_BYTES_PER_WEIGHT if cfg.regulariser else 0)
        layers = args.num_layers
        if cfg.recompute:
            acts = layers * act.layer_input(args, shape) + act.saved_per_layer(args, shape) \
                + shard.layer_sparse_weights * per_weight
        else:
            acts = layers * act.saved_per_layer(args, shape) + sparse * per_weight
        acts += act.loss_bytes(args, shape, copies=fmt.LOSS_FP32_COPIES)
        buffers = act.working_set(args, shape) + local_buffer
        ckpt = total_w + (1 + OPTIMIZER_STATES[cfg.optimizer]) * total_logits
    counts = {"weights_per_rank": shard.weights, "sparse_weights_per_rank": sparse,
              "weights_total": whole.weights, "sparse_weights_total": whole.sparse_weights,
              "tp": tp, "dp": cfg.dp, "world_size": cfg.tp * cfg.dp}
    loads = cfg.tool in ("prune", "eval")
    # one-shot pruning writes the pruned model; its cached eval masks are still held then
    save = _fc1_elems(args, tp) * d + sparse * fmt.EVAL_MASK_BYTES_PER_WEIGHT \
        if cfg.tool == "prune" else 0
    return MemoryEstimate(tool=cfg.tool, parameters=params, gradients=grads, optimizer=opt,
                          activations=acts, buffers=buffers, checkpoint=ckpt,
                          load_transient=logits if loads and cfg.legacy_format else 0,
                          save_transient=save, per_gpu=not host,
                          counts=counts)
