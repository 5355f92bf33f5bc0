"""Keep int8 tensor-core products in flight on Hopper.

Triton software-pipelines a GEMM's loads on Hopper, but it lets a wgmma stay in flight while the next one is
issued only when the accumulator is float32. An int8 GEMM accumulates in int32, so its K loop waits for every
product before issuing the next one, and runs ~20% slower than the same GEMM in FP8 (benchmarks/notes-linear.md).

The hardware has no such restriction (PTX only asks that the accumulator registers are not touched while a
product is pending). `pipelined_int_mma` edits a compiled kernel's TTGIR the way Triton edits it for a float32
accumulator: the wait inside the K loop leaves one product pending, and one wait after the loop collects the
last. The loads that refill a shared-memory stage are already issued after that wait, so a stage is never
overwritten while the pending product still reads it. In a persistent kernel, whose tile loop Triton flattens
into the K loop, the epilogue sits inside that loop: it first waits for the pending product. `launch` compiles a
kernel that way (once per specialisation) and launches it; anything it cannot handle raises `NotPipelinable`, and
the caller falls back to the plain launch.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import namedtuple

import torch
import triton
from triton.compiler import ASTSource

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
    _DESCRIPTORS: tuple = (TensorDescriptor,)
except ImportError:   # Triton before 3.3 (gemm8 then launches no persistent kernels)
    _DESCRIPTORS = ()

_POINTER_TYPES = {torch.int8: "*i8", torch.float8_e4m3fn: "*fp8e4nv", torch.bfloat16: "*bf16",
                  torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}
_LOOP = re.compile(r"(\s*)(%[\w.$-]+):\d+ = scf\.for .*\) -> \((.*)\)\s+: i\d+ \{")


class NotPipelinable(Exception):
    """This kernel, device or argument list is not one `launch` handles."""


def pipelined_int_mma(ttgir: str) -> str:
    """The TTGIR of a kernel whose K loop carries an int32 wgmma accumulator, with one product left in flight
    across iterations (as Triton does for float32 accumulators). Every such loop is edited, the flattened tile
    loop of a persistent kernel included (its epilogue, inside the loop, first collects the pending product)."""
    lines = ttgir.split("\n")
    loops = [i for i, line in enumerate(lines) if _LOOP.match(line)
             and any(_is_int_acc(t) for t in _split_types(_LOOP.match(line).group(3)))]
    if not loops:
        raise NotPipelinable("no K loop with an int32 wgmma accumulator")
    for i in reversed(loops):   # from the last, so that insertions leave the earlier line numbers valid
        lines = _pipeline_loop(lines, i)
    return "\n".join(lines)


def _is_int_acc(t: str) -> bool:
    return re.fullmatch(r"tensor<\w+xi32, #mma\w*>", t) is not None


def _pipeline_loop(lines: list[str], i: int) -> list[str]:
    """`lines` with the loop opened at line i edited (one product in flight, collected after the loop)."""
    indent, result, types = _LOOP.match(lines[i]).groups()
    carried = _split_types(types)
    acc = [k for k, t in enumerate(carried) if _is_int_acc(t)]
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(indent + "}"))
    copies = [j for j in range(i + 1, end) if re.search(r"async(_tma)?_copy_global_to_local", lines[j])]
    dots = [j for j in range(i + 1, end) if "ttng.warp_group_dot " in lines[j]]
    waits = [j for j in range(i + 1, end)
             if "ttng.warp_group_dot_wait" in lines[j] and "pendings = 0" in lines[j]]
    if len(acc) != 1 or len(dots) != 1 or len(waits) != 1:
        raise NotPipelinable(f"expected one int32 accumulator, product and wait in the K loop, found "
                             f"{len(acc)}, {len(dots)}, {len(waits)}")
    # the edit is safe only if every refill of a shared-memory stage is issued after the wait (then the stage
    # the pending product reads is not the one being refilled)
    if not copies or min(copies) < waits[0]:
        raise NotPipelinable("the K loop's loads are not multi-buffered after the product's wait")
    wait = waits[0]
    lines[wait] = lines[wait].replace("pendings = 0", "pendings = 1")
    named = re.match(r"\s*(%[\w.$-]+)(:\d+)? = ", lines[wait])
    product = named.group(1) + ("#0" if named.group(2) else "")
    lines = _collect_before_epilogue(lines, wait, end, indent + "  ", product, carried[acc[0]])
    end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(indent + "}"))
    value, done = f"{result}#{acc[0]}", f"%all_done_{result[1:]}"
    collect = f"{indent}{done} = ttng.warp_group_dot_wait {value} {{pendings = 0 : i32}} : {carried[acc[0]]}"
    after = [re.sub(re.escape(value) + r"\b", done, line) for line in lines[end + 1:]]
    return lines[: end + 1] + [collect] + after


def _collect_before_epilogue(lines, wait, end, body, product, acc_type):
    """Uses of the pending product later in the loop body: the accumulator's reset (a select) and the yield
    pass it on as Triton's float32 path does; an `scf.if` region that reads it (a persistent kernel's epilogue)
    first waits for it. Anything else is refused."""
    use = re.compile(re.escape(product) + r"(?![\w#])")
    out, j = lines[: wait + 1], wait + 1
    while j < end:
        line = lines[j]
        opens_if = line.startswith(body + "scf.if ") or re.match(re.escape(body) + r"%[\w.:$-]+ = scf\.if ", line)
        if opens_if and line.rstrip().endswith("{"):
            close = next(k for k in range(j + 1, end) if lines[k].startswith(body + "}"))
            region = lines[j + 1: close]
            if any(use.search(r) for r in region):
                if lines[close].strip().startswith("} else"):
                    raise NotPipelinable("the pending product is read in an scf.if with an else region")
                ready = f"%ready_{product[1:].replace('#', '_')}"
                out += [line, f"{body}  {ready} = ttng.warp_group_dot_wait {product} {{pendings = 0 : i32}} : "
                              f"{acc_type}"] + [use.sub(ready, r) for r in region]
                j = close
                continue
        elif use.search(line) and not (line.startswith(body) and ("arith.select" in line or "scf.yield" in line)):
            raise NotPipelinable(f"the pending product is read in the loop: {line.strip()[:120]}")
        out.append(line)
        j += 1
    return out + lines[end:]


def _split_types(types: str) -> list[str]:
    """'tensor<a, #b>, i32, !ttg.async.token' -> its top-level items."""
    items, depth, start = [], 0, 0
    for k, ch in enumerate(types):
        depth += (ch == "<") - (ch == ">")
        if ch == "," and depth == 0:
            items.append(types[start:k].strip())
            start = k + 1
    return items + [types[start:].strip()]


_DESC_TYPES = {torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv"}


def _arg_type(value) -> str:
    if isinstance(value, _DESCRIPTORS):
        if value.base.dtype not in _DESC_TYPES:
            raise NotPipelinable(f"no descriptor type for {value.base.dtype}")
        return f"tensordesc<{_DESC_TYPES[value.base.dtype]}{list(value.block_shape)}>"
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER_TYPES:
            raise NotPipelinable(f"no pointer type for {value.dtype}")
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        raise NotPipelinable("bool runtime arguments are not handled")
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise NotPipelinable(f"argument of type {type(value).__name__}")


def _divisible(value) -> bool:
    """What Triton's JIT assumes of an argument: 16-byte aligned pointer, integer multiple of 16."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def signature(fn, args: dict, constexprs: dict) -> tuple[dict, tuple, dict]:
    """What Triton's JIT would specialise `fn` on for these arguments: (types of the runtime arguments, the
    positions of those it assumes 16-divisible, the constexprs with None arguments added)."""
    constexprs = {**constexprs, **{name: None for name, v in args.items() if v is None}}
    runtime = {name: v for name, v in args.items() if v is not None}
    types = {name: _arg_type(v) for name, v in runtime.items()}
    aligned = tuple(fn.arg_names.index(name) for name, v in runtime.items() if _divisible(v))
    return types, aligned, constexprs


