#!/usr/bin/env bash
# Build the wheel against the installed torch, install it into a fresh venv
# (same torch), and run a smoke test from outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
mkdir -p "$work"
torch_version=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
python -m build --wheel --no-isolation --outdir "$work/dist" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/fast_attn-*.whl)
echo "wheel: $(basename "$wheel"), $(du -k "$wheel" | cut -f1) KiB"
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==$torch_version" "$wheel"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import torch
import fast_attn
from fast_attn.reference import reference_attention

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
"$work/venv/bin/python" -m fast_attn.info
