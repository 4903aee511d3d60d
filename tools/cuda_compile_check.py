#!/usr/bin/env python3
"""Compile every CUDA kernel translation unit and check ptxas's resource report.

Each csrc/cuda/*.cu and csrc/cuda/instantiations/*.cu is compiled with
`nvcc -c -Xptxas -v`, once for all the archs of csrc/cuda/build_matrix.json (8.0
as sm_80, 9.0 as sm_90a: one host compile, one device compile per arch) with the
flags the builds give nvcc (the matrix's nvcc_flags, plus torch's default CUDA
extension flags when torch is importable), in parallel. The run fails (exit status 1) on:
  - a compile error,
  - spill stores or loads, a stack frame or cumulative stack (local memory),
    unless the kernel is listed in INTENDED_LOCAL_MEMORY with the reason,
  - dynamic shared memory above what the arch allows one CTA,
  - registers x threads of one CTA above the SM's register file.
It writes csrc/cuda/PTXAS_REPORT.md: per kernel and arch, registers, spills,
stack, shared memory, threads and the CTAs per SM they allow; and, for the forward
and dK/dV kernels of SASS_UNITS, the SASS instruction counts of their main loops
(sass_loops: the cubins disassembled by the cuobjdump and nvdisasm found on PATH,
else those that ship with Triton).

Dynamic shared memory and threads per CTA come from the kernels' own traits:
a small host program including the kernel headers prints them.

    python tools/cuda_compile_check.py [--jobs N] [--report PATH | --no-report]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
DEFAULT_REPORT = CUDA_DIR / "PTXAS_REPORT.md"
BUILD_MATRIX = json.loads((CUDA_DIR / "build_matrix.json").read_text())


@dataclass(frozen=True)
class Arch:
    name: str
    gencode: str
    max_dynamic_smem: int  # per CTA, with the opt-in attribute
    smem_per_sm: int
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048


# What each arch of the build matrix is compiled for here, with its limits.
ARCH_TARGETS = {
    "8.0": Arch("sm_80", "arch=compute_80,code=sm_80", max_dynamic_smem=166912, smem_per_sm=167936),
    "9.0": Arch("sm_90a", "arch=compute_90a,code=sm_90a", max_dynamic_smem=232448, smem_per_sm=233472),
}

# Kernels allowed a stack frame or spills, each with why (any other byte of local memory is a
# finding).
INTENDED_LOCAL_MEMORY: dict[str, str] = {
    f"backward_dkdv<{dtype}, {variant}, deterministic>": (
        "deterministic mode's dq (the loop over the split's key blocks, read-modify-writes of its "
        "partial sums) in kernels at 253-255 registers: 4-44 bytes spilled on sm_80 or sm_90a around "
        "the step's dq code, none inside the main loop (issue 15 step 5)"
    )
    for dtype in ("bf16", "fp16")
    for variant in (
        "128",
        "128, varlen",
        "128, dbias",
        "128, modifiers",
        "128, modifiers, varlen",
        "256, varlen",
        "256, dbias",
        "256, modifiers",
        "256, modifiers, varlen",
    )
}

INTENDED_LOCAL_MEMORY.update(
    {
        f"backward_dkdv_staged<{dtype}, {head_dim}, {path}{deterministic}>": (
            "the staged dK/dV kernels (FlashAttention-2's backward dataflow) hold dK and dV (64 or 128 "
            "floats per thread) with P^T and dP^T (32 + 32 or 64 + 64) at 255 registers: ptxas spills "
            "0-24 bytes (D 64: 8-24; D 128: 0-16), no LDL inside the loop over "
            "the steps; FlashAttention-2's own backward "
            "spills 4 (D 128) to 64 (D 64) bytes on sm_90a (issue 15 step 5)"
        )
        for dtype in ("bf16", "fp16")
        for head_dim in (64, 128)
        for path in ("fast", "causal")
        for deterministic in ("", ", deterministic")
    }
)

# The units whose forward and dK/dV kernels (paths fast, causal, general) get SASS loop counts: the
# forward at D 64 and 128, the backward at every head dim of the staged dK/dV kernel.
SASS_UNITS = tuple(
    f"{kind}_hdim{head_dim}_{dtype}"
    for kind, head_dims in (("forward", (64, 128)), ("backward", (32, 64, 96, 128)))
    for head_dim in head_dims
    for dtype in ("fp16", "bf16")
)
SASS_KERNELS = ("forward", "backward_dkdv", "backward_dkdv_staged")
# SASS opcodes counted per loop (by their name before the first '.'); FP32 sums the float ALU ones.
SASS_COUNTED = ("HMMA", "LDSM", "MUFU", "BAR", "STS")
SASS_RED = ("RED", "REDG")  # float atomics: RED on sm_80, REDG on sm_90
SASS_FP32 = ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP")

# The kernels' traits, each with its template arguments after the element type and head dim, one
# tuple per instantiation (ForwardTraits: kSpecialized, the kFast / kCausal kernels' tile or not;
# DkdvStagedTraits: the staged dK/dV kernels', at the head dims TRAITS_AT names).
TRAITS = {
    "ForwardTraits": (", true", ", false"),
    "DkdvTraits": ("",),
    "DkdvStagedTraits": ("",),
    "DbiasTraits": ("",),
    "DecodeTraits": ("",),
}
# Traits that exist at some head dims only: the C++ condition (of head_dim) under which they do.
TRAITS_AT = {"DkdvStagedTraits": "dkdv_staged({head_dim})"}
HEAD_DIMS = tuple(BUILD_MATRIX["head_dims"])
ELEMENTS = tuple(dtype["cuda_type"] for dtype in BUILD_MATRIX["dtypes"])


@dataclass
class KernelReport:
    mangled: str
    arch: str
    registers: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    cumulative_stack: int = 0
    static_smem: int = 0
    name: str = ""
    traits: str | None = None


@dataclass
class SassLoop:
    """One loop of a kernel's SASS: the instructions from its head label to its backward branch."""

    head: int  # address of the first instruction
    end: int  # address of the backward branch
    opcodes: list[str]

    def count(self, *names: str) -> int:
        return sum(1 for opcode in self.opcodes if opcode in names)


