"""Every kernel compiles ahead of time for sm_80 and sm_90 on this GPU-less machine, without spills.

SPEC §3: the default configs must show ``STACK:0`` in ``cuobjdump --dump-resource-usage``. The
compiled cubins are cached under ``.aot_cache/`` (``CONVCRF_AOT_CACHE``), so reruns take milliseconds.
"""

import os
import re

import pytest
import triton
from aot import compile_for, hot_loop, instructions_per_ffma, loops, memory_layouts, opcode, sass, ttgir
from convcrf_triton.kernels import band_product as bp
from convcrf_triton.kernels import blur_iteration as bi
from convcrf_triton.kernels import features as ft
from convcrf_triton.kernels import merged_kernel as gw
from convcrf_triton.kernels import message_passing as mp

ARCHS = [80, 90]
PTR = "*fp32"
MP_SIGNATURE = {"q_ptr": PTR, "k_ptr": PTR, "f_ptr": PTR, "compat_ptr": PTR, "m_ptr": PTR, "a_ptr": PTR,
                "w_ptr": PTR, "cm_ptr": PTR, "C": "i32", "h": "i32", "w": "i32"}
NO_STEP = {"STEP": False, "W_STRIDE": 0, "HAS_COMPAT": False, "SOFTMAX": False}
# What a launch tells the compiler of a grid whose width is not a multiple of 16: 16-byte aligned pointers,
# nothing about the sizes (the two-pass kernels' ALIGNED then says whether the width is a multiple of 4).
POINTERS_ALIGNED = tuple(name for name, kind in MP_SIGNATURE.items() if kind.startswith("*"))
GW_SIGNATURE = {"f_ptr": PTR, "compat_ptr": PTR, "k_ptr": PTR, "h": "i32", "w": "i32"}
TWO_GAUSSIANS = {"D1": 2, "D2": 3}


def _mp_constexprs(cfg, k, fused, idx64=False, gaussians=TWO_GAUSSIANS, aligned=None):
    """A launch's constexprs; ``aligned``: ``ALIGNED``, 16 or 4 when the grid's width is a multiple of it (most
    images; two-pass only; default 16), 0 otherwise."""
    aligned = (0 if fused else 16) if aligned is None else aligned
    return {"KSIZE": k, "FUSED": fused, "KEEP_CENTRE": False, "IDX64": idx64, **gaussians, **NO_STEP, **cfg.kwargs,
            "ALIGNED": aligned}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k,idx64,gaussians", [
    (11, False, TWO_GAUSSIANS),
    (31, True, {"D1": 2, "D2": 5}),
    (3, False, {"D1": 3, "D2": 0}),
])
def test_gaussian_weights_kernel_compiles_without_spills(arch, k, idx64, gaussians):
    usage = compile_for(gw._gaussian_weights_kernel, GW_SIGNATURE,
                        {"KSIZE": k, "KEEP_CENTRE": k == 3, "BLOCK_P": gw.WEIGHTS_BLOCK_P, "IDX64": idx64,
                         **gaussians}, arch)
    print(f"gaussian_weights k={k} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 255


def test_gaussian_weights_tap_loop_overhead():
    """The weights kernel stores inside its tap loop, so the compiler cannot hoist the pixels' own features out
    of it (the store may alias them): they are loaded once before it (_own_features), the taps are walked as
    rows × columns (no division a tap), 4 pixels a thread (16-byte stores) addressed from one pointer a
    thread. sm_90, k = 7: 38 instructions per pixel and tap, triton 3.6 and 3.9 (89 with the own features
    reloaded and a division every tap, 1 pixel a thread)."""
    listing = sass(gw._gaussian_weights_kernel, GW_SIGNATURE, {"KSIZE": 7, "KEEP_CENTRE": False,
                   "BLOCK_P": gw.WEIGHTS_BLOCK_P, "IDX64": False, **TWO_GAUSSIANS}, 90, divisible=tuple(GW_SIGNATURE))
    tap = min((body for body in loops(listing) if any(opcode(t) == "MUFU" for t in body)), key=len)  # one tap a trip
    assert len(tap) / (gw.WEIGHTS_BLOCK_P // 128) <= 40
    assert re.search(r"\bSTG\.E\.128\b", listing)


def _features_signature(pointers: int) -> dict[str, str]:
    """The features kernel's arguments; scalar ``i`` of ``ft.SCALARS`` a pointer where bit ``i`` of ``pointers``
    is set (a module's parameter), else a float (a number)."""
    scalars = {name: PTR if pointers >> i & 1 else "fp32" for i, name in enumerate(ft.SCALARS)}
    sizes = ("stride_b", "stride_c", "stride_y", "stride_x", "H", "W", "h", "w", "pad_y", "pad_x")
    return {"image": PTR, "feats": PTR, "compats": PTR, "nonfinite": PTR, **scalars, **dict.fromkeys(sizes, "i32")}


# A module's scalars: every one a parameter but col_sdims (a number without col_use_pos).
MODULE_POINTERS = 0b11101


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pointers,col_pos,idx64,check", [(MODULE_POINTERS, False, False, True),
                                                          (0, True, True, True), (0b11111, True, False, False)])
