// ================================================================================================
// Variant 4 forward: Hopper (sm_90a) warpgroup MMA (wgmma). Compiled only for compute_90a, as the
// source "attention_sm90a.cu" = common.cuh + attention.cu (helpers only: ATTN_HELPERS_ONLY drops its
// kernels) + this file, so the masks, fast_exp2 and loaders are variant 3's. The backward is v3's.
//
// Block: 128 query rows, 2 warpgroups (256 threads), each owning 64 rows; 128 keys per step.
//   S (64 x 128 per warpgroup)  = Q K^T : wgmma m64n128k16, A and B from shared memory (K-major);
//   O (64 x D per warpgroup)   += P V   : wgmma m64nDk16, A = P from registers (the score
//                                         accumulators re-packed, as in FA2/FA3), B = V (MN-major).
// The wgmma accumulator layout per warp is mma.sync's m16n8 C layout (rows 16 w + g, + 8; columns
// 8 i + 2 t, + 1 in registers 4 i .. 4 i + 3), so masking and the online softmax are variant 3's.
// Shared tiles use the 128-byte swizzle wgmma reads: a tile of R rows x D columns is D/64 column
// blocks of R x 128 bytes; 16-byte unit u of row r sits at unit u ^ (r % 8) (tile 1024-aligned).
// Descriptors (CUTLASS cute/arch/mma_sm90_desc.hpp, make_gmma_desc): K-major SW128: SBO = 1024
// (8-row groups), LBO unused; MN-major SW128: LBO = bytes between 64-column blocks, SBO = 1024
// (8-row groups along K). A k16 step inside a 128-byte row advances the start address by 32 bytes.
// Shared: Q 128 x D, then 2 stages of K and of V (128 x D each): 160 KB at d128, 80 KB at d64
// (+1 KB for alignment). One block per SM at d128.
// ================================================================================================
typedef unsigned long long u64;

#define FWD4_BM 128
#define FWD4_BN 128
#define FWD4_THREADS 256

// wgmma shared-memory matrix descriptor with the 128-byte swizzle (layout type 1 in bits 62-63).
__device__ __forceinline__ u64 sw128_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) |
           ((u64)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N of this warpgroup's committed wgmma groups are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void wgmma_wait0() { wgmma_wait<0>(); }
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Bulk asynchronous reduction (plain sm_90, no tensor map): global[dst .. + bytes] += shared[src ..]
// element-wise in fp32, atomically per element, by the copy engine. Both addresses 16-byte aligned,
// bytes a multiple of 16. Per-thread bulk groups: commit, then wait until the source was read.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, u32 src, u32 bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(dst), "r"(src), "r"(bytes)
                 : "memory");
}
// dst[0..4] += v, atomically per element at L2 (no return value); dst 16-byte aligned.
__device__ __forceinline__ void red_add_v4(float* dst, float a, float b, float c, float d) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read0() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait0() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }
// Barrier `id` (1..15; 0 is __syncthreads') over `threads` threads, e.g. one warpgroup.
__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Keeps the compiler from touching accumulator registers across a wgmma wait (CUTLASS's
// warpgroup_fence_operand): each use after this depends on an asm ordered after the wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// D (64 x 128, fp32, 64 registers per thread) (+)= A (64 x 16, shared, K-major) * B (16 x 128, shared,
// K-major: stored [n][k]). `accumulate` 0 overwrites D.
template <bool BF16>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], u64 a_desc, u64 b_desc, int accumulate) {
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(a_desc), "l"(b_desc), "r"(accumulate));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "l"(a_desc), "l"(b_desc), "r"(accumulate));
    }
}

// D (64 x 128, fp32) (+)= A (64 x 16, registers: the mma.sync A fragment layout per warp) *
// B (16 x 128, shared, MN-major: stored [k][n], hence the transpose flag 1).
template <bool BF16>
__device__ __forceinline__ void wgmma_rs_n128_tb(float (&d)[64], const u32 (&a)[4], u64 b_desc, int accumulate) {
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate));
    }
}

// D (64 x 64, fp32) (+)= A (64 x 16, registers: the mma.sync A fragment layout per warp) *
// B (16 x 64, shared, MN-major: stored [k][n], hence the transpose flag 1).
template <bool BF16>
__device__ __forceinline__ void wgmma_rs_n64_tb(float (&d)[32], const u32 (&a)[4], u64 b_desc, int accumulate) {
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(accumulate));
    }
}


// D (64 x 64, fp32) (+)= A (64 x 16) * B (16 x 64), both from shared memory; TA / TB = 1 reads
// that operand MN-major (A stored [k][m], B stored [k][n]) instead of K-major.
template <bool BF16, int TA, int TB>
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[32], u64 a_desc, u64 b_desc, int accumulate) {
    if (BF16) {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TA), "n"(TB));
    } else {
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %35, %36;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
            : "l"(a_desc), "l"(b_desc), "r"(accumulate), "n"(TA), "n"(TB));
    }
}


// Rows [row0, row0 + ROWS) of one head (D columns) with cp.async into the swizzled layout above
// (shared byte address `dst`), zero-filled past S. The caller commits and waits.
template <int D, int ROWS>
__device__ __forceinline__ void load_rows_sw128(u32 dst, const u16* src, i64 row_stride, int row0, int S) {
    constexpr int CH = D / 8;  // 16-byte units per row
#pragma unroll 1
    for (int c = threadIdx.x; c < ROWS * CH; c += FWD4_THREADS) {
        const int r = c / CH, cc = c % CH;
        const u32 off = (cc >> 3) * (ROWS * 128) + r * 128 + (((cc & 7) ^ (r & 7)) << 4);
        const bool in = row0 + r < S;
        const u16* g = in ? src + (i64)(row0 + r) * row_stride + cc * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst + off), "l"(g), "r"(in ? 16 : 0));
    }
}

template <bool BF16, int D>
__device__ __forceinline__ void wgmma_rs_d(float (&d)[D / 2], const u32 (&a)[4], u64 b_desc) {
    if constexpr (D == 128) wgmma_rs_n128_tb<BF16>(d, a, b_desc, 1);
    else wgmma_rs_n64_tb<BF16>(d, a, b_desc, 1);
}

// Forward pieces shared by variant 4 and its pipelined form (variant 5).

// S (64 x 128 per warpgroup, unscaled) = Q K^T: A = this warpgroup's 64 rows of the Q tile at
// `q_wg` (column block c at + c * BM * 128), B = the K tile at `Ks`. Issue only: the caller commits.
template <bool BF16, int D>
__device__ __forceinline__ void fwd4_qk(float (&s)[FWD4_BN / 2], u32 q_wg, u32 Ks) {
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
        const u32 col = (k & 3) * 32;  // bytes into the 128-byte row of column block k / 4
        const u64 da = sw128_desc(q_wg + (k >> 2) * (FWD4_BM * 128) + col, 16, 1024);
        const u64 db = sw128_desc(Ks + (k >> 2) * (FWD4_BN * 128) + col, 16, 1024);
        wgmma_ss_n128<BF16>(s, da, db, k > 0);
    }
}

// O += P V for the packed P fragments `pa` and the V tile at `Vs` (16 keys per step). Issue only.
template <bool BF16, int D>
__device__ __forceinline__ void fwd4_pv(float (&o)[D / 2], const u32 (&pa)[FWD4_BN / 16][4], u32 Vs) {
#pragma unroll
    for (int ks = 0; ks < FWD4_BN / 16; ++ks)
        wgmma_rs_d<BF16, D>(o, pa[ks], sw128_desc(Vs + ks * 16 * 128, FWD4_BN * 128, 1024));
}

