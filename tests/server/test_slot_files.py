"""Slot files (``POST /slots/{id}?action=save|restore|erase``, ``--slot-save-path``) on a real
nkat-server with the default model and one slot: a slot saved, erased and restored continues with
identical greedy text from the restored cache, while after an erase the prompt is computed again;
files are written atomically; bad names, truncated or damaged files, another model's or another
cache's files, unknown actions or slots and a busy slot are refused with a 4xx JSON answer, the
slot unchanged and the server still answering; without the flag every action is refused. And on
an engine with a tiny model: a q8_0/f16 cache round-trips bit for bit and the block pool stays
consistent; an erase leaves nothing to share and takes the content out of the RAM prompt cache."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from enginecalls import ids, req, run
from nkat_runtime.loader import load_model
from nkat_runtime.serve import slot_files
from nkat_runtime.serve.engine import Engine
from nkat_runtime.serve.scheduler import SchedulerConfig
from nkat_runtime.serve.slot_files import pack_header, read_header
from serverproc import Server

PROMPT = ("The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
          "father had taught him, and at the top he lit the great lamp while the sea")
BODY = {"prompt": PROMPT, "n_predict": 24, "temperature": 0, "cache_prompt": True, "id_slot": 0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("slot-files")


@pytest.fixture(scope="module")
def server(tmp_path_factory, folder):
    srv = Server(tmp_path_factory.mktemp("slot-server"), "--slot-save-path", str(folder), "--parallel", "1")
    yield srv
    srv.stop()


def act(srv: Server, action: str, body: dict | None = None, slot: object = 0):
    return srv.post(f"/slots/{slot}?action={action}", body)


def complete(srv: Server) -> dict:
    reply = srv.post("/completion", BODY)
    assert reply.status == 200, reply.body
    return reply.json()


def held(srv: Server) -> int:
    return srv.get("/slots").json()[0]["n_cached"]


def test_save_erase_restore_continues_with_identical_greedy_text(server, folder):
    n_prompt = len(server.post("/tokenize", {"content": PROMPT, "add_special": True}).json()["tokens"])
    first = complete(server)
    n = held(server)
    saved = act(server, "save", {"filename": "story.bin"}).json()
    size = (folder / "story.bin").stat().st_size
    assert saved["id_slot"] == 0 and saved["filename"] == "story.bin" and saved["timings"]["save_ms"] > 0
    assert saved["n_saved"] == n > n_prompt and saved["n_written"] == size

    erased = act(server, "erase").json()
    assert erased == {"id_slot": 0, "n_erased": n}
    assert server.get("/slots").json()[0] | {"n_ctx": 0} == {"id": 0, "n_ctx": 0, "is_processing": False,
                                                              "n_cached": 0, "n_blocks": 0, "n_blocks_shared": 0}
    recomputed = complete(server)  # nothing of it is left: not the slot, its blocks or the RAM cache
    assert recomputed["content"] == first["content"]
    assert recomputed["tokens_cached"] == 0 and recomputed["timings"]["prompt_n"] == n_prompt

    act(server, "erase")
    restored = act(server, "restore", {"filename": "story.bin"}).json()
    assert restored["id_slot"] == 0 and restored["n_restored"] == n and restored["n_read"] == size
    assert held(server) == n
    again = complete(server)
    assert again["content"] == first["content"]
    assert again["tokens_cached"] == n_prompt - 1 and again["timings"]["prompt_n"] == 1  # from the file


def test_a_save_replaces_the_file_atomically(server, folder):
    before = (folder / "story.bin").stat().st_ino
    assert act(server, "save", {"filename": "story.bin"}).status == 200
    assert (folder / "story.bin").stat().st_ino != before  # a new file renamed in, not rewritten in place
    assert sorted(p.name for p in folder.iterdir()) == ["story.bin"]  # no temporary file left behind
    assert act(server, "restore", {"filename": "story.bin"}).status == 200


def test_refusals_leave_the_slot_as_it_was(server, folder):
    raw = (folder / "story.bin").read_bytes()
    with open(folder / "story.bin", "rb") as f:
        meta, start = read_header(f, len(raw), "story.bin")

    def crafted(name: str, **changes: dict) -> str:
        m = {k: ({**v, **changes[k]} if k in changes else v) for k, v in meta.items()}
        (folder / name).write_bytes(pack_header(m) + raw[start:])
        return name

    (folder / "short.bin").write_bytes(raw[: len(raw) - 100])
    (folder / "long.bin").write_bytes(raw + b"\0")
    (folder / "junk.bin").write_bytes(b"not a slot file at all, just text")
    flipped = bytearray(raw)
    flipped[-7] ^= 0x40
    (folder / "flipped.bin").write_bytes(bytes(flipped))
    n = held(server)
    cases = [
        ("restore", {"filename": crafted("model.bin", model={"sha256": "0" * 64})}, 400, "another model"),
        ("restore", {"filename": crafted("cache.bin", cache={"type_k": "f16"})}, 400, "type_k 'f16' (here 'bf16')"),
        ("restore", {"filename": "short.bin"}, 400, "truncated"),
        ("restore", {"filename": "long.bin"}, 400, "past its KV data"),
        ("restore", {"filename": "junk.bin"}, 400, "not an NKAT slot file"),
        ("restore", {"filename": "flipped.bin"}, 400, "checksum"),
        ("restore", {"filename": "missing.bin"}, 404, "no slot file"),
        ("save", {"filename": "../escape.bin"}, 400, "invalid filename"),
        ("save", {"filename": "a/b.bin"}, 400, "invalid filename"),
        ("restore", {"filename": ".."}, 400, "invalid filename"),
        ("save", None, 400, "'filename' is required"),
        ("explode", {"filename": "x.bin"}, 400, "Invalid action"),
    ]
    for action, body, status, words in cases:
        reply = act(server, action, body)
        message = reply.json()["error"]["message"]
        assert reply.status == status and words in message, (action, body, reply.status, message)
        assert held(server) == n
    assert act(server, "erase", slot=7).json()["error"]["message"].startswith("slot id 7 is out of range")
    assert act(server, "erase", slot="x").status == 400
    assert not (folder.parent / "escape.bin").exists()
    assert complete(server)["tokens_cached"] > 0  # what it held still serves


def test_a_busy_slot_is_refused(server):
    done: list = []
    long = threading.Thread(target=lambda: done.append(server.post(
        "/completion", {**BODY, "n_predict": 64, "ignore_eos": True, "prompt": "Once upon a time"})))
    long.start()
    try:
        deadline = time.time() + 60
        while not server.get("/slots").json()[0]["is_processing"]:
            assert time.time() < deadline and long.is_alive()
            time.sleep(0.05)
        for action, body in (("save", {"filename": "busy.bin"}), ("restore", {"filename": "story.bin"}),
                             ("erase", None)):
            reply = act(server, action, body)
            assert reply.status == 409 and "busy" in reply.json()["error"]["message"], reply.body
    finally:
        long.join()
    assert done[0].status == 200 and done[0].json()["tokens_predicted"] == 64
    assert server.get("/health").status == 200


def test_every_action_is_refused_without_the_flag(tmp_path):
    srv = Server(tmp_path, "--parallel", "1")
    try:
        for action in ("save", "restore", "erase"):
            reply = act(srv, action, {"filename": "x.bin"})
            assert reply.status == 400 and "--slot-save-path" in reply.json()["error"]["message"]
        assert srv.get("/health").status == 200
    finally:
        srv.stop()


def test_engine_round_trip_of_a_quantised_cache_and_what_erase_forgets(tiny_model, tmp_path):
    lm = load_model(tiny_model("llama", n_embd=256), context=128, progress=False, reference=True,
                    cache_types=("q8_0", "f16"))  # head size 64: Hadamard-rotated q8_0 keys, two planes
    engine = Engine(lm, max_queue=4, config=SchedulerConfig(slots=2, block_size=8, cache_ram_bytes=1 << 24))
    sched, path = engine.sched, tmp_path / "tiny.bin"
    prompt = ids(30)

    def call(fn):
        async def go():
            return await engine.call(fn)
        return asyncio.run(go())

    try:
        first = run(engine, req(prompt, max_tokens=8, ban_eos=True)).choices[0]
        row = next(s.row for s in sched.slots if s.tokens)
        n, _ = asyncio.run(slot_files.save(engine, row, path))
        tokens = list(sched.slots[row].tokens)
        kv = lm.model.read_kv(sched.slots[row].table, n)
        call(lambda s: s.cache.replace(s.slots[row]))  # its content goes to the RAM cache
        assert len(sched.ram) == 1
        assert asyncio.run(slot_files.restore(engine, 1 - row, path))[0] == n  # into the other slot
        other = sched.slots[1 - row]
        assert other.tokens == tokens and all(torch.equal(a, b) for x, y in zip(kv, lm.model.read_kv(other.table, n))
                                              for a, b in zip(x, y))
        sched.pool.check([s.table for s in sched.slots])
        assert asyncio.run(slot_files.erase_slot(engine, 1 - row)) == n
        sched.pool.check([s.table for s in sched.slots])
        assert len(sched.ram) == 0 and sched.pool.lookup(tokens, n) == [] and sched.pool.stats().cached == 0
        assert run(engine, req(prompt, max_tokens=8, ban_eos=True)).choices[0].cached_tokens == 0
        call(lambda s: [s.cache.discard(slot) for slot in s.slots])
        asyncio.run(slot_files.restore(engine, 0, path))
        again = run(engine, req(prompt, max_tokens=8, ban_eos=True)).choices[0]
        sched.pool.check([s.table for s in sched.slots])
    finally:
        engine.close()
    assert again.cached_tokens == len(prompt) - 1 and again.token_ids == first.token_ids
