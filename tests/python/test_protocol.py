"""The generated wire module (nanotune.wire) against protocol/schema.json, the handlers
against the schema, and the golden vectors in protocol/vectors/ decoded and
re-encoded bit-exactly. (tests/ts/protocol.test.ts checks that wire.py is fresh.)"""
import importlib
import importlib.util
import json
import pathlib

import msgspec
import msgspec.inspect as mi
import pytest

from nanotune import wire
from nanotune.sidecar import dispatch, transport
from nanotune.sidecar.runtime import HANDLER_MODULES, method_modules

for _module in [*HANDLER_MODULES, *method_modules()]:  # what the sidecar loads at start
    importlib.import_module(_module)

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "protocol" / "schema.json").read_text())
VECTORS = ROOT / "protocol" / "vectors"
SAFE_INT = 9007199254740991  # zod's int() bounds, which the Python side leaves out


# ---- a normal form both sides are reduced to -----------------------------------


def json_bounds(s: dict) -> str:
    names = {"minimum": "ge", "exclusiveMinimum": "gt", "maximum": "le", "exclusiveMaximum": "lt", "minLength": "min_length"}
    out = [f"{names[k]}={float(v):g}" for k, v in s.items() if k in names and abs(v) != SAFE_INT]
    return f"[{','.join(sorted(out))}]" if out else ""


def py_bounds(t: mi.Type) -> str:
    out = [f"{k}={float(getattr(t, k)):g}" for k in ("ge", "gt", "le", "lt", "min_length") if getattr(t, k, None) is not None]
    return f"[{','.join(sorted(out))}]" if out else ""


def drop_null(norm: str) -> str:
    """An optional field: absent and null read the same (msgspec's `X | None = None`
    takes both and omit_defaults never sends the null)."""
    return "|".join(x for x in norm.split("|") if x != "null") if norm != "null" else norm


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
        return "int" + json_bounds(s)
    if t == "number":
        return "float" + json_bounds(s)
    if t == "string":
        return "str" + json_bounds(s)
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
        fields = ",".join(f"{k}{'' if k in req else '?'}:{norm_json(v) if k in req else drop_null(norm_json(v))}"
                          for k, v in sorted(s["properties"].items()))
        return "{" + fields + "}"
    raise AssertionError(f"schema.json node not understood: {s}")


def norm_py(t: mi.Type, inline_tensor_ref: bool = False) -> str:
    if isinstance(t, mi.UnionType):
        return "|".join(sorted(norm_py(x) for x in t.types))
    if isinstance(t, mi.AnyType):
        return "any"
    if isinstance(t, mi.StructType):
        if t.cls is wire.TensorRef and not inline_tensor_ref:
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
    if isinstance(t, (mi.IntType, mi.FloatType, mi.StrType)):
        return {mi.IntType: "int", mi.FloatType: "float", mi.StrType: "str"}[type(t)] + py_bounds(t)
    simple = {mi.BoolType: "bool", mi.NoneType: "null", mi.DictType: "dict"}
    if type(t) in simple:
        return simple[type(t)]
    if isinstance(t, mi.ListType):
        return f"list[{norm_py(t.item_type)}]"
    if isinstance(t, mi.TupleType):
        return "tuple[" + ",".join(norm_py(x) for x in t.item_types) + "]"
    raise AssertionError(f"msgspec type not understood: {t}")


def test_every_schema_method_has_exactly_one_handler_bound_to_its_wire_types():
    assert sorted(wire.METHODS) == sorted(SCHEMA["methods"])
    assert dispatch.unhandled() == []  # a second handler for a method raises when it registers
    for name, spec in wire.METHODS.items():
        m = dispatch.METHODS[name]
        assert (m.params, m.result, m.thread) == (spec.params, spec.result, spec.thread), name


def test_a_handler_cannot_disagree_with_the_schema():
    with pytest.raises(TypeError, match="come from there"):
        dispatch.method("ping", params=wire.DebugBusyParams)
    with pytest.raises(ValueError, match="two handlers"):
        dispatch.method("ping")(lambda ctx, p: None)
    with pytest.raises(TypeError, match="not in protocol/schema.ts"):
        dispatch.method("no.such.method")


@pytest.mark.parametrize("name", sorted(SCHEMA["methods"]))
def test_method_params_and_result_match_the_schema(name):
    spec, js = wire.METHODS[name], SCHEMA["methods"][name]
    assert spec.thread == js["thread"], f"{name}: thread"
    assert norm_py(mi.type_info(spec.params)) == norm_json(js["params"]), f"{name}: params"
    assert norm_py(mi.type_info(spec.result)) == norm_json(js["result"]), f"{name}: result"


def test_events_match_the_schema():
    assert sorted(wire.EVENTS) == sorted(SCHEMA["events"]) == sorted(dispatch.EVENTS)
    for name, cls in wire.EVENTS.items():
        assert norm_py(mi.type_info(cls)) == norm_json(SCHEMA["events"][name]), name


def test_envelope_tensor_ref_error_codes_and_version_match():
    assert wire.PROTOCOL_VERSION == SCHEMA["protocolVersion"]
    assert sorted(wire.ERROR_CODES) == sorted(SCHEMA["errorCodes"])
    assert {k for k, v in vars(wire.ErrorCode).items() if k.isupper()} == set(SCHEMA["errorCodes"])
    assert norm_py(mi.type_info(wire.TensorRef), inline_tensor_ref=True) == norm_json({**SCHEMA["envelope"]["tensorRef"], "title": None})
    assert sorted(wire.DTYPES) == sorted(SCHEMA["dtypes"])
    req = SCHEMA["envelope"]["request"]
    assert set(req["required"]) == {f.name for f in mi.type_info(transport.Request).fields if f.required}


def test_the_normal_form_notices_a_mismatch():
    class Wrong(wire.Model):
        seconds: int  # schema says number

    class Unbounded(wire.Model):
        seconds: float  # schema says >= 0
        tick_every_s: float | None = msgspec.field(default=None, name="tickEveryS")
        cooperative: bool | None = None

    busy = norm_json(SCHEMA["methods"]["debug.busy"]["params"])
    assert norm_py(mi.type_info(Wrong)) != busy
    assert norm_py(mi.type_info(Unbounded)) != busy
    assert norm_py(mi.type_info(wire.DebugBusyParams)) == busy


def test_decoding_checks_the_schemas_constraints():
    for params, field in [({"lr": -1}, "params.lr"), ({"lr": 1e-3, "microBatch": 0}, "params.microBatch"),
                          ({"lr": 1e-3, "mask": {"criterion": "big", "density": 0.1}}, "params.mask.criterion"),
                          ({"lr": 1e-3, "mask": {"criterion": "random", "density": 0}}, "params.mask.density")]:
        with pytest.raises(dispatch.NanotuneError) as e:
            dispatch.decode_params("train_step", msgspec.msgpack.encode(params))
        assert e.value.code == "INVALID_PARAMS" and e.value.data == {"field": field}, params


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
        req = msgspec.msgpack.decode(py_bytes, type=transport.Request)
        dispatch.decode_params(req.method, req.params)
    elif kind.startswith("reply:") and kind != "reply:error":
        msgspec.convert(value["result"], wire.METHODS[kind.split(":", 1)[1]].result)
    elif kind == "reply:error":
        err = msgspec.convert(value, transport.Error)
        assert err.error.code in wire.ERROR_CODES
    elif kind == "event":
        msgspec.convert(value["data"], wire.EVENTS[value["event"]])
    else:
        raise AssertionError(f"unknown vector kind {kind}")