// Masks the score tile of keys [k0, k0 + 128) (rows row0 + g, + 8 of this thread), then the
// online softmax step: updates the running max and this thread's partial row sums, turns s into
// P (2^(s scale_log2 - m)) and returns in `corr` the factor O must be rescaled by.
__device__ __forceinline__ void fwd4_softmax(float (&s)[FWD4_BN / 2], float (&m_run)[2], float (&l_run)[2],
                                             float (&corr)[2], const AttnParams& p, int b, int q0, int row0, int k0) {
    constexpr int NTS = FWD4_BN / 8;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const float sl2 = p.scale_log2;
    if (!tile_full(p, b, q0, k0, FWD4_BN)) {
        // (variant 20: a tile the masks allow no pair of is masked without the mask loads; a
        // separate all -inf loop made ptxas spill ~100 bytes here)
        const bool none = tile_empty(p, b, q0, k0);
#pragma unroll
        for (int j = 0; j < NTS; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = row0 + g + (e >> 1) * 8;
                const int col = k0 + j * 8 + 2 * t + (e & 1);
                if (none || !allowed3(p, b, row, col)) s[4 * j + e] = NEG_INF;
            }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = NEG_INF;
#pragma unroll
        for (int j = 0; j < NTS; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[r], mx * sl2);
        const float m_use = m_new == NEG_INF ? 0.f : m_new;  // all masked so far: avoid inf - inf
        corr[r] = fast_exp2(m_run[r] - m_use);
        m_run[r] = m_new;
        l_run[r] *= corr[r];
#pragma unroll
        for (int j = 0; j < NTS; ++j)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; ++e) {
                const float pv = fast_exp2(fmaf(s[4 * j + e], sl2, -m_use));
                s[4 * j + e] = pv;
                l_run[r] += pv;
            }
    }
}

template <int D>
__device__ __forceinline__ void fwd4_rescale(float (&o)[D / 2], const float (&corr)[2]) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * j + e] *= corr[e >> 1];
}

// P as wgmma A fragments. All of them are packed before the fence that precedes the P V wgmmas:
// registers written between two wgmmas make ptxas insert a warpgroup.arrive before each (C7519).
template <bool BF16>
__device__ __forceinline__ void fwd4_pack(u32 (&pa)[FWD4_BN / 16][4], const float (&s)[FWD4_BN / 2]) {
#pragma unroll
    for (int ks = 0; ks < FWD4_BN / 16; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) pa[ks][i] = pack2<BF16>(s[8 * ks + 2 * i], s[8 * ks + 2 * i + 1]);
}

// O / l and the log2-domain lse for this thread's rows row0 + g, + 8.
template <bool BF16, int D>
__device__ __forceinline__ void fwd4_store(const AttnParams& p, int b, int h, int row0, const float (&o)[D / 2],
                                           const float (&m_run)[2], const float (&l_run)[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = row0 + g + r * 8;
        if (row < p.Sq) {
            u16* orow = p.o + b * p.o_bs + (i64)row * p.o_ss + h * p.o_hs;
#pragma unroll
            for (int j = 0; j < D / 8; ++j)
                *reinterpret_cast<u32*>(orow + j * 8 + 2 * t) = pack2<BF16>(o[4 * j + 2 * r] * inv, o[4 * j + 2 * r + 1] * inv);
            if (t == 0) p.lse[((i64)b * p.H + h) * p.Sq + row] = l > 0.f ? m_run[r] + log2f(l) : NEG_INF;
        }
    }
}

// Forward, variant 4 (and 5 with PIPE). Grid (ceil(Sq / 128), H, B), query tiles in reverse order
// (causal: longest first), as variant 3. D is 64 or 128.
// Variant 4, per key tile: S = Q K^T, wait, softmax, O += P V, wait: the tensor cores idle while
// a warpgroup does its softmax. Variant 5 (FA3's intra-warpgroup overlap): iteration kt issues
// S_{kt+1} = Q K_{kt+1} and then O += P_kt V_kt, waits for S only, does the softmax of tile kt+1
// while P_kt V_kt runs, then waits for it and rescales O. Its loads: the group issued at the top of
// iteration kt brings K_{kt+2} and V_{kt+1}, each into the stage its previous occupant (K_kt,
// V_{kt-1}) left when the last iteration's wgmmas were waited for.
template <bool BF16, int D, bool PIPE>
__device__ void attn_fwd4(const AttnParams& p) {
    extern __shared__ __align__(16) u16 smem[];
    constexpr int BM = FWD4_BM, BN = FWD4_BN;
    constexpr u32 Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
    const u32 base = (smem_addr(smem) + 1023u) & ~1023u;
    const u32 Qs = base, Kst = Qs + Q_BYTES, Vst = Kst + 2 * KV_BYTES;

    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.H / p.Hk);
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3;
    const int q0 = qt * BM, row0 = q0 + wg * 64 + warp * 16;  // this thread's rows: row0 + g (+ 8)
    const u16* qbase = p.q + b * p.q_bs + h * p.q_hs;
    const u16* kbase = p.k + b * p.k_bs + hk * p.k_hs;
    const u16* vbase = p.v + b * p.v_bs + hk * p.v_hs;

    int n_tiles = (p.Sk + BN - 1) / BN;
    if (p.causal) {
        const int last_key = q0 + BM - 1 + (p.Sk - p.Sq);
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }
    auto load_k = [&](int tile) { load_rows_sw128<D, BN>(Kst + (tile & 1) * KV_BYTES, kbase, p.k_ss, tile * BN, p.Sk); };
    auto load_v = [&](int tile) { load_rows_sw128<D, BN>(Vst + (tile & 1) * KV_BYTES, vbase, p.v_ss, tile * BN, p.Sk); };

    load_rows_sw128<D, BM>(Qs, qbase, p.q_ss, q0, p.Sq);
    if (n_tiles > 0) {
        load_k(0);
        load_v(0);
    }
    if (PIPE && n_tiles > 1) load_k(1);
    cp_async_commit();  // group: Q + K/V tile 0 (+ K tile 1)

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // rows g, g + 8 (partial sums per thread)
    float corr[2];
    float s[BN / 2];
    u32 pa[BN / 16][4];
    const u32 q_wg = Qs + wg * 64 * 128;

    if (!PIPE) {
        for (int kt = 0; kt < n_tiles; ++kt) {
            if (kt + 1 < n_tiles) {  // prefetch the next tile into the other stage (freed by the last barrier)
                load_k(kt + 1);
                load_v(kt + 1);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            fence_proxy_async();
            __syncthreads();
            wgmma_fence();
            fwd4_qk<BF16, D>(s, q_wg, Kst + (kt & 1) * KV_BYTES);
            wgmma_commit();
            wgmma_wait0();
            fence_regs(s);
            fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, kt * BN);
            fwd4_rescale<D>(o, corr);
            fwd4_pack<BF16>(pa, s);
            wgmma_fence();
            fwd4_pv<BF16, D>(o, pa, Vst + (kt & 1) * KV_BYTES);
            wgmma_commit();
            wgmma_wait0();
            fence_regs(o);
            __syncthreads();  // this stage may be overwritten by the next prefetch
        }
    } else if (n_tiles > 0) {
        // prologue: S_0 and its softmax (O is still zero: no rescale needed)
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        wgmma_fence();
        fwd4_qk<BF16, D>(s, q_wg, Kst);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(s);
        fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, 0);
        fwd4_pack<BF16>(pa, s);
        // Every tile but the last: the loop body issues its wgmmas unconditionally (with a
        // conditional issue, ptxas serialized every wgmma of the kernel).
        for (int kt = 0; kt + 1 < n_tiles; ++kt) {
            cp_async_wait<0>();  // K_{kt+1}, V_kt
            fence_proxy_async();
            __syncthreads();  // ... visible to all; K_kt and V_{kt-1} no longer read
            if (kt + 2 < n_tiles) load_k(kt + 2);
            load_v(kt + 1);
            cp_async_commit();
            wgmma_fence();
            fwd4_qk<BF16, D>(s, q_wg, Kst + ((kt + 1) & 1) * KV_BYTES);
            wgmma_commit();
            fwd4_pv<BF16, D>(o, pa, Vst + (kt & 1) * KV_BYTES);
            wgmma_commit();
            wgmma_wait<1>();  // S_{kt+1} done
            fence_regs(s);
            fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, (kt + 1) * BN);
            wgmma_wait0();  // P_kt V_kt done: O and the P fragments are free
            fence_regs(o);
            fwd4_rescale<D>(o, corr);
            fwd4_pack<BF16>(pa, s);
        }
        // the last tile's P V
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        wgmma_fence();
        fwd4_pv<BF16, D>(o, pa, Vst + ((n_tiles - 1) & 1) * KV_BYTES);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(o);
    }
    cp_async_wait<0>();
    fwd4_store<BF16, D>(p, b, h, row0, o, m_run, l_run);
}

