"""The candidate tables of benchmarks/cuda_tile_sweep.py: variant 0 is what
csrc/cuda/tile_configs.h releases, every candidate keeps the kernels' shape rules,
and the overrides header it writes names every candidate (and goes away)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cuda_tile_sweep", ROOT / "benchmarks" / "cuda_tile_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)


def released(function: str) -> dict[int, tuple]:
    """{head_dim: config tuple} of one constexpr function of tile_configs.h."""
    text = (ROOT / "csrc" / "cuda" / "tile_configs.h").read_text()
    body = text[text.index(f"{function}(int head_dim)") :]
    body = body[: body.index("default:")]
    configs = {}
    for head_dim, values in re.findall(r"case (\d+): return \{([^}]*)\};", body):
        fields = [v.strip() for v in values.split(",")]
        configs[int(head_dim)] = tuple(f == "true" if f in ("true", "false") else int(f) for f in fields)
    return configs


def test_variant_zero_is_the_released_configuration():
    forward, dkdv = released("forward_tile_config"), released("dkdv_tile_config")
    for head_dim in sweep.FORWARD_CANDIDATES:
        assert sweep.FORWARD_CANDIDATES[head_dim][0] == forward[head_dim]
        assert sweep.DKDV_CANDIDATES[head_dim][0] == dkdv[head_dim]
        assert len(sweep.FORWARD_CANDIDATES[head_dim]) == len(sweep.DKDV_CANDIDATES[head_dim])


def test_candidates_keep_the_kernels_shape_rules():
    for candidates in sweep.FORWARD_CANDIDATES.values():
        for block_m, block_n, warps, min_blocks, _, m_tiles in candidates:
            assert block_m == 16 * m_tiles * warps and block_n % 16 == 0 and warps * 32 * min_blocks <= 1024
    for head_dim, candidates in sweep.DKDV_CANDIDATES.items():
        for block_n, block_m, chunk_m, warps, split, _, _ in candidates:
            assert block_n == 16 * warps // split and block_m % chunk_m == 0 and chunk_m % 16 == 0
            assert chunk_m <= 64 and block_m <= 32 * warps and head_dim // split % 16 == 0


def test_overrides_header_names_every_candidate_and_goes_away(monkeypatch, tmp_path):
    header = tmp_path / "tile_overrides.h"
    monkeypatch.setattr(sweep, "OVERRIDES", header)
    dims = sorted(sweep.FORWARD_CANDIDATES)
    for variant in range(1, len(sweep.FORWARD_CANDIDATES[dims[0]])):
        sweep.write_overrides(variant, dims)
        text = header.read_text()
        for head_dim in dims:
            assert (
                f"if (head_dim == {head_dim}) return {sweep._cpp(sweep.FORWARD_CANDIDATES[head_dim][variant])};"
                in text
            )
            assert (
                f"if (head_dim == {head_dim}) return {sweep._cpp(sweep.DKDV_CANDIDATES[head_dim][variant])};"
                in text
            )
    sweep.write_overrides(0, dims)
    assert not header.exists()
