"""Evaluation on benchmark files (JSONL, one question per line), resumable, PIPO against AR.

- ``schema``: the file format, its validation and the prompt each question poses;
- ``scoring``: answer extraction (last ``\\boxed{}``, option letters) and math checking
  (math-verify);
- ``code``: code problems: LiveCodeBench's prompt, the last code block, stdin / functional /
  program tests; ``sandbox``: the limited subprocess those tests run in;
- ``protocol``: presets (``paper``) and per-(question, sample) seeds;
- ``store``: the resumable per-(benchmark, model) result files;
- ``harness``: the evaluation loop, metrics (avg@k, pass@k, decode statistics) and tables;
- ``sources``: AIME 2025, GPQA, HumanEval, LiveCodeBench and LongBench v2 converters,
  ``python -m pipo_jax.eval convert``.

``schema``, ``scoring``, ``code``, ``sandbox``, ``protocol``, ``store`` and ``sources`` are pure
Python; only ``harness`` needs JAX and a loaded run. Entry point:
``python decode.py --run RUN --bench FILE``.
"""