def test_features_kernel_compiles_without_spills(arch, pointers, col_pos, idx64, check):
    usage = compile_for(ft._features_kernel, _features_signature(pointers),
                        {"S": 4, "POINTERS": pointers, "COL_POS": col_pos, "BLOCK_P": ft.FEATURES_BLOCK_P,
                         "IDX64": idx64, "CHECK": check},
                        arch)
    print(f"gaussian_features pointers={pointers:05b} col_pos={col_pos} check={check} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 128


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("k,idx64", [(11, False), (31, True)])
def test_message_pass_default_config_compiles_without_spills(arch, fused, k, idx64):
    cfg = mp.DEFAULT_CONFIG
    usage = compile_for(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, k, fused, idx64), arch,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    print(f"message_pass fused={fused} k={k} sm_{arch}: {usage}")
    # 128 measured at k = 3 ... 15, up to 166 at k = 21 and 31 (the interior loop's unrolled tap rows keep tens of
    # loads in flight a warp): at least 3 resident blocks of 4 warps an SM.
    assert usage.stack == 0 and usage.reg <= 168


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS, ids=str)
def test_every_autotune_config_compiles_without_spills_on_sm90(cfg, fused):
    usage = compile_for(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, fused), 90,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    assert usage.stack == 0, f"{cfg} spills: {usage}"


WG_SIGNATURE = {"q_ptr": PTR, "g_ptr": PTR, "f_ptr": PTR, "compat_ptr": PTR, "gf_ptr": PTR, "gc_ptr": PTR,
                "C": "i32", "h": "i32", "w": "i32"}


def _wg_constexprs(k: int, C: int, gaussians: dict, keep_centre: bool = False, idx64: bool = False) -> dict:
    """A weight-gradient launch's constexprs for ``C`` classes, as ``_weight_grad`` passes them on the GPU."""
    block_c = mp.weight_grad_classes(C)
    return {"KSIZE": k, "KEEP_CENTRE": keep_centre, "BLOCK_C": block_c, "CLASS_TAIL": C % block_c != 0,
            "BLOCK_P": mp.WEIGHT_GRAD_BLOCK_P, "IDX64": idx64, **gaussians}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k,C,gaussians,keep_centre,idx64", [
    (11, 21, TWO_GAUSSIANS, False, False),
    (31, 19, {"D1": 2, "D2": 5}, True, True),
    (3, 150, {"D1": 5, "D2": 0}, False, False),
])
def test_weight_grad_kernel_compiles_without_spills(arch, k, C, gaussians, keep_centre, idx64):
    usage = compile_for(mp._weight_grad_kernel, WG_SIGNATURE, _wg_constexprs(k, C, gaussians, keep_centre, idx64),
                        arch, divisible=tuple(WG_SIGNATURE))
    print(f"weight_grad k={k} C={C} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 255


def test_weight_grad_loops_stay_in_registers():
    """The weight-gradient kernel holds every value as a vector of its pixels, 2 consecutive pixels a thread, in
    one layout: no loop crosses threads (no shared memory, no barrier; the old kernel's [BLOCK_C, BLOCK_P] and
    [BLOCK_D, BLOCK_P] tiles took 12 barriers a tap), and the class loop, which unrolls a chunk of a tap row's
    taps for a block of classes (each class's neighbours constant offsets from one pointer, shared between a
    thread's two pixels), issues at most 2.2 instructions per multiply-add (sm_90, k = 7, C = 21: 2.06 with
    triton 3.9 and 3.6; the old kernel 16.8 a class and tap)."""
    listing = sass(mp._weight_grad_kernel, WG_SIGNATURE, _wg_constexprs(7, 21, TWO_GAUSSIANS), 90,
                   divisible=tuple(WG_SIGNATURE))
    for body in loops(listing):
        assert not {opcode(t) for t in body} & {"BAR", "LDS", "STS", "SHFL", "LDL", "STL"}, body
    assert instructions_per_ffma(listing) <= 2.2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unroll", [cfg.kwargs["UNROLL"] for cfg in mp.STEP_CONFIGS[:2]])
@pytest.mark.parametrize("C,fused,compat", [(21, True, True), (21, False, False), (32, True, True), (150, True, False)])
def test_mean_field_step_compiles_without_spills(arch, unroll, C, fused, compat):
    block_c, block_p, num_warps = mp.step_blocks(C, compat)
    consts = {"KSIZE": 7, "FUSED": fused, "KEEP_CENTRE": False, "IDX64": False, **TWO_GAUSSIANS, "STEP": True,
              "W_STRIDE": 1, "HAS_COMPAT": compat, "SOFTMAX": True, "BLOCK_C": block_c, "BLOCK_P": block_p,
              "UNROLL": unroll}
    usage = compile_for(mp._message_pass_kernel, MP_SIGNATURE, consts, arch, num_warps=num_warps)
    print(f"mean_field_step C={C} fused={fused} compat={compat} unroll={unroll} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 255


# SASS: what the design relies on, read from the compiled code (aligned pointers and sizes, as a launch on
# a 512×512 image specialises them). No local memory; the pixel-contiguous output stored 16 bytes at a
# time; the fused pass's weights through the SFU's exp2, and no exp at all in the two-pass kernel.
ALIGNED_MP = tuple(MP_SIGNATURE)


def _opcodes(listing: str) -> set[str]:
    return set(re.findall(r"\b(?:LDG|STG|LDL|STL|MUFU)\.[A-Z0-9.]+|\b(?:LDL|STL)\b", listing))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS, ids=str)
def test_message_pass_sass(cfg, fused):
    ops = _opcodes(sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, fused), 90,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP))
    assert not {op for op in ops if op.startswith(("LDL", "STL"))}, ops
    assert "STG.E.128" in ops, ops
    assert ("MUFU.EX2" in ops) == fused, ops


