"""The fast engine: our own forward passes and sampling over upstream's weights.

`prompt` builds a request's talker prompt exactly as upstream does, `model_runner` runs the talker
(static per-slot KV cache, batched decode) and the code predictor, `sampler` applies HF generate's
logits rules per row with batch-independent, seedable randomness.
"""
