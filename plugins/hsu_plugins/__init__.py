"""Built-in plugins. They use only the public API of hsu."""
