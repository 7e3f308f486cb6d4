"""The models a server offers: which are loaded, loading on demand, LRU unloading, admin load/unload.

Each model is one :class:`~nkat_runtime.serve.engine.Engine` (its own weights, KV pool and engine
thread). A request names a model by its file stem, its file name or its listed id
(``koboldcpp/<stem>``); no name means the default (the first one). A handler holds a model for
the whole request through :meth:`ModelSet.use`, so a model is never unloaded while a request runs
on it. Loading runs in a worker thread: the other models keep serving meanwhile. When loading one
more would exceed ``max_loaded``, the least recently used idle model is unloaded first.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from nkat_runtime.serve.engine import Engine

from .errors import ApiError

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".gguf", ".nkat")
ID_PREFIX = "koboldcpp/"


@dataclass(eq=False)
class ModelEntry:
    name: str  # the file's stem: what /v1/models lists (as koboldcpp/<name>) and requests pick
    path: Path
    engine: Engine | None = None
    status: str = "unloaded"  # unloaded | loading | loaded | failed | unloading
    error: str | None = None  # why the last load failed
    users: int = 0  # requests holding it now
    last_used: float = 0.0
    load_seconds: float | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while users == 0

    def __post_init__(self) -> None:
        self.idle.set()

    @property
    def id(self) -> str:
        return ID_PREFIX + self.name

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(503, f"model {self.name} is not loaded", "busy")
        return self.engine


def scan_dir(folder: Path) -> list[Path]:
    """Every .gguf/.nkat file directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise ValueError(f"--models-dir: not a folder: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)


class ModelSet:
    def __init__(self, paths: list[Path], build: Callable[[Path], Engine], max_loaded: int = 4) -> None:
        if not paths:
            raise ValueError("no model to serve")
        if max_loaded < 1:
            raise ValueError("--models-max must be >= 1")
        self.entries: dict[str, ModelEntry] = {}
        for path in paths:
            name = path.stem
            if name in self.entries:
                if self.entries[name].path.resolve() == path.resolve():
                    continue
                raise ValueError(f"two models are named {name!r} ({self.entries[name].path} and {path}): rename one")
            self.entries[name] = ModelEntry(name, path)
        self.default = next(iter(self.entries))
        self.build = build
        self.max_loaded = max_loaded
        self._room = asyncio.Lock()  # making room and marking a model loading happen together

    # --- lookup -----------------------------------------------------------------------------------
    def find(self, name: str | None) -> ModelEntry:
        """The entry a request's ``model`` names. With a single model any name picks it (clients
        send 'gpt-3.5-turbo' and the like); with several, an unknown name is a 404."""
        if not name or len(self.entries) == 1:
            return self.entries[self.default]
        key = name[len(ID_PREFIX):] if name.startswith(ID_PREFIX) else name
        for suffix in MODEL_SUFFIXES:
            if key.lower().endswith(suffix):
                key = key[: -len(suffix)]
        if key in self.entries:
            return self.entries[key]
        raise ApiError(404, f"model {name!r} is not served here; the models are: {', '.join(self.entries)}",
                       "not_found", param="model", code="model_not_found")

    def engines(self) -> list[Engine]:
        """The engines of the models loaded now."""
        return [e.engine for e in self.entries.values() if e.engine is not None]

    @property
    def several(self) -> bool:
        return len(self.entries) > 1

    # --- use --------------------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, name: str | None = None) -> AsyncIterator[ModelEntry]:
        """The named model, loaded (waiting for a load under way, or starting one), held until the
        block ends."""
        entry = self.find(name)
        entry.users += 1
        entry.idle.clear()
        try:
            await self._ensure_loaded(entry)
            entry.last_used = time.monotonic()
            yield entry
        finally:
            entry.users -= 1
            entry.last_used = time.monotonic()
            if entry.users == 0:
                entry.idle.set()

    async def _ensure_loaded(self, entry: ModelEntry) -> None:
        if entry.status == "loaded":
            return
        async with entry.lock:
            if entry.status == "loaded":
                return
            async with self._room:
                await self._make_room(entry)
                entry.status = "loading"
            log.info("loading model %s (%s)", entry.name, entry.path)
            start = time.perf_counter()
            try:
                engine = await asyncio.to_thread(self.build, entry.path)
            except Exception as exc:  # noqa: BLE001 - reported to the caller and in the listing
                entry.status, entry.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("model %s failed to load: %s", entry.name, entry.error)
                raise ApiError(503, f"model {entry.name} failed to load: {entry.error}", "busy",
                               code="model_load_failed") from None
            entry.engine, entry.status, entry.error = engine, "loaded", None
            entry.load_seconds = time.perf_counter() - start
            log.info("model %s loaded in %.1f s", entry.name, entry.load_seconds)

    async def _make_room(self, incoming: ModelEntry) -> None:
        """Unload least recently used idle models until one more fits under ``max_loaded``."""
        while True:
            held = [e for e in self.entries.values() if e is not incoming and e.status in ("loaded", "loading")]
            if len(held) < self.max_loaded:
                return
            idle = [e for e in held if e.status == "loaded" and e.users == 0]
            if not idle:
                raise ApiError(503, f"the {self.max_loaded} loaded model(s) are all busy; try again later "
                                    "(or raise --models-max)", "busy", headers={"Retry-After": "5"})
            victim = min(idle, key=lambda e: e.last_used)
            log.info("unloading model %s to make room for %s (--models-max %d)", victim.name, incoming.name,
                     self.max_loaded)
            await self._close(victim)

    async def _close(self, entry: ModelEntry) -> None:
        engine, entry.engine = entry.engine, None
        entry.status = "unloading"
        if engine is not None:
            await asyncio.to_thread(engine.close)
            del engine
            await asyncio.to_thread(_free_memory)
        entry.status = "unloaded"

    def adopt(self, name: str, engine: Engine, seconds: float) -> None:
        """A model loaded before the event loop runs (the default one, at start-up)."""
        entry = self.entries[name]
        entry.engine, entry.status, entry.load_seconds = engine, "loaded", seconds
        entry.last_used = time.monotonic()

    # --- admin ------------------------------------------------------------------------------------
    async def load(self, name: str | None) -> ModelEntry:
        async with self.use(name) as entry:
            return entry

    async def unload(self, name: str | None, drain_seconds: float = 30.0) -> ModelEntry:
        """Unload once the requests on it have finished (409 if they take longer than ``drain_seconds``)."""
        entry = self.find(name)
        async with entry.lock:
            deadline = time.monotonic() + drain_seconds
            while entry.users:  # a request may take it between the event and this check: look again
                try:
                    await asyncio.wait_for(entry.idle.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise ApiError(409, f"model {entry.name} still has {entry.users} request(s) running after "
                                        f"{drain_seconds:g} s; try again when they end", "busy") from None
            if entry.engine is not None:
                log.info("unloading model %s (admin)", entry.name)
                await self._close(entry)
            elif entry.status == "failed":
                entry.status = "unloaded"
        return entry

    async def reload(self, name: str | None) -> ModelEntry:
        await self.unload(name)
        return await self.load(name)

    def make_default(self, entry: ModelEntry) -> None:
        self.default = entry.name

    async def close(self) -> None:
        for entry in self.entries.values():
            if entry.engine is not None:
                await asyncio.to_thread(entry.engine.close)

    # --- listing ----------------------------------------------------------------------------------
    def describe(self) -> list[dict]:
        out = []
        for e in self.entries.values():
            info: dict = {"name": e.name, "id": e.id, "path": str(e.path), "status": e.status,
                          "default": e.name == self.default}
            if e.error:
                info["error"] = e.error
            if e.load_seconds is not None:
                info["load_seconds"] = round(e.load_seconds, 3)
            try:
                st = e.path.stat()
                info["size"], info["modified"] = st.st_size, st.st_mtime
            except OSError:
                pass
            out.append(info)
        return out


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
