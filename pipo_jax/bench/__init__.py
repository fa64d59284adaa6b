"""Reports over finished benchmark evaluations, without loading a model or JAX.

``python -m pipo_jax.bench report RESULTS...`` reads the per-(benchmark, model) result files that
``python decode.py --run RUN --bench FILE...`` writes (``pipo_jax.eval.store``) and prints one
table across benchmarks and runs in the layout of the paper's Table 1 (avg@k / pass@k per
benchmark plus "Overall"), the decode statistics of every cell and, where records carry
``tags``, avg@k per tag value. ``report`` holds the loading, the metrics and the formatting.
"""