@dataclass
class CompileResult:
    source: Path
    arch: Arch
    returncode: int
    output: str
    kernels: list[KernelReport] = field(default_factory=list)
    loops: dict[str, list[SassLoop]] = field(default_factory=dict)  # mangled kernel name -> its main loops


def matrix_archs() -> list[Arch]:
    """The targets of the build matrix's archs."""
    unknown = [arch for arch in BUILD_MATRIX["archs"] if arch not in ARCH_TARGETS]
    if unknown:
        raise SystemExit(f"cuda_compile_check: ARCH_TARGETS has no target and limits for the archs {unknown}")
    return [ARCH_TARGETS[arch] for arch in BUILD_MATRIX["archs"]]


def torch_nvcc_flags() -> list[str]:
    """The flags torch's CUDAExtension puts before the project's (empty without torch)."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return []
    return list(getattr(cpp_extension, "COMMON_NVCC_FLAGS", []))


def nvcc_command(nvcc: str, flags: list[str], source: Path, archs: list[Arch], output: Path) -> list[str]:
    gencodes = [option for arch in archs for option in ("-gencode", arch.gencode)]
    return [
        nvcc,
        "-c",
        "-std=c++17",
        *flags,
        f"-I{ROOT / 'csrc'}",
        *gencodes,
        "-Xptxas",
        "-v",
        str(source),
        "-o",
        str(output),
    ]


ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
PROPERTIES = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
CUMULATIVE = re.compile(r"(\d+) bytes cumulative stack size")
SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(output: str) -> dict[str, list[KernelReport]]:
    """{arch name: its kernels' reports} from one nvcc run's ptxas output (ptxas reports one arch
    after the other, each entry function under a line naming the arch)."""
    kernels: dict[tuple[str, str], KernelReport] = {}
    current: KernelReport | None = None
    pending_properties: tuple[str, str] | None = None
    for line in output.splitlines():
        if match := ENTRY.search(line):
            key = (match.group(2), match.group(1))
            current = kernels.setdefault(key, KernelReport(match.group(1), match.group(2)))
        elif (match := PROPERTIES.search(line)) and current is not None:
            pending_properties = (current.arch, match.group(1))
        elif (match := FRAME.search(line)) and pending_properties in kernels:
            report = kernels[pending_properties]
            report.stack_frame, report.spill_stores, report.spill_loads = map(int, match.groups())
            pending_properties = None
        elif (match := USED.search(line)) and current is not None:
            current.registers = int(match.group(1))
            if cumulative := CUMULATIVE.search(line):
                current.cumulative_stack = int(cumulative.group(1))
            if smem := SMEM.search(line):
                current.static_smem = int(smem.group(1))
    by_arch: dict[str, list[KernelReport]] = {}
    for report in kernels.values():
        by_arch.setdefault(report.arch, []).append(report)
    return by_arch


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines()))


# The template arguments after each kernel's traits, in order: a bool's name is in the report when
# it is true; "path" is a KernelPath (kernel_api.h), named unless it is the general one.
KERNEL_FLAGS = {
    "forward": ("path", "varlen"),
    "backward_dkdv": ("dbias", "path", "varlen", "deterministic"),
    "backward_dkdv_staged": ("path", "deterministic"),
    "backward_dbias": ("modifiers",),
}
DEFAULT_KERNEL_FLAGS = ("modifiers", "varlen")
KERNEL_PATHS = ("fast", "causal", "general", "modifiers")  # KernelPath's values in order


def short_name(demangled: str) -> tuple[str, str | None]:
    """('forward<bf16, 64, modifiers>', 'ForwardTraits<__nv_bfloat16, 64, false>') from a demangled kernel name
    (a kernel of neither element type, such as decode_append, by its name alone)."""
    base = re.search(r"(\w+)_kernel", demangled)
    kernel = base.group(1).replace("attention_", "") if base else demangled
    demangled = re.sub(
        r"\(fast_attn::cuda::KernelPath\)(\d)", lambda m: KERNEL_PATHS[int(m.group(1))], demangled
    )
    # c++filt writes "> >" where a kernel's only template argument is its traits.
    traits = re.search(rf"(\w+Traits<[^<>]*>)((?:, (?:true|false|{'|'.join(KERNEL_PATHS)}))*) ?>", demangled)
    element = "bf16" if "bfloat16" in demangled else "fp16" if "__half" in demangled else "?"
    if traits:
        head_dim = re.search(r", (\d+)[,>]", traits.group(1)).group(1)
        values = re.findall(r"\w+", traits.group(2))
        names = KERNEL_FLAGS.get(kernel, DEFAULT_KERNEL_FLAGS)
        variant = "".join(
            f", {value if name == 'path' else name}"
            for name, value in zip(names, values)
            if value == "true" or (name == "path" and value != "general")
        )
        return f"{kernel}<{element}, {head_dim}{variant}>", traits.group(1)
    return (f"{kernel}<{element}>" if element != "?" else kernel), None


def sass_tools() -> tuple[str, str] | None:
    """(cuobjdump, nvdisasm): on PATH, else Triton's copies; None when neither has both."""
    found = (shutil.which("cuobjdump"), shutil.which("nvdisasm"))
    if all(found):
        return found
    try:
        import triton
    except ImportError:
        return None
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    tools = (bin_dir / "cuobjdump", bin_dir / "nvdisasm")
    return (str(tools[0]), str(tools[1])) if all(t.is_file() for t in tools) else None


SASS_FUNCTION = re.compile(r"^\.text\.(\S+):$")
SASS_LABEL = re.compile(r"^(\.L_x_\d+):$")
SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*;")
SASS_BRANCH_TARGET = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def sass_loops(listing: str) -> dict[str, list[SassLoop]]:
    """{mangled kernel: its main loops} from an `nvdisasm -c` listing.

    A loop is a backward branch: a BRA whose target label lies at or before it; its body is every
    instruction from that label to the branch (all basic blocks between them, so a body's counts
    are static: each conditional block inside it is counted once). A kernel's main loops are the
    loops that hold HMMA instructions and hold no smaller loop that does, in code order."""
    functions: dict[str, list[tuple[int, str, str]]] = {}
    labels: dict[str, dict[str, int]] = {}
    current = None
    pending_labels: list[str] = []
    for line in listing.splitlines():
        if match := SASS_FUNCTION.match(line.strip()):
            current = match.group(1)
            functions[current], labels[current], pending_labels = [], {}, []
        elif current is None:
            continue
        elif match := SASS_LABEL.match(line.strip()):
            pending_labels.append(match.group(1))
        elif match := SASS_INSTRUCTION.match(line):
            address = int(match.group(1), 16)
            for label in pending_labels:
                labels[current][label] = address
            pending_labels = []
            functions[current].append((address, match.group(2), line))
    result = {}
    for name, instructions in functions.items():
        loops = []
        for address, opcode, line in instructions:
            target = SASS_BRANCH_TARGET.search(line) if opcode == "BRA" else None
            head = labels[name].get(target.group(1)) if target else None
            if head is not None and head <= address:
                body = [op for a, op, _ in instructions if head <= a <= address]
                loops.append(SassLoop(head, address, body))
        with_mma = [loop for loop in loops if loop.count("HMMA")]
        result[name] = sorted(
            (
                loop
                for loop in with_mma
                if not any(o is not loop and loop.head <= o.head and o.end <= loop.end for o in with_mma)
            ),
            key=lambda loop: loop.head,
        )
    return result


def disassemble_loops(tools: tuple[str, str], objfile: Path) -> dict[str, dict[str, list[SassLoop]]]:
    """{arch name: sass_loops of its cubin} for the cubins in the object file nvcc wrote (cuobjdump
    names each <unit>.<arch>.cubin)."""
    cuobjdump, nvdisasm = tools
    folder = objfile.with_suffix(".cubins")
    folder.mkdir()
    subprocess.run(
        [cuobjdump, "-xelf", "all", str(objfile.resolve())], cwd=folder, check=True, capture_output=True
    )
    loops: dict[str, dict[str, list[SassLoop]]] = {}
    for cubin in sorted(folder.glob("*.cubin")):
        listing = subprocess.run(
            [nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True
        ).stdout
        loops.setdefault(cubin.suffixes[-2].lstrip("."), {}).update(sass_loops(listing))
    return loops


def traits_launch_shapes(nvcc: str, flags: list[str], workdir: Path) -> dict[str, tuple[int, int]]:
    """{'ForwardTraits<__half, 64, true>': (threads, dynamic smem bytes), ...} printed by the traits themselves."""
    source = workdir / "traits_sizes.cu"
    lines = [
        "#include <cstdio>",
        '#include "cuda/forward_kernel.cuh"',
        '#include "cuda/backward_dkdv_kernel.cuh"',
        '#include "cuda/backward_dbias_kernel.cuh"',
        '#include "cuda/decode_kernel.cuh"',
        "using namespace fast_attn::cuda;",
        "// Traits T's launch shape, when kExists (a discarded branch instantiates none of T's members).",
        "template <typename T, bool kExists>",
        "void print_shape(const char* name) {",
        "  if constexpr (kExists) {",
        '    std::printf("%s|%d|%zu\\n", name, T::kThreads, static_cast<size_t>(T::kSmemBytes));',
        "  }",
        "}",
        "int main() {",
    ]
    for traits, arguments in TRAITS.items():
        for element in ELEMENTS:
            for head_dim in HEAD_DIMS:
                exists = TRAITS_AT.get(traits, "true").format(head_dim=head_dim)
                for rest in arguments:
                    t = f"{traits}<{element}, {head_dim}{rest}>"
                    lines.append(f'  print_shape<{t}, {exists}>("{t}");')
    lines += ["  return 0;", "}"]
    source.write_text("\n".join(lines) + "\n")
    binary = workdir / "traits_sizes"
    compile_cmd = [nvcc, "-std=c++17", *flags, f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)]
    subprocess.run(compile_cmd, check=True, capture_output=True, text=True)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    shapes = {}
    for line in printed.splitlines():
        name, threads, smem = line.split("|")
        shapes[name] = (int(threads), int(smem))
    return shapes


def compile_one(
    nvcc: str, flags: list[str], source: Path, archs: list[Arch], workdir: Path, tools: tuple[str, str] | None
) -> list[CompileResult]:
    """One nvcc run of `source` for every arch: a CompileResult per arch."""
    output = workdir / f"{source.stem}.o"
    proc = subprocess.run(
        nvcc_command(nvcc, flags, source, archs, output), capture_output=True, text=True, check=False
    )
    text = proc.stdout + proc.stderr
    kernels = parse_ptxas(text)
    loops = {}
    if proc.returncode == 0 and tools is not None and source.stem in SASS_UNITS:
        loops = disassemble_loops(tools, output)
    return [
        CompileResult(
            source, arch, proc.returncode, text, kernels.get(arch.name, []), loops.get(arch.name, {})
        )
        for arch in archs
    ]


def ctas_per_sm(arch: Arch, registers: int, threads: int, smem: int) -> tuple[int, int]:
    """(CTAs an SM holds by registers, by shared memory); registers are allocated per warp in units of 256."""
    warps = (threads + 31) // 32
    registers_per_warp = (registers * 32 + 255) // 256 * 256
    by_registers = arch.registers_per_sm // (registers_per_warp * warps) if registers else 0
    by_threads = arch.max_threads_per_sm // threads
    by_smem = arch.smem_per_sm // (smem + 1024) if smem else 32  # 1 KiB per CTA is reserved by the driver
    return min(by_registers, by_threads), by_smem


def check(results: list[CompileResult], shapes: dict[str, tuple[int, int]]) -> list[str]:
    failures = []
    failed_sources = set()  # one nvcc run compiles a source for every arch: its failure is told once
    for result in results:
        where = f"{result.source.relative_to(ROOT)} ({result.arch.name})"
        if result.returncode != 0:
            if result.source not in failed_sources:
                failed_sources.add(result.source)
                failures.append(f"{result.source.relative_to(ROOT)}: nvcc failed:\n{result.output.strip()}")
            continue
        if not result.kernels:
            failures.append(f"{where}: no kernel in ptxas's report")
        for kernel in result.kernels:
            local = kernel.stack_frame or kernel.spill_stores or kernel.spill_loads or kernel.cumulative_stack
            if local and kernel.name not in INTENDED_LOCAL_MEMORY:
                failures.append(
                    f"{where}: {kernel.name} uses local memory: {kernel.stack_frame} bytes stack frame, "
                    f"{kernel.spill_stores} bytes spill stores, {kernel.spill_loads} bytes spill loads, "
                    f"{kernel.cumulative_stack} bytes cumulative stack"
                )
            if kernel.traits in shapes:
                threads, smem = shapes[kernel.traits]
                if smem > result.arch.max_dynamic_smem:
                    failures.append(
                        f"{where}: {kernel.name} needs {smem} bytes of shared memory, "
                        f"{result.arch.name} allows {result.arch.max_dynamic_smem}"
                    )
                if ctas_per_sm(result.arch, kernel.registers, threads, smem)[0] < 1:
                    failures.append(
                        f"{where}: {kernel.name}: {kernel.registers} registers x {threads} threads "
                        f"exceed the register file"
                    )
    return failures


def nvcc_version(nvcc: str) -> str:
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"release ([\d.]+), (V[\d.]+)", text)
    return f"{match.group(1)} ({match.group(2)})" if match else "unknown"


