"""Advantages, losses, the DeepSpeed engine and the train loop."""

from forge.trainer.logprobs import sequence_logprobs
