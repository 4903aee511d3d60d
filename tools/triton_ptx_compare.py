"""Check that a change to the Triton kernels leaves the generated code alone, without a GPU.

Compiles every case of tests/test_triton_compile.py for sm_80 and sm_90 (triton.compile
with a GPUTarget) and keeps each kernel's PTX instruction stream, without debug data.
Two dumps, before and after a change, compare instruction by instruction; a kernel
whose instructions are the same (up to register names) runs the same on the GPU.
Exit status 1 when some kernel's instructions differ or come in another order.

    python tools/triton_ptx_compare.py dump /tmp/ptx-before     # at the old commit
    python tools/triton_ptx_compare.py dump /tmp/ptx-after      # with the change
    python tools/triton_ptx_compare.py compare /tmp/ptx-before /tmp/ptx-after
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SKIPPED_PREFIXES = (
    ".loc",
    ".file",
    "//",
    ".reg",
    ".b8",
    ".b16",
    ".b32",
    ".b64",
    ".section",
    "{",
    "}",
    "$L__",
)


def instructions(ptx: str) -> list[str]:
    """The PTX's instruction lines, without debug data, locations and comments."""
    lines = []
    for line in ptx.splitlines():
        line = line.strip()
        if line and not line.startswith(_SKIPPED_PREFIXES) and "DW_" not in line:
            lines.append(line.split("//")[0].strip())
    return lines


def without_register_names(lines: list[str]) -> list[str]:
    return [re.sub(r"\$L__BB\d+_\d+", "$L", re.sub(r"%([a-z]+)\d+", r"%\1", line)) for line in lines]


def dump(folder: Path) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    # This checkout's kernels, not those of a fast_attn installed elsewhere (an editable install
    # of another worktree would otherwise be imported, and its code dumped).
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import test_triton_compile as cases
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for kind, name, capability in cases.CASE_IDS:
        torch.manual_seed(0)
        case = cases.make_case(kind, name)
        kernel, args, constexprs, warps, stages, _ = cases._kernel_launch(kind, case, capability, name)
        compiled = cases.compile_for_target(kernel, args, constexprs, capability, warps, stages)
        (folder / f"{kind}-{name}-{capability}.ptx").write_text("\n".join(instructions(compiled.asm["ptx"])))
        print(f"{kind} {name} sm_{capability}", flush=True)


def compare(before: Path, after: Path) -> int:
    differing = 0
    for path in sorted(before.glob("*.ptx")):
        old, new = path.read_text().splitlines(), (after / path.name).read_text().splitlines()
        if old == new:
            verdict = "identical"
        elif without_register_names(old) == without_register_names(new):
            verdict = "identical up to register names"
        elif sorted(without_register_names(old)) == sorted(without_register_names(new)):
            verdict = "REORDERED (the same instructions in another order)"
            differing += 1
        else:
            verdict = f"DIFFERENT ({len(old)} -> {len(new)} instructions)"
            differing += 1
        print(f"{path.stem:<48} {verdict}")
    return differing


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "dump":
        dump(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(1 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    else:
        sys.exit(__doc__)
