"""NKAT HTTP server (aiohttp): Kobold.cpp, OpenAI and llama.cpp routes over one engine.

Not built yet: see the issue "HTTP server". The runtime (``nkat_runtime``) is usable on its
own through ``nkat-generate`` and ``nkat-perplexity``.
"""
