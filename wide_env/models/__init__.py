"""The decoding runtime of the shipped MoE LMs that the envs run: the model (:mod:`~wide_env.models.moe_lm`), the
KV-cached stream decoder under expert masks (:mod:`~wide_env.models.decoder`) and the trace contexts
(:mod:`~wide_env.models.trace_context`). Training, export and the other offline tools: :mod:`wide_env.modeltools`."""
