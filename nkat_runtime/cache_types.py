"""The KV cache's type names (llama.cpp's ``--cache-type-k`` / ``-v`` values), without torch, so the
command lines can offer them before anything heavy is imported (``model/kv_cache.py`` implements them)."""

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0")
#: the default, as every peer's is 16-bit: half of float32's memory, perplexity within 0.1 % of it and
#: decode at the same speed on the CPU (docs/server.md, "KV memory"); the reference math keeps float32
DEFAULT_CACHE_TYPE = "bf16"
REFERENCE_CACHE_TYPE = "f32"


def default_cache_types(reference: bool = False) -> tuple[str, str]:
    """(keys, values) when none are asked for: float32 for the reference math, else the default."""
    kind = REFERENCE_CACHE_TYPE if reference else DEFAULT_CACHE_TYPE
    return kind, kind