// ------------------------------------------------------------------------------------------------
// mbarriers, TMA and register hand-off (variant 7's forward, variant 10's backward)
// ------------------------------------------------------------------------------------------------
// A CUtensorMap: 128 opaque bytes made by cuTensorMapEncodeTiled on the host.
struct __align__(64) TmaMap {
    u64 w[16];
};

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Makes the initialized barriers visible to the async proxy (the TMA unit) before first use.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// One arrival that also announces `bytes` of TMA writes the phase must wait for.
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
    u32 done;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
    return done != 0;
}
// Waits for the phase with this parity to complete (the math warpgroups' wait: no watchdog,
// a trap anywhere in their code made ptxas compile it with the entry's 168-register budget instead
// of setmaxnreg's 240, spilling and serializing the wgmmas).
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}
// The producer's wait. A wait that outlasts ~2^34 cycles (seconds) can only be a protocol bug (a
// byte or arrival count that never adds up): trap, so the launch fails with an error instead of
// hanging the process and the GPU. The producer waits for the math warpgroups' last release before
// it exits (`fwd7_produce`), so a math warpgroup stuck on a barrier trips this watchdog too.
__device__ __forceinline__ void mbar_wait_or_trap(u32 bar, u32 parity) {
    if (mbar_try_wait(bar, parity)) return;
    const long long t0 = clock64();
    while (!mbar_try_wait(bar, parity))
        if (clock64() - t0 > (1ll << 34)) __trap();
}

// TMA: one box of `map` (64 columns x the rows the map was encoded with) at coordinates (c0, c1, c2, c3) into shared `dst`,
// completing `bytes` on the mbarrier `bar`.
__device__ __forceinline__ void tma_load_4d(u32 dst, const TmaMap* map, u32 bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];" ::"r"(dst),
        "l"((u64)map), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N)); }
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N)); }
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Map coordinate k (1..3) for a tile at sequence row `row` of head `head`, batch `batch`.
__device__ __forceinline__ int tma_coord(const int (&pos)[3], int k, int row, int head, int batch) {
    return (pos[0] == k ? row : 0) + (pos[1] == k ? head : 0) + (pos[2] == k ? batch : 0);
}

// One tile of ROWS rows (D / 64 boxes of ROWS rows x 128 bytes: the swizzled column blocks, each
// ROWS x 128 bytes) onto `bar`; the caller announces the bytes.
template <int D, int ROWS>
__device__ __forceinline__ void tma_load_rows(u32 dst, const TmaMap& map, const int (&pos)[3], u32 bar, int row,
                                              int head, int batch) {
    const int c1 = tma_coord(pos, 1, row, head, batch), c2 = tma_coord(pos, 2, row, head, batch),
              c3 = tma_coord(pos, 3, row, head, batch);
#pragma unroll
    for (int c = 0; c < D / 64; ++c) tma_load_4d(dst + c * ROWS * 128, &map, bar, c * 64, c1, c2, c3);
}
// Plain bulk copy (no tensor map) of `bytes` (a multiple of 16, both addresses 16-byte aligned) onto `bar`.
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}

// ================================================================================================
// Backward, variant 4 (wgmma). One block per (128-key tile, KV head, batch): 2 warpgroups, each
// owning 64 keys, looping over the query heads of the KV head's group and their 64-row query tiles
// (dK/dV stay in registers; dQ goes to the fp32 dq_acc with atomics), as variant 3 does. Per tile:
//   1. S^T = K Q^T, dP^T = V dO^T (64 keys x 64 queries per warpgroup): wgmma m64n64k16, both
//      operands K-major from shared memory.
//   2. P^T = 2^(S^T scale_log2 - lse), dS^T = P^T (dP^T - delta), on the accumulators; dS^T also
//      goes to shared memory ([key][query], swizzled) for step 5.
//   3. dV += P^T dO, dK += dS^T Q: wgmma m64nDk16, A = P^T / dS^T from registers, B = dO / Q read
//      MN-major (stored [query][d]).
//   4. the next tile's Q, dO, lse, delta start loading (single buffer, free after step 3);
//   5. dQ += dS K (64 queries x 128): A = dS^T from shared memory read MN-major ([key][query]),
//      B = K read MN-major ([key][d]); warpgroup w computes columns 64 w .. +64 over all 128 keys.
// Shared: K, V (128 x D), Q, dO (64 x D), dS^T (128 x 64), lse, delta (64): 113 KB.
// Head dim 128 only: at d64 this kernel (dQ split over keys instead) measured 0.85-0.89x variant
// 3's backward on an H200 (2026-11-26), so d64 keeps variant 3's.
// ================================================================================================
#define BWD4_BN 128
#define BWD4_BM 64

// Variant 17 (p.lpt_group > 0, set for causal calls): blocks longest first. In grid order each
// (batch, head)'s longest tile is dispatched one head's worth of blocks after the previous
// head's, so the last head's longest tile starts a fraction of a wave before the end and runs
// on while the other SMs go idle (a causal tile's work is its number of key tiles, 1 to n). Here
// the grid's linear block index walks the (batch, head) pairs in groups of `group`; within a
// group every pair's longest tile comes first, then every pair's second longest, and so on, so
// the blocks that start last are the shortest. The host sizes a group to start its longest tiles
// at least two waves before its end, and, beyond that, to as many pairs as half the L2 holds the
// data of (the blocks running together share it). level: 0 for a pair's longest tile; pair:
// (batch, head) as batch * gridDim.y + head. `lpt_block` in kernels/src/attention.rs is its
// twin, tested on the CPU.
__device__ __forceinline__ void lpt_block(int group, int& level, int& pair) {
    const i64 n_tiles = gridDim.x, pairs = (i64)gridDim.y * gridDim.z;
    const i64 linear = blockIdx.x + n_tiles * (blockIdx.y + (i64)gridDim.y * blockIdx.z);
    const i64 first = linear / (group * n_tiles) * group;  // the group's first pair
    const i64 size = min((i64)group, pairs - first), r = linear - first * n_tiles;
    level = (int)(r / size);
    pair = (int)(first + r % size);
}

// Step 2 of the backward on the accumulators, in two halves so that variant 6 can run the first
// while dP^T is still on the tensor cores. bwd4_p: P^T = 2^(S^T scale_log2 - lse) in place of S^T;
// bwd4_ds: dS^T = P^T (dP^T - delta) in place of dP^T (w.r.t. the scaled scores). Element e of
// column block j: key `key` + 8 (e >> 1), query column 8 j + 2 t + (e & 1) of the tile at q0. FULL
// (no element masked) is chosen by one uniform branch outside: a per-element `full ||
// allowed(...)` test made each of the 32 elements its own branch region in SASS, so their shared
// loads and exp2 latencies ran one after another.
// 2^x on the FMA and integer pipes instead of the MUFU unit (FlashAttention-4's trick): x =
// n + f with n = round(x) (1.5 * 2^23 added and taken away again puts n in the sum's low mantissa
// bits), 2^f for f in [-0.5, 0.5] by a degree-3 polynomial fitted to relative error (7.5e-5, far
// below bf16's 3.9e-3 rounding), and n added to the result's exponent bits. x is clamped at -125
// (2^-125 ~ 2e-38 stands for 0; below it the exponent would underflow into the sign bit). The
// constants and the bound are checked in kernels/src/attention.rs (a float32 emulation).
__device__ __forceinline__ float exp2_fma(float x) {
    x = fmaxf(x, -125.f);
    const float r = __fadd_rn(x, 12582912.f);              // (the _rn forms are never reassociated)
    const float f = __fsub_rn(x, __fsub_rn(r, 12582912.f));  // x - round(x)
    const float p = fmaf(fmaf(fmaf(0.055171482f, f, 0.24261090f), f, 0.69326097f), f, 0.99992812f);
    // (unsigned: the shift pushes r's high bits out, which a signed shift may not do)
    return __uint_as_float(__float_as_uint(p) + (__float_as_uint(r) << 23));
}

