"""Text: the tokenizer from GGUF metadata and sandboxed chat templates."""
