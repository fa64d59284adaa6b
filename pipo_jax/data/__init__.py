"""The embedded default data: a generated arithmetic reasoning task, stored with TFDS as
array_record and batched with grain."""

from pipo_jax.data.arith import (
    SYSTEM_PROMPT,
    extract_boxed,
    generate_split,
    make_problem,
    normalize_answer,
    split_of,
    to_messages,
    verify,
    worked_solution,
)
from pipo_jax.data.loader import (
    example_to_ids,
    make_prompt_dataset,
    make_train_dataset,
    test_examples,
)
from pipo_jax.data.tfds_builder import ArithConfig, ArithReasoning, build, load_source

__all__ = [
    "SYSTEM_PROMPT",
    "ArithConfig",
    "ArithReasoning",
    "build",
    "example_to_ids",
    "extract_boxed",
    "generate_split",
    "load_source",
    "make_problem",
    "make_prompt_dataset",
    "make_train_dataset",
    "normalize_answer",
    "split_of",
    "test_examples",
    "to_messages",
    "verify",
    "worked_solution",
]