// POLY (variant 16): every third element's 2^x on the FMA pipe (exp2_fma), the others on MUFU.
// Both warpgroups compute their P^T at the same time: 8192 exp2s per tile, ~512 cycles of the
// SM's 16 MUFU results per cycle, while only dP^T (~512 cycles of tensor work) runs.
template <bool FULL, bool POLY = false>
__device__ __forceinline__ void bwd4_p(float (&s)[32], const float* lse_s, const AttnParams& p, int b, int q0, int key,
                                       bool none = false) {
    const int t = threadIdx.x & 3;
    const float sl2 = p.scale_log2;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int qi = 8 * j + 2 * t + (e & 1);
            const float lse = lse_s[qi];
            const bool ok = FULL || (!none && lse != NEG_INF && allowed3(p, b, q0 + qi, key + 8 * (e >> 1)));
            const float x = fmaf(s[4 * j + e], sl2, -lse);
            // (4 j + e is a constant once unrolled: no branch)
            const float pv = POLY && (4 * j + e) % 3 == 2 ? exp2_fma(x) : fast_exp2(x);
            s[4 * j + e] = ok ? pv : 0.f;
        }
}
__device__ __forceinline__ void bwd4_ds(float (&dp)[32], const float (&pt)[32], const float* delta_s) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[4 * j + e] = pt[4 * j + e] * (dp[4 * j + e] - delta_s[8 * j + 2 * t + (e & 1)]);
}
template <bool POLY = false>
__device__ __forceinline__ void bwd4_p_dispatch(float (&s)[32], const float* lse_s, const AttnParams& p, int b, int q0,
                                                int k0, int key) {
    if (tile_full(p, b, q0, k0, BWD4_BN)) bwd4_p<true, POLY>(s, lse_s, p, b, q0, key);
    // (variant 20: a tile the masks allow no pair of gets P^T = 0 without the mask loads)
    else bwd4_p<false, POLY>(s, lse_s, p, b, q0, key, tile_empty(p, b, q0, k0));
}
// The query tiles one backward block visits: for each query head h in [h_begin, h_end) (the KV
// head's group; empty when no query tile sees these keys), tiles qt_start .. qt_end - 1.
struct Bwd4Walk {
    int qt_start, qt_end, h_begin, h_end;
    // the tile after (h, qt): the next tile of this head, else the first of the next head
    __device__ __forceinline__ void next(int& h, int& qt) const {
        if (qt + 1 < qt_end) {
            ++qt;
        } else {
            ++h;
            qt = qt_start;
        }
    }
};
__device__ __forceinline__ Bwd4Walk bwd4_walk(const AttnParams& p, int k0, int hk) {
    const int group = p.H / p.Hk;
    int qt_start = 0;
    if (p.causal) qt_start = max(0, k0 - (p.Sk - p.Sq)) / BWD4_BM;  // first query tile that sees key k0
    const int n_q = max(0, (p.Sq + BWD4_BM - 1) / BWD4_BM - qt_start);
    return {qt_start, qt_start + n_q, hk * group, n_q > 0 ? (hk + 1) * group : hk * group};
}

// 1. S^T = K Q^T (or dP^T = V dO^T) for this warpgroup's 64 keys (row kw of the K (V) tile) against
// the 64 queries of the Q (dO) tile: wgmma m64n64k16, both operands K-major. Issue only.
template <bool BF16, int D>
__device__ __forceinline__ void bwd4_rowdot(float (&acc)[32], u32 keys, u32 queries, int kw) {
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
        const u32 col = (k & 3) * 32, blk = k >> 2;
        wgmma_ss_n64<BF16, 0, 0>(acc, sw128_desc(keys + blk * (BWD4_BN * 128) + kw * 128 + col, 16, 1024),
                                 sw128_desc(queries + blk * (BWD4_BM * 128) + col, 16, 1024), k > 0);
    }
}

// P^T and dS^T as wgmma A fragments (k16 slice ks: pf[ks]); dS^T also to shared memory at dSt,
// [key][query] swizzled: column block j's 4 bytes 4 t of row r sit in 16-byte unit j ^ (r % 8).
// Unit j = pack rows of ks = j / 2: df[j / 2][(j & 1) * 2 + r8]. krow: this thread's key row g.
template <bool BF16>
__device__ __forceinline__ void bwd4_pack(u32 (&pf)[4][4], u32 (&df)[4][4], const float (&s)[32], const float (&dp)[32],
                                          u32 dSt, int krow) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            pf[ks][i] = pack2<BF16>(s[8 * ks + 2 * i], s[8 * ks + 2 * i + 1]);
            df[ks][i] = pack2<BF16>(dp[8 * ks + 2 * i], dp[8 * ks + 2 * i + 1]);
        }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int r8 = 0; r8 < 2; ++r8) {
            const int r = krow + 8 * r8;
            const u32 addr = dSt + r * 128 + ((j ^ (r & 7)) << 4) + 4 * t;
            asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(df[j >> 1][(j & 1) * 2 + r8]));
        }
}

// 3. dV += P^T dO, dK += dS^T Q: A = P^T / dS^T from registers, B = dO / Q read MN-major
// (stored [query][d]), 16 queries per step. Issue only.
template <bool BF16, int D>
__device__ __forceinline__ void bwd4_dvdk(float (&dv)[D / 2], float (&dk)[D / 2], const u32 (&pf)[4][4],
                                          const u32 (&df)[4][4], u32 Qs, u32 dOs) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) {
        wgmma_rs_d<BF16, D>(dv, pf[ks], sw128_desc(dOs + ks * 16 * 128, BWD4_BM * 128, 1024));
        wgmma_rs_d<BF16, D>(dk, df[ks], sw128_desc(Qs + ks * 16 * 128, BWD4_BM * 128, 1024));
    }
}

// 5. dQ[:, 64 wg .. +64] = dS K[:, 64 wg .. +64] over the 128 keys: A = dS^T read MN-major
// ([key][query]), B = column block wg of K read MN-major ([key][d]), 16 keys per step. Issue only.
template <bool BF16>
__device__ __forceinline__ void bwd4_dq(float (&dq)[32], u32 dSt, u32 Ks, int wg) {
#pragma unroll
    for (int ks = 0; ks < BWD4_BN / 16; ++ks) {
        const u32 krow_off = ks * 16 * 128;
        wgmma_ss_n64<BF16, 1, 1>(dq, sw128_desc(dSt + krow_off, BWD4_BN * 128, 1024),
                                 sw128_desc(Ks + wg * (BWD4_BN * 128) + krow_off, BWD4_BN * 128, 1024), ks > 0);
    }
}

// dK = scale * dS^T Q, dV = P^T dO for keys key0 (+ 8); outputs (B, Sk, Hk, D) contiguous.
template <bool BF16, int D>
__device__ __forceinline__ void bwd4_store_dkdv(const AttnParams& p, int b, int hk, int key0, const float (&dk)[D / 2],
                                                const float (&dv)[D / 2]) {
    const int t = threadIdx.x & 3;
#pragma unroll
    for (int r8 = 0; r8 < 2; ++r8) {
        const int key = key0 + 8 * r8;
        if (key >= p.Sk) continue;
        u16* dkr = p.dk + (((i64)b * p.Sk + key) * p.Hk + hk) * D + 2 * t;
        u16* dvr = p.dv + (((i64)b * p.Sk + key) * p.Hk + hk) * D + 2 * t;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            *reinterpret_cast<u32*>(dkr + j * 8) = pack2<BF16>(dk[4 * j + 2 * r8] * p.scale, dk[4 * j + 2 * r8 + 1] * p.scale);
            *reinterpret_cast<u32*>(dvr + j * 8) = pack2<BF16>(dv[4 * j + 2 * r8], dv[4 * j + 2 * r8 + 1]);
        }
    }
}

// Shared addresses as generic float pointers (the aligned tile base is a shared-window address).
__device__ __forceinline__ float* smem_float(u16* smem, u32 addr) {
    return reinterpret_cast<float*>(reinterpret_cast<char*>(smem) + (addr - smem_addr(smem)));
}

