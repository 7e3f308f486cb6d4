"""API dialects (Kobold, OpenAI, llama.cpp) turned into one GenerationRequest and back.

Not built yet: see the issue "HTTP server".
"""
