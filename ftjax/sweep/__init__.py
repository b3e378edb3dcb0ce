"""Sweeps: an ablation or search as a config file, its runs, their records and the analysis.

    python -m ftjax.sweep run experiments/lora_variants/sweep.py
    python -m ftjax.sweep analyze experiments/lora_variants/sweep.py

See docs/sweeps.md.
"""