template <bool BF16, int D>
__device__ void attn_bwd4(const AttnParams& p) {
    static_assert(D == 128, "step 5 splits dQ's columns into one 64-column block per warpgroup");
    extern __shared__ __align__(16) u16 smem[];
    constexpr int BN = BWD4_BN, BM = BWD4_BM;
    constexpr u32 KV_BYTES = BN * D * 2, QT_BYTES = BM * D * 2, DS_BYTES = BN * BM * 2;
    const u32 base = (smem_addr(smem) + 1023u) & ~1023u;
    const u32 Ks = base, Vs = Ks + KV_BYTES, Qs = Vs + KV_BYTES, dOs = Qs + QT_BYTES, dSt = dOs + QT_BYTES;
    float* lse_s = smem_float(smem, dSt + DS_BYTES);  // lse and delta after dS^T
    float* delta_s = lse_s + BM;

    const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int k0 = kt * BN, kw = wg * 64;  // this warpgroup's keys: k0 + kw .. + 64
    const int krow = kw + warp * 16 + g;   // this thread's key rows krow (+ 8) of the tile
    const Bwd4Walk walk = bwd4_walk(p, k0, hk);

    auto load_iter = [&](int h, int q0) {
        load_rows_sw128<D, BM>(Qs, p.q + b * p.q_bs + h * p.q_hs, p.q_ss, q0, p.Sq);
        load_rows_sw128<D, BM>(dOs, p.dout + b * p.do_bs + h * p.do_hs, p.do_ss, q0, p.Sq);
        load_lse_delta_async<BM>(p, lse_s, delta_s, b, h, q0);
    };

    load_rows_sw128<D, BN>(Ks, p.k + b * p.k_bs + hk * p.k_hs, p.k_ss, k0, p.Sk);
    load_rows_sw128<D, BN>(Vs, p.v + b * p.v_bs + hk * p.v_hs, p.v_ss, k0, p.Sk);
    if (walk.h_begin < walk.h_end) load_iter(walk.h_begin, walk.qt_start * BM);
    cp_async_commit();

    float dk[D / 2], dv[D / 2];  // keys k0 + krow (+ 8) x D columns
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;

    for (int h = walk.h_begin, qt = walk.qt_start; h < walk.h_end;) {
        const int q0 = qt * BM;
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // this tile's loads are visible; the last tile's dQ reads of dS^T are done

        float s[32], dp[32];
        wgmma_fence();
        bwd4_rowdot<BF16, D>(s, Ks, Qs, kw);
        bwd4_rowdot<BF16, D>(dp, Vs, dOs, kw);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(s);
        fence_regs(dp);

        // 2. P^T and dS^T
        bwd4_p_dispatch(s, lse_s, p, b, q0, k0, k0 + krow);
        bwd4_ds(dp, s, delta_s);
        u32 pf[4][4], df[4][4];
        bwd4_pack<BF16>(pf, df, s, dp, dSt, krow);

        wgmma_fence();
        bwd4_dvdk<BF16, D>(dv, dk, pf, df, Qs, dOs);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(dv);
        fence_regs(dk);
        fence_proxy_async();  // dS^T was written by plain stores; step 5 reads it as a wgmma operand
        __syncthreads();      // Q, dO, lse, delta are free; dS^T is complete

        // 4. prefetch the next tile
        int h_next = h, qt_next = qt;
        walk.next(h_next, qt_next);
        if (h_next < walk.h_end) load_iter(h_next, qt_next * BM);
        cp_async_commit();

        float dq[32];
        wgmma_fence();
        bwd4_dq<BF16>(dq, dSt, Ks, wg);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(dq);
#pragma unroll
        for (int r8 = 0; r8 < 2; ++r8) {
            const int qi = q0 + warp * 16 + g + 8 * r8;
            if (qi >= p.Sq) continue;
            float* dst = p.dq_acc + (((i64)b * p.Sq + qi) * p.H + h) * D + wg * 64 + 2 * t;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                atomicAdd(dst + j * 8, dq[4 * j + 2 * r8]);
                atomicAdd(dst + j * 8 + 1, dq[4 * j + 2 * r8 + 1]);
            }
        }
        qt = qt_next;
        h = h_next;
    }
    cp_async_wait<0>();
    bwd4_store_dkdv<BF16, D>(p, b, hk, k0 + krow, dk, dv);
}

// ================================================================================================
// Backward, variant 6: variant 4's steps and tiles, four changes.
// - dQ leaves through shared memory: each warpgroup stages its 64 x 64 fp32 dQ tile and 64 of its
//   threads each hand one 256-byte row to the copy engine as a bulk reduce-add
//   (cp.reduce.async.bulk ... add.f32) instead of 32 scalar fp32 atomics per thread per tile (8192
//   per block per tile through the SM's load/store pipe). Staging rows are 288 bytes apart (64
//   floats + 32 bytes): a warp's float2 stores of rows g and g + 4 share banks, 2 wavefronts per
//   store, the minimum.
// - Q, dO, lse, delta are double-buffered: tile i + 1 starts loading at the top of iteration i
//   (variant 4 loads it during step 5 only, and waits for it at the next tile).
// - dS^T is made visible before step 3 and step 5 is issued right behind it, so the tensor cores
//   run dV/dK and dQ back to back; one block barrier less per tile.
// - S^T and dP^T are two wgmma groups: P^T (the exp2s) is computed while dP^T still runs.
// Shared: K, V (128 x D), dS^T (128 x 64), 2 x (Q, dO) (64 x D), 2 x (lse, delta), a dQ staging
// tile per warpgroup (64 x 288 bytes; not double-buffered: a tile waits for the previous reduce to
// have read it): 182 KB at d128.
// ================================================================================================
#define BWD6_DQ_STRIDE 288

// One accumulation of step 3 alone (dV += P^T dO or dK += dS^T Q), for variant 9's order.
template <bool BF16, int D>
__device__ __forceinline__ void bwd4_rs_acc(float (&acc)[D / 2], const u32 (&a)[4][4], u32 Bs) {
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) wgmma_rs_d<BF16, D>(acc, a[ks], sw128_desc(Bs + ks * 16 * 128, BWD4_BM * 128, 1024));
}

