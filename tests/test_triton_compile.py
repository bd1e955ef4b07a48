"""Every Triton kernel compiles for a real GPU target (sm_90: PTX and cubin), without a GPU.

The other tests run the kernels under the interpreter, which executes them as Python on numpy
arrays and never runs Triton's compiler (lowering, type and layout checks, ptxas). Compilation
runs in a subprocess without TRITON_INTERPRET; the signatures below mirror the launch sites.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maskclip_apro.kernels import gp_propagate, gp_tree_triton as T, lp

P = "*i32"
E = dict(BLOCK=1024)
L = dict(BLOCK=T._DEVICE_BLOCK)  # the tree kernels' device block
KERNELS = [
    (T._mst_min_kernel, dict(act_in=P, n_in=P, act_out=P, n_out=P, kbits=P, parent=P, best="*i64", num_edges="i32",
                             n="i32", w="i32", nv="i32"), dict(FIRST=True, **L)),
    (T._mst_min_kernel, dict(act_in=P, n_in=P, act_out=P, n_out=P, kbits=P, parent=P, best="*i64", num_edges="i32",
                             n="i32", w="i32", nv="i32"), dict(FIRST=False, **L)),
    (T._mst_union_kernel, dict(best="*i64", parent=P, flags="*i8", trips=P, n_alive=P, total="i32", num_edges="i32",
                               n="i32", w="i32", nv="i32"), L),
    (T._mst_compress_kernel, dict(parent=P, trips=P, n_alive=P, total="i32"), L),
    (T._krt_hook_kernel, dict(labels=P, uf="*i64", total="i32", m_edges="i32", nodes="i32", n="i32", beta="i32",
                              level="i32"), L),
    (T._krt_union_kernel, dict(labels=P, uf="*i64", trips=P, total="i32", m_edges="i32", nodes="i32", n="i32",
                               beta="i32", level="i32"), L),
    (T._krt_top_kernel, dict(uf="*i64", top="*i64", trips=P, total="i32", m_edges="i32", nodes="i32", n="i32",
                             beta="i32", level="i32"), L),
    (T._krt_relabel_kernel, dict(labels=P, uf="*i64", top="*i64", trips=P, total="i32", m_edges="i32",
                                 beta="i32", level="i32"), L),
    (T._tour_kernel, dict(children=P, nxt=P, val=P, total="i32", nodes="i32", n="i32", m_edges="i32"), L),
    (T._rank_kernel, dict(nxt_in=P, val_in=P, nxt_out=P, val_out=P, total="i32"), L),
    (T._ranges_kernel, dict(val=P, lo="*i64", hi="*i64", order="*i64", total="i32", nodes="i32", n="i32"), L),
    (gp_propagate._leaf_sums_kernel, dict(unary="*fp32", order=P, sums="*fp64", n="i32", k="i32", k_total="i32",
                                          c0="i32", n_tiles="i32"), dict(BLOCK_C=4, **E)),
    (gp_propagate._tile_scan_kernel, dict(sums="*fp64", n_tiles="i32"), dict(BLOCK_C=4, TILES=1024)),
    (gp_propagate._prefix_kernel, dict(unary="*fp32", order=P, sums="*fp64", prefix="*fp64", n="i32", k="i32",
                                       k_total="i32", c0="i32", n_tiles="i32"), dict(BLOCK_C=4, **E)),
    (gp_propagate._contrib_sums_kernel, dict(prefix="*fp64", ci=P, cj=P, cc="*fp64", sums="*fp64", n="i32", k="i32",
                                             length="i32", n_tiles="i32"), dict(BLOCK_C=4, **E)),
    (gp_propagate._contrib_scan_kernel, dict(prefix="*fp64", ci=P, cj=P, cc="*fp64", dest=P, sums="*fp64",
                                             acc="*fp64", n="i32", k="i32", length="i32", n_tiles="i32"),
     dict(BLOCK_C=4, **E)),
    (gp_propagate._output_kernel, dict(unary="*fp32", order=P, acc="*fp64", scale="*fp64", out="*fp32", n="i32",
                                       k="i32", k_total="i32", c0="i32"), dict(BLOCK_C=4, **E)),
]
LP = dict(y_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", n_ch="i32", h="i32", w="i32")
KERNELS += [(lp._lp_step_kernel, LP, dict(KS=k, UNROLL=k <= lp.UNROLL_MAX, BLOCK_C=8, BLOCK_P=256)) for k in (5, 33)]
target = GPUTarget("cuda", 90, 32)
for fn, signature, constants in KERNELS:
    signature = {**signature, **{name: "constexpr" for name in constants}}
    compiled = triton.compile(ASTSource(fn, signature, constants), target=target)
    assert compiled.asm.get("cubin"), fn.__name__
print("compiled", len(KERNELS))
"""


def test_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real, not from an earlier cache
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "compiled 19"
