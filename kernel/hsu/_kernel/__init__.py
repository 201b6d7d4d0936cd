"""The kernel's mechanisms: private. Plugins never import ``hsu._kernel``;
what they need is in the public modules (docs/plugins.md)."""
