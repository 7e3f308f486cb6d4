"""Mutation fuzzing of GGUF / .nkat files: every case must end in a typed rejection
(:class:`NKATError`) or a correct load (a forward pass with finite or honestly non-finite
logits) — never another exception, a hang, or a large allocation.

Run as a worker (``python gguf_fuzz.py SEED_FILE... --cases N --seed S``): it prints one line
per case (``ok``, ``rejected``, ``CRASH <type>: <message>``) and a final ``peak_rss_mb`` line.
:func:`campaign` runs it in a subprocess with a memory limit and a watchdog, so a hang or a huge
allocation is caught as such (``tests/model/test_hardening_files.py``: 2,000 cases;
``tests/slow/test_fuzz_long.py``: 10,000).
"""

from __future__ import annotations

import argparse
import random
import resource
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HUGE = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]


@dataclass
class Layout:
    """Byte positions of a clean file's fields (found with gguf-py's reader)."""

    header_end: int  # end of the tensor table
    scalar_values: list[tuple[int, int]]  # (position, size) of numeric metadata values
    counts: list[int]  # positions of u64 string/array lengths in the metadata
    tensor_fields: list[dict[str, int]]  # per tensor: dims / type / offset positions, n_dims
    data: list[tuple[int, int, int]]  # (start, nbytes, ggml type) of each tensor's data


def layout(path: Path) -> Layout:
    import gguf

    r = gguf.GGUFReader(str(path))
    base = r.data.ctypes.data
    pos = lambda a: a.ctypes.data - base  # noqa: E731
    scalars, counts = [], []
    for f in r.fields.values():
        counts.append(pos(f.parts[0]))  # the key's length
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            counts.append(pos(f.parts[3]))  # the array's element count
        elif f.types and f.types[0] == gguf.GGUFValueType.STRING:
            counts.append(pos(f.parts[3]))
        elif f.types:
            scalars.append((pos(f.parts[-1]), f.parts[-1].nbytes))
    tensors, data = [], []
    end = 0
    for t in r.tensors:
        p = t.field.parts
        tensors.append({"dims": pos(p[3]), "n_dims": int(p[2][0]), "type": pos(p[4]), "offset": pos(p[5])})
        end = max(end, pos(p[5]) + 8)
        data.append((pos(t.data) if t.data.size else 0, int(t.n_bytes), int(t.tensor_type)))
    return Layout(end, scalars, counts, tensors, data)


