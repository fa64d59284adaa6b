"""Evaluation on benchmark files (JSONL, one question per line), resumable, PIPO against AR.

- ``schema``: the file format, its validation and the prompt each question poses;
- ``scoring``: answer extraction (last ``\\boxed{}``, option letters) and math normalisation;
- ``protocol``: presets (``paper``) and per-(question, sample) seeds;
- ``store``: the resumable per-(benchmark, model) result files;
- ``harness``: the evaluation loop, metrics (avg@k, pass@k, decode statistics) and tables;
- ``convert``: AIME 2025 (JSONL) and GPQA (CSV) converters, ``python -m pipo_jax.eval``.

``schema``, ``scoring``, ``protocol``, ``store`` and ``convert`` are pure Python; only
``harness`` needs JAX and a loaded run. Entry point: ``python decode.py --run RUN --bench FILE``.
"""
