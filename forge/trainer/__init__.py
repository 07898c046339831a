"""Advantages, losses, the DeepSpeed engine and the train loop."""
