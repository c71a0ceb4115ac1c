"""The Qwen2.5 policy: Flax NNX model, Hugging Face checkpoint I/O and tokenizers."""