# The window sum's hot loop (an interior block's: no masks), in instructions per multiply-add, k = 7, sm_90.
# Before _window_sum split the interior from the border blocks and walked the window by rows, every config
# took 6.6-11.4 (two-pass and steps) and 7.4-10.8 (fused): a mask, a zero fill and a 64-bit address per
# load, the tap's row and column from a division, and in the 8 × 128 tiles a trip of the weights through
# shared memory between two barriers at every tap. With that: 2.3-4.3 and 3.7-6.8. Then the planar interior
# tap rows were unrolled (8 taps at a time, 4 fused) from one pointer a chunk: a thread's neighbours at
# constant offsets, each loaded once for all the chunk's taps, and the fused weights' exp one MUFU.EX2:
# two-pass 1.7-2.2 (4-byte loads, 0.42 a multiply-add), fused 3.3-4.7, planar steps 1.7-2.0. Now the
# two-pass interior reads aligned 16-byte chunks of each row and splits them in registers (_interior_rows,
# widths that are multiples of 16), its tile held as rows of 4 pixels and K's tap pointer stepped by one add:
# triton 3.6 and 3.9 alike 1.39-1.68 (0.17-0.23 loads a multiply-add, every one 16 bytes; planar steps
# 1.39-1.74). Other widths keep the 4-byte loop: 2.45-3.1 without the divisibility by 16. The channels-last
# step keeps its loop (2.8-3.3).
MAX_INSTRUCTIONS_PER_FFMA = {"two-pass": 1.75, "two-pass-edge": 2.55, "two-pass-unaligned": 3.2, "fused": 5.0,
                             "fused-edge": 5.3, "step": 1.8, "step-channels-last": 3.4}
MAX_LOADS_PER_FFMA = 0.25


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS, ids=str)
def test_message_pass_hot_loop_overhead(cfg, fused):
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, fused), 90,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    assert instructions_per_ffma(listing) <= MAX_INSTRUCTIONS_PER_FFMA["fused" if fused else "two-pass"]
    if not fused:  # the K weights load in the tile's own layout: no shared memory, no barrier in any loop
        assert not [t for body in loops(listing) for t in body if opcode(t) in ("BAR", "LDS", "STS")]


def _ffma(body: list[str]) -> int:
    return sum(opcode(t) == "FFMA" for t in body)


def _loads(body: list[str]) -> list[str]:
    return [t for t in body if opcode(t) == "LDG"]


def _select_loops(listing: str) -> list[list[str]]:
    """The loops with multiply-adds and selects: the border blocks' unmasked loops (EDGE)."""
    return [body for body in loops(listing) if "FFMA" in {opcode(t) for t in body} and
            {"SEL", "FSEL"} & {opcode(t) for t in body}]


@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS, ids=str)
def test_two_pass_interior_reads_16_bytes_at_a_time(cfg):
    """Aligned pointers and sizes (a width that is a multiple of 16; ALIGNED): the interior loop's loads of Q and
    K are all 16 bytes wide, at most MAX_LOADS_PER_FFMA a multiply-add (k = 7: 3 chunks a class row and tap
    row, one K load a tap: 0.17 with 4 class rows a thread, 0.23 with 2; was 10 4-byte loads a class row), and
    nothing crosses shared memory."""
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, False), 90,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    body = hot_loop(listing)
    loads = _loads(body)
    assert loads and all(".128" in t for t in loads), loads
    assert len(loads) <= MAX_LOADS_PER_FFMA * _ffma(body)
    assert not [t for t in body if opcode(t) in ("BAR", "LDS", "STS")]
    assert len(body) <= MAX_INSTRUCTIONS_PER_FFMA["two-pass"] * _ffma(body)


@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS, ids=str)
def test_two_pass_border_blocks_take_the_chunks_too(cfg):
    """A border block whose reads all lie in Q (all but those near the batch's two ends) runs the chunked loop
    too (EDGE), each value outside the image replaced by zero with one select: its one loop with selects reads
    16 bytes at a time and issues at most 2.55 instructions a multiply-add (k = 7: 1.88-2.43 with triton 3.9,
    1.88-2.5 with 3.6; the masked loop these blocks ran before, which the blocks at the batch's ends still run:
    4.5-5.9 and 5.0-9.1)."""
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, False), 90,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    edge = _select_loops(listing)
    assert len(edge) == 1, [len(body) for body in edge]
    loads, ffma = _loads(edge[0]), _ffma(edge[0])
    assert loads and all(".128" in t for t in loads), loads
    assert len(loads) <= MAX_LOADS_PER_FFMA * ffma
    assert len(edge[0]) <= MAX_INSTRUCTIONS_PER_FFMA["two-pass-edge"] * ffma


FUSED_EDGE_CONFIGS = [cfg for cfg in mp.TUNE_CONFIGS if cfg.kwargs["BLOCK_C"] <= mp.FUSED_EDGE_MAX_BLOCK_C
                      and cfg.kwargs["BLOCK_P"] <= 16 * cfg.kwargs["BLOCK_C"]]


