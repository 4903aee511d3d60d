"""tools/triton_ptx_compare.py: what counts as the same generated code."""

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "triton_ptx_compare", Path(__file__).resolve().parent.parent / "tools" / "triton_ptx_compare.py"
)
ptx_compare = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ptx_compare)

PTX = """
\t.reg .b32 \t%r<12>;
\t.loc\t1 20 5
\tadd.s32 \t%r3, %r1, %r2;  // a comment
$L__BB0_1:
\tmul.lo.s32 \t%r4, %r3, 7;
\t.section\t.debug_abbrev
\t.b8 1                                   // DW_CHILDREN_yes
"""


def test_instructions_drop_debug_data_and_locations():
    assert ptx_compare.instructions(PTX) == ["add.s32 \t%r3, %r1, %r2;", "mul.lo.s32 \t%r4, %r3, 7;"]


def test_compare_tells_renamed_reordered_and_changed_code(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    original = ["add.s32 \t%r3, %r1, %r2;", "mul.lo.s32 \t%r4, %r3, 7;"]
    versions = {
        "same": original,
        "renamed": ["add.s32 \t%r5, %r1, %r2;", "mul.lo.s32 \t%r6, %r5, 7;"],
        "reordered": original[::-1],
        "changed": ["add.s32 \t%r3, %r1, %r2;", "mul.lo.s32 \t%r4, %r3, 8;"],
    }
    for name, lines in versions.items():
        (before / f"{name}.ptx").write_text("\n".join(original))
        (after / f"{name}.ptx").write_text("\n".join(lines))
    assert ptx_compare.compare(before, after) == 2  # "reordered" and "changed"
