"""A JSON schema as a GBNF grammar (llama.cpp's grammar language), for koboldcpp's
``/api/extra/json_to_grammar``.

Clients (KoboldAI Lite among them) ask for the GBNF of a schema and send it back as ``grammar``;
generation itself takes a schema directly (``json_schema``, ``response_format``) through
llguidance, which is the better path. The grammar follows llama.cpp's converter in meaning:
properties in the schema's order, required ones always present, optional ones in order and
each may be left out, no other keys unless ``additionalProperties`` allows them, whitespace
between tokens, ``properties`` or ``items`` without a ``type`` meaning an object or an array. Supported: ``type`` (one or a list), ``enum``, ``const``, ``anyOf`` / ``oneOf``,
``allOf`` of objects, local ``$ref`` (``#/$defs/...``, ``#/definitions/...``, recursion allowed),
``properties`` / ``required`` / ``additionalProperties``, ``items`` / ``prefixItems`` /
``minItems`` / ``maxItems``, ``minLength`` / ``maxLength``, string ``format`` ``date``, ``time``,
``date-time``, ``uuid``, and integer ``minimum`` / ``maximum`` (and their exclusive forms).
Anything else that constrains values (``pattern``, number bounds, ``not``...) is refused by
name: a grammar that quietly ignored it would let through what the schema forbids.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import InvalidRequestError

SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'
PRIMITIVES = {
    "space": SPACE,
    "boolean": '("true" | "false")',
    "null": '"null"',
    "integral-part": "[0] | [1-9] [0-9]{0,15}",
    "decimal-part": "[0-9]{1,16}",
    "integer": '("-"? integral-part)',
    "number": '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?',
    "char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": '"\\"" char* "\\""',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? space "}"',
    "array": '"[" space ( value ("," space value)* )? space "]"',
    "date": '[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
            '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
    "date-time": 'date "T" time',
    "uuid": '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}',
}
DEPENDS = {"value": ("object", "array", "string", "number", "boolean", "null"), "object": ("string", "value", "space"),
           "array": ("value", "space"), "string": ("char",), "integer": ("integral-part",),
           "number": ("integral-part", "decimal-part"), "date-time": ("date", "time")}
FORMATS = ("date", "time", "date-time", "uuid")
REFUSED = ("pattern", "patternProperties", "not", "if", "then", "else", "dependentRequired", "dependentSchemas",
           "uniqueItems", "contains", "minContains", "maxContains", "multipleOf", "minProperties", "maxProperties",
           "propertyNames", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _json_literal(value: Any) -> str:
    return literal(json.dumps(value, ensure_ascii=False))


class _Converter:
    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}

    def error(self, path: str, message: str) -> InvalidRequestError:
        return InvalidRequestError(f"json_to_grammar: {path or 'the schema'}: {message}", "schema")

    def use(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = PRIMITIVES[name]
            for dep in DEPENDS.get(name, ()):
                self.use(dep)
        return name

    def add(self, base: str, body: str) -> str:
        name, i = re.sub(r"[^a-zA-Z0-9-]+", "-", base).strip("-") or "rule", 1
        candidate = name
        while candidate in self.rules or candidate in PRIMITIVES:
            if self.rules.get(candidate) == body:
                return candidate
            i += 1
            candidate = f"{name}-{i}"
        self.rules[candidate] = body
        return candidate

    # --- schemas -----------------------------------------------------------------------------------
    def visit(self, schema: Any, name: str, path: str) -> str:
        """An expression matching ``schema`` (a rule name, or a short sequence)."""
        if schema is True or schema == {}:
            return self.use("value")
        if not isinstance(schema, dict):
            raise self.error(path, "a schema must be an object (or true)")
        for key in REFUSED:
            if key in schema:
                raise self.error(path, f"'{key}' is not supported by json_to_grammar; send the schema itself as "
                                       "'json_schema' (or OpenAI response_format), which supports it")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path)
        if "const" in schema:
            return _json_literal(schema["const"])
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise self.error(path, "'enum' must be a non-empty list")
            return self.add(name, " | ".join(_json_literal(v) for v in schema["enum"]))  # no spaces inside
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise self.error(path, f"'{key}' must be a non-empty list")
                return self.add(name, " | ".join(self.visit(s, f"{name}-{i}", f"{path}/{key}/{i}")
                                                 for i, s in enumerate(subs)))
        if "allOf" in schema:
            return self.visit(self.all_of(schema, path), name, path)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise self.error(path, "'type' must not be an empty list")
            return self.add(name, " | ".join(self.visit(dict(schema, type=k), f"{name}-{k}", path) for k in kind))
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return self.use("value")
        if kind == "object":
            return self.object(schema, name, path)
        if kind == "array":
            return self.array(schema, name, path)
        if kind == "string":
            return self.string(schema, name, path)
        if kind == "integer":
            return self.integer(schema, name, path)
        if kind in ("number", "boolean", "null"):
            if kind == "number" and any(k in schema for k in BOUNDS):
                raise self.error(path, "bounds on 'number' are not supported by json_to_grammar (integers' are)")
            return self.use(kind)
        raise self.error(path, f"unknown type {kind!r}")

    def ref(self, ref: Any, path: str) -> str:
        if ref not in self.refs:
            target = self._resolve(ref, path)
            name = self.add("ref-" + ref.rsplit("/", 1)[-1], "")  # reserved first: recursion finds it
            self.refs[ref] = name
            self.rules[name] = self.visit(target, name + "-body", ref[1:])
        return self.refs[ref]

    def all_of(self, schema: dict[str, Any], path: str) -> dict[str, Any]:
        """One schema for ``allOf``: a single part, the common values of enums, or merged objects."""
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        subs = schema["allOf"]
        if not isinstance(subs, list) or not subs:
            raise self.error(path, "'allOf' must be a non-empty list")
        parts = []
        for sub in subs:
            while isinstance(sub, dict) and "$ref" in sub:
                sub = self._resolve(sub["$ref"], path)
            parts.append(sub)
        if len(parts) == 1 and isinstance(parts[0], dict) and not (set(rest) & set(parts[0]) - {"type"}):
            return {**rest, **parts[0]}
        if all(isinstance(p, dict) and ("enum" in p or "const" in p) for p in parts):
            values = [p["enum"] if "enum" in p else [p["const"]] for p in parts]
            common = [v for v in values[0] if all(v in other for other in values[1:])]
            if not common:
                raise self.error(path, "the enums in 'allOf' have no value in common")
            return {"enum": common}
        out: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for i, sub in enumerate(parts):
            if not isinstance(sub, dict) or sub.get("type", "object") != "object" or "anyOf" in sub or "oneOf" in sub:
                raise self.error(f"{path}/allOf/{i}", "allOf is supported for objects and enums only")
            out["properties"].update(sub.get("properties", {}))
            out["required"] += [r for r in sub.get("required", []) if r not in out["required"]]
        out["properties"].update(rest.pop("properties", {}))
        out["required"] += [r for r in rest.pop("required", []) if r not in out["required"]]
        return {**rest, **out}

    def _resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self.error(path, f"only local references (#/$defs/...) are supported, not {ref!r}")
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            elif isinstance(target, dict) and part in target:
                target = target[part]
            else:
                raise self.error(path, f"$ref {ref!r} points nowhere")
        return target

    def object(self, schema: dict[str, Any], name: str, path: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise self.error(path, "'properties' must be an object and 'required' a list")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.error(path, f"required property {missing[0]!r} has no schema in 'properties'")
        extra = schema.get("additionalProperties", "properties" not in schema)  # {"type": "object"}: any object
        if extra is True and not props:
            return self.use("object")
        self.use("space")
        kv = {}
        for key, sub in props.items():
            value = self.visit(sub, f"{name}-{key}", f"{path}/properties/{key}")
            kv[key] = self.add(f"{name}-{key}-kv", f'{literal(json.dumps(key, ensure_ascii=False))} space ":" space {value}')
        if extra is not False:
            value = self.visit({} if extra is True else extra, f"{name}-additional", f"{path}/additionalProperties")
            kv_extra = self.add(f"{name}-additional-kv", f'{self.use("string")} ":" space {value}')
        req = [kv[k] for k in props if k in required]
        opt = [kv[k] for k in props if k not in required] + ([f"{kv_extra} (\",\" space {kv_extra})*"]
                                                               if extra is not False else [])
        if req:
            body = ' "," space '.join(req) + "".join(f' ("," space {o})?' for o in opt)
        elif opt:
            chain = ""
            for i in range(len(opt) - 1, -1, -1):  # each optional entry, then any of the later ones
                chain = self.add(f"{name}-opt-{i}", f'{opt[i]} ("," space {chain})? | {chain}' if chain else opt[i])
            body = f"({chain})?"
        else:
            return self.add(name, '"{" space "}"')
        return self.add(name, f'"{{" space {body} space "}}"')

    def array(self, schema: dict[str, Any], name: str, path: str) -> str:
        if isinstance(schema.get("prefixItems"), dict):  # an old spelling of 'items' ('items' wins)
            schema = {"items": schema["prefixItems"], **{k: v for k, v in schema.items() if k != "prefixItems"}}
        if "prefixItems" in schema:
            items = schema["prefixItems"]
            if not isinstance(items, list):
                raise self.error(path, "'prefixItems' must be a list")
            parts = [self.visit(s, f"{name}-{i}", f"{path}/prefixItems/{i}") for i, s in enumerate(items)]
            return self.add(name, f'"[" {self.use("space")} ' + ' "," space '.join(parts) + ' space "]"')
        item = self.visit(schema.get("items", {}), f"{name}-item", f"{path}/items")
        lo, hi = self.counts(schema, "minItems", "maxItems", path)
        self.use("space")
        if hi == 0:
            return self.add(name, '"[" space space "]"')
        more = "" if hi == 1 else f' ("," space {item}){{{max(lo - 1, 0)},{"" if hi is None else hi - 1}}}'
        body = f"{item}{more}"
        return self.add(name, f'"[" space {body if lo > 0 else f"({body})?"} space "]"')

    def string(self, schema: dict[str, Any], name: str, path: str) -> str:
        fmt = schema.get("format")
        if fmt in FORMATS:
            return self.add(name, f'"\\"" {self.use(fmt)} "\\""')
        lo, hi = self.counts(schema, "minLength", "maxLength", path)
        if lo == 0 and hi is None:
            return self.use("string")
        return self.add(name, f'"\\"" {self.use("char")}{{{lo},{"" if hi is None else hi}}} "\\""')

    def counts(self, schema: dict[str, Any], low: str, high: str, path: str) -> tuple[int, int | None]:
        lo, hi = schema.get(low, 0), schema.get(high)
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise self.error(path, f"'{low}' / '{high}' must be integers with {low} <= {high}")
        return lo, hi

    def integer(self, schema: dict[str, Any], name: str, path: str) -> str:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        if xlo is True and _number(lo):  # draft 4: a flag on "minimum"
            xlo, lo = lo, None
        if xhi is True and _number(hi):
            xhi, hi = hi, None
        if _number(xlo):
            lo = math.floor(xlo) + 1 if lo is None else max(lo, math.floor(xlo) + 1)
        if _number(xhi):
            hi = math.ceil(xhi) - 1 if hi is None else min(hi, math.ceil(xhi) - 1)
        if lo is None and hi is None:
            return self.use("integer")
        if any(v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                                  or v != int(v) or abs(v) >= 10**16) for v in (lo, hi)):
            raise self.error(path, "integer bounds must be whole numbers below 10^16 in size")
        lo, hi = (None if lo is None else int(lo)), (None if hi is None else int(hi))
        if lo is not None and hi is not None and lo > hi:
            raise self.error(path, f"no integer lies in [{lo}, {hi}]")
        return self.add(name, f"({int_range(lo, hi)})")

    def convert(self) -> str:
        root = self.visit(self.root, "root", "")
        if root != "root":
            self.rules["root"] = root
        order = ["root"] + sorted(k for k in self.rules if k != "root")
        return "".join(f"{k} ::= {self.rules[k]}\n" for k in order)


def _digits(lo: str, hi: str) -> list[str]:
    """GBNF sequences for the digit strings of one length from ``lo`` to ``hi`` (inclusive)."""
    if not lo:
        return [""]
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" {rest}'.strip() for rest in _digits(lo[1:], hi[1:])]
    n, out = len(lo) - 1, []
    if lo[1:] != "0" * n:  # lo's first digit with the tail from lo up
        out += [f'"{lo[0]}" {rest}'.strip() for rest in _digits(lo[1:], "9" * n)]
        first = int(lo[0]) + 1
    else:
        first = int(lo[0])
    last = int(hi[0]) if hi[1:] == "9" * n else int(hi[0]) - 1
    if first <= last:
        head = f'"{first}"' if first == last else f"[{first}-{last}]"
        out.append(f"{head} [0-9]{{{n}}}" if n else head)
    if hi[1:] != "9" * n:
        out += [f'"{hi[0]}" {rest}'.strip() for rest in _digits("0" * n, hi[1:])]
    return out


def _non_negative(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the integers ``lo..hi`` (``hi`` None: no upper end), ``lo >= 0``."""
    out: list[str] = []
    length = len(str(lo))
    while hi is None or length <= len(str(hi)):
        start = max(lo, 10 ** (length - 1) if length > 1 else 0)
        end = 10**length - 1 if hi is None else min(hi, 10**length - 1)
        if hi is None and start == 10 ** (length - 1) and length > 1:
            out.append(f"[1-9] [0-9]{{{length - 1},15}}")  # every longer number too
            return out
        if start <= end:
            out += _digits(str(start), str(end))
        length += 1
        if hi is None and length > 16:
            break
    return out


def int_range(lo: int | None, hi: int | None) -> str:
    """A GBNF alternation of the integers in ``[lo, hi]`` (either end may be open)."""
    alts: list[str] = []
    if lo is None or lo < 0:  # the negative part: "-" and the magnitudes
        mags = _non_negative(max(1, -hi) if hi is not None and hi < 0 else 1, None if lo is None else -lo)
        alts += [f'"-" {m}' for m in mags]
    if hi is None or hi >= 0:
        alts += _non_negative(max(lo or 0, 0), hi)
        if lo is None or lo < 0:
            alts.append('"-0"')  # JSON's negative zero (as llama.cpp: only where negatives are allowed)
    return " | ".join(alts)


def schema_to_gbnf(schema: Any) -> str:
    """The GBNF grammar for ``schema``; an unsupported or malformed schema is an
    :class:`~nkat_runtime.errors.InvalidRequestError` naming the place."""
    try:
        return _Converter(schema).convert()
    except RecursionError:
        raise InvalidRequestError("json_to_grammar: the schema is nested too deeply", "schema") from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and abs(value) < 10**16
