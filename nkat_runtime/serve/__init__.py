"""Serving: the request preparer, one sequence's run, the scheduler, KV slots, the engine and the one-slot driver."""