// Variant 9 (ORDER9) is variant 6 with two changes from FlashAttention-3
// (hopper/mainloop_bwd_sm90_tma_gmma_ws.hpp, flash_bwd_launch_template.h):
// - the order of the last three products: dV += P^T dO is issued before the barrier that makes
//   dS^T complete (it needs only registers and dO), so the barrier wait overlaps it; dQ = dS K is
//   issued behind it, then dK += dS^T Q once dV is done, and dQ is staged and handed to the copy
//   engine while dK is still on the tensor cores (variant 6 waits for all three first);
// - dQ leaves as one 16 KB bulk reduce per warpgroup and tile instead of 64 row-sized ones: dq_acc
//   is laid out in tiles (b, h, 64-query tile, warpgroup) of 64 x 64 floats, each in the order the
//   threads hold them (float4 j of thread tid at (j * 128 + tid) * 4: conflict-free 16-byte
//   stores), and attn_bwd_dq9 writes dq from it. A profile of variant 6 (H200, 2026-11-27) showed
//   ~2200 cycles per tile in the dQ hand-off, most of it waiting for the previous tile's 128
//   small reduces.
//
//
// Variant 10 (TMA, with ORDER9) is variant 9 without the block barrier at the top of every tile.
// Profiles of variants 6 and 9 (H200, 2026-11-27) had ~2900 cycles per tile from that barrier to
// S^T done, against ~500 of tensor work: the cp.async loads of the next tile, issued just before,
// were in flight when wgmma.fence ran. Here thread 0 issues the next tile's Q and dO as TMA boxes
// and lse, delta as bulk copies (from copies padded to 64-row tiles), all completing an mbarrier
// per stage that the tile waits on. The loads of tile i + 1 go out right after tile i's dS^T
// barrier, the first point where every thread is done with tile i - 1, the stage's last user;
// dS^T is double-buffered, since nothing now keeps a warpgroup from writing the next tile's while
// the other still reads this one's.
//
// Variant 12 (EARLY, with TMA and ORDER9) is variant 10 with the next tile's S^T = K Q^T issued
// early: right behind this tile's dK, before this tile's dQ is staged, so the tensor cores have it
// queued while the warpgroup stores dQ and waits at the two staging barriers (v10's profile: ~500
// cycles of "dQ out" per tile, then ~1450 from issuing S^T to having it, against ~500 of tensor
// work). The next tile's Q must have landed by then, so Q, dO, lse, delta get 3 stages: tile i + 2
// is issued at tile i's dS^T barrier (the stage's previous tile, i - 1, has no readers left once
// both warpgroups are past its dK) instead of tile i + 1. After the last tile the early S^T is
// issued anyway, on this tile's Q, and its result is dropped: a wgmma issued conditionally inside
// the loop made ptxas serialize every wgmma of the kernel (variant 5). The first two tiles' loads
// are issued before K and V have landed, not after. Measured on an H200 (2026-11-27, session 15):
// every check passes; the backward alone 1.01-1.09x variant 10's at d128, s >= 1k. Variant 13
// pairs it with variant 7's forward.
//
// Variant 15 (RED, with EARLY) is variant 12 with dQ added to dq_acc straight from the registers
// (`red.global.add.v4.f32`, 8 per thread and tile, the tiled layout unchanged) instead of staged in
// shared memory and added by a bulk reduce. Per tile and block that takes 32 KB of stores and 32 KB
// of the bulk reduce's reads off shared memory (of ~370 KB: the S^T, dP^T and dQ products, both
// operands in shared memory, alone use its whole bandwidth while they run), and the two staging
// barriers per warpgroup. The additions at L2 are the same bytes as the bulk reduce's. Not yet run
// on a GPU (2026-11-27, session 15).
//
// Variant 16 (POLY, with RED) is variant 15 with every third exp2 of P^T computed by a polynomial
// on the FMA pipe (exp2_fma): v12's profile has ~750-840 cycles per tile for P^T, the MUFU part
// alone ~512 (both warpgroups at once), while dP^T's ~512 cycles of tensor work run beside it.
// Not yet run on a GPU (2026-11-27, session 15). (Issuing dV += P^T dO before dS^T is computed, to fill the
// ~450 cycles per tile with nothing on the tensor cores, was measured in the same session and
// removed: 254 registers, no faster, see kernels/BENCHMARKS.md.)
//
// PROF (kernel development only: `attn_bwd6p_*` ... `attn_bwd16p_*`, launched when
// LLAVA_SCO_ATTN_BWD_PROFILE=1): thread 0 of each warpgroup of two blocks (x = 0 and the middle
// one) adds up clock64 spans of each step over its tiles and leaves them per tile in
// `attn_bwd_prof`, which the host reads and prints after the launch. (A device printf instead made
// ptxas serialize every wgmma of the profiling build (C7510, a call inside the wgmma pipeline), so
// profiles before 2026-11-27 session 10 timed a serialized kernel.)
struct __align__(64) Bwd10Maps {
    TmaMap q, dout;
    int q_pos[3], do_pos[3];
};
#define BWD_PROF_SPANS 8
// Per (block 0 or the middle block) x warpgroup: cycles per tile of each span, tiles, the key tile.
__device__ long long attn_bwd_prof[4][BWD_PROF_SPANS + 2];
template <bool BF16, int D, bool ORDER9, bool PROF = false, bool TMA = false, bool EARLY = false, bool RED = false,
          bool POLY = false>
