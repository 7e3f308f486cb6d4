"""API dialects turned into one GenerationRequest and back.

- ``kobold``: KoboldAI / KoboldCpp (``/api/v1/*``, ``/api/extra/*``)
- ``openai``: OpenAI completions and chat completions (``/v1/*``)
- ``llamacpp``: llama.cpp server's native routes (``/completion``, ``/tokenize``, ``/props``...)

``samplers`` reads the shared Kobold sampler field set, ``fields`` the lenient JSON access.
Adapters build and read :mod:`nkat_runtime.request` types; they never touch tensors.
"""
