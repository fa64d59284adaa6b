"""Frozen dataclass configs: the one source of truth for a run.

A config is loaded from a YAML file plus ``key=value`` overrides (``sft.steps=200``). Unknown or
misspelt keys and values of the wrong type are errors that name the key, so that a typo never
silently falls back to a default. The resolved config is saved as JSON beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from pipo_jax.errors import ConfigError

TRAIN_ATTENTION_IMPLS = ("auto", "xla", "blockwise", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone, compressor, MTP head and confidence head sizes (SPEC §3)."""

    vocab_size: int = 272
    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    mlp_dim: int = 384
    # "qwen3": plain ``w·x̂`` RMSNorm, ungated attention. "qwen3_5": ``(1 + w)·x̂`` RMSNorm
    # (weights stored as the offset from 1) and a sigmoid output gate on full attention.
    family: Literal["qwen3", "qwen3_5"] = "qwen3"
    # One entry per backbone layer, "full_attention" or "linear_attention" (Gated DeltaNet).
    # Empty means all "full_attention". The stack is scanned over repeats of its shortest period
    # (Qwen3.5: [linear, linear, linear, full]).
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 10000.0
    # Fraction of each head's dims that RoPE rotates (Qwen3.5: 0.25; the rest pass through).
    partial_rotary_factor: float = 1.0
    rms_eps: float = 1e-6
    # False: a separate LM head matrix (Qwen3.5-9B); True: logits through the embedding.
    tie_embeddings: bool = True
    # Gated DeltaNet (linear attention) sizes: q/k heads, v heads (a multiple of the q/k heads),
    # their head dims, the causal conv width and the chunk of the chunk-parallel form.
    linear_n_key_heads: int = 2
    linear_n_value_heads: int = 4
    linear_key_head_dim: int = 16
    linear_value_head_dim: int = 16
    linear_conv_kernel: int = 4
    linear_chunk: int = 64
    # Longest token context (prompt + response) the decode caches are sized for.
    max_context: int = 2048
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
    init_std: float = 0.02
    # Causal self-attention of the whole-sequence forward (training, scoring, one-shot prefill):
    # auto | xla (materialised) | blockwise (online softmax, linear memory) | cudnn | splash
    # (pipo_jax/model/self_attention.py); attention_block: the blockwise form's block, positions.
    attention_impl: str = "auto"
    attention_block: int = 256

    def __post_init__(self) -> None:
        if self.attention_impl not in TRAIN_ATTENTION_IMPLS:
            raise ConfigError(f"model.attention_impl must be one of "
                              f"{', '.join(TRAIN_ATTENTION_IMPLS)}, got {self.attention_impl!r}")
        for name in ("attention_block", "vocab_size", "d_model", "n_layers", "n_heads",
                     "n_kv_heads", "head_dim", "mlp_dim", "max_context", "linear_n_key_heads",
                     "linear_n_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel", "linear_chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}) for grouped-query attention")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError("model.partial_rotary_factor must be in (0, 1], got "
                              f"{self.partial_rotary_factor}")
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
class DataConfig:
    """Training data: the embedded arithmetic task or the user's chat-JSONL trajectories."""

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
    buckets: tuple[int, ...] = ()
    bucket_window: int = 16
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
    seed: int = 0
    num_train: int = 20000
    num_test: int = 500
    # Difficulty levels: the number of digits of the operands (for mul: of the multi-digit one).
    levels: tuple[int, ...] = (2, 3, 4)
    # Training sequence length in tokens (prompt + response, after PAD insertion). Longer
    # examples are truncated, their tail labels dropped (or, with ``overlength: drop``, the
    # examples are left out).
    max_len: int = 320

    def __post_init__(self) -> None:
        if self.max_len <= 0 or self.max_len % 2:
            raise ConfigError(f"data.max_len must be a positive even number, got {self.max_len}")
        if self.num_train <= 0 or self.num_test <= 0:
            raise ConfigError("data.num_train and data.num_test must be positive")
        if not self.levels or any(level < 1 or level > 12 for level in self.levels):
            raise ConfigError(f"data.levels must be digit counts in 1..12, got {self.levels}")
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
        if any(b <= 0 or b % 2 for b in self.buckets):
            raise ConfigError(f"data.buckets must be positive even lengths, got {self.buckets}")
        if any(b > self.max_len for b in self.buckets):
            raise ConfigError(f"data.buckets {list(self.buckets)} has lengths above data.max_len "
                              f"({self.max_len}); no batch is longer than max_len, so drop them")
        if self.bucket_window <= 0:
            raise ConfigError(f"data.bucket_window must be positive, got {self.bucket_window}")


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters ``W + (alpha / rank) · A·B`` (SPEC §4 reference: 64 / 128 / 0.05).

    ``targets`` name projections of the backbone's full-attention layers, of every layer's MLP and
    of the MTP layer; Gated DeltaNet projections are never adapted (PAPER §2.6).
    """

    rank: int = 64
    alpha: float = 128.0
    # Dropout on the adapter's input during training (the frozen path sees the clean input).
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"lora.rank must be positive, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"lora.alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        if bad or not self.targets:
            raise ConfigError(f"lora.targets must be a non-empty subset of {LORA_TARGETS}, "
                              f"got {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What every training stage has: the tuner, the optimiser, the loop and its checkpoints.
    Each stage's section is its own subclass (``ArConfig``, ``SftConfig``, ``OpdConfig``) with
    only the keys it uses, so a key of another stage is an error, not silently ignored."""

    # "full": every parameter trains. "lora": adapters on ``lora.targets`` plus the PIPO modules
    # of SPEC §4 (compressor, confidence head, MTP fc, its pre-norms and final norm); the rest
    # (embeddings, LM head, backbone, the MTP layer's own weights and norms) is frozen.
    # "mtp" (the ``mtp`` stage's only tuner): the MTP drafter trains on a frozen AR model.
    tuner: Literal["full", "lora", "mtp"] = "full"
    lora: LoraConfig = LoraConfig()
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_frac: float = 0.05
    end_lr_frac: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 200
    # Checkpoints kept: the newest ``keep_checkpoints``, plus (forever) every step that is a
    # multiple of ``keep_every`` (0: none), e.g. for evaluating the run's history later.
    keep_checkpoints: int = 2
    keep_every: int = 0
    # Tokens per chunk of the vocabulary cross-entropy (peak logits memory: chunk × V).
    loss_chunk: int = 2048
    # Micro-batches per optimizer step: batch_size rows in grad_accum scanned slices, the
    # gradient and loss those of the whole batch (its token mean, not a mean of means).
    grad_accum: int = 1
    # How a loss averages its targets: over every target token ("token"), or each row's own
    # mean, then over rows ("sample", as the reference implementation does).
    loss_average: Literal["token", "sample"] = "token"

    @property
    def adapters(self) -> LoraConfig | None:
        """The LoRA settings when this stage trains adapters (``tuner: lora``), else None."""
        return self.lora if self.tuner == "lora" else None

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise ConfigError("train steps and batch_size must be positive")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.loss_chunk <= 0 or self.log_every <= 0 or self.ckpt_every <= 0:
            raise ConfigError("loss_chunk, log_every and ckpt_every must be positive")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be at least 1")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                              f"({self.grad_accum} micro-batches per step); change one of them")
        if self.loss_average not in ("token", "sample"):
            raise ConfigError(f"loss_average must be token or sample, got {self.loss_average!r}")
        if self.keep_every < 0 or self.keep_every % self.ckpt_every:
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
    steps: int = 200

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

    w_mtp: float = 1.0
    w_conf: float = 1.0
    pad_augment: Literal["split", "shift", "mix"] = "shift"
    pad_ratio_max: float = 0.25
    pad_dense_frac: float = 0.0
    detach_confidence_inputs: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.pad_ratio_max <= 1.0:  # also refuses NaN
            raise ConfigError(f"pad_ratio_max must be in [0, 1] (the largest per-pair rejection "
                              f"probability), got {self.pad_ratio_max}")
        if not 0.0 <= self.pad_dense_frac <= 1.0:
            raise ConfigError(f"pad_dense_frac must be in [0, 1] (the share of densely augmented "
                              f"rows), got {self.pad_dense_frac}")