__device__ void attn_bwd6(const AttnParams& p, const Bwd10Maps* maps = nullptr) {
    static_assert(D == 128, "step 5 splits dQ's columns into one 64-column block per warpgroup");
    static_assert(!TMA || ORDER9, "variant 10 is variant 9's order with TMA loads");
    static_assert(!EARLY || TMA, "variant 12 is variant 10 with the next S^T issued early");
    static_assert(!RED || EARLY, "variant 15 is variant 12 with dQ added from registers");
    static_assert(!POLY || RED, "variant 16 is variant 15 with a third of P^T's exp2s on the FMA pipe");
    extern __shared__ __align__(16) u16 smem[];
    constexpr int BN = BWD4_BN, BM = BWD4_BM;
    constexpr int NST = EARLY ? 3 : 2;  // stages of Q, dO, lse, delta
    constexpr u32 KV_BYTES = BN * D * 2, QT_BYTES = BM * D * 2, DS_BYTES = BN * BM * 2;
    const u32 base = (smem_addr(smem) + 1023u) & ~1023u;
    const u32 Ks = base, Vs = Ks + KV_BYTES, dSt = Vs + KV_BYTES;  // dS^T: 2 buffers with TMA
    const u32 Q0 = dSt + (TMA ? 2 : 1) * DS_BYTES;  // stage i: Q at Q0 + 2 i QT_BYTES, dO right after it
    const u32 LD0 = Q0 + NST * 2 * QT_BYTES;       // stage i: lse at LD0 + 2 i BM floats, delta after it
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3, tid = threadIdx.x & 127;
    constexpr u32 DQ_STAGE_BYTES = ORDER9 ? BM * 64 * 4 : BM * BWD6_DQ_STRIDE;
    const u32 dq_stage = LD0 + NST * 2 * BM * 4 + wg * DQ_STAGE_BYTES;  // this warpgroup's dQ tile
    const u32 bars = LD0 + NST * 2 * BM * 4 + 2 * DQ_STAGE_BYTES;       // TMA: full[stage] at + 8 stage

    int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    if (p.lpt_group > 0) {  // variant 17: key tile 0 is the longest (every query tile sees it)
        int pair;
        lpt_block(p.lpt_group, kt, pair);
        hk = pair % gridDim.y;
        b = pair / gridDim.y;
    }
    const int k0 = kt * BN, kw = wg * 64;
    const int krow = kw + warp * 16 + g;
    const Bwd4Walk walk = bwd4_walk(p, k0, hk);

    auto load_iter = [&](int stage, int h, int q0) {
        const u32 q_s = Q0 + stage * 2 * QT_BYTES;
        float* lse_s = smem_float(smem, LD0 + stage * 2 * BM * 4);
        load_rows_sw128<D, BM>(q_s, p.q + b * p.q_bs + h * p.q_hs, p.q_ss, q0, p.Sq);
        load_rows_sw128<D, BM>(q_s + QT_BYTES, p.dout + b * p.do_bs + h * p.do_hs, p.do_ss, q0, p.Sq);
        load_lse_delta_async<BM>(p, lse_s, lse_s + BM, b, h, q0);
    };

    // TMA: one tile's Q, dO (boxes of 64 rows) and lse, delta (rows of the padded copies)
    const i64 sq_pad = (p.Sq + BM - 1) / BM * BM;
    auto issue_tma = [&](int stage, int h, int q0) {
        const u32 bar = bars + 8 * stage, q_s = Q0 + stage * 2 * QT_BYTES, lse_s = LD0 + stage * 2 * BM * 4;
        mbar_arrive_expect_tx(bar, 2 * QT_BYTES + 2 * BM * 4);
        tma_load_rows<D, BM>(q_s, maps->q, maps->q_pos, bar, q0, h, b);
        tma_load_rows<D, BM>(q_s + QT_BYTES, maps->dout, maps->do_pos, bar, q0, h, b);
        const i64 row = ((i64)b * p.H + h) * sq_pad + q0;
        bulk_load(lse_s, p.lse + row, BM * 4, bar);
        bulk_load(lse_s + BM * 4, p.delta + row, BM * 4, bar);
    };

    load_rows_sw128<D, BN>(Ks, p.k + b * p.k_bs + hk * p.k_hs, p.k_ss, k0, p.Sk);
    load_rows_sw128<D, BN>(Vs, p.v + b * p.v_bs + hk * p.v_hs, p.v_ss, k0, p.Sk);
    if constexpr (TMA) {
        cp_async_commit();
        auto issue_first_two = [&] {
            int h1 = walk.h_begin, qt1 = walk.qt_start;
            issue_tma(0, h1, qt1 * BM);
            walk.next(h1, qt1);
            if (h1 < walk.h_end) issue_tma(1, h1, qt1 * BM);
        };
        if (threadIdx.x == 0) {
            for (int st = 0; st < NST; ++st) mbar_init(bars + 8 * st, 1);
            mbar_init_fence();
            // EARLY: the first two tiles' loads go out now, under K's and V's (the other threads
            // wait on their barriers only after the block barrier below)
            if (EARLY && walk.h_begin < walk.h_end) issue_first_two();
        }
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();  // K, V and the barriers are ready
        if (!EARLY && threadIdx.x == 0 && walk.h_begin < walk.h_end) issue_first_two();
    } else {
        if (walk.h_begin < walk.h_end) load_iter(0, walk.h_begin, walk.qt_start * BM);
        cp_async_commit();
    }

    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
    // EARLY: S^T of the next tile, issued in the previous iteration (or below, for tile 0) and
    // copied to s once done. Its own array: with s itself in flight across the loop's back edge,
    // the compiler's copies of it there made ptxas serialize every wgmma (C7514).
    float s_next[32];
    if constexpr (EARLY) {
        // unconditional, like the one after the last tile: with this wgmma under the block's
        // "any tiles" branch, ptxas serialized every wgmma of the kernel (a block without tiles
        // reads uninitialized shared memory here and drops the result)
        if (walk.h_begin < walk.h_end) mbar_wait_or_trap(bars, 0);
        wgmma_fence();
        bwd4_rowdot<BF16, D>(s_next, Ks, Q0, kw);
        wgmma_commit();
    }

    // PROF: spans 0 load wait + barrier, 1 S^T, 2 P^T, 3 dP^T + dS^T + pack, 4 to the dS^T barrier,
    // 5 dV + dQ (+ dK for variant 6), 6 dQ staging (RED: the reductions' issue), 7 dK wait. EARLY: 0 is empty, 1 is the rest of
    // S^T after dP^T was issued, and 6 also holds the next tile's load wait and S^T issue.
    constexpr int NPROF = BWD_PROF_SPANS;
    long long prof[NPROF] = {}, prof_t = 0;
    const bool prof_on = PROF && tid == 0 && hk == 0 && b == 0 && (kt == 0 || kt == gridDim.x / 2);
    auto mark = [&](int i) {
        if constexpr (PROF) {
            const long long now = clock64();
            if (i >= 0) prof[i] += now - prof_t;
            prof_t = now;
        }
    };
    int tiles = 0;

    int stage = 0;
    // EARLY: the tile after next, (h_next2, qt_next2), is the one whose loads this tile issues
    int h_next2 = walk.h_begin, qt_next2 = walk.qt_start;
    if (EARLY) {
        walk.next(h_next2, qt_next2);
        walk.next(h_next2, qt_next2);
    }
    for (int h = walk.h_begin, qt = walk.qt_start; h < walk.h_end; stage = stage + 1 == NST ? 0 : stage + 1) {
        const int q0 = qt * BM;
        const u32 Qs = Q0 + stage * 2 * QT_BYTES, dOs = Qs + QT_BYTES;
        const float* lse_s = smem_float(smem, LD0 + stage * 2 * BM * 4);
        int h_next = h, qt_next = qt;
        walk.next(h_next, qt_next);
        const int it = tiles++;
        const u32 dS_cur = dSt + (TMA ? (it & 1) * DS_BYTES : 0);
        mark(-1);
        if constexpr (EARLY) {
            mark(0);  // this tile's loads were waited for before its S^T was issued
        } else if constexpr (TMA) {
            mbar_wait_or_trap(bars + 8 * stage, (it >> 1) & 1);  // a lost byte count fails, not hangs
            mark(0);
        } else {
            cp_async_wait<0>();
            fence_proxy_async();
            __syncthreads();  // this tile is visible; the other stage's last reader (the last tile's
                              // dV/dK) and the last tile's dQ reads of dS^T are done
            mark(0);
            if (h_next < walk.h_end) load_iter(stage ^ 1, h_next, qt_next * BM);
            cp_async_commit();
        }

        float s[32], dp[32];
        wgmma_fence();
        if constexpr (!EARLY) {
            bwd4_rowdot<BF16, D>(s, Ks, Qs, kw);
            wgmma_commit();
        }
        bwd4_rowdot<BF16, D>(dp, Vs, dOs, kw);
        wgmma_commit();
        wgmma_wait<1>();  // S^T done: P^T's exp2 runs while dP^T is on the tensor cores
        if constexpr (EARLY) {
            fence_regs(s_next);
#pragma unroll
            for (int i = 0; i < 32; ++i) s[i] = s_next[i];
        }
        fence_regs(s);
        mark(1);
        bwd4_p_dispatch<POLY>(s, lse_s, p, b, q0, k0, k0 + krow);
        mark(2);
        wgmma_wait0();
        fence_regs(dp);
        bwd4_ds(dp, s, lse_s + BM);
        u32 pf[4][4], df[4][4];
        bwd4_pack<BF16>(pf, df, s, dp, dS_cur, krow);
        mark(3);
        float dq[32];
        if constexpr (ORDER9) {
            wgmma_fence();
            bwd4_rs_acc<BF16, D>(dv, pf, dOs);
            wgmma_commit();
            fence_proxy_async();  // dS^T was written by plain stores; dQ reads it as a wgmma operand
            __syncthreads();      // ... and it is complete in both warpgroups
            mark(4);
            bwd4_dq<BF16>(dq, dS_cur, Ks, wg);
            wgmma_commit();
            // TMA: everyone is past tile it - 1, the last user of the stage the loads go to
            if constexpr (EARLY) {
                if (threadIdx.x == 0 && h_next2 < walk.h_end) issue_tma(stage == 0 ? NST - 1 : stage - 1, h_next2, qt_next2 * BM);
            } else {
                if (TMA && threadIdx.x == 0 && it >= 1 && h_next < walk.h_end) issue_tma(stage ^ 1, h_next, qt_next * BM);
            }
            wgmma_wait<1>();  // dV done
            fence_regs(dv);
            wgmma_fence();
            bwd4_rs_acc<BF16, D>(dk, df, Qs);
            wgmma_commit();
            wgmma_wait<1>();  // dQ done; dK still running while dQ is staged below
            fence_regs(dq);
            mark(5);
            if constexpr (EARLY) {
                // the next tile's S^T behind dK (after the last tile: this tile's, unused)
                const bool more = h_next < walk.h_end;
                const int next_stage = stage + 1 == NST ? 0 : stage + 1;
                if (more) mbar_wait_or_trap(bars + 8 * next_stage, ((it + 1) / NST) & 1);
                wgmma_fence();
                bwd4_rowdot<BF16, D>(s_next, Ks, more ? Q0 + next_stage * 2 * QT_BYTES : Qs, kw);
                wgmma_commit();
            }
        } else {
            fence_proxy_async();  // dS^T was written by plain stores; step 5 reads it as a wgmma operand
            __syncthreads();      // ... and it is complete in both warpgroups
            mark(4);
            wgmma_fence();
            bwd4_dvdk<BF16, D>(dv, dk, pf, df, Qs, dOs);
            wgmma_commit();
            bwd4_dq<BF16>(dq, dS_cur, Ks, wg);
            wgmma_commit();
            wgmma_wait0();
            fence_regs(dv);
            fence_regs(dk);
            fence_regs(dq);
            mark(5);
        }

        // dQ out (RED: vector reductions from the registers; else the last bulk reduce has read the
        // staging tile (waited by the threads that issued it), then the tile is overwritten and
        // handed to the copy engine)
        if constexpr (RED) {
            // straight from the registers: 8 vector reductions per thread into dq_acc's tile
            // (b, h, qt, wg), in fragment order (a warp's 32 float4 are 512 contiguous bytes)
            const i64 tile = (((i64)b * p.H + h) * ((p.Sq + BM - 1) / BM) + qt) * 2 + wg;
            float* dst = p.dq_acc + tile * (BM * 64);
#pragma unroll
            for (int j = 0; j < 8; ++j)
                red_add_v4(dst + (j * 128 + tid) * 4, dq[4 * j], dq[4 * j + 1], dq[4 * j + 2], dq[4 * j + 3]);
        } else if constexpr (ORDER9) {
            // one 16 KB reduce per warpgroup into dq_acc's tile (b, h, qt, wg), in fragment order
            if (tid == 0) bulk_wait_read0();
            named_barrier(1 + wg, 128);
#pragma unroll
            for (int j = 0; j < 8; ++j)
                asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(dq_stage + (j * 128 + tid) * 16),
                             "f"(dq[4 * j]), "f"(dq[4 * j + 1]), "f"(dq[4 * j + 2]), "f"(dq[4 * j + 3]));
            fence_proxy_async();  // plain stores, read next by the copy engine
            named_barrier(1 + wg, 128);
            if (tid == 0) {
                const i64 tile = (((i64)b * p.H + h) * ((p.Sq + BM - 1) / BM) + qt) * 2 + wg;
                bulk_reduce_add_f32(p.dq_acc + tile * (BM * 64), dq_stage, BM * 64 * 4);
            }
        } else {
            if (tid < 64) bulk_wait_read0();
            named_barrier(1 + wg, 128);
#pragma unroll
            for (int r8 = 0; r8 < 2; ++r8) {
                const u32 row = dq_stage + (warp * 16 + g + 8 * r8) * BWD6_DQ_STRIDE + 8 * t;
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(row + 32 * j), "f"(dq[4 * j + 2 * r8]),
                                 "f"(dq[4 * j + 2 * r8 + 1]));
            }
            fence_proxy_async();  // plain stores, read next by the copy engine
            named_barrier(1 + wg, 128);
            if (tid < 64 && q0 + tid < p.Sq)
                bulk_reduce_add_f32(p.dq_acc + (((i64)b * p.Sq + q0 + tid) * p.H + h) * D + wg * 64,
                                    dq_stage + tid * BWD6_DQ_STRIDE, 64 * 4);
        }
        if constexpr (!RED) bulk_commit();
        mark(6);
        if constexpr (EARLY) {
            wgmma_wait<1>();  // dK done; the next S^T may still run
            fence_regs(dk);
        } else if constexpr (ORDER9) {
            wgmma_wait0();
            fence_regs(dk);
        }
        mark(7);
        qt = qt_next;
        h = h_next;
        if (EARLY) walk.next(h_next2, qt_next2);
    }
    if constexpr (EARLY) {
        wgmma_wait0();  // the unused S^T after the last tile
        fence_regs(s_next);
    }
    if constexpr (PROF) {
        if (prof_on && tiles > 0) {
            long long* out = attn_bwd_prof[(kt == 0 ? 0 : 2) + wg];
#pragma unroll
            for (int i = 0; i < NPROF; ++i) out[i] = prof[i] / tiles;
            out[NPROF] = tiles;
            out[NPROF + 1] = kt;
        }
    }
    cp_async_wait<0>();
    bulk_wait0();  // the staged rows are read and added before the block exits
    bwd4_store_dkdv<BF16, D>(p, b, hk, k0 + krow, dk, dv);
}

