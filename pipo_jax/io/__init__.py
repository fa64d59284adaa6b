"""Files: orbax checkpoints, run directories (stage metadata, weight loading without training
code), tokenizers, and Hugging Face checkpoints (`hf`)."""
