"""Notebook / library API: ``pipo_jax.load(run_dir)`` → a ``PipoRunner`` that generates text.

    runner = pipo_jax.load("runs/default")
    outs = runner.generate(["What is 123 + 989?"], threshold=0.7)
    outs[0].text, outs[0].stats        # stats: tokens, backbone passes, commit rate, …

``generate(..., model="ar")`` runs the autoregressive baseline of the same run (same backbone,
one token per pass), so every speed claim is a ratio measured on the same machine;
``model="spec"`` runs that AR model with its MTP drafter (the ``mtp`` stage), speculatively
(``pipo_jax.decode.speculative``): AR's output, fewer backbone passes.

``load(run_dir, mesh=build_mesh(MeshConfig(...)))`` spreads the parameters over a device mesh
(the logical rules of ``pipo_jax.model.sharding``) and decodes with programs compiled for it
(``pipo_jax.decode.engine.Decoder``): a model too large for one device, or larger batches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from pipo_jax.config import (
    PIPO_STAGES,
    Config,
    DecodeConfig,
    ModelConfig,
)
from pipo_jax.data.arith import SYSTEM_PROMPT
from pipo_jax.decode import batching, engine, speculative
from pipo_jax.decode.sampling import request_keys
from pipo_jax.errors import CheckpointError, PromptError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.run_dir import latest_pipo_stage, load_params, model_diff
from pipo_jax.io.tokenizer import ByteTokenizer, Tokenizer, reasoning_prompt, run_tokenizer
from pipo_jax.model.pairs import assert_pad_at_odd
from pipo_jax.model.sharding import batch_parallel, batch_sharding

Prompt = str | Sequence[dict[str, str]] | Sequence[int]
# What ``generate(model=)`` decodes with: PIPO, the AR baseline, the AR model speculatively.
MODELS = ("pipo", "ar", "spec")
PROMPT_BUCKET = 64  # prompts are left-padded to a multiple of this many tokens (fewer compiles)


@dataclasses.dataclass
class Generation:
    """One request's output: ``text`` (PAD and EOS removed), its ``tokens`` and ``stats``; or,
    for a request that was refused (empty, or too long for the context), empty text and
    ``error``, the one-line reason."""

    text: str
    tokens: list[int]
    stats: dict[str, Any]
    error: str | None = None


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds to the first output (``prefill``) and from there to the last
    (``decode``): of each request with continuous batching, of each batch with static."""

    prefill: float
    decode: float


