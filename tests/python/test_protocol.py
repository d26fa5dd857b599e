"""The Python models against protocol/schema.json (generated from protocol/schema.ts),
and the golden vectors in protocol/vectors/ decoded and re-encoded bit-exactly."""
import importlib
import importlib.util
import json
import pathlib

import msgspec
import msgspec.inspect as mi
import pytest

from nanotune.sidecar import protocol as P
from nanotune.sidecar.registry import EVENTS, METHODS
from nanotune.sidecar.server import Server, _method_modules  # noqa: F401  (imports the builtin methods)

for _module in _method_modules():  # and the method modules the sidecar loads at start
    importlib.import_module(_module)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "protocol" / "schema.json").read_text())
VECTORS = ROOT / "protocol" / "vectors"


# ---- a normal form both sides are reduced to -----------------------------------


def norm_json(s: dict) -> str:
    if "anyOf" in s:
        return "|".join(sorted(norm_json(x) for x in s["anyOf"]))
    if not s:
        return "any"
    if s.get("title") == "TensorRef":
        return "TensorRef"
    if "const" in s:
        return f"const({s['const']!r})"
    t = s.get("type")
    if isinstance(t, list):  # {"type": ["number", "null"]}: zod's nullable scalars
        return "|".join(sorted(norm_json({**s, "type": x}) for x in t))
    if "enum" in s:
        return "enum(" + ",".join(sorted(map(str, s["enum"]))) + ")"
    if t == "integer":
        return "int"
    if t == "number":
        return "float"
    if t == "string":
        return "str"
    if t == "boolean":
        return "bool"
    if t == "null":
        return "null"
    if t == "array" and "prefixItems" in s:
        return "tuple[" + ",".join(norm_json(x) for x in s["prefixItems"]) + "]"
    if t == "array":
        return f"list[{norm_json(s['items'])}]"
    if t == "object":
        if "properties" not in s:
            return "dict"
        req = set(s.get("required", []))
        fields = ",".join(f"{k}{'' if k in req else '?'}:{norm_json(v)}" for k, v in sorted(s["properties"].items()))
        return "{" + fields + "}"
    raise AssertionError(f"schema.json node not understood: {s}")


def norm_py(t: mi.Type, inline_tensor_ref: bool = False) -> str:
    if isinstance(t, mi.UnionType):
        return "|".join(sorted(norm_py(x) for x in t.types))
    if isinstance(t, mi.AnyType):
        return "any"
    if isinstance(t, mi.StructType):
        if t.cls is P.TensorRef and not inline_tensor_ref:
            return "TensorRef"
        parts = []
        for f in sorted(t.fields, key=lambda f: f.encode_name):
            ft = norm_py(f.type)
            if not f.required and f.default is None and "null" in ft.split("|") and ft != "null":
                ft = "|".join(x for x in ft.split("|") if x != "null")  # `X | None = None` is zod's `X.optional()`
            parts.append(f"{f.encode_name}{'' if f.required else '?'}:{ft}")
        return "{" + ",".join(parts) + "}"
    if isinstance(t, mi.LiteralType):
        return "enum(" + ",".join(sorted(map(str, t.values))) + ")"
    simple = {mi.IntType: "int", mi.FloatType: "float", mi.StrType: "str", mi.BoolType: "bool", mi.NoneType: "null", mi.DictType: "dict"}
    if type(t) in simple:
        return simple[type(t)]
    if isinstance(t, mi.ListType):
        return f"list[{norm_py(t.item_type)}]"
    if isinstance(t, mi.TupleType):
        return "tuple[" + ",".join(norm_py(x) for x in t.item_types) + "]"
    raise AssertionError(f"msgspec type not understood: {t}")


def test_method_names_match_the_schema():
    assert sorted(METHODS) == sorted(SCHEMA["methods"])


@pytest.mark.parametrize("name", sorted(SCHEMA["methods"]))
def test_method_params_and_result_match_the_schema(name):
    m, spec = METHODS[name], SCHEMA["methods"][name]
    assert m.thread == spec["thread"], f"{name}: thread"
    assert norm_py(mi.type_info(m.params)) == norm_json(spec["params"]), f"{name}: params"
    assert m.result is not None, f"{name}: register its result Struct"
    assert norm_py(mi.type_info(m.result)) == norm_json(spec["result"]), f"{name}: result"


def test_events_match_the_schema():
    assert sorted(EVENTS) == sorted(SCHEMA["events"])
    for name, cls in EVENTS.items():
        assert norm_py(mi.type_info(cls)) == norm_json(SCHEMA["events"][name]), name


def test_envelope_tensor_ref_error_codes_and_version_match():
    assert P.PROTOCOL_VERSION == SCHEMA["protocolVersion"]
    assert sorted(P.ERROR_CODES) == sorted(SCHEMA["errorCodes"])
    assert norm_py(mi.type_info(P.TensorRef), inline_tensor_ref=True) == norm_json({**SCHEMA["envelope"]["tensorRef"], "title": None})
    assert sorted(P.DType.__args__) == sorted(SCHEMA["dtypes"])
    req = SCHEMA["envelope"]["request"]
    assert set(req["required"]) == {f.name for f in mi.type_info(P.Request).fields if f.required}


def test_the_normal_form_notices_a_mismatch():
    class Wrong(P.Model):
        seconds: int  # schema says number

    assert norm_py(mi.type_info(Wrong)) != norm_json(SCHEMA["methods"]["debug.busy"]["params"])


# ---- golden vectors ---------------------------------------------------------------


def _load_vector_generator():
    # from_json (the "$bigint" convention of the vectors' .json files) lives in
    # protocol/vectors/generate.py, which writes the .msgpack files; use that one.
    spec = importlib.util.spec_from_file_location("vector_generate", VECTORS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


from_json = _load_vector_generator().from_json


VECTOR_NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))


def test_there_are_vectors():
    assert len(VECTOR_NAMES) >= 8


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_vector_decodes_and_reencodes_bit_exact(name):
    spec = json.loads((VECTORS / f"{name}.json").read_text())
    value = from_json(spec["value"])
    py_bytes = (VECTORS / f"{name}.msgpack").read_bytes()
    assert msgspec.msgpack.decode(py_bytes) == value
    assert msgspec.msgpack.encode(msgspec.msgpack.decode(py_bytes)) == py_bytes
    ts_file = VECTORS / f"{name}.ts.msgpack"
    if ts_file.exists():  # what the TS client writes (Note [integers] in the README)
        assert msgspec.msgpack.decode(ts_file.read_bytes()) == value
    # and the value is a valid message of its kind for the Python models
    kind = spec["kind"]
    if kind == "request":
        req = msgspec.msgpack.decode(py_bytes, type=P.Request)
        METHODS[req.method].decoder.decode(req.params)
    elif kind.startswith("reply:") and kind != "reply:error":
        msgspec.convert(value["result"], METHODS[kind.split(":", 1)[1]].result)
    elif kind == "reply:error":
        err = msgspec.convert(value, P.Error)
        assert err.error.code in P.ERROR_CODES
    elif kind == "event":
        msgspec.convert(value["data"], EVENTS[value["event"]])
    else:
        raise AssertionError(f"unknown vector kind {kind}")