@pytest.mark.parametrize("cfg", FUSED_EDGE_CONFIGS, ids=str)
def test_fused_border_blocks_walk_the_window_unmasked(cfg):
    """The fused pass's border blocks (but those near the batch's two ends) run the interior's unrolled tap rows
    too (EDGE), each tap's weights outside the image zeroed by one select a pixel, not one a class: a second loop
    with the interior's multiply-adds, at most 0.6 selects and 5.3 instructions a multiply-add (k = 7, sm_90:
    triton 3.9 4.4-4.7 and 0.18, triton 3.6 4.9-5.3 and 0.54, where a thread's 2 class rows × 4 pixels make one
    select a pixel 0.5 and one a value 1; zeroing the values instead took 0.68 with 3.9; the masked loop these
    blocks ran before: 6.3-9.1)."""
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, True), 90,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    interior = hot_loop(listing)
    edge = [body for body in loops(listing) if body != interior and _ffma(body) == _ffma(interior)]
    assert len(edge) == 1, [len(body) for body in edge]
    ffma = _ffma(edge[0])
    assert sum(opcode(t) in ("SEL", "FSEL") for t in edge[0]) <= 0.6 * ffma
    assert len(edge[0]) <= MAX_INSTRUCTIONS_PER_FFMA["fused-edge"] * ffma


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", FUSED_EDGE_CONFIGS, ids=str)
def test_fused_border_loop_fits_the_register_budget_at_k_21(cfg, arch):
    """The largest filter size whose fused border blocks take the unmasked loop (FUSED_EDGE_MAX_FILTER_SIZE), in
    every tile that takes it (sm_90: 92 registers with triton 3.9, 128 with 3.6): no spills, and at most 168
    registers (3 resident blocks of 4 warps an SM)."""
    k = mp.FUSED_EDGE_MAX_FILTER_SIZE.value
    usage = compile_for(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, k, True), arch,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=ALIGNED_MP)
    assert usage.stack == 0 and usage.reg <= 168, usage


def _blocked(layout: str) -> dict[str, list[int]]:
    """``#ttg.blocked<{sizePerThread = [1, 4], ...}>`` as ``{"sizePerThread": [1, 4], ...}``."""
    return {name: [int(n) for n in value.split(",")] for name, value in re.findall(r"(\w+) = \[([\d, ]+)\]", layout)}


@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS[:2], ids=str)
def test_two_pass_widths_that_are_multiples_of_4_read_16_bytes_too(cfg):
    """A width that is a multiple of 4 but not of 16 (a launch tells the compiler the pointers' alignment, nothing
    of the sizes; the kernel restates w as (w // 4) * 4): the interior and the border blocks' chunked loops as at
    a multiple of 16, 16-byte loads only and no shared memory (k = 7; interior 1.39 / 1.64, EDGE up to 2.54 with
    triton 3.9, 2.88 with 3.6, whose selects then fold less)."""
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, False, aligned=4), 90,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=POINTERS_ALIGNED)
    body = hot_loop(listing)
    assert all(".128" in t for t in _loads(body)) and not [t for t in body if opcode(t) in ("BAR", "LDS", "STS")]
    assert len(body) <= MAX_INSTRUCTIONS_PER_FFMA["two-pass"] * _ffma(body)
    edge = _select_loops(listing)
    assert len(edge) == 1 and all(".128" in t for t in _loads(edge[0]))
    assert len(edge[0]) <= 2.95 * _ffma(edge[0])


@pytest.mark.parametrize("cfg", mp.TUNE_CONFIGS[:2], ids=str)
def test_two_pass_interior_of_other_widths(cfg):
    """A width that is not a multiple of 4 (aligned pointers, nothing known of the sizes): the 4-byte loop, and
    its border blocks (but those near the batch's ends) unmasked too, with a select a neighbour (EDGE: k = 7,
    3.5-4.8 instructions a multiply-add with triton 3.9, 3.5-5.1 with 3.6, against the masked loop's 5.9-9.0)."""
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(cfg, 7, False, aligned=0), 90,
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, divisible=POINTERS_ALIGNED)
    assert instructions_per_ffma(listing) <= MAX_INSTRUCTIONS_PER_FFMA["two-pass-unaligned"]
    assert not [t for t in _loads(hot_loop(listing)) if ".128" in t]
    edge = _select_loops(listing)
    assert len(edge) == 1 and len(edge[0]) <= 5.2 * _ffma(edge[0])