def write_report(
    path: Path,
    results: list[CompileResult],
    shapes: dict[str, tuple[int, int]],
    archs: list[Arch],
    nvcc: str,
    flags: list[str],
) -> None:
    lines = [
        "# ptxas resource report of the CUDA kernels",
        "",
        (
            "Generated by `python tools/cuda_compile_check.py`; do not edit. "
            f"nvcc {nvcc_version(nvcc)}, flags `{' '.join(flags)}`."
        ),
        "",
        (
            "Dynamic shared memory and threads are the kernels' launch configuration (their traits); "
            "CTAs/SM is what registers (and threads) and shared memory each allow."
        ),
        "",
    ]
    if INTENDED_LOCAL_MEMORY:
        lines += ["Local memory allowed (`INTENDED_LOCAL_MEMORY`; any other is a CI failure):", ""]
        lines += [f"- {name}: {why}" for name, why in INTENDED_LOCAL_MEMORY.items()]
        lines += [""]
    for arch in archs:
        lines += [
            f"## {arch.name}",
            "",
            (
                "| kernel | registers | spill stores / loads (bytes) | stack (bytes) | dynamic smem (bytes) "
                "| threads | CTAs/SM by registers | by smem |"
            ),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        kernels = sorted((k for r in results if r.arch is arch for k in r.kernels), key=lambda k: k.name)
        for k in kernels:
            threads, smem = shapes.get(k.traits, (0, 0))
            smem += k.static_smem
            by_regs, by_smem = ctas_per_sm(arch, k.registers, threads, smem) if threads else ("-", "-")
            lines.append(
                f"| {k.name} | {k.registers} | {k.spill_stores} / {k.spill_loads} | "
                f"{max(k.stack_frame, k.cumulative_stack)} | {smem} | {threads or '-'} | {by_regs} | {by_smem} |"
            )
        lines.append("")
    lines += sass_section(results, archs)
    path.write_text("\n".join(lines))


def sass_section(results: list[CompileResult], archs: list[Arch]) -> list[str]:
    """The report's SASS loop counts of the kernels SASS_KERNELS names, paths fast, causal and general."""
    lines = [
        "## SASS per main-loop iteration",
        "",
        (
            "The forward's main loop runs once per key tile, the dK/dV kernel's once per chunk of queries "
            "(kChunkM queries x 16 keys per warp), the staged dK/dV kernel's (`backward_dkdv_staged`, kFast "
            "and kCausal at D 32 to 128) once per step: all five products of kBlockM queries x 128 keys, "
            "so its counts are per warp per whole step (320 HMMA at D 64 and 128, 160 at D 32, 240 at D 96), "
            "the prefetch of the next step's tiles included. Each unit of `SASS_UNITS` is disassembled "
            "(`cuobjdump -xelf all`, `nvdisasm -c`). A loop is a backward branch: a `BRA` whose target label "
            "lies before it; its body is every instruction from that label to the branch, all basic blocks "
            "between them, so the counts are static (a conditional block inside the body, such as the "
            "prefetch of the next tile, counts once). A kernel's main loops are those holding HMMA and no "
            "smaller loop that does, in code order: one in the general kernels (which test per tile at run "
            "time what they need); two in the fast and causal kernels, the loop of the masked tiles (or "
            "steps) and the unmasked loop, told apart by their size (the unmasked one is the smaller, marked "
            "*unmasked*), except the fast forward kernel's, whose one masked tile "
            "at most runs outside the loop (its one loop is the unmasked one), and the staged dK/dV "
            "kernel's, whose one loop serves masked and unmasked steps (their mask limits at run time). FP32 = "
            + " + ".join(SASS_FP32)
            + "; RED = RED + REDG (dq's float atomics; REDG.E.ADD.F32x2 and x4 count one each); "
            "instructions / HMMA is the loop's instructions per HMMA; counts per warp."
        ),
        "",
    ]
    columns = ("instructions", "per HMMA", *SASS_COUNTED[:3], *SASS_FP32, "FP32", *SASS_COUNTED[3:], "RED")
    for arch in archs:
        lines += [
            f"### {arch.name}",
            "",
            "| kernel | loop | " + " | ".join(columns) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in columns) + " |",
        ]
        rows = []
        for result in results:
            if result.arch is not arch:
                continue
            for kernel in result.kernels:
                kind = kernel.name.split("<")[0]
                loops = result.loops.get(kernel.mangled, [])
                if (
                    kind not in SASS_KERNELS
                    or not loops
                    or any(f in kernel.name for f in ("varlen", "dbias"))
                ):
                    continue
                smallest = min(loops, key=lambda loop: len(loop.opcodes)) if len(loops) > 1 else None
                for index, loop in enumerate(loops):
                    label = f"{index + 1} of {len(loops)}" + (", *unmasked*" if loop is smallest else "")
                    counts = [
                        len(loop.opcodes),
                        f"{len(loop.opcodes) / max(loop.count('HMMA'), 1):.2f}",
                        *(loop.count(name) for name in SASS_COUNTED[:3]),
                        *(loop.count(name) for name in SASS_FP32),
                        loop.count(*SASS_FP32),
                        *(loop.count(name) for name in SASS_COUNTED[3:]),
                        loop.count(*SASS_RED),
                    ]
                    rows.append(f"| {kernel.name} | {label} | " + " | ".join(str(c) for c in counts) + " |")
        lines += sorted(rows)
        lines.append("")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--no-report", action="store_true", help="check only")
    args = parser.parse_args()

    nvcc = shutil.which(args.nvcc) or args.nvcc
    if not shutil.which(nvcc):
        print(f"cuda_compile_check: nvcc not found ({args.nvcc})", file=sys.stderr)
        return 1
    archs = matrix_archs()
    flags = torch_nvcc_flags() + BUILD_MATRIX["nvcc_flags"]
    sources = sorted(CUDA_DIR.glob("*.cu")) + sorted((CUDA_DIR / "instantiations").glob("*.cu"))
    tools = sass_tools()
    if tools is None and not args.no_report:
        print(
            "cuda_compile_check: cuobjdump and nvdisasm not found (PATH or Triton) for the SASS counts",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="fast_attn_ptxas_") as tmp:
        workdir = Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            shapes_future = pool.submit(traits_launch_shapes, nvcc, flags, workdir)
            futures = [
                pool.submit(compile_one, nvcc, flags, source, archs, workdir, tools) for source in sources
            ]
            results = [result for future in futures for result in future.result()]
            shapes = shapes_future.result()
    names = demangle(sorted({k.mangled for r in results for k in r.kernels}))
    for result in results:
        for kernel in result.kernels:
            kernel.name, kernel.traits = short_name(names[kernel.mangled])
    failures = check(results, shapes)
    if not args.no_report:
        write_report(args.report, results, shapes, archs, nvcc, flags)
    kernels = sum(len(r.kernels) for r in results)
    if failures:
        print(
            f"cuda_compile_check: {len(failures)} finding(s) in {len(sources)} files x {len(archs)} archs:",
            file=sys.stderr,
        )
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    allowed = f" beyond the {len(INTENDED_LOCAL_MEMORY)} allowed" if INTENDED_LOCAL_MEMORY else ""
    print(
        f"cuda_compile_check: {len(sources)} files x {len(archs)} archs, {kernels} kernels, no local memory"
        f"{allowed}, shared memory and registers within limits"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
