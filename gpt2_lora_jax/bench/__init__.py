"""The benchmark and the GPU check's tools: nothing here is imported by the product.

    python -m gpt2_lora_jax.bench --preset gpt2 --batch_size 16 --seq_len 1024 --compare peft

  harness.py          throughput, MFU, memory and compile time of the train step, sampler, scorer
                      (the command above, through __main__.py)
  run_setup.py        one configuration's GPT-2 config, synthetic batch and jitted train step
  settings.py         the 'user' (configs/gpt2_hh.py), 'like_peft' and DPO (configs/dpo_hh.py) settings
  dpo_step.py         the DPO train step against the SFT step on the same rows (time, FLOPs, memory,
                      the first step's margin on the device)
  hlo_flops.py        matmul FLOPs of a compiled program, each loop counted per trip
  torch_runner.py     the PyTorch children of a run, one process per part; peft_peer.py is the child
  report.py           a run's JSON and Markdown files
  preflight.py, xla_attention.py, attention_check.py, records.py, summary.py
                      the stages of benchmarks/gpu_check.sh, its record log and its summary
  profile.py          where a train step's time goes: a jax.profiler capture of the benchmarked
                      step reduced to tables (trace_reduce.py: the reducer, standard library only)
  e2e.py              the real `python -m gpt2_lora_jax.main` end to end, timed by phase (time to
                      first step, steps/s, evaluation), recorded for the GPU check
  step_plan.py        the compiler's plan (memory, FLOPs, compile time) of one train step on
                      abstract shapes (BUILD.md's memory table, benchmarks/compile_plan.py)

benchmarks/README.md explains every field and stage.
"""