_compiled: dict = {}


def compile_pipelined(fn, args: dict, constexprs: dict, *, num_warps: int, num_stages: int, target=None):
    """`fn` compiled for `target` (default: the current GPU) with its int32 K loop pipelined. `args` are the
    runtime arguments by name, in `fn`'s parameter order (None: a constexpr, as for Triton's JIT); cached per
    types, alignments and constexprs."""
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    if getattr(target, "backend", None) != "cuda" or target.arch != 90:
        raise NotPipelinable(f"wgmma pipelining applies to sm_90 only, not {target}")
    types, aligned, constexprs = signature(fn, args, constexprs)
    key = (fn, tuple(types.values()), aligned, tuple(sorted(constexprs.items())), num_warps, num_stages,
           target.arch)
    if key not in _compiled:
        try:
            _compiled[key] = _build(fn, types, aligned, constexprs, num_warps, num_stages, target)
        except NotPipelinable as e:
            _compiled[key] = e
        except Exception as e:   # a Triton whose IR this edit does not fit: fall back, and say why once
            _compiled[key] = NotPipelinable(f"compiling the pipelined kernel failed: {e}")
    kernel = _compiled[key]
    if isinstance(kernel, NotPipelinable):
        raise kernel
    return kernel


def compile_plain(fn, types: dict, aligned: tuple, constexprs: dict, *, target, **options):
    """`fn` compiled as Triton's JIT would compile it (what `pipelined_int_mma` starts from)."""
    signature = {**types, **{name: "constexpr" for name in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=target, options=options)


def _build(fn, types, aligned, constexprs, num_warps, num_stages, target):
    options = dict(num_warps=num_warps, num_stages=num_stages)
    plain = compile_plain(fn, types, aligned, constexprs, target=target, **options)
    ttgir = pipelined_int_mma(plain.asm["ttgir"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttgir")
        with open(path, "w") as f:
            f.write(ttgir)
        kernel = triton.compile(path, target=target, options=options)
    descriptors = [t for t in types.values() if t.startswith("tensordesc")]
    if descriptors:
        _launch_descriptors_as_jit(kernel, descriptors, plain.metadata.tensordesc_meta)
    return kernel


def _launch_descriptors_as_jit(kernel, descriptors: list[str], tensordesc_meta) -> None:
    """A kernel compiled from TTGIR lists each tensor descriptor parameter already expanded (descriptor, shape,
    strides) and lacks the TMA layouts the launcher needs to build the descriptor from a host-side
    TensorDescriptor. Give it the signature and layouts Triton's JIT would (those of the plain compile)."""
    folded, skip, given = {}, 0, iter(descriptors)
    for ty in kernel.src.signature.values():
        if skip:
            skip -= 1
        elif str(ty).startswith("!tt.tensordesc"):
            folded[len(folded)] = desc = next(given)
            skip = 2 * (desc.count(",") + 1)               # its shape (i32) and strides (i64), one per dim
        else:
            folded[len(folded)] = ty
    kernel.src.signature = folded
    fields = {**kernel.metadata._asdict(), "tensordesc_meta": tensordesc_meta}
    kernel.metadata = namedtuple("KernelMetadata", sorted(fields))(**fields)


def launch(fn, grid: tuple, args: dict, constexprs: dict, *, num_warps: int, num_stages: int) -> None:
    """Launch `fn` on `grid` with its int32 K loop pipelined (see the module doc)."""
    kernel = compile_pipelined(fn, args, constexprs, num_warps=num_warps, num_stages=num_stages)
    kernel[tuple(grid) + (1,) * (3 - len(grid))](*(v for v in args.values() if v is not None))
