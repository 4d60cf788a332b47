r"""What configs/gpt2_hh.py's held-out sample holds on given test files (data.py, "the held-out sample").

  python benchmarks/heldout_sample.py ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz

Prints per subset the rows of the split, the sample, the rows of held-out loss and the preference
pairs used, the pairs cut only because paired, the prompts drawn, and how many sampled rows lie past
the first data.max_eval_rows rows (the slice the sample replaced).
"""
import importlib.util
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2_lora_jax import data, evaluate, preference, tokenizer as tokenizer_lib  # noqa: E402


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location("gpt2_hh", os.path.join(here, "..", "configs", "gpt2_hh.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.data.source, cfg.data.eval_files = "files", tuple(sys.argv[1:])
  tokenizer = tokenizer_lib.load("offline")
  with tempfile.TemporaryDirectory() as cache_dir:
    _, loss_summary = data.build(cfg.data, tokenizer, "eval", cfg.eval.batch_size, cache_dir, log=None)
    _, pair_summary = preference.build(cfg.data, tokenizer, "eval", cfg.eval.batch_size, cache_dir, log=None)
  rows, _ = data.read_heldout(cfg.data)
  prompts = evaluate.choose_prompts(rows, cfg.eval.num_prompts, cfg.eval.seed)
  print(f"data.max_eval_rows={cfg.data.max_eval_rows}, data.eval_seed={cfg.data.eval_seed}, "
        f"eval.num_prompts={cfg.eval.num_prompts}, max_length={cfg.data.max_length}")
  for name, c in loss_summary["subsets"].items():
    print(f"  {name}: {c['rows_in_split']:,} rows, {c['rows_read']:,} sampled, {c['rows_used']:,} held-out "
          f"loss rows, {pair_summary['subsets'][name]['rows_used']:,} pairs, "
          f"{sum(p[3] == name for p in prompts)} prompts")
  paired = pair_summary["cut_because_paired"]
  print(f"  pairs truncated {pair_summary['rows_truncated']['count']}, {paired['truncated']['count']} only "
        f"because paired; skipped only because paired {paired['skipped']['count']}")
  sampled = sorted({i for i, _, _ in rows})
  print(f"  sampled rows past row {cfg.data.max_eval_rows}: {sum(i >= cfg.data.max_eval_rows for i in sampled)}")


if __name__ == "__main__":
  main()
