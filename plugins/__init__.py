"""Built-in plugins of wyoming-cosyvoice (installed as the `wyoming_cosyvoice_plugins` package)."""
