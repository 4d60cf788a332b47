"""LoRA fine-tuning of GPT-2 in JAX/Flax."""
