"""GGUF files: the validating reader, the derived-file writer, tensor names, requantisation."""
