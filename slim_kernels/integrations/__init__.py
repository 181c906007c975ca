"""Integrations: Hugging Face model swap, save/load, distributed sync."""