@dataclasses.dataclass(frozen=True)
class OpdConfig(TrainConfig):
    """The on-policy distillation stage (SPEC §5): rollouts of the student, scored by a frozen
    AR teacher. Its loss weights are ``w_backbone``, ``w_mtp`` and ``w_conf``; rollouts are not
    PAD-augmented."""

    w_mtp: float = 1.0
    w_conf: float = 1.0
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
    topk: int = 32
    # ``full`` only: vocabulary columns per block of the logits (0: the whole vocabulary at
    # once). Peak logits memory is loss_chunk × vocab_chunk per model instead of loss_chunk × V.
    vocab_chunk: int = 0
    # Weight of the divergence at backbone positions (MTP positions: ``w_mtp``).
    w_backbone: float = 1.0
    # A rollout PAD at an MTP target (a rejected or absent draft): "argmax" trains on the
    # student's own argmax there (the reference), "mask" leaves the position out.
    pad_fill: Literal["argmax", "mask"] = "argmax"
    # Rollout sampling: temperature 1 keeps the sampled tokens on the student's distribution,
    # which the ``sampled`` estimator and the acceptance target assume. ``rollout_threshold``
    # gates drafts as in decode; -1 commits every draft (gating off, the default).
    # ``rollout_thresholds`` (when not empty) gates row ``i`` of every rollout batch at
    # ``rollout_thresholds[i % n]`` instead, e.g. [0.9, 0.99]: the states of several inference
    # thresholds, trained on-policy in one run (rows near 1 reject more and decode longer).
    rollout_temperature: float = 1.0
    rollout_threshold: float = -1.0
    rollout_thresholds: tuple[float, ...] = ()
    rollout_max_new_tokens: int = 256
    # Prompts are left-padded to a multiple of this many tokens, and rollout rows are cut to a
    # multiple of ``row_bucket`` tokens past the longest rollout (fewer recompilations).
    prompt_bucket: int = 32
    row_bucket: int = 64
    # Bins of the confidence head's expected calibration error.
    ece_bins: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_average != "token":
            raise ConfigError("opd.loss_average must be token: the OPD losses average over "
                              "target tokens only (per-sample averaging is for the "
                              "teacher-forced stages)")
        validate_threshold(self.rollout_threshold, "opd.rollout_threshold")
        for t in self.rollout_thresholds:
            validate_threshold(t, "every entry of opd.rollout_thresholds")
        if self.topk <= 0:
            raise ConfigError(f"opd.topk must be positive, got {self.topk}")
        if self.vocab_chunk < 0:
            raise ConfigError(f"opd.vocab_chunk must be >= 0 (0: no vocabulary chunking), got "
                              f"{self.vocab_chunk}")
        if not (self.rollout_temperature > 0 and math.isfinite(self.rollout_temperature)):
            raise ConfigError(f"opd.rollout_temperature must be positive (1 samples the "
                              f"student's own distribution), got {self.rollout_temperature}")
        if min(self.rollout_max_new_tokens, self.prompt_bucket, self.ece_bins) <= 0:
            raise ConfigError("opd.rollout_max_new_tokens, opd.prompt_bucket and opd.ece_bins "
                              "must be positive")
        if self.row_bucket <= 0 or self.row_bucket % 2:
            raise ConfigError(f"opd.row_bucket must be a positive even number, got "
                              f"{self.row_bucket}")
        if min(self.w_backbone, self.w_mtp, self.w_conf) < 0:
            raise ConfigError("opd loss weights (w_backbone, w_mtp, w_conf) must be >= 0")

    def row_thresholds(self, batch: int) -> tuple[float, ...]:
        """The gating threshold of each of ``batch`` rollout rows."""
        if not self.rollout_thresholds:
            return (self.rollout_threshold,) * batch
        n = len(self.rollout_thresholds)
        return tuple(self.rollout_thresholds[i % n] for i in range(batch))


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Sampling and gating for ``decode.py`` and ``PipoRunner.generate`` (SPEC §6)."""

    # Confidence threshold: < 0 commits every draft; >= 1 commits none and skips the MTP head.
    threshold: float = 0.7
    max_new_tokens: int = 384
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    seed: int = 0
    # Requests decoded at once: the decode slots of continuous batching (a finished row's slot
    # takes the next request at once), or the rows of one static batch.
    batch_size: int = 16
    # "continuous" (refill finished slots) or "static" (a batch runs until its longest row ends).
    batching: str = "continuous"
    # Decode steps the device runs between host checks for finished rows (continuous batching).
    sync_steps: int = 32
    # How a step attends to the cache: "blocked" (only the filled key/value blocks, online
    # softmax; cost follows the filled context), "masked" (every allocated slot: the reference),
    # or a library kernel, jax.nn.dot_product_attention with implementation "cudnn" (GPU, bf16)
    # or "xla" (any backend), over the allocation with the fill as key_value_seq_lengths.
    attention: str = "blocked"
    kv_block: int = 256  # key/value slots per block of "blocked" attention
    # Prompts are consumed this many tokens at a time (even): memory follows the chunk.
    prefill_chunk: int = 2048
    # Drafts per round of MTP-speculative decoding (the AR model with its MTP drafter, 1..4).
    speculative_k: int = 3

    def __post_init__(self) -> None:
        validate_threshold(self.threshold, "decode.threshold")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"decode.max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"decode.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"decode.top_k must be >= 0 (0 disables), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"decode.top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size <= 0:
            raise ConfigError(f"decode.batch_size must be positive, got {self.batch_size}")
        if self.batching not in ("continuous", "static"):
            raise ConfigError(f"decode.batching must be 'continuous' or 'static', got "
                              f"{self.batching!r}")
        if self.sync_steps <= 0:
            raise ConfigError(f"decode.sync_steps must be positive, got {self.sync_steps}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"decode.attention must be one of {', '.join(ATTENTION_IMPLS)}, "
                              f"got {self.attention!r}")
        if self.kv_block <= 0:
            raise ConfigError(f"decode.kv_block must be positive, got {self.kv_block}")
        if not 1 <= self.speculative_k <= 8:
            raise ConfigError(f"decode.speculative_k must be in 1..8 drafts per round, got "
                              f"{self.speculative_k}")
        if self.prefill_chunk <= 0 or self.prefill_chunk % 2:
            raise ConfigError(f"decode.prefill_chunk must be a positive even number of tokens, "
                              f"got {self.prefill_chunk}")


def validate_threshold(threshold: float, name: str = "threshold") -> None:
    if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise ConfigError(
            f"{name} must be in [-1, 1] (-1 commits every draft, 1 commits none), "
            f"got {threshold}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means all remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class Config:
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

    def model_of(self, stage: str) -> ModelConfig:
        """The architecture a stage trains: ``teacher_model`` for the teacher, else ``model``."""
        return self.teacher_model if stage == "teacher" else self.model


STAGES = ("teacher", "ar", "mtp", "sft", "opd")
# Stages whose model is PIPO (compressor, MTP and confidence heads); the others are AR.
PIPO_STAGES = ("sft", "opd")
# Stages whose model is the AR model with its MTP drafter.
DRAFTER_STAGES = ("mtp",)
