"""Built-in auth plugins: who is calling and what they may call (docs/auth.md)."""
