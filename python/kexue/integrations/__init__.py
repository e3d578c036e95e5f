"""Integrations with other libraries (Hugging Face transformers lands with issue 7)."""
