"""NKAT HTTP server (aiohttp): Kobold.cpp, OpenAI and llama.cpp routes over one engine.

``cli`` (``nkat-server``) loads the model and runs ``app``; ``app`` holds the routing, auth,
CORS and size limits; ``routes_*`` one dialect each; ``jobs`` runs a request on the engine;
``sse`` writes event streams; ``errors`` turns typed errors into each dialect's error body.
"""
