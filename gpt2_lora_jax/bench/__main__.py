"""python -m gpt2_lora_jax.bench: one benchmark configuration (see harness.py; --help lists the flags)."""
import sys

from gpt2_lora_jax.bench import harness

sys.exit(harness.main())
