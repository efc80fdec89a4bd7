"""Examples of the pytest plugin, run in the project's integration runs."""
