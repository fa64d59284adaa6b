"""Frozen dataclass configs: the one source of truth for a run.

A config is loaded from a YAML file plus ``key=value`` overrides (``sft.steps=200``). Unknown or
misspelt keys and values of the wrong type are errors that name the key, so that a typo never
silently falls back to a default. The resolved config is saved as JSON beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal

from pipo_jax.config.bounds import check_fields, number
from pipo_jax.errors import ConfigError

TRAIN_ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")
# Seeds become a uint32 JAX key: a larger one would wrap onto a smaller seed's stream.
SEED_MAX = 2 ** 32 - 1
THRESHOLD_WHY = "-1 commits every draft, 1 commits none"


class _Section:
    """Base of every config section: ``__post_init__`` first checks each numeric field against
    its declared range (``pipo_jax.config.bounds``); a section adds its cross-field checks after
    ``super().__post_init__()``. ``SECTION`` names it in errors of direct construction (the
    loader names the key's full path instead)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_fields(self, self.SECTION)


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Backbone, compressor, MTP head and confidence head sizes (SPEC §3)."""

    SECTION: ClassVar[str] = "model"

    vocab_size: int = number(272, ge=1)
    d_model: int = number(128, ge=1)
    n_layers: int = number(8, ge=1)
    n_heads: int = number(4, ge=1)
    n_kv_heads: int = number(2, ge=1)
    head_dim: int = number(32, ge=1)
    mlp_dim: int = number(384, ge=1)
    # "qwen3": plain ``w·x̂`` RMSNorm, ungated attention. "qwen3_5": ``(1 + w)·x̂`` RMSNorm
    # (weights stored as the offset from 1) and a sigmoid output gate on full attention.
    family: Literal["qwen3", "qwen3_5"] = "qwen3"
    # One entry per backbone layer, "full_attention" or "linear_attention" (Gated DeltaNet).
    # Empty means all "full_attention". The stack is scanned over repeats of its shortest period
    # (Qwen3.5: [linear, linear, linear, full]).
    layer_types: tuple[str, ...] = ()
    rope_theta: float = number(10000.0, gt=0)
    # Fraction of each head's dims that RoPE rotates (Qwen3.5: 0.25; the rest pass through).
    partial_rotary_factor: float = number(1.0, gt=0, le=1)
    rms_eps: float = number(1e-6, gt=0, lt=1)
    # False: a separate LM head matrix (Qwen3.5-9B); True: logits through the embedding.
    tie_embeddings: bool = True
    # Gated DeltaNet (linear attention) sizes: q/k heads, v heads (a multiple of the q/k heads),
    # their head dims, the causal conv width and the chunk of the chunk-parallel form.
    linear_n_key_heads: int = number(2, ge=1)
    linear_n_value_heads: int = number(4, ge=1)
    linear_key_head_dim: int = number(16, ge=1)
    linear_value_head_dim: int = number(16, ge=1)
    linear_conv_kernel: int = number(4, ge=1)
    linear_chunk: int = number(64, ge=1)
    # Longest token context (prompt + response) the decode caches are sized for.
    max_context: int = number(2048, ge=2)
    compressor_type: Literal["linear", "mlp"] = "mlp"
    compressor_init: Literal["identity", "random"] = "identity"
    # How the MTP layer starts when a PIPO model is built from an AR checkpoint: a copy of the
    # last full-attention backbone layer, random, or "native" (a checkpoint's own MTP module,
    # set by ``python -m pipo_jax.io.hf.convert hf-to-pipo``).
    mtp_init: Literal["last_layer", "random", "native"] = "last_layer"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # What the backward pass recomputes (docs/attention.md): "full" keeps one input per scanned
    # block of the layer pattern, "layer" one per decoder layer (more kept, a smaller peak: one
    # layer's intermediates at a time, not a block's), the dots_* policies keep matmul outputs.
    remat_policy: Literal["none", "full", "layer", "dots_saveable",
                          "dots_with_no_batch_dims_saveable"] = "none"
    init_std: float = number(0.02, gt=0, le=1)
    # Causal self-attention of the whole-sequence forward (training, scoring, one-shot prefill):
    # auto | xla (materialised) | blockwise (online softmax, linear memory) | cudnn | splash
    # (pipo_jax/model/self_attention.py); attention_block: the blockwise form's block, positions.
    attention_impl: str = "auto"
    attention_block: int = number(256, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention_impl not in TRAIN_ATTENTION_IMPLS:
            raise ConfigError(f"model.attention_impl must be one of "
                              f"{', '.join(TRAIN_ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(
                f"model.head_dim × model.partial_rotary_factor = {self.rotary_dim} rotary dims; "
                "RoPE needs a positive even number")
        if self.linear_n_value_heads % self.linear_n_key_heads:
            raise ConfigError(
                f"model.linear_n_value_heads ({self.linear_n_value_heads}) must be a multiple of "
                f"model.linear_n_key_heads ({self.linear_n_key_heads})")
        if self.max_context % 2:
            raise ConfigError(f"model.max_context must be even (pairs), got {self.max_context}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ConfigError(
                    f"model.layer_types has {len(self.layer_types)} entries but model.n_layers is "
                    f"{self.n_layers}; give one type per layer or leave it empty")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ConfigError(
                    f"model.layer_types has unsupported types {unknown}; supported: {LAYER_TYPES}")

        if "full_attention" not in self.resolved_layer_types:
            raise ConfigError("model.layer_types needs at least one full_attention layer (the MTP "
                              "head is a full-attention layer of the backbone's kind)")

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        return self.layer_types or ("full_attention",) * self.n_layers

    @property
    def layer_pattern(self) -> tuple[str, ...]:
        """The shortest period of ``layer_types``; the backbone scans over its repeats."""
        types_ = self.resolved_layer_types
        for period in range(1, self.n_layers + 1):
            if self.n_layers % period == 0 and all(
                    t == types_[i % period] for i, t in enumerate(types_)):
                return types_[:period]
        raise AssertionError("unreachable: the whole stack is a period")

    @property
    def last_full_attention(self) -> int:
        """Index of the last full-attention layer (what the MTP head's ``last_layer`` init
        copies)."""
        return max(i for i, t in enumerate(self.resolved_layer_types) if t == "full_attention")

    @property
    def n_blocks(self) -> int:
        """Repeats of ``layer_pattern`` (the length of the scanned stack)."""
        return self.n_layers // len(self.layer_pattern)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def norm_offset(self) -> bool:
        """Qwen3.5 norms compute ``(1 + w)·x̂`` with ``w`` stored as the offset from 1."""
        return self.family == "qwen3_5"

    @property
    def attn_output_gate(self) -> bool:
        return self.family == "qwen3_5"

    @property
    def linear_conv_dim(self) -> int:
        """Channels of the Gated DeltaNet's q|k|v projection and causal conv."""
        return (2 * self.linear_n_key_heads * self.linear_key_head_dim
                + self.linear_n_value_heads * self.linear_value_head_dim)


LAYER_TYPES = ("full_attention", "linear_attention")
# How decode attends to its cache (pipo_jax/model/attention.py).
ATTENTION_IMPLS = ("blocked", "masked", "xla", "cudnn")


# ``DataConfig.task``'s values, and the operations of the mixed task (``data.ops``).
Task = Literal["addition", "mixed"]
TASKS: tuple[str, ...] = typing.get_args(Task)
MIXED_OPS = ("add", "sub", "mul")
# The default operations: the embedded teacher's CPU budget does not learn ``sub`` and ``mul``
# well (docs/embedded-default.md, "The task").
DEFAULT_MIXED_OPS = ("add",)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """Training data: the embedded arithmetic task or the user's chat-JSONL trajectories."""

    SECTION: ClassVar[str] = "data"

    # "arith": the generated arithmetic task (``pipo_jax.data.arith``). "chat_jsonl": local JSONL
    # files of chat trajectories (``train_files``), built once into a TFDS dataset.
    source: Literal["arith", "chat_jsonl"] = "arith"
    # JSONL files (or glob patterns) of chat trajectories, for ``source: chat_jsonl``; read in
    # the order given (each glob's matches sorted). Schema: ``pipo_jax.data.chat_jsonl``.
    train_files: tuple[str, ...] = ()
    # A malformed JSONL line: "error" stops the build naming file and line; "skip" drops and
    # counts it (the count is logged and kept in the built dataset's metadata).
    on_malformed: Literal["error", "skip"] = "error"
    # Examples whose pair sequence (parity PADs included, before PAD augmentation) is longer than
    # ``max_len``: "truncate" keeps their head, "drop" removes them when the dataset is built
    # (counted like malformed lines). chat_jsonl only: the arithmetic task is never that long.
    overlength: Literal["truncate", "drop"] = "truncate"
    # Length bucketing (either source): each batch is padded to the smallest of these lengths
    # (and ``max_len``) that holds its longest row; empty pads every batch to ``max_len``.
    # Examples are sorted by length within windows of ``bucket_window`` batches of the shuffled
    # stream, so that a batch holds similar lengths (Hugging Face's group_by_length).
    buckets: tuple[int, ...] = number((), ge=2)
    bucket_window: int = number(16, ge=1)
    # Where TFDS writes the array_record files; relative paths are under the working directory.
    data_dir: str = "runs/tfds"
    # The arithmetic task's generation settings (unused by ``source: chat_jsonl``).
    # "mixed": column addition, subtraction and multiplication by a digit, each line worded in
    # one of a few equivalent phrasings drawn at random (``pipo_jax.data.mixed``), so that second
    # tokens are not all predictable. "addition": column addition in one fixed wording
    # (``pipo_jax.data.arith``, the original task; its built data sets keep their directories).
    task: Task = "mixed"
    # task mixed: the operations, problems cycling through them (sub: a - b with a >= b; mul: a
    # ``levels``-digit number times a digit in 2..9).
    ops: tuple[str, ...] = DEFAULT_MIXED_OPS
    seed: int = number(0, ge=0, le=SEED_MAX)
    num_train: int = number(20000, ge=1)
    num_test: int = number(500, ge=1)
    # Difficulty levels: the number of digits of the operands (for mul: of the multi-digit one).
    levels: tuple[int, ...] = number((2, 3, 4), ge=1, le=12, why="digits per operand")
    # Training sequence length in tokens (prompt + response, after PAD insertion). Longer
    # examples are truncated, their tail labels dropped (or, with ``overlength: drop``, the
    # examples are left out).
    max_len: int = number(320, ge=2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_len % 2:
            raise ConfigError(f"data.max_len must be an even number (pairs), got {self.max_len}")
        if not self.levels:
            raise ConfigError("data.levels must list at least one digit count in 1..12")
        # ``_coerce`` already rejects an unknown task from YAML; this covers direct construction.
        if self.task not in TASKS:
            raise ConfigError(f"data.task must be one of {list(TASKS)}, got {self.task!r}")
        if not self.ops or set(self.ops) - set(MIXED_OPS) or len(set(self.ops)) < len(self.ops):
            raise ConfigError(f"data.ops must be a non-empty list of distinct operations of "
                              f"{list(MIXED_OPS)}, got {list(self.ops)}")
        # The default cannot be told from an explicit setting, so only a non-default ``ops`` is
        # caught; it would otherwise be ignored silently.
        if self.task != "mixed" and self.ops != DEFAULT_MIXED_OPS:
            raise ConfigError(f"data.ops applies to data.task=mixed only, but data.task is "
                              f"{self.task} (column addition); set data.task=mixed or drop "
                              "data.ops")
        if self.source == "chat_jsonl" and not self.train_files:
            raise ConfigError("data.source is chat_jsonl but data.train_files is empty; list the "
                              "JSONL files (or glob patterns) to train on")
        if self.source != "chat_jsonl" and self.train_files:
            raise ConfigError("data.train_files is set but data.source is "
                              f"{self.source}; set data.source=chat_jsonl to train on them")
        if self.source != "chat_jsonl" and self.overlength == "drop":
            raise ConfigError("data.overlength=drop applies to data.source=chat_jsonl only (the "
                              "arithmetic task is truncated at data.max_len)")
        if any(b % 2 for b in self.buckets):
            raise ConfigError(f"data.buckets must be even lengths (pairs), got "
                              f"{list(self.buckets)}")
        if any(b > self.max_len for b in self.buckets):
            raise ConfigError(f"data.buckets {list(self.buckets)} has lengths above data.max_len "
                              f"({self.max_len}); no batch is longer than max_len, so drop them")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig(_Section):
    """Low-rank adapters ``W + (alpha / rank) · A·B`` (SPEC §4 reference: 64 / 128 / 0.05).

    ``targets`` name projections of the backbone's full-attention layers, of every layer's MLP and
    of the MTP layer; Gated DeltaNet projections are never adapted (PAPER §2.6).
    """

    rank: int = number(64, ge=1)
    alpha: float = number(128.0, gt=0)
    # Dropout on the adapter's input during training (the frozen path sees the clean input).
    dropout: float = number(0.05, ge=0, lt=1)
    targets: tuple[str, ...] = LORA_TARGETS

    SECTION: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        if bad or not self.targets:
            raise ConfigError(f"lora.targets must be a non-empty subset of {LORA_TARGETS}, "
                              f"got {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """What every training stage has: the tuner, the optimiser, the loop and its checkpoints.
    Each stage's section is its own subclass (``ArConfig``, ``SftConfig``, ``OpdConfig``) with
    only the keys it uses, so a key of another stage is an error, not silently ignored."""

    # "full": every parameter trains. "lora": adapters on ``lora.targets`` plus the PIPO modules
    # of SPEC §4 (compressor, confidence head, MTP fc, its pre-norms and final norm); the rest
    # (embeddings, LM head, backbone, the MTP layer's own weights and norms) is frozen.
    # "mtp" (the ``mtp`` stage's only tuner): the MTP drafter trains on a frozen AR model.
    tuner: Literal["full", "lora", "mtp"] = "full"
    lora: LoraConfig = LoraConfig()
    steps: int = number(1000, ge=1)
    batch_size: int = number(32, ge=1)
    learning_rate: float = number(3e-3, gt=0)
    warmup_frac: float = number(0.05, ge=0, lt=1)
    # The schedule's last learning rate, as a fraction of the peak (cosine decay to it).
    end_lr_frac: float = number(0.1, ge=0, le=1)
    weight_decay: float = number(0.1, ge=0)
    b1: float = number(0.9, ge=0, lt=1, why="Adam's first-moment decay")
    b2: float = number(0.95, ge=0, lt=1, why="Adam's second-moment decay")
    # Global gradient-norm clip (a negative one flips every update: the loss rises).
    clip_norm: float = number(1.0, gt=0)
    seed: int = number(0, ge=0, le=SEED_MAX)
    log_every: int = number(20, ge=1)
    ckpt_every: int = number(200, ge=1)
    # Checkpoints kept: the newest ``keep_checkpoints``, plus (forever) every step that is a
    # multiple of ``keep_every`` (0: none), e.g. for evaluating the run's history later.
    keep_checkpoints: int = number(2, ge=1)
    keep_every: int = number(0, ge=0, why="0 keeps none")
    # Tokens per chunk of the vocabulary cross-entropy (peak logits memory: chunk × V).
    loss_chunk: int = number(2048, ge=1)
    # Micro-batches per optimizer step: batch_size rows in grad_accum scanned slices, the
    # gradient and loss those of the whole batch (its token mean, not a mean of means).
    grad_accum: int = number(1, ge=1)
    # How a loss averages its targets: over every target token ("token"), or each row's own
    # mean, then over rows ("sample", as the reference implementation does).
    loss_average: Literal["token", "sample"] = "token"

    SECTION: ClassVar[str] = "train"

    @property
    def adapters(self) -> LoraConfig | None:
        """The LoRA settings when this stage trains adapters (``tuner: lora``), else None."""
        return self.lora if self.tuner == "lora" else None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                              f"({self.grad_accum} micro-batches per step); change one of them")
        if self.loss_average not in ("token", "sample"):
            raise ConfigError(f"loss_average must be token or sample, got {self.loss_average!r}")
        if self.keep_every % self.ckpt_every:
            # Only saved steps can be kept: keep_every 30 with ckpt_every 20 would silently keep
            # every 60th step instead of every 30th.
            raise ConfigError(f"keep_every must be 0 (off) or a multiple of ckpt_every "
                              f"({self.ckpt_every}), got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class ArConfig(TrainConfig):
    """An autoregressive stage: ``teacher`` (the larger OPD teacher) or ``ar`` (the student's
    AR base). Next-token cross-entropy; nothing beyond ``TrainConfig``."""


@dataclasses.dataclass(frozen=True)
class MtpConfig(TrainConfig):
    """The ``mtp`` stage: an MTP drafter (``PipoLM(pipo=False, drafter=True)``, initialised
    like PIPO's MTP head from the AR model) fitted to predict token t+2 from the frozen AR
    model's state at t and token t+1; the baseline of MTP-speculative decoding."""

    tuner: Literal["full", "lora", "mtp"] = "mtp"
    steps: int = number(200, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tuner != "mtp":
            raise ConfigError(f"mtp.tuner must be 'mtp' (the AR model stays frozen), got "
                              f"{self.tuner!r}")


@dataclasses.dataclass(frozen=True)
class SftConfig(TrainConfig):
    """The PIPO SFT stage (SPEC §4): loss weights and PAD augmentation.

    Each step draws r ~ U[0, pad_ratio_max]; every response pair then holds a rejection event
    with probability r (a per-pair Bernoulli draw). "shift" inserts one lone PAD, the state
    after a rejected draft; "split" (the reference) turns (a, b) into (a, PAD), (b, PAD); "mix"
    picks either per event (``pipo_jax.model.pairs.random_pad_augment``). ``pad_dense_frac``:
    the share of rows drawn instead at their own r ~ U[pad_ratio_max, 1], the long runs of
    rejections that a threshold near 1 decodes (0: off, the reference; such rows are up to
    twice as long, so a config that turns them on must leave room in ``data.max_len`` or accept
    truncation).
    """

    SECTION: ClassVar[str] = "sft"

    w_mtp: float = number(1.0, ge=0)
    w_conf: float = number(1.0, ge=0)
    pad_augment: Literal["split", "shift", "mix"] = "shift"
    pad_ratio_max: float = number(0.25, ge=0, le=1, why="the largest per-pair rejection "
                                  "probability")
    pad_dense_frac: float = number(0.0, ge=0, le=1, why="the share of densely augmented rows")
    detach_confidence_inputs: bool = True



@dataclasses.dataclass(frozen=True)
class OpdConfig(TrainConfig):
    """The on-policy distillation stage (SPEC §5): rollouts of the student, scored by a frozen
    AR teacher. Its loss weights are ``w_backbone``, ``w_mtp`` and ``w_conf``; rollouts are not
    PAD-augmented."""

    SECTION: ClassVar[str] = "opd"

    w_mtp: float = number(1.0, ge=0)
    w_conf: float = number(1.0, ge=0)
    detach_confidence_inputs: bool = True

    # Stage directories (a run's ``sft`` / ``teacher`` folder, or any run's). Empty: the student
    # starts from ``<run_dir>/sft`` and the teacher is ``<run_dir>/teacher``.
    student_dir: str = ""
    teacher_dir: str = ""
    # "topk": exact reverse KL over the union of student top-k, teacher top-k and the sampled
    # token, both renormalised on it (the reference default). "full": exact reverse KL over the
    # whole vocabulary. "sampled": the policy-gradient estimator of reverse KL at the sampled
    # token (cost ``log p_s(y) - log p_t(y)``, detached).
    divergence: Literal["topk", "full", "sampled"] = "topk"
    topk: int = number(32, ge=1)
    # ``full`` only: vocabulary columns per block of the logits (0: the whole vocabulary at
    # once). Peak logits memory is loss_chunk × vocab_chunk per model instead of loss_chunk × V.
    vocab_chunk: int = number(0, ge=0, why="0: the whole vocabulary at once")
    # Weight of the divergence at backbone positions (MTP positions: ``w_mtp``).
    w_backbone: float = number(1.0, ge=0)
    # A rollout PAD at an MTP target (a rejected or absent draft): "argmax" trains on the
    # student's own argmax there (the reference), "mask" leaves the position out.
    pad_fill: Literal["argmax", "mask"] = "argmax"
    # Rollout sampling: temperature 1 keeps the sampled tokens on the student's distribution,
    # which the ``sampled`` estimator and the acceptance target assume. ``rollout_threshold``
    # gates drafts as in decode; -1 commits every draft (gating off, the default).
    # ``rollout_thresholds`` (when not empty) gates row ``i`` of every rollout batch at
    # ``rollout_thresholds[i % n]`` instead, e.g. [0.9, 0.99]: the states of several inference
    # thresholds, trained on-policy in one run (rows near 1 reject more and decode longer).
    rollout_temperature: float = number(1.0, gt=0)
    rollout_threshold: float = number(-1.0, ge=-1, le=1, why=THRESHOLD_WHY)
    rollout_thresholds: tuple[float, ...] = number((), ge=-1, le=1, why=THRESHOLD_WHY)
    rollout_max_new_tokens: int = number(256, ge=1)
    # Prompts are left-padded to a multiple of this many tokens, and rollout rows are cut to a
    # multiple of ``row_bucket`` tokens past the longest rollout (fewer recompilations).
    prompt_bucket: int = number(32, ge=1)
    row_bucket: int = number(64, ge=2)
    # Bins of the confidence head's expected calibration error.
    ece_bins: int = number(10, ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_average != "token":
            raise ConfigError("opd.loss_average must be token: the OPD losses average over "
                              "target tokens only (per-sample averaging is for the "
                              "teacher-forced stages)")
        if self.row_bucket % 2:
            raise ConfigError(f"opd.row_bucket must be an even number (pairs), got "
                              f"{self.row_bucket}")

    def row_thresholds(self, batch: int) -> tuple[float, ...]:
        """The gating threshold of each of ``batch`` rollout rows."""
        if not self.rollout_thresholds:
            return (self.rollout_threshold,) * batch
        n = len(self.rollout_thresholds)
        return tuple(self.rollout_thresholds[i % n] for i in range(batch))


@dataclasses.dataclass(frozen=True)
class DecodeConfig(_Section):
    """Sampling and gating for ``decode.py`` and ``PipoRunner.generate`` (SPEC §6)."""

    SECTION: ClassVar[str] = "decode"

    # Confidence threshold: < 0 commits every draft; >= 1 commits none and skips the MTP head.
    threshold: float = number(0.7, ge=-1, le=1, why=THRESHOLD_WHY)
    max_new_tokens: int = number(384, ge=1)
    temperature: float = number(0.0, ge=0, why="0 decodes greedily")
    top_k: int = number(0, ge=0, why="0 turns it off")
    top_p: float = number(1.0, gt=0, le=1)
    # Subtracted from the logits of every token already generated (OpenAI's and vLLM's range).
    presence_penalty: float = number(0.0, ge=-2, le=2)
    seed: int = number(0, ge=0, le=SEED_MAX)
    # Requests decoded at once: the decode slots of continuous batching (a finished row's slot
    # takes the next request at once), or the rows of one static batch.
    batch_size: int = number(16, ge=1)
    # "continuous" (refill finished slots) or "static" (a batch runs until its longest row ends).
    batching: str = "continuous"
    # Decode steps the device runs between host checks for finished rows (continuous batching).
    sync_steps: int = number(32, ge=1)
    # How a step attends to the cache: "blocked" (only the filled key/value blocks, online
    # softmax; cost follows the filled context), "masked" (every allocated slot: the reference),
    # or a library kernel, jax.nn.dot_product_attention with implementation "cudnn" (GPU, bf16)
    # or "xla" (any backend), over the allocation with the fill as key_value_seq_lengths.
    attention: str = "blocked"
    kv_block: int = number(256, ge=1)  # key/value slots per block of "blocked" attention
    # Prompts are consumed this many tokens at a time (even): memory follows the chunk.
    prefill_chunk: int = number(2048, ge=2)
    # Drafts per round of MTP-speculative decoding (the AR model with its MTP drafter, 1..4).
    speculative_k: int = number(3, ge=1, le=8)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batching not in ("continuous", "static"):
            raise ConfigError(f"decode.batching must be 'continuous' or 'static', got "
                              f"{self.batching!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"decode.attention must be one of {', '.join(ATTENTION_IMPLS)}, "
                              f"got {self.attention!r}")
        if self.prefill_chunk % 2:
            raise ConfigError(f"decode.prefill_chunk must be an even number of tokens (pairs), "
                              f"got {self.prefill_chunk}")


def validate_threshold(threshold: float, name: str = "threshold") -> None:
    if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise ConfigError(
            f"{name} must be in [-1, 1] (-1 commits every draft, 1 commits none), "
            f"got {threshold}")


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Section):
    """Device mesh axis sizes; -1 means all remaining devices."""

    SECTION: ClassVar[str] = "mesh"

    data: int = number(1, ge=1, also=(-1,), why="-1: all remaining devices")
    fsdp: int = number(-1, ge=1, also=(-1,), why="-1: all remaining devices")
    tensor: int = number(1, ge=1, also=(-1,), why="-1: all remaining devices")


@dataclasses.dataclass(frozen=True)
class Config(_Section):
    run_dir: str = "runs/default"
    # In order: "teacher" (the larger AR teacher, ``teacher_model``), "ar" (the student's AR
    # base), "mtp" (an MTP drafter on the frozen AR base, for speculative decoding), "sft"
    # (PIPO from the AR base, SPEC §4), "opd" (on-policy distillation, SPEC §5).
    stages: tuple[str, ...] = ("ar", "sft")
    # "byte" (the embedded ByteTokenizer) or a directory holding a Hugging Face tokenizer.json;
    # a relative path is looked up in the run directory first (where hf-to-pipo copies it).
    tokenizer: str = "byte"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    # The AR teacher the ``teacher`` stage trains (same tokenizer and vocabulary as ``model``).
    teacher_model: ModelConfig = ModelConfig()
    teacher: ArConfig = ArConfig()
    ar: ArConfig = ArConfig()
    mtp: MtpConfig = MtpConfig()
    sft: SftConfig = SftConfig()
    opd: OpdConfig = OpdConfig()
    decode: DecodeConfig = DecodeConfig()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.run_dir.strip():
            raise ConfigError("run_dir is empty: give the directory the run writes into, e.g. "
                              "run_dir=runs/my_run")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"stages must be a non-empty subset of {STAGES}, got {self.stages}")
        if list(self.stages) != sorted(self.stages, key=STAGES.index) or \
                len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"stages must be listed once each, in the order {STAGES}; got "
                              f"{list(self.stages)}")
        if "teacher" in self.stages and self.teacher_model.vocab_size != self.model.vocab_size:
            raise ConfigError(
                f"teacher_model.vocab_size ({self.teacher_model.vocab_size}) must equal "
                f"model.vocab_size ({self.model.vocab_size}): teacher and student share a "
                f"tokenizer")
        self._check_lengths()
        self._check_mesh()

    def _check_lengths(self) -> None:
        """Training rows and rollouts must fit the context the model's caches are sized for."""
        trained = [("model", self.model)] + (
            [("teacher_model", self.teacher_model)] if "teacher" in self.stages else [])
        for name, m in trained:
            if m.max_context < self.data.max_len:
                raise ConfigError(
                    f"{name}.max_context ({m.max_context}) is below data.max_len "
                    f"({self.data.max_len}): a training row would not fit the model's context; "
                    f"raise {name}.max_context or lower data.max_len")
        if "opd" in self.stages and self.opd.rollout_max_new_tokens >= self.model.max_context:
            raise ConfigError(
                f"opd.rollout_max_new_tokens ({self.opd.rollout_max_new_tokens}) leaves no room "
                f"for a prompt in model.max_context ({self.model.max_context}); lower it")

    def _check_mesh(self) -> None:
        """A mesh of explicit sizes must split every stage's batch evenly (with ``-1`` axes the
        device count decides, checked when the mesh is built)."""
        if self.mesh.data < 1 or self.mesh.fsdp < 1:
            return
        ways = self.mesh.data * self.mesh.fsdp
        for stage in self.stages:
            batch = getattr(self, stage).batch_size
            if batch % ways:
                raise ConfigError(
                    f"{stage}.batch_size ({batch}) cannot be split evenly over mesh.data × "
                    f"mesh.fsdp = {ways}: make it a multiple of {ways} or change the mesh")

    def model_of(self, stage: str) -> ModelConfig:
        """The architecture a stage trains: ``teacher_model`` for the teacher, else ``model``."""
        return self.teacher_model if stage == "teacher" else self.model


STAGES = ("teacher", "ar", "mtp", "sft", "opd")
# Stages whose model is PIPO (compressor, MTP and confidence heads); the others are AR.
PIPO_STAGES = ("sft", "opd")
# Stages whose model is the AR model with its MTP drafter.
DRAFTER_STAGES = ("mtp",)
