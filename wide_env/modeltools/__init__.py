"""Offline tools for the shipped MoE models; the envs never import this package.

Training the small byte-level MoE LMs (:mod:`~wide_env.modeltools.train_moe`, :mod:`~wide_env.modeltools.corpus`),
exporting their gating traces (:mod:`~wide_env.modeltools.export`, :mod:`~wide_env.modeltools.effect_tables`),
the LiveMoE reference decoder the tests and the budget calibration replay episodes with
(:mod:`~wide_env.modeltools.live`) and the Hugging Face trace recorder (:mod:`~wide_env.modeltools.hf_recorder`).
The decoding runtime the envs run is :mod:`wide_env.models`.
"""