@pytest.mark.parametrize("cs", [0, 24])
@pytest.mark.parametrize("unroll", [1, 2])
def test_mean_field_step_hot_loop_overhead(cs, unroll):
    consts, num_warps = _step_consts(21, False, cs)
    listing = sass(mp._message_pass_kernel, MP_SIGNATURE, {**consts, "UNROLL": unroll}, 90, num_warps=num_warps,
                   divisible=ALIGNED_MP)
    assert instructions_per_ffma(listing) <= MAX_INSTRUCTIONS_PER_FFMA["step-channels-last" if cs else "step"]
    if not cs:  # planar: _interior_rows' 16-byte chunks of Q and K
        assert all(".128" in t for t in _loads(hot_loop(listing)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("storage", ["*bf16", "*fp16"])
@pytest.mark.parametrize("step", [False, True])
def test_low_precision_storage_compiles_without_spills(arch, storage, step):
    """K and Q stored in bfloat16/float16 (and, for the step, its output): the same kernel, float32 sums."""
    # (a message in float32: kernels._launch.message_dtype; the step's output, the next Q, in the storage dtype)
    signature = {**MP_SIGNATURE, "q_ptr": storage, "k_ptr": storage, "m_ptr": storage if step else "*fp32"}
    if step:
        block_c, block_p, num_warps = mp.step_blocks(21, False)
        consts = {"KSIZE": 7, "FUSED": False, "KEEP_CENTRE": False, "IDX64": False, **TWO_GAUSSIANS, "STEP": True,
                  "W_STRIDE": 1, "HAS_COMPAT": False, "SOFTMAX": True, "BLOCK_C": block_c, "BLOCK_P": block_p,
                  "UNROLL": 1}
    else:
        cfg = mp.TUNE_CONFIGS[1]
        consts, num_warps = _mp_constexprs(cfg, 7, False), cfg.num_warps
    usage = compile_for(mp._message_pass_kernel, signature, consts, arch, num_warps=num_warps, divisible=ALIGNED_MP)
    assert usage.stack == 0 and usage.reg <= 255, usage
    gw_usage = compile_for(gw._gaussian_weights_kernel, {**GW_SIGNATURE, "k_ptr": storage},
                           {"KSIZE": 7, "KEEP_CENTRE": False, "BLOCK_P": gw.WEIGHTS_BLOCK_P, "IDX64": False,
                            **TWO_GAUSSIANS}, arch)
    assert gw_usage.stack == 0, gw_usage


def _step_consts(C, compat, cs):
    block_c, block_p, num_warps = mp.step_blocks(max(C, cs), compat)
    return {"KSIZE": 7, "FUSED": False, "KEEP_CENTRE": False, "IDX64": False, **TWO_GAUSSIANS, "STEP": True,
            "W_STRIDE": 1, "HAS_COMPAT": compat, "SOFTMAX": True, "BLOCK_C": block_c, "BLOCK_P": block_p,
            "UNROLL": 1, "CS": cs, "ALIGNED": 16}, num_warps


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("C,compat", [(21, False), (21, True), (150, False)])
def test_channels_last_step_compiles_without_spills(arch, C, compat):
    consts, num_warps = _step_consts(C, compat, -(-C // 4) * 4)
    usage = compile_for(mp._message_pass_kernel, MP_SIGNATURE, consts, arch, num_warps=num_warps)
    print(f"mean_field_step channels-last C={C} compat={compat} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 255


# The two-pass interior's tile as _interior_rows holds it, [BLOCK_C * BLOCK_P / 4, 4] (a class's run of 4 pixels
# a row), for every tuned tile and the planar step's.
INTERIOR_LAUNCHES = [(_mp_constexprs(cfg, 7, False), cfg.num_warps) for cfg in mp.TUNE_CONFIGS]
INTERIOR_LAUNCHES.append(_step_consts(21, False, 0))


INTERIOR_IDS = [f"{c['BLOCK_C']}x{c['BLOCK_P']}-{w}w{'-step' * c['STEP']}"
                for c, w in INTERIOR_LAUNCHES]


@pytest.mark.parametrize("consts,num_warps", INTERIOR_LAUNCHES, ids=INTERIOR_IDS)
def test_two_pass_interior_lanes_on_consecutive_runs(consts, num_warps):
    """The layouts the compiler chose for the interior's loads (Q's chunks, K's taps): a thread a row's 4 pixels
    (one 16-byte load), a warp's lanes on consecutive rows: consecutive runs of a class row, 512 contiguous bytes
    a load at 16 or more runs a class row. (As [BLOCK_C, BLOCK_P / 4, 4], a tile whose first two dimensions
    are equally non-contiguous, triton 3.6 put the lanes on the classes: each load 32 cache lines, 16 bytes of
    each, and 4 runs of one class a thread, each with its own K load.) The output tile's stores: lanes along
    the pixels too."""
    block_c, block_p = consts["BLOCK_C"], consts["BLOCK_P"]
    ir = ttgir(mp._message_pass_kernel, MP_SIGNATURE, consts, 90, num_warps=num_warps, divisible=ALIGNED_MP)
    ops = memory_layouts(ir)
    runs = [_blocked(layout) for op, shape, layout in ops if op == "tt.load" and shape == (block_c * block_p // 4, 4)]
    assert len(runs) >= 2, ops
    for layout in runs:
        assert layout["sizePerThread"] == [1, 4] and layout["threadsPerWarp"] == [32, 1], layout
    stores = [_blocked(layout) for op, shape, layout in ops if op == "tt.store" and shape == (block_c, block_p)]
    assert stores and all(layout["threadsPerWarp"][1] == min(32, block_p // 4) for layout in stores), stores


def test_channels_last_step_reads_classes_16_bytes_at_a_time():
    """What the channels-last layout is for: a neighbour's 4 classes in one 16-byte load. In the interior loop
    (k = 7) the channels-last step issues one LDG.E.128 per 4 multiply-adds (its weights: 4-byte loads); the
    planar step reads Q in aligned 16-byte chunks of 4 pixels (3 a class row and tap row, for 28 multiply-adds)
    and K 16 bytes at a time, one load per tap: fewer loads per multiply-add than channels-last."""
    def loop_loads(cs):
        consts, num_warps = _step_consts(21, False, cs)
        listing = sass(mp._message_pass_kernel, MP_SIGNATURE, consts, 90, num_warps=num_warps, divisible=ALIGNED_MP)
        ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in hot_loop(listing)]
        return ops.count("FFMA"), ops.count("LDG.E.128"), ops.count("LDG.E")

    ffma, wide, narrow = loop_loads(24)
    assert wide == ffma // 4 and narrow <= ffma // 4, (ffma, wide, narrow)
    ffma, wide, narrow = loop_loads(0)
    assert narrow == 0 and wide <= MAX_LOADS_PER_FFMA * ffma, (ffma, wide, narrow)


BLUR_SIGNATURE = {"u_ptr": PTR, "lse_ptr": PTR, "f_ptr": PTR, "m_ptr": PTR, "out_ptr": PTR, "term_ptr": PTR,
                  "flag_ptr": PTR, "C": "i32", "H": "i32", "W": "i32", "h": "i32", "w": "i32", "pad_y": "i32",
                  "pad_x": "i32"}
# (start, term, pool, softmax, log): the set-ups (blur > 1: lse and the pooled softmax or log-softmax of u;
# blur 1: softmax(u) and the unary term), then the iterations'.
BLUR_OUTPUTS = {"start": (True, False, True, True, False), "start-log": (True, False, True, True, True),
                "start-term": (True, True, True, True, False),
                "pooled": (False, False, True, True, False), "probabilities": (False, False, False, True, False),
                "logits": (False, False, False, False, False)}


def _blur_default(blur, output="pooled"):
    """The config a launch at ``blur`` takes untuned: the first the pruner keeps."""
    start, term, pool, softmax, log = BLUR_OUTPUTS[output]
    return bi._prune(bi.TUNE_CONFIGS, {"C": 21}, SP=triton.next_power_of_2(blur), POOL=pool, SOFTMAX=softmax)[0]


def _blur_consts(blur, output, idx64=False):
    start, term, pool, softmax, log = BLUR_OUTPUTS[output]
    return {"S": blur, "SP": triton.next_power_of_2(blur), "START": start, "TERM": term, "POOL": pool,
            "SOFTMAX": softmax, "LOG": log, **_blur_default(blur, output).kwargs, "IDX64": idx64,
            "CHECK": start}  # (an inference's set-ups test the unary's values)


# The iterations' outputs at every blur kind (2, odd, 4, int64 offsets, 8); the set-ups, smaller kernels (no
# message), once each: blur 1's with int64 offsets.
SETUP_BLURS = {"start": [(4, True)], "start-log": [(3, False)], "start-term": [(1, True)]}
BLUR_CASES = [(blur, idx64, output) for output in BLUR_OUTPUTS
              for blur, idx64 in SETUP_BLURS.get(output, [(2, False), (3, False), (4, False), (4, True), (8, False)])]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("blur,idx64,output", BLUR_CASES, ids=lambda c: str(c))
def test_blur_step_compiles_without_spills(arch, blur, idx64, output):
    usage = compile_for(bi._blur_step_kernel, BLUR_SIGNATURE, _blur_consts(blur, output, idx64), arch,
                        num_warps=_blur_default(blur, output).num_warps)
    print(f"blur_step blur={blur} {output} idx64={idx64} sm_{arch}: {usage}")
    assert usage.stack == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("storage", ["*bf16", "*fp16"])
@pytest.mark.parametrize("output", ["start-log", "start-term", "pooled"])
def test_blur_kernels_store_q_in_low_precision_storage(arch, storage, output):
    """The set-ups' first Q (blur 1's with the unary term) and the iterations' pooled Q written in the storage dtype
    (float16 saturated: kernels._math.as_stored): no spills."""
    blur = 1 if output == "start-term" else 4
    usage = compile_for(bi._blur_step_kernel, {**BLUR_SIGNATURE, "out_ptr": storage}, _blur_consts(blur, output),
                        arch, num_warps=_blur_default(blur, output).num_warps)
    assert usage.stack == 0, usage


def test_blur_step_exponentiates_only_for_the_softmax():
    """The classes run as a loop over one pixel tile: exp (MUFU.EX2) in the softmax variants only, nothing
    through local memory; the set-up reads no message, lse or unary factor, and stores lse."""
    listings = {output: sass(bi._blur_step_kernel, BLUR_SIGNATURE, _blur_consts(4, output), 90,
                             num_warps=_blur_default(4, output).num_warps) for output in BLUR_OUTPUTS}
    for output, listing in listings.items():
        ops = _opcodes(listing)
        assert not {op for op in ops if op.startswith(("LDL", "STL"))}, (output, ops)
        assert ("MUFU.EX2" in ops) == BLUR_OUTPUTS[output][3], output

    def count(pattern):
        return {output: len(re.findall(pattern, listing)) for output, listing in listings.items()}

    loads, stores = count(r"\bLDG\.E"), count(r"\bSTG\.E")
    assert loads["start"] < loads["pooled"] and stores["start"] > stores["pooled"], (loads, stores)


def test_blur_step_class_loop_overhead():
    """blur_step is issue-bound (bench/NOTES.md: run 3's 211 µs a call at 1024×2048 was its instruction count at
    ~75% of the H100's issue rate): the two class loops of the default config (1024 pixels on 2 warps, 16 a
    thread) in instructions per tile element. With the bilinear neighbours chosen per class by selects: 106;
    with pixel-only weights: 90; with exp as exp2, the upsampling along y at the pooled columns before x,
    unmasked message loads from clamped rows and columns, and the pooling's division once a cell: 57 (the then
    pick, 256 pixels on 2 warps, a cell's rows across lanes). Now a thread holds the 16 pixels of one cell, its
    bilinear pairs and weights constants (two multiply-adds a pixel and axis), the message scaled by w at its
    nine loads, the softmax in base 2 with one exponential an element in the first loop, the pooling in
    registers: 31 (triton 3.9) and 33 (3.6, whose L2 hints below take uniform instructions to set up). The loops
    cross no shared memory and no lanes, and u is read
    16 bytes at a time, kept in L2 by the first loop for the second (evict_last), released by the second
    (evict_first)."""
    cfg = bi.TUNE_CONFIGS[0]
    listing = sass(bi._blur_step_kernel, BLUR_SIGNATURE, _blur_consts(4, "pooled"), 90, num_warps=cfg.num_warps,
                   divisible=tuple(BLUR_SIGNATURE))
    per_thread = cfg.kwargs["BLOCK_PIXELS"] // (32 * cfg.num_warps)
    class_loops = loops(listing)
    assert len(class_loops) == 2  # the online softmax's pass and the probabilities' pass
    assert sum(map(len, class_loops)) / per_thread <= 34
    for body, hint in zip(class_loops, ("EL", "EF"), strict=True):
        ops = [opcode(t) for t in body]
        assert not {"BAR", "SHFL", "LDS", "STS"} & set(ops), sorted(set(ops))
        u_loads = [t for t in body if re.search(r"\bLDG\.E\S*\.128\b", t)]  # a 16-byte chunk of each of the cell's rows
        assert len(u_loads) == 4 and all(f".{hint}." in t for t in u_loads), u_loads


# The configs the tuner times at blur 4, C = 21 (the one-pass ones with every class: CLASSES = 21).
def _every_kept(prune, *args, **kwargs):
    """What ``prune`` keeps with ``CONVCRF_AUTOTUNE=0`` ignored (the GPU session sets it, and these names are
    built when the module is collected there too)."""
    switch = os.environ.pop("CONVCRF_AUTOTUNE", None)
    try:
        return prune(*args, **kwargs)
    finally:
        if switch is not None:
            os.environ["CONVCRF_AUTOTUNE"] = switch


BLUR_CONFIGS = _every_kept(bi._prune, bi.TUNE_CONFIGS, {"C": 21}, SP=4, POOL=True, SOFTMAX=True)


# sm_90 every config; sm_80 (the same 255 registers a thread) the fullest: 16 pixels a thread on 8 warps, one pass.
@pytest.mark.parametrize("arch,cfg", [(90, c) for c in BLUR_CONFIGS] + [(80, BLUR_CONFIGS[3]), (80, BLUR_CONFIGS[7])],
                         ids=str)
def test_every_blur_step_config_compiles_without_spills(arch, cfg):
    usage = compile_for(bi._blur_step_kernel, BLUR_SIGNATURE, {**_blur_consts(4, "pooled"), **cfg.kwargs}, arch,
                        num_warps=cfg.num_warps)
    print(f"blur_step {cfg} sm_{arch}: {usage}")
    assert usage.stack == 0, f"{cfg} spills: {usage}"


def test_blur_step_one_pass_configs_follow_the_register_budget():
    """Every class in registers where that is at most 96 values a thread (4 pixels a thread: C <= 24), with the
    softmax only (without it the kernel reads u once anyway); the default first."""
    def one_pass(C, softmax=True):
        return [(cfg.kwargs["BLOCK_PIXELS"], cfg.num_warps, cfg.kwargs.get("CLASSES"))
                for cfg in bi._prune(bi.TUNE_CONFIGS, {"C": C}, SP=4, POOL=True, SOFTMAX=softmax)
                if cfg.kwargs.get("CLASSES")]

    assert one_pass(21) == [(128, 1, 21), (256, 2, 21)] and one_pass(24)[0] == (128, 1, 24)
    assert one_pass(25) == one_pass(150) == one_pass(21, softmax=False) == []
    assert _blur_default(4) is bi.TUNE_CONFIGS[0]


@pytest.mark.parametrize("cfg", BLUR_CONFIGS[:2] + BLUR_CONFIGS[4:5] + BLUR_CONFIGS[-2:-1], ids=str)
def test_blur_step_loads_lie_along_the_rows(cfg):
    """Every load of blur_step's loops (u, lse and the message's gathers) in one layout: a flat tile of pixels,
    4 consecutive a thread (u's 16-byte chunks), consecutive chunks on consecutive lanes. Held as a tile with
    a dimension for the cells' rows, triton 3.6 and 3.9 ordered the gathers' ties differently (3.6: lanes on
    the rows) and converted them to u's layout through shared memory; a flat dimension has no ties."""
    ir = ttgir(bi._blur_step_kernel, BLUR_SIGNATURE, {**_blur_consts(4, "pooled"), **cfg.kwargs}, 90,
               num_warps=cfg.num_warps, divisible=tuple(BLUR_SIGNATURE))
    tiles = [_blocked(layout) for op, shape, layout in memory_layouts(ir)
             if op == "tt.load" and shape == (cfg.kwargs["BLOCK_PIXELS"],)]
    passes = cfg.kwargs.get("CLASSES") or 2  # u and six message gathers a class, or a class loop
    assert len(tiles) == 1 + 7 * passes, tiles  # and lse once
    for layout in tiles:
        assert layout["sizePerThread"] == [4] and layout["threadsPerWarp"] == [32], layout


BAND_SIGNATURE = {"q_ptr": PTR, "k_ptr": PTR, "m_ptr": PTR, "a_ptr": PTR, "w_ptr": PTR, "cm_ptr": PTR, "C": "i32",
                  "h": "i32", "w": "i32"}


def _band_consts(k, precision="tf32x3", idx64=False, block_c=None, **step):
    return {"KSIZE": k, **bp.band_tile(k), "BLOCK_C": block_c or bp.band_blocks(21),
            "PRECISION": precision, "IDX64": idx64, **step}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k,precision,idx64", [(3, "tf32x3", False), (11, "tf32x3", False), (11, "tf32", False),
                                               (15, "tf32", False), (21, "tf32", True), (31, "tf32x3", True)])
def test_band_message_pass_runs_on_tensor_cores_without_spills(arch, k, precision, idx64):
    """The banded product compiles to tensor-core MMAs: HMMA (mma.sync, tf32) on sm_80, HGMMA (wgmma, 64-row
    warpgroup tiles) on sm_90; tf32x3 issues three per product. Its operands are staged in shared memory by
    asynchronous copies (LDGSTS), nothing through local memory."""
    consts = _band_consts(k, precision, idx64)
    usage = compile_for(bp._band_message_pass_kernel, BAND_SIGNATURE, consts, arch, num_warps=bp.NUM_WARPS)
    print(f"band_message_pass k={k} {precision} idx64={idx64} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 255
    listing = sass(bp._band_message_pass_kernel, BAND_SIGNATURE, consts, arch, num_warps=bp.NUM_WARPS)
    mma = re.findall(r"\b(?:HMMA|HGMMA)\.\S*TF32\b", listing)
    assert mma and all(op.startswith("HGMMA" if arch == 90 else "HMMA") for op in mma), set(mma)
    assert "LDGSTS" in listing and not re.search(r"\b(?:LDL|STL)\b", listing)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k,precision,block_c,compat", [(11, "tf32x3", 32, False), (11, "tf32x3", 32, True),
                                                        (11, "tf32x3", 64, False), (21, "tf32", 32, True),
                                                        (21, "tf32", 64, False)])
def test_band_step_compiles_without_spills(arch, k, precision, block_c, compat):
    consts = _band_consts(k, precision, block_c=block_c, STEP=True, W_STRIDE=1, HAS_COMPAT=compat, SOFTMAX=True)
    usage = compile_for(bp._band_message_pass_kernel, BAND_SIGNATURE, consts, arch, num_warps=bp.STEP_NUM_WARPS)
    print(f"band_mean_field_step k={k} {precision} classes={block_c} compat={compat} sm_{arch}: {usage}")
    assert usage.stack == 0 and usage.reg <= 255


def _ones(signature: dict[str, str]) -> dict[str, int]:
    """Every integer argument of ``signature`` as the constant 1: what a launch compiles when a size is 1
    (Triton specialises an int argument equal to 1, so inside the kernel it is a plain int, not a tensor)."""
    return {name: 1 for name, kind in signature.items() if kind == "i32"}


def _pointers(signature: dict[str, str]) -> dict[str, str]:
    return {name: kind for name, kind in signature.items() if kind != "i32"}


# A 1-pixel-wide or -high image, one class: each kernel compiled as such a launch compiles it (a size method
# such as ``w.to(...)`` fails on the constant; the interpreter never specialises, so only this test sees it).
SIZE_ONE_CASES = {
    "gaussian_weights": (gw._gaussian_weights_kernel, GW_SIGNATURE,
                         {"KSIZE": 3, "KEEP_CENTRE": False, "BLOCK_P": gw.WEIGHTS_BLOCK_P, "IDX64": False,
                          **TWO_GAUSSIANS}, 4),
    "message_pass": (mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(mp.DEFAULT_CONFIG, 3, False, aligned=0),
                     mp.DEFAULT_CONFIG.num_warps),
    "fused_message_pass": (mp._message_pass_kernel, MP_SIGNATURE, _mp_constexprs(mp.DEFAULT_CONFIG, 3, True),
                           mp.DEFAULT_CONFIG.num_warps),
    "mean_field_step": (mp._message_pass_kernel, MP_SIGNATURE,
                        {**_mp_constexprs(mp.STEP_CONFIGS[0], 3, True), "STEP": True, "W_STRIDE": 1,
                         "HAS_COMPAT": True, "SOFTMAX": True, "BLOCK_C": mp.step_blocks(1, True)[0],
                         "BLOCK_P": mp.step_blocks(1, True)[1]}, mp.step_blocks(1, True)[2]),
    "weight_grad": (mp._weight_grad_kernel, WG_SIGNATURE, _wg_constexprs(3, 1, TWO_GAUSSIANS), 4),
    "blur_step": (bi._blur_step_kernel, BLUR_SIGNATURE, _blur_consts(4, "pooled"), bi.TUNE_CONFIGS[0].num_warps),
    "band_message_pass": (bp._band_message_pass_kernel, BAND_SIGNATURE, _band_consts(3), bp.NUM_WARPS),
    "gaussian_features": (ft._features_kernel, _features_signature(MODULE_POINTERS),
                          {"S": 1, "POINTERS": MODULE_POINTERS, "COL_POS": True, "BLOCK_P": ft.FEATURES_BLOCK_P,
                           "IDX64": False, "CHECK": True}, 4),
}


@pytest.mark.parametrize("name", SIZE_ONE_CASES)
def test_kernels_compile_with_sizes_of_one(name):
    fn, signature, consts, num_warps = SIZE_ONE_CASES[name]
    usage = compile_for(fn, _pointers(signature), {**consts, **_ones(signature)}, 90, num_warps=num_warps)
    assert usage.stack == 0
