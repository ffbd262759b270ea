"""Real MoE models for wide-env: the byte-level MoE LMs (train, export, live backend, budget calibration,
rule-vs-live agreement) and the Hugging Face trace recorder."""