// Variant 9's dq = scale * dq_acc, dq (B, Sq, H, 128) contiguous, dq_acc in tiles of 64 x 64 floats
// (b, h, 64-query tile, column half) as attn_bwd6<.., ORDER9> leaves them: float4 j of thread tid
// (warp w, g = lane / 4, t = lane % 4) holds rows 16 w + g (+ 8), columns 8 j + 2 t (+ 1). One
// float4 per thread: coalesced reads, two 4-byte stores.
template <bool BF16>
__device__ void attn_bwd_dq9(const AttnParams& p) {
    const int n_qt = (p.Sq + BWD4_BM - 1) / BWD4_BM;
    const i64 n4 = (i64)p.B * p.H * n_qt * 2 * 1024;
    const float4* acc = reinterpret_cast<const float4*>(p.dq_acc);
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (i64)gridDim.x * blockDim.x) {
        const int within = (int)(i & 1023), j = within >> 7, tid = within & 127;
        const i64 tile = i >> 10;
        const int half = (int)(tile & 1), qt = (int)((tile >> 1) % n_qt);
        const i64 bh = (tile >> 1) / n_qt;
        const int h = (int)(bh % p.H), b = (int)(bh / p.H);
        const int lane = tid & 31, row0 = qt * BWD4_BM + (tid >> 5) * 16 + (lane >> 2);
        const int col = half * 64 + j * 8 + 2 * (lane & 3);
        const float4 v = acc[i];
        if (row0 < p.Sq)
            *reinterpret_cast<u32*>(p.dq + (((i64)b * p.Sq + row0) * p.H + h) * 128 + col) =
                pack2<BF16>(v.x * p.scale, v.y * p.scale);
        if (row0 + 8 < p.Sq)
            *reinterpret_cast<u32*>(p.dq + (((i64)b * p.Sq + row0 + 8) * p.H + h) * 128 + col) =
                pack2<BF16>(v.z * p.scale, v.w * p.scale);
    }
}
extern "C" __global__ void attn_bwd_dq9_bf16(AttnParams p) { attn_bwd_dq9<true>(p); }
extern "C" __global__ void attn_bwd_dq9_f16(AttnParams p) { attn_bwd_dq9<false>(p); }

#define ATTN4_FWD(NAME, BF16, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1) attn_fwd4_##NAME##_d##D(AttnParams p) {  \
        attn_fwd4<BF16, D, false>(p);                                                                      \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1) attn_fwd5_##NAME##_d##D(AttnParams p) {  \
        attn_fwd4<BF16, D, true>(p);                                                                       \
    }
// A variant 6 / 9 backward entry and its profiling build (`...p`, PROF).
#define ATTN6_BWD(KERNEL, NAME, BF16, D, ORDER9)                                                            \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1) attn_##KERNEL##_##NAME##_d##D(AttnParams p) { \
        attn_bwd6<BF16, D, ORDER9>(p);                                                                      \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1) attn_##KERNEL##p_##NAME##_d##D(AttnParams p) { \
        attn_bwd6<BF16, D, ORDER9, true>(p);                                                                \
    }
// A TMA backward entry (tensor maps first) and its profiling build: variant 10 (variant 9 with TMA
// loads), with EARLY variant 12 (the next S^T issued early, 3 load stages), with RED too variant
// 15 (dQ added from the registers), with POLY too variant 16 (a third of P^T's exp2s on the FMA
// pipe).
#define ATTN10_BWD(KERNEL, NAME, BF16, D, EARLY, RED, POLY)                                              \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1)                                        \
        attn_##KERNEL##_##NAME##_d##D(const __grid_constant__ Bwd10Maps maps, AttnParams p) {           \
        attn_bwd6<BF16, D, true, false, true, EARLY, RED, POLY>(p, &maps);                               \
    }                                                                                                    \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1)                                        \
        attn_##KERNEL##p_##NAME##_d##D(const __grid_constant__ Bwd10Maps maps, AttnParams p) {          \
        attn_bwd6<BF16, D, true, true, true, EARLY, RED, POLY>(p, &maps);                                \
    }
#define ATTN4_BWD(NAME, BF16, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(FWD4_THREADS, 1) attn_bwd4_##NAME##_d##D(AttnParams p) { \
        attn_bwd4<BF16, D>(p);                                                                            \
    }                                                                                                     \
    ATTN6_BWD(bwd6, NAME, BF16, D, false)                                                                 \
    ATTN6_BWD(bwd9, NAME, BF16, D, true)                                                                  \
    ATTN10_BWD(bwd10, NAME, BF16, D, false, false, false)                                                 \
    ATTN10_BWD(bwd12, NAME, BF16, D, true, false, false)                                                  \
    ATTN10_BWD(bwd15, NAME, BF16, D, true, true, false)                                                   \
    ATTN10_BWD(bwd16, NAME, BF16, D, true, true, true)
// Head dims here must match `v4_forward` / `v4_backward` in attention.rs (and the d128 that
// `kernel_head_dim` pads 64 and 80 to).
ATTN4_FWD(bf16, true, 64)
ATTN4_FWD(bf16, true, 128)
ATTN4_FWD(f16, false, 64)
ATTN4_FWD(f16, false, 128)
ATTN4_BWD(bf16, true, 128)
ATTN4_BWD(f16, false, 128)
