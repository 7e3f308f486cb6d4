"""Cost of constrained decoding (llguidance) on a real vocabulary.

    python benchmarks/grammar_cost.py --model gemma3-270m --steps 48 --runs 5

1. The one-off cost of llguidance's token table for the model, and the compile time of each
   grammar (GBNF, JSON schema, a forced tool call; median of 20 compiles).
2. Per step, greedy, under a GBNF grammar and a JSON schema: the median time of the mask
   (computing the allowed tokens and applying them to the logits) beside the median decode step
   of the model itself, in the same run.
3. End to end through the generation driver (what the server runs): decode tokens/s of
   ``--steps`` tokens with and without a JSON-schema constraint (a schema that cannot be completed
   in that many tokens, so both runs decode them all), alternating, median of ``--runs``.
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
    p.add_argument("--runs", type=int, default=5, help="end-to-end runs of each kind (alternating)")
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
    result["compile_ms"] = compile_times(compiler)
    print("grammar compile (median of 20): " + ", ".join(f"{k} {v:.2f} ms" for k, v in result["compile_ms"].items()))
    result["end_to_end"] = end_to_end(lm, compiler, prompt, args.steps, args.runs)
    e = result["end_to_end"]
    print(f"decode through the driver, {args.steps} tokens, median of {args.runs}: free {e['free_tok_s']:.2f} tok/s, "
          f"JSON schema {e['schema_tok_s']:.2f} tok/s ({100 * (e['schema_tok_s'] / e['free_tok_s'] - 1):+.1f} %)")
    print(json.dumps(result))
    return 0


LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}


def compile_times(compiler) -> dict[str, float]:
    from nkat_runtime.sampling.params import GrammarSpec
    from nkat_runtime.text.tool_syntax import HERMES, check_tools, forced_call_grammar

    tools = check_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}])
    specs = {"gbnf": GrammarSpec("gbnf", GBNF), "json_schema": GrammarSpec("json_schema", json.dumps(SCHEMA)),
             "tool_call": GrammarSpec("lark", forced_call_grammar(HERMES, tools, False, lambda t: None))}
    out = {}
    for name, spec in specs.items():
        times = []
        for _ in range(20):
            t = time.perf_counter()
            compiler.compile(spec)()  # checked, and one sequence's matcher made
            times.append(time.perf_counter() - t)
        out[name] = 1000 * statistics.median(times)
    return out


def end_to_end(lm, compiler, prompt: list[int], steps: int, runs: int) -> dict[str, float]:
    from nkat_runtime.sampling.params import GrammarSpec, SamplingParams
    from nkat_runtime.serve.driver import Driver
    from nkat_runtime.serve.sequence import GenerationParams

    driver = Driver(lm)
    schema = compiler.compile(GrammarSpec("json_schema", json.dumps(LONG)))
    kinds = {"free": None, "schema": schema}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(runs + 1):  # the first round warms both up and is not counted
        for name, constraint in kinds.items():
            params = GenerationParams(steps, SamplingParams.greedy(), stop_ids=frozenset(), constraint=constraint,
                                      cache_prompt=False)
            choice = driver.generate(prompt, params)
            assert len(choice.token_ids) == steps, (name, len(choice.token_ids))
            if i:
                rates[name].append(choice.decode_tokens_per_second)
    return {"free_tok_s": statistics.median(rates["free"]), "schema_tok_s": statistics.median(rates["schema"]),
            "steps": steps, "runs": runs}


if __name__ == "__main__":
    raise SystemExit(main())
