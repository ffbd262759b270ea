"""Real MoE models for wide-env: tiny byte-level MoE LM (train/export/live) and the HF trace recorder."""
