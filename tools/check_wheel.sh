#!/usr/bin/env bash
# Build the wheel against the installed torch, install it into a fresh venv
# (same torch), and run a smoke test from outside the source tree. The build
# compiles into build/temp.* like every build of this checkout (setup.py): after
# an editable install with the same torch, ninja only links.
# WHEEL_REUSE_TORCH=1: no new venv; the wheel is unpacked into a folder on
# PYTHONPATH in front of the current environment's torch (for machines without
# a package registry, like the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
torch_version=$($PY -c 'import torch; print(torch.__version__.split("+")[0])')
# A wheel build writes its build info into the build directory, never over the one
# an editable install of this checkout reads (that one may be for another torch).
source_info=fast_attn/_build_info.py
info_before=$(stat -c %Y "$source_info" 2>/dev/null || echo absent)
$PY -m build --wheel --no-isolation --outdir "$work/dist" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
info_after=$(stat -c %Y "$source_info" 2>/dev/null || echo absent)
[[ "$info_before" == "$info_after" ]] || { echo "the wheel build rewrote $source_info"; exit 1; }
wheel=$(ls "$work"/dist/fast_attn-*.whl)
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"
if [[ "${WHEEL_REUSE_TORCH:-0}" == 1 ]]; then
  $PY -m pip install -q --no-deps --target "$work/site" "$wheel"
  export PYTHONPATH="$work/site"
  run_python=$PY
else
  $PY -m venv "$work/venv"
  "$work/venv/bin/pip" install -q "torch==$torch_version" "$wheel"
  run_python="$work/venv/bin/python"
fi
cd "$work"
"$run_python" - <<'PY'
import torch
import fast_attn
from fast_attn.reference import reference_attention

assert "site-packages" in fast_attn.__file__ or "/site/" in fast_attn.__file__, fast_attn.__file__
print(fast_attn.__file__)
build = fast_attn._extension.build_info()
print("build info:", {k: build[k] for k in ("version", "torch_version", "cuda_version", "cuda_archs")})
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
q, k, v = (torch.randn(2, 4, 100, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
out = fast_attn.attention(q, k, v, causal=True)
out.float().sum().backward()
expected, _ = reference_attention(q.detach(), k.detach(), v.detach(), causal=True)
error = (out.float() - expected.float()).abs().max().item()
assert error < (3e-2 if dtype == torch.bfloat16 else 1e-4), error
print(f"smoke test on {device}: max error {error:.2e}, grads finite:", all(t.grad.isfinite().all().item() for t in (q, k, v)))
PY
"$run_python" -m fast_attn.info
