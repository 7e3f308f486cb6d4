"""Per-token cost of constrained decoding (llguidance) on a real vocabulary.

    python benchmarks/grammar_cost.py --model gemma3-270m --steps 48

Greedy decode under a GBNF grammar and a JSON schema; prints the one-off cost of llguidance's
token table for the model, and per step the median time of the mask (computing the allowed
tokens and applying them to the logits) beside the median decode step of the model itself, in
the same run. Medians of ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

GBNF = 'root ::= "The answer is " ("yes" | "no" | "maybe") ", because " [a-z ,]{1,200} "."'
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from nkat_runtime.bundled import resolve_model
    from nkat_runtime.loader import load_model
    from nkat_runtime.sampling.grammar import GrammarCompiler
    from nkat_runtime.sampling.params import GrammarSpec

    lm = load_model(resolve_model(args.model), device="cpu", context=512, progress=False)
    rows = lm.gguf.tensors["token_embd.weight"].shape[0]
    compiler = GrammarCompiler(lm.tokenizer, rows)
    t0 = time.perf_counter()
    compiler.compile(GrammarSpec("gbnf", 'root ::= "x"'))
    result: dict = {"model": lm.path.name, "vocabulary": rows, "token_table_s": time.perf_counter() - t0}
    prompt = lm.tokenizer.encode("Describe a person as JSON, or answer the question: is the sky green?",
                                 add_special=True)
    for name, spec in (("gbnf", GrammarSpec("gbnf", GBNF)), ("json_schema", GrammarSpec("json_schema", json.dumps(SCHEMA)))):
        constraint = compiler.compile(spec)()
        masks, steps, out = [], [], []
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt]), torch.arange(len(prompt)), last_only=True)[0, -1]
            for pos in range(len(prompt), len(prompt) + args.steps):
                t = time.perf_counter()
                tok = int(constraint.mask(logits).argmax())
                masks.append(time.perf_counter() - t)
                if tok in lm.tokenizer.stop_ids:
                    break
                constraint.accept(tok)
                out.append(tok)
                if constraint.finished:
                    break
                t = time.perf_counter()
                logits = lm.model(torch.tensor([[tok]]), torch.tensor([pos]), last_only=True)[0, -1]
                steps.append(time.perf_counter() - t)
        mask_ms, step_ms = 1000 * statistics.median(masks), 1000 * statistics.median(steps or [float("nan")])
        result[name] = {"tokens": len(out), "mask_ms": mask_ms, "decode_step_ms": step_ms,
                        "mask_share_of_step": mask_ms / step_ms, "text": lm.tokenizer.decode(out)}
        print(f"{name:12} {len(out):3} tokens: mask {mask_ms:.2f} ms, decode step {step_ms:.1f} ms "
              f"({100 * mask_ms / step_ms:.1f} %): {result[name]['text'][:80]!r}")
    print(f"token table for {rows} tokens: {result['token_table_s']:.2f} s (once per model)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
