"""Built-in environments, each a Python class a user could have written."""
