"""The KV cache's type names (llama.cpp's ``--cache-type-k`` / ``-v`` values), without torch, so the
command lines can offer them before anything heavy is imported (``model/kv_cache.py`` implements them)."""

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0")
DEFAULT_CACHE_TYPE = "f32"
