"""Write fast_attn/measured_order.py, the GPU problems on which "auto" asks the C++ CUDA kernels
before Triton, from the records of a fast_attn.bench run on a GPU (its results.json).

    python tools/measured_order.py RESULTS.json [RESULTS.json ...] [--capability sm_90] \
        [--out fast_attn/measured_order.py]

A key (compute capability, dtype, head dim, causal, "fwd" | "fwd_bwd") is listed when
fast_attn:cuda's median is below fast_attn:triton's at every shape measured for it, and each
of the two has a measurement at each of them: "auto" decides without the sequence length, so a
key that CUDA wins at some lengths only stays with Triton. "fwd_bwd" (a call with a gradient)
compares a shape's forward plus backward medians (the bench's "fwd" and "bwd" modes), or its
"fwd_bwd" median where the run measured that mode. Only records of calls without a bias or a
window count (the calls that consult the table: dispatch.measured_key).
Records name their card's capability (fast_attn.bench writes it); --capability supplies it for
older ones, which do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA, TRITON = "fast_attn:cuda", "fast_attn:triton"
KEY_FIELDS = ("capability", "dtype", "head_dim", "causal", "mode")  # dispatch.measured_key's order
SHAPE_FIELDS = ("batch", "heads", "seqlen")

HEADER = '''"""The GPU problems on which "auto" asks the C++ CUDA kernels before Triton (dispatch.auto_order):
where fast_attn.bench measured them faster at every sequence length it ran, forward only ("fwd",
calls without a gradient) or forward plus backward ("fwd_bwd"). Written by the command in
GENERATED_BY; regenerate it from a new GPU run instead of editing it.

A key: (compute capability, dtype, head dim, causal, mode). Calls with a bias, key mask, dropout,
window, softcap, ALiBi, sinks or packed sequences never consult it (the bench measures none).
"""
'''


def load_records(paths: list[Path], capability: str | None) -> list[dict]:
    """plain_records of every results file."""
    return [
        r for path in paths for r in plain_records(json.loads(path.read_text())["records"], capability, path)
    ]


def plain_records(records: list[dict], capability: str | None, source: object = "records") -> list[dict]:
    """The records of the two fast_attn GPU backends on plain problems, each with its card's capability
    (`capability` for those without one)."""
    plain = []
    for record in records:
        if record["device_type"] != "cuda" or record["implementation"] not in (CUDA, TRITON):
            continue
        if record["bias"] != "none" or record.get("window") is not None:
            continue
        record_capability = record.get("capability") or capability
        if record_capability is None:
            raise ValueError(f"{source}: a record of {record['card']} names no capability; pass --capability")
        plain.append({**record, "capability": record_capability})
    return plain


def medians_by_shape(records: list[dict]) -> dict[tuple, dict[str, float | None]]:
    """(key, shape) -> {implementation: median ms, None where it failed}, keys as KEY_FIELDS and shapes as
    SHAPE_FIELDS; a shape's "fwd_bwd" from its "fwd" plus "bwd" medians unless the run measured it."""
    measured: dict[tuple, dict[str, float | None]] = defaultdict(dict)
    for r in records:
        key, shape = tuple(r[f] for f in KEY_FIELDS), tuple(r[f] for f in SHAPE_FIELDS)
        measured[key, shape][r["implementation"]] = r["median_ms"]
    table = {(key, shape): medians for (key, shape), medians in measured.items() if key[4] != "bwd"}
    for (key, shape), forward in measured.items():
        backward = measured.get(((*key[:4], "bwd"), shape))
        if key[4] == "fwd" and backward is not None:
            both = {name: _sum(forward.get(name), backward.get(name)) for name in (CUDA, TRITON)}
            table.setdefault(((*key[:4], "fwd_bwd"), shape), both)
    return table


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def cuda_faster_keys(records: list[dict]) -> list[tuple]:
    """The keys at whose every measured shape the CUDA kernels beat Triton."""
    wins: dict[tuple, bool] = {}
    for (key, _), medians in medians_by_shape(records).items():
        cuda, triton = medians.get(CUDA), medians.get(TRITON)
        wins[key] = wins.get(key, True) and cuda is not None and triton is not None and cuda < triton
    return sorted(key for key, won in wins.items() if won)


def _literal(values: tuple) -> str:
    """A tuple of str, int and bool as ruff format writes it (double quotes)."""
    items = [json.dumps(v) if isinstance(v, str) else repr(v) for v in values]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def module_text(keys: list[tuple], command: str) -> str:
    lines = [HEADER, f"GENERATED_BY = {json.dumps(command)}"]
    if keys:
        lines += [
            "CUDA_FASTER = frozenset(",
            "    {",
            *(f"        {_literal(key)}," for key in keys),
            "    }",
            ")",
        ]
    else:
        lines.append("CUDA_FASTER = frozenset()")
    return "\n".join(lines) + "\n"


def _from_root(path: Path) -> str:
    resolved = path.resolve()
    return resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", nargs="+", type=Path, help="fast_attn.bench results.json files of one GPU run"
    )
    parser.add_argument("--capability", help='for records without one, e.g. "sm_90"')
    parser.add_argument("--out", type=Path, default=ROOT / "fast_attn" / "measured_order.py")
    args = parser.parse_args(argv)
    keys = cuda_faster_keys(load_records(args.results, args.capability))
    command = ["python tools/measured_order.py", *map(_from_root, args.results)]
    if args.capability:
        command += ["--capability", args.capability]
    args.out.write_text(module_text(keys, " ".join(command)))
    print(f"{args.out}: {len(keys)} keys where the CUDA kernels measured faster", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
