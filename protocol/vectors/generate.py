"""Writes <name>.msgpack for every <name>.json here, as the sidecar encodes it (msgspec)."""
import json
import pathlib

import msgspec


def from_json(v):
    if isinstance(v, dict):
        if set(v) == {"$bigint"}:
            return int(v["$bigint"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


if __name__ == "__main__":
    here = pathlib.Path(__file__).parent
    for path in sorted(here.glob("*.json")):
        value = from_json(json.loads(path.read_text())["value"])
        path.with_suffix(".msgpack").write_bytes(msgspec.msgpack.encode(value))
        print("wrote", path.with_suffix(".msgpack").name)