def mutate(raw: bytes, lay: Layout, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(raw)
    kind = rng.choice(["flip", "flip", "truncate", "count", "scalar", "offset", "dims", "type", "nan", "header"])
    if kind == "flip":
        n = rng.randint(1, 8)
        hi = lay.header_end if rng.random() < 0.8 else len(b)
        for _ in range(n):
            i = rng.randrange(hi)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip {n} bits below {hi}"
    if kind == "truncate":
        cut = rng.randrange(len(b))
        return bytes(b[:cut]), f"truncate at {cut}"
    if kind == "count":
        at = rng.choice(lay.counts)
        v = rng.choice(HUGE)
        struct.pack_into("<Q", b, at, v)
        return bytes(b), f"length at {at} = {v}"
    if kind == "scalar" and lay.scalar_values:
        at, size = rng.choice(lay.scalar_values)
        v = rng.choice(HUGE) & ((1 << (8 * size)) - 1)
        b[at : at + size] = v.to_bytes(size, "little")
        return bytes(b), f"metadata value at {at} = {v}"
    if kind in ("offset", "dims", "type"):
        t = rng.choice(lay.tensor_fields)
        if kind == "offset":
            other = rng.choice(lay.tensor_fields)
            choices = [rng.choice(HUGE), rng.randrange(len(b)), rng.randrange(1, 32)]
            v = rng.choice(choices + [struct.unpack_from("<Q", b, other["offset"])[0]])  # overlap another tensor
            struct.pack_into("<Q", b, t["offset"], v)
        elif kind == "dims":
            d = rng.randrange(t["n_dims"])
            v = rng.choice(HUGE + [rng.randint(1, 4096)])
            struct.pack_into("<Q", b, t["dims"] + 8 * d, v)
        else:
            v = rng.choice([rng.randrange(64), 2**32 - 1, 4, 5, 31, 40])
            struct.pack_into("<I", b, t["type"], v)
        return bytes(b), f"tensor {kind} = {v}"
    if kind == "nan":
        start, nbytes, qtype = rng.choice([d for d in lay.data if d[1] >= 4])
        if qtype == 0:  # F32: NaN / inf floats
            for _ in range(rng.randint(1, 4)):
                i = start + 4 * rng.randrange(nbytes // 4)
                struct.pack_into("<f", b, i, rng.choice([float("nan"), float("inf"), -float("inf")]))
        else:  # a block scale (F16 at the block's start for the legacy/K types) → NaN or inf
            struct.pack_into("<H", b, start + 2 * rng.randrange(min(nbytes, 64) // 2), rng.choice([0x7E00, 0x7C00]))
        return bytes(b), f"non-finite values in tensor data at {start}"
    # header: version / counts
    at = rng.choice([4, 8, 16])
    v = rng.choice(HUGE + [1, 3, 4])
    struct.pack_into("<I" if at == 4 else "<Q", b, at, v & (0xFFFFFFFF if at == 4 else 2**64 - 1))
    return bytes(b), f"header field at {at} = {v}"


def run_case(path: Path) -> str:
    import torch

    from nkat_runtime.errors import NKATError
    from nkat_runtime.loader import load_model

    try:
        lm = load_model(path, context=32, progress=False)
        ids = torch.tensor([[1, 2, 3, 4]])
        out = lm.model(ids, torch.arange(4))
        if out.shape[-1] != lm.tokenizer.vocab_size and out.shape[-1] < lm.tokenizer.vocab_size:
            return f"CRASH shape: logits {tuple(out.shape)} for vocab {lm.tokenizer.vocab_size}"
        return "ok"
    except NKATError:
        return "rejected"
    except Exception as exc:  # noqa: BLE001 - what the fuzz is looking for
        import traceback

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "nkat_runtime" in f.filename]
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        return f"CRASH {type(exc).__name__}{where}: {str(exc)[:300]}"


def status_kib(field: str) -> int:
    """A size from /proc/self/status. (Not ``ru_maxrss``: it keeps the peak of the process this
    one was forked from, before the exec, e.g. a pytest process holding several models.)"""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("seeds", nargs="+", type=Path)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mem-mb", type=int, default=3072, help="address-space limit for the cases")
    args = ap.parse_args()
    import logging

    import torch  # noqa: F401  (imported before the limit: its own reservations are not a case's)

    logging.disable(logging.CRITICAL)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    seeds = [(p.read_bytes(), layout(p), p.suffix) for p in args.seeds]
    soft = status_kib("VmData") // 1024 + args.mem_mb
    resource.setrlimit(resource.RLIMIT_DATA, (soft * 2**20, soft * 2**20))
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            raw, lay, suffix = rng.choice(seeds)
            data, what = mutate(raw, lay, rng)
            path = Path(tmp) / f"case{suffix}"
            path.write_bytes(data)
            t0 = time.perf_counter()
            verdict = run_case(path)
            print(f"case {i}: {verdict} ({what}; {time.perf_counter() - t0:.2f} s)", flush=True)
    print(f"peak_rss_mb {status_kib('VmHWM') // 1024}", flush=True)
    return 0


CASE_TIMEOUT_S = 60  # no case may take longer (a hang)


@dataclass
class Campaign:
    cases: int
    loaded: int
    rejected: int
    peak_rss_mb: int


def fuzz_seeds(tiny_model, folder: Path) -> list[Path]:
    """Clean seed files: a tiny model of each architecture and a .nkat file."""
    from nkat_runtime.theta.convert import ConvertOptions, convert

    nkat = folder / "seed.nkat"
    convert(ConvertOptions(input=tiny_model("llama"), output=nkat, rank=4, progress=False))
    return [tiny_model("llama"), tiny_model("gemma3"), tiny_model("qwen2"), nkat]


def campaign(seeds: list[Path], cases: int, seed: int = 1) -> Campaign:
    """Run ``cases`` mutated files through a worker process, with a watchdog per case; raises
    AssertionError on a crash, a hang, a failed worker or a peak RSS of 1.5 GB or more."""
    import os
    import queue
    import subprocess
    import threading

    proc = subprocess.Popen([sys.executable, __file__, *map(str, seeds), "--cases", str(cases), "--seed", str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    verdicts: dict[str, int] = {"ok": 0, "rejected": 0}
    crashes, other, peak = [], [], None
    last = "(before the first case)"
    while True:
        try:
            line = lines.get(timeout=CASE_TIMEOUT_S)
        except queue.Empty:
            proc.kill()
            raise AssertionError(f"a fuzz case hung for {CASE_TIMEOUT_S} s; the last finished: {last}") from None
        if line is None:
            break
        line = line.rstrip()
        if line.startswith("case "):
            last = line
            verdict = line.split(": ", 1)[1]
            if verdict.startswith("CRASH"):
                crashes.append(line)
            else:
                verdicts[verdict.split(" ", 1)[0]] += 1
        elif line.startswith("peak_rss_mb"):
            peak = int(line.split()[1])
        else:
            other.append(line)
    assert proc.wait(60) == 0, "\n".join(other[-20:])
    assert not crashes, "\n".join(crashes[:20])
    assert sum(verdicts.values()) == cases
    assert verdicts["ok"] > 0 and verdicts["rejected"] > 0  # both outcomes were exercised
    assert peak is not None and peak < 1500, f"peak RSS {peak} MiB"
    return Campaign(cases, verdicts["ok"], verdicts["rejected"], peak)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
