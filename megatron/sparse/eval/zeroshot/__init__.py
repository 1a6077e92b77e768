"""Zero-shot downstream evaluation through lm-evaluation-harness (``lm_eval``).

``local_tasks``: offline tasks in lm-eval's YAML format built from held-out text;
``megatron_lm``: an ``lm_eval`` LM over a (tensor-parallel) Megatron model;
``runner``: task resolution, the evaluation run, the results table and JSON.
"""
