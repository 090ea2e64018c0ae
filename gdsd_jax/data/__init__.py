"""Data: tokenizers (tiny character tokenizers, local Hugging Face tokenizers) behind one interface."""
