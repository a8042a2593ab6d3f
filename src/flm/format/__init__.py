"""File formats: .flm (fastllm's container) and lazy Hugging Face checkpoints."""
