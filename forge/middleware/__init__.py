"""The boundary between rollouts and training: trajectory schema, data pool, weights."""
