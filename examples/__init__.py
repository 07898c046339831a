"""Black-box agents trained through Forge's gateway (docs/agents.md); run recipes from the
project root so that `examples.<module>:run` imports."""
