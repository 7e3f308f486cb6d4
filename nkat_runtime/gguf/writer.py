"""Write a GGUF file derived from another: every key/value and tensor copied byte for byte,
some tensors replaced or added, some keys added. Temp file beside the target, then rename:
an interrupted write leaves no half file under the final name."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..fsutil import publish, temp_beside
from .reader import GGUFFile

# key -> (value, GGUFValueType, element GGUFValueType for arrays or None)
ExtraKV = Mapping[str, tuple[Any, Any, Any]]
# name -> (numpy array, GGMLQuantizationType or None for plain float/int arrays)
NewTensors = Mapping[str, tuple[np.ndarray, Any]]


def write_derived_gguf(
    src: GGUFFile,
    output: Path,
    extra_kv: ExtraKV | None = None,
    replace: NewTensors | None = None,
    add: NewTensors | None = None,
    drop: Callable[[str], bool] = lambda name: False,
    progress: bool = False,
) -> None:
    import gguf

    replace, add, extra_kv = replace or {}, add or {}, extra_kv or {}
    tmp = temp_beside(output)
    try:
        w = gguf.GGUFWriter(str(tmp), src.architecture)
        w.data_alignment = src.alignment
        for key, value in src.metadata.items():
            if key == "general.architecture" or key in extra_kv or drop(key):
                continue
            vtype, elem = src.value_types[key]
            w.add_key_value(key, value, gguf.GGUFValueType(vtype),
                            sub_type=gguf.GGUFValueType(elem) if elem is not None else None)
        for key, (value, vtype, elem) in extra_kv.items():
            w.add_key_value(key, value, vtype, sub_type=elem)
        for name, t in src.tensors.items():
            if drop(name):
                continue
            if name in replace:
                data, qtype = replace[name]
                w.add_tensor(name, data, raw_dtype=qtype)
                continue
            rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
            raw = t.raw.reshape(*t.shape[:-1], t.nbytes // rows)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(t.qtype))
        for name, (data, qtype) in add.items():
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        publish(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