class PipoRunner:
    """A trained run: config, PIPO parameters, the AR baseline's parameters (and, when the run
    has an ``mtp`` stage, the AR model with its MTP drafter) and the tokenizer."""

    def __init__(self, config: Config, params: Any, ar_params: Any | None,
                 tokenizer: Tokenizer | None = None, system_prompt: str = SYSTEM_PROMPT,
                 ar_model: ModelConfig | None = None, stage: str = "sft",
                 ar_stage: str = "ar", mesh: Mesh | None = None,
                 drafter_params: Any | None = None) -> None:
        """``mesh``: decode with programs compiled for this mesh (the parameters must already
        be placed on it, e.g. by ``load(..., mesh=)``); None: wherever the parameters are.
        ``drafter_params``: the ``mtp`` stage's (the AR model plus ``mtp_head``), for
        ``generate(model="spec")``."""
        self.config = config
        self.params = params
        self.ar_params = ar_params
        self.drafter_params = drafter_params
        # The AR model's architecture: ``config.model`` (the same backbone), or the teacher's.
        self.ar_model = ar_model or config.model
        self.stage, self.ar_stage = stage, ar_stage
        self.tokenizer = tokenizer or ByteTokenizer()
        self.system_prompt = system_prompt
        self.mesh = mesh
        self._decoders: dict[engine.DecodeSpec, engine.Decoder | speculative.Decoder] = {}
        self._continuous: dict[tuple[engine.DecodeSpec, int, int],
                               batching.ContinuousDecoder] = {}

    # -------------------------------------------------------------------------------- prompts

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """A user message (str), a chat (list of messages) or token ids → prompt ids.

        Text and chats get the chat template, the run's system prompt (when the chat has none)
        and the ``<think>\\n`` prefix that opens the reasoning, as in training.
        """
        tok = self.tokenizer
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("empty prompt: give a question to answer")
            messages = [{"role": "user", "content": prompt}]
        elif len(prompt) and all(isinstance(m, dict) for m in prompt):
            messages = list(prompt)  # type: ignore[arg-type]
        else:
            ids = [int(i) for i in prompt]  # type: ignore[union-attr]
            if not ids:
                raise PromptError("empty prompt: give at least one token")
            return ids
        if self.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return reasoning_prompt(tok, messages)

    # ----------------------------------------------------------------------------- generation

    def decode_options(self, overrides: dict[str, Any]) -> DecodeConfig:
        """The run's ``decode`` config with ``overrides`` (``DecodeConfig`` fields; None: not
        given) applied and validated."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(DecodeConfig)}
        if unknown:
            raise TypeError(f"unknown decode option(s) {sorted(unknown)}; the options are "
                            f"DecodeConfig's fields")
        given = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self.config.decode, **given)

    def generate(self, prompts: Prompt | Sequence[Prompt], *, model: str = "pipo",
                 seeds: Sequence[int] | None = None, return_timing: bool = False,
                 progress: bool = False,
                 on_done: Callable[[int, Generation], None] | None = None,
                 **options: Any) -> list[Generation] | tuple[list[Generation], list[Timing]]:
        """Generates a response for each prompt (any number of them).

        With ``decode.batching: continuous`` (the default, on one device) the prompts share
        ``batch_size`` decode slots, each refilled as soon as its row finishes, and the samples
        of a repeated prompt share one prefill; ``static`` (and any mesh, and ``spec``) decodes
        ``batch_size`` prompts at a time. A prompt that is empty or too long for the context
        is refused alone: its ``Generation.error`` says why, the others are decoded.

        Args:
          prompts: one prompt or a list (see ``encode_prompt``).
          model: ``"pipo"``, ``"ar"`` (the autoregressive baseline) or ``"spec"`` (the AR
            model decoding speculatively with its MTP drafter, ``decode.speculative_k`` drafts
            per round; one device, static batches, no presence penalty).
          seeds: one sampling seed per prompt (default ``decode.seed + i``): a request's
            samples depend only on its own seed.
          return_timing: also return ``Timing``s (one per request with continuous batching,
            one per batch with static).
          progress: a progress bar of finished requests.
          on_done: called ``on_done(i, generation)`` as each request finishes.
          **options: any ``DecodeConfig`` field (threshold, max_new_tokens, temperature, top_k,
            top_p, presence_penalty, batch_size, batching, …), overriding the run's ``decode``
            config.
        """
        if model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], dict)):
            prompts = [prompts]  # type: ignore[list-item]
        opts = self.decode_options(options)  # validated: each option within its declared range
        if model == "ar" and self.ar_params is None:
            raise ValueError(f"this run has no AR model (no <run_dir>/{self.ar_stage} checkpoint)")
        if model == "spec":
            if self.drafter_params is None:
                raise ValueError("this run has no MTP drafter (no <run_dir>/mtp checkpoint): "
                                 "train it with `python train.py --stage mtp`")
            if self.mesh is not None:
                raise ValueError("speculative decoding runs on one device: load the run "
                                 "without a mesh for model='spec'")
        seeds = list(seeds) if seeds is not None else [opts.seed + i
                                                       for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        ids: list[list[int]] = []
        errors: dict[int, str] = {}
        for i, p in enumerate(prompts):
            try:
                ids.append(self.encode_prompt(p))  # type: ignore[arg-type]
            except PromptError as e:
                ids.append([])  # refused by the decoder too; this message is kept
                errors[i] = f"request {i}: {e}"
        if opts.batching == "continuous" and self.mesh is None and model != "spec":
            outs, timings = self._generate_continuous(ids, seeds, opts, model, progress, on_done)
        else:
            outs, timings = self._generate_static(ids, seeds, opts, model, progress, on_done)
        for i, msg in errors.items():
            outs[i] = _refused(msg)
        return (outs, timings) if return_timing else outs

    def _model_of(self, model: str) -> tuple[ModelConfig, Any]:
        if model == "pipo":
            return self.config.model, self.params
        if model == "spec":
            return self.config.model, self.drafter_params
        return self.ar_model, self.ar_params

    def _spec(self, model: str, opts: DecodeConfig) -> engine.DecodeSpec:
        return engine.DecodeSpec.of(self._model_of(model)[0], model == "pipo", opts,
                                    self.tokenizer, speculative=model == "spec")

    def _generate_continuous(self, ids: list[list[int]], seeds: list[int], opts: DecodeConfig,
                             model: str, progress: bool,
                             on_done: Callable[[int, Generation], None] | None
                             ) -> tuple[list[Generation], list[Timing]]:
        pipo = model == "pipo"
        mcfg, params = self._model_of(model)
        spec = self._spec(model, opts)
        key = (spec, opts.batch_size, opts.sync_steps)
        if key not in self._continuous:
            self._continuous[key] = batching.ContinuousDecoder(spec, opts.batch_size,
                                                               opts.sync_steps)
        done_cb = None if on_done is None else (
            lambda i, r: on_done(i, self._generation(r, ids[i], pipo)))
        rows = self._continuous[key].run(params, ids, seeds, opts.threshold,
                                         bucket=PROMPT_BUCKET, max_context=mcfg.max_context,
                                         progress=progress, on_done=done_cb)
        return ([self._generation(r, ids[i], pipo) for i, r in enumerate(rows)],
                [Timing(prefill=r.ttft, decode=r.decode) for r in rows])

    def _generation(self, row: batching.RowResult, ids: list[int], pipo: bool) -> Generation:
        if row.error is not None:
            return _refused(row.error)
        assert row.out is not None
        return self._to_generation(row.out, row.n_tokens, row.n_passes, row.n_drafts,
                                   row.n_commits, len(ids), pipo)

    def _to_generation(self, out: np.ndarray, n_tokens: int, passes: int, drafts: int,
                       commits: int, prompt_tokens: int, pipo: bool) -> Generation:
        tok = self.tokenizer
        if pipo:  # the pair invariant over the slots this row actually used
            assert_pad_at_odd(out, tok.pad_id, 2 * passes)
        emitted = [int(t) for t in out if t != tok.pad_id]
        finished = tok.eos_id in emitted
        text_ids = emitted[:emitted.index(tok.eos_id)] if finished else emitted
        return Generation(
            text=tok.decode(text_ids), tokens=text_ids,
            stats={"tokens": n_tokens, "backbone_passes": passes, "drafts": drafts,
                   "commits": commits, "commit_rate": commits / drafts if drafts else 0.0,
                   "tokens_per_pass": n_tokens / max(passes, 1), "finished": finished,
                   "prompt_tokens": prompt_tokens})

    def _generate_static(self, ids: list[list[int]], seeds: list[int], opts: DecodeConfig,
                         model: str, progress: bool,
                         on_done: Callable[[int, Generation], None] | None
                         ) -> tuple[list[Generation], list[Timing]]:
        pipo = model == "pipo"
        mcfg = self._model_of(model)[0]
        spec = self._spec(model, opts)  # a bad option fails before any prompt is encoded
        outs: list[Generation] = [_refused("") for _ in ids]
        timings: list[Timing] = []
        ok = []
        for i, r in enumerate(ids):
            try:
                engine.prepare_prompts([r], pipo, self.tokenizer.pad_id, PROMPT_BUCKET,
                                       opts.max_new_tokens + spec.speculative, mcfg.max_context)
                ok.append(i)
            except PromptError as e:
                outs[i] = _refused(f"request {i}: {e}")
        with tqdm(total=len(ok), desc="decode", unit="request", disable=not progress) as bar:
            for start in range(0, len(ok), opts.batch_size):
                batch = ok[start:start + opts.batch_size]
                gens, timing = self._generate_batch([ids[i] for i in batch],
                                                    [seeds[i] for i in batch], opts, model,
                                                    spec)
                for i, g in zip(batch, gens, strict=True):
                    outs[i] = g
                    if on_done is not None:
                        on_done(i, g)
                timings.append(timing)
                bar.update(len(batch))
        return outs, timings

    def _generate_batch(self, ids: list[list[int]], seeds: list[int], opts: DecodeConfig,
                        model: str, spec: engine.DecodeSpec
                        ) -> tuple[list[Generation], Timing]:
        tok = self.tokenizer
        pipo = model == "pipo"
        mcfg, params = self._model_of(model)
        # A speculative verify writes k rows past the budget: the context must hold them too.
        tokens, valid = engine.prepare_prompts(ids, pipo, tok.pad_id, PROMPT_BUCKET,
                                               opts.max_new_tokens + spec.speculative,
                                               mcfg.max_context)
        decoder = self._decoder(spec, params)
        keys = request_keys(seeds)
        if self.mesh is not None:
            # Rows split evenly over the batch axes: repeat the last request, drop its copies.
            fill = -len(ids) % batch_parallel(self.mesh)
            tokens, valid = (np.concatenate([a, np.repeat(a[-1:], fill, 0)])
                             for a in (tokens, valid))
            tokens, valid, keys = jax.device_put(
                (tokens, valid, request_keys([*seeds, *[seeds[-1]] * fill])),
                batch_sharding(self.mesh))
        threshold = np.float32(opts.threshold)
        t0 = time.perf_counter()
        state = decoder.prefill(params, tokens, valid, keys, threshold)
        jax.block_until_ready(state.out)
        t1 = time.perf_counter()
        state = decoder.loop(params, state, threshold)
        jax.block_until_ready(state.out)
        t2 = time.perf_counter()
        host = jax.device_get({k: getattr(state, k) for k in
                               ("out", "n_tokens", "n_passes", "n_drafts", "n_commits")})
        gens = [self._to_generation(host["out"][i], int(host["n_tokens"][i]),
                                    int(host["n_passes"][i]), int(host["n_drafts"][i]),
                                    int(host["n_commits"][i]), len(ids[i]), pipo)
                for i in range(len(ids))]
        return gens, Timing(prefill=t1 - t0, decode=t2 - t1)

    def _decoder(self, spec: engine.DecodeSpec,
                 params: Any) -> engine.Decoder | speculative.Decoder:
        if spec not in self._decoders:
            if spec.speculative:
                self._decoders[spec] = speculative.Decoder(spec)
            else:
                params_sh = None if self.mesh is None else jax.tree.map(lambda a: a.sharding,
                                                                        params)
                self._decoders[spec] = engine.Decoder(spec, self.mesh, params_sh)
        return self._decoders[spec]


def _refused(message: str) -> Generation:
    return Generation(text="", tokens=[], stats={"tokens": 0, "backbone_passes": 0,
                                                 "error": message}, error=message)


def load(run_dir: str | Path, step: int | None = None, tokenizer: Tokenizer | None = None,
         system_prompt: str | None = None, stage: str | None = None,
         ar_stage: str = "ar", mesh: Mesh | None = None,
         ar_run: str | Path | None = None) -> PipoRunner:
    """Loads a run directory written by ``train.py``.

    PIPO comes from ``stage``: ``"opd"`` or ``"sft"``; by default the run's latest, ``opd`` when
    it has checkpoints. The AR model of ``generate(model="ar")`` comes from ``ar_stage``:
    ``"ar"`` (the same backbone: the baseline of every speed ratio) or ``"teacher"`` (the larger
    OPD teacher, for accuracy comparisons); it is optional when the run has none.

    ``ar_run`` takes the AR model (its ``ar_stage``) and the MTP drafter (its ``mtp`` stage)
    from another run instead, e.g. an AR base trained long enough to be competent, so that the
    baselines' accuracy means something; with ``ar_stage="ar"`` its model must be this run's.

    ``system_prompt`` is added to prompts that have none; by default the embedded task's for a
    run trained on it, and none for a run trained on chat data (which carries its own).

    Raises ``CheckpointError`` with what to do when the directory or its checkpoints are missing
    or corrupt. ``step`` selects a PIPO checkpoint (default: the latest). ``mesh`` places the
    parameters on a device mesh (sharded by the logical rules, whatever mesh trained them) and
    decodes there; the default is one device.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir} does not exist: train a run first with `python train.py run_dir={run_dir}`")
    if stage is None:
        stage = latest_pipo_stage(run_dir)
    if stage not in PIPO_STAGES:
        raise ValueError(f"stage must be one of {PIPO_STAGES}, got {stage!r}")
    if ar_stage not in ("ar", "teacher"):
        raise ValueError(f"ar_stage must be 'ar' or 'teacher', got {ar_stage!r}")
    params, cfg = load_params(run_dir / stage, True, step, mesh)
    base_dir = run_dir
    if ar_run is not None:
        base_dir = Path(ar_run)
        if ckpt.latest_step(base_dir / ar_stage) is None:
            raise CheckpointError(f"ar_run {base_dir} has no {ar_stage} checkpoint: train it with "
                                  f"`python train.py run_dir={base_dir} --stage {ar_stage}`")
    ar_params, ar_model = None, None
    if ckpt.latest_step(base_dir / ar_stage) is not None:
        ar_params, ar_cfg = load_params(base_dir / ar_stage, False, mesh=mesh)
        ar_model = ar_cfg.model_of(ar_stage)
        differ = model_diff(cfg.model, ar_model) if ar_run is not None else {}
        if ar_stage == "ar" and differ:
            raise CheckpointError(
                f"ar_run {base_dir} holds another model than {run_dir} ({', '.join(differ)} "
                "differ): the AR baseline must share PIPO's backbone")
    drafter = None
    if mesh is None and ckpt.latest_step(base_dir / "mtp") is not None:
        drafter, _ = load_params(base_dir / "mtp", False)
    if tokenizer is None:
        tokenizer = run_tokenizer(cfg.tokenizer, run_dir, cfg.model.vocab_size)
    if system_prompt is None:
        system_prompt = SYSTEM_PROMPT if cfg.data.source == "arith" else ""
    return PipoRunner(cfg, params, ar_params, tokenizer, system_prompt, ar_model, stage, ar_stage,
                      mesh, drafter)
