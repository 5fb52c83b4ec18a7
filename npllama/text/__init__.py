"""Text: tokenizers, chat formats and templates, and tokenizer import from other formats."""
