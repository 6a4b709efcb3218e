"""Integrations with model libraries; importing a submodule is the opt-in."""
