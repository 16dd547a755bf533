"""Compile the Triton kernels for sm_90 (Hopper) without a GPU, and check the production launches
for register spills.  Run by ``test_triton_compile_sm90.py`` in a subprocess without the
interpreter (the kernels must be decorated by a compiling ``triton.jit``):

    python tests/triton/sm90.py compile   # every kernel and variant compiles to a cubin
    python tests/triton/sm90.py spill     # stack bytes of the production launches (needs cuobjdump)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

COMPILED = "compiled for sm_90"
NO_SPILLS = "no spills beyond the allowed"


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def _source(fn, types, constexprs, default="i64", attrs=None):
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, default) for n in names}
    return ASTSource(fn=fn, signature=signature, attrs=attrs,
                     constexprs={(names.index(n),): v for n, v in constexprs.items()})


def compile_all() -> None:
    """Every kernel, in the variants the backend launches, compiles for sm_90."""
    import triton

    from hyperattn_triton.kernels import attention, lsh, sort, utility
    from hyperattn_triton.launches import launch_for
    from hyperattn_triton.options import TritonOptions

    options = TritonOptions()

    def compiles(source, **launch):
        compiled = triton.compile(source, target=_target(), options=launch or None)
        assert "cubin" in compiled.asm, source.fn.__name__
        return compiled

    ptr = "*{}"
    for dtype in ("fp16", "bf16"):
        common = dict(HEAD_DIM=64, D_PAD=64, V_DIM=64, DV_PAD=64, BLOCK_M=64, BLOCK_N=64, PERMUTED=True, CAUSAL=False,
                      PRECISION="tf32", INT64_OFFSETS=dtype == "fp16", DRAW_WEIGHTS=False)
        fwd_types = {"Q": ptr.format(dtype), "K": ptr.format(dtype), "V": ptr.format(dtype), "Out": "*fp32",
                     "Lse": "*fp32", "Tiles": "*i64", "QOrder": "*i32", "KOrder": "*i32", "QBlock": "*i32",
                     "Samples": "*i32", "SampleBlock": "*i32", "LogW": "*fp32", "scale_log2": "fp32"}
        bwd_types = dict(fwd_types, DO="*fp32", Delta="*fp32", DQ="*fp32", DK="*fp32", DV="*fp32", scale="fp32")
        for fn, types, flags in (
            (attention.attention_fwd_kernel, fwd_types, dict(HAS_SAMPLES=True, OVERWRITE=True)),
            (attention.attention_fwd_kernel, fwd_types, dict(HAS_SAMPLES=True, OVERWRITE=False)),
            (attention.attention_bwd_dq_kernel, bwd_types, dict(HAS_SAMPLES=True, OVERWRITE=dtype == "fp16")),
            (attention.attention_bwd_dkdv_kernel, bwd_types, dict(SAMPLES=True, OVERWRITE=False)),
            (attention.attention_bwd_dkdv_kernel, bwd_types, dict(SAMPLES=True, OVERWRITE=False, SLOT_OUTPUT=True)),
            (attention.attention_bwd_dkdv_kernel, bwd_types, dict(SAMPLES=False, OVERWRITE=True)),
            (attention.attention_bwd_dkdv_kernel, bwd_types, dict(SAMPLES=False, OVERWRITE=False)),
            # per-draw log weights (sampling="key_norm")
            (attention.attention_fwd_kernel, fwd_types, dict(HAS_SAMPLES=True, OVERWRITE=False, DRAW_WEIGHTS=True)),
            (attention.attention_bwd_dq_kernel, bwd_types, dict(HAS_SAMPLES=True, OVERWRITE=False, DRAW_WEIGHTS=True)),
            (attention.attention_bwd_dkdv_kernel, bwd_types, dict(SAMPLES=True, OVERWRITE=False, DRAW_WEIGHTS=True)),
        ):
            compiled = compiles(_source(fn, types, dict(common, **flags)))
            assert "ptx" in compiled.asm
        # the forward's production launch at D <= 64 (registers capped)
        launch = launch_for(options.launches, "forward", 64, 64)
        capped = _source(attention.attention_fwd_kernel, fwd_types,
                         dict(common, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, HAS_SAMPLES=True, OVERWRITE=True))
        compiles(capped, num_warps=launch.warps, num_stages=launch.stages, maxnreg=launch.maxnreg)
    split_launch = launch_for(options.launches, "lsh_split", 64)
    for x_type, p_type, split in (("*bf16", "*bf16", split_launch.terms), ("*fp16", "*fp16", split_launch.terms),
                                  ("*fp32", "*fp32", 0)):
        compiles(_source(lsh.lsh_codes_kernel, {"X": x_type, "P": p_type, "Codes": "*i32"},
                         dict(HEAD_DIM=64, D_PAD=64, NUM_PROJS=7, R_PAD=16, BLOCK=split_launch.block, SPLIT=split)))
    compiles(_source(utility.sample_blocks_kernel, {"Samples": "*i32", "KRank": "*i32", "Blocks": "*i32"},
                     dict(BLOCK=launch_for(options.launches, "sample_blocks", 64).block)))
    for out_type, terms in (("*bf16", split_launch.terms), ("*fp32", 0)):
        compiles(_source(lsh.split_projections_kernel, {"P": "*fp64", "Out": out_type},
                         dict(HEAD_DIM=64, NUM_PROJS=7, D_PAD=64, R_PAD=16, TERMS=terms)))
    for add in (False, True):
        compiles(_source(utility.cast_rows_kernel, {"Src": "*bf16", "Dst": "*fp32"},
                         dict(DIM=64, D_PAD=64, BLOCK=launch_for(options.launches, "cast_rows", 64).block, ADD=add)))
    for out_type, in_memory in (("*i32", False), ("*i32", True), ("*i64", False)):
        compiles(_source(utility.draw_samples_kernel,
                         {"Out": out_type, "KStart": "*i64", "KLen": "*i64", "Seed": "*i64", "stream": "i32",
                          "per_head": "i32", "m": "i32"},
                         dict(SEED_IN_MEMORY=in_memory, STRATIFIED=in_memory,
                              BLOCK=launch_for(options.launches, "draw_samples", 64).block)))
    for out_type, in_memory in (("*i32", False), ("*i32", True), ("*i64", False)):
        compiles(_source(utility.draw_key_norm_samples_kernel,
                         {"Out": out_type, "LogW": "*fp32", "Weights": "*fp32", "Prefix": "*fp64", "KStart": "*i64",
                          "KLen": "*i64", "HeadIds": "*i32", "Seed": "*i64", "stream": "i32", "per_head": "i32",
                          "m": "i32", "m_u": "i32", "m_n": "i32", "kv_heads": "i32", "kv_total": "i32",
                          "n_k": "i32", "search_steps": "i32"},
                         dict(SEED_IN_MEMORY=in_memory, BLOCK=launch_for(options.launches, "draw_samples", 64).block)))
    compiles(_source(utility.row_dot_kernel, {"A": "*bf16", "B": "*fp32", "Out": "*fp32"},
                     dict(DIM=64, D_PAD=64, BLOCK=launch_for(options.launches, "row_dot", 64).block)))
    for fn in (sort.chunk_histogram_kernel, sort.chunk_scatter_kernel, sort.bucket_starts_kernel,
               sort.chunk_presort_kernel, sort.presorted_scatter_kernel):
        types = {"Tiles": "*i64", "Pieces": "*i64", "Codes": "*i32", "Hist": "*i32", "First": "*i32",
                 "Order": "*i32", "Rank": "*i32", "Sorted": "*i32"}
        sizes = dict(CB=options.sort_starts_chunks) if fn is sort.bucket_starts_kernel else dict(CHUNK=options.sort_chunk)
        compiles(_source(fn, types, dict(sizes, NB=128)))
    print(COMPILED)


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _stack_bytes(fn, types, constexprs, launch) -> int:
    """Stack bytes per thread of ``fn`` compiled as the launcher specialises it (pointers and
    strides divisible by 16, ints equal to 1 constant)."""
    import triton

    floats = {"scale", "scale_log2"}
    names = fn.arg_names
    defaults = {n: "fp32" if n in floats else "i32" for n in names}
    signature_types = {**defaults, **types}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and signature_types[n] != "fp32"}
    source = _source(fn, signature_types, constexprs, attrs=attrs)
    options = dict(num_warps=launch.warps, num_stages=launch.stages)
    if launch.maxnreg:
        options["maxnreg"] = launch.maxnreg
    compiled = triton.compile(source, target=_target(), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def check_spills() -> None:
    """The forward's launch at D = 64 and 128 and the backward's at D = 128 spill nothing, but for
    at most 128 B of the D = 128 dK/dV launch (faster so than the launches that do not spill)."""
    from hyperattn_triton.kernels import attention
    from hyperattn_triton.launches import launch_for
    from hyperattn_triton.options import TritonOptions

    launches = TritonOptions().launches
    pointers = {n: "*bf16" for n in ("Q", "K", "V", "DO", "Out")}
    pointers.update({n: "*fp32" for n in ("Lse", "Delta", "DQ", "DK", "DV", "LogW")})
    pointers.update({n: "*i32" for n in ("QOrder", "KOrder", "QBlock", "Samples", "SampleBlock")}, Tiles="*i64")
    units = dict(sq_d=1, sk_d=1, sv_d=1, so_d=1, sdo_d=1, sdq_d=1, sdk_d=1, sdv_d=1, sl_n=1, group=1)
    for dim in (64, 128):
        shape = dict(HEAD_DIM=dim, D_PAD=dim, V_DIM=dim, DV_PAD=dim, PERMUTED=True, CAUSAL=False, PRECISION="tf32",
                     INT64_OFFSETS=False, DRAW_WEIGHTS=False)
        cases = [(attention.attention_fwd_kernel, launch_for(launches, "forward", dim, dim),
                  dict(HAS_SAMPLES=True, OVERWRITE=True))]
        if dim == 128:  # at D = 64 the backward's launches are tuned to spill a little (faster than capped)
            cases += [(attention.attention_bwd_dq_kernel, launch_for(launches, "dq", dim, dim),
                       dict(HAS_SAMPLES=True, OVERWRITE=True)),
                      (attention.attention_bwd_dkdv_kernel, launch_for(launches, "dkdv", dim, dim),
                       dict(SAMPLES=False, OVERWRITE=True)),
                      (attention.attention_bwd_dkdv_kernel, launch_for(launches, "dkdv", dim, dim),
                       dict(SAMPLES=True, OVERWRITE=False))]
        for fn, launch, flags in cases:
            constexprs = {n: v for n, v in dict(units, **shape, **flags, BLOCK_M=launch.block_m,
                                                 BLOCK_N=launch.block_n).items() if n in fn.arg_names}
            spilled = _stack_bytes(fn, pointers, constexprs, launch)
            print(f"D={dim} {fn.__name__} {launch}: stack {spilled} B", flush=True)
            allowed = 128 if fn is attention.attention_bwd_dkdv_kernel else 0
            assert spilled <= allowed, (dim, fn.__name__, launch, spilled)
    print(NO_SPILLS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile the Triton kernels for sm_90 without a GPU, or check "
                                                 "the production launches for register spills.")
    parser.add_argument("what", choices=("compile", "spill"))
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # before the kernels are decorated: compile, do not interpret
    if args.what == "compile":
        compile_all()
    else:
        check_spills()
    return 0


if __name__ == "__main__":
    sys.exit(main())
