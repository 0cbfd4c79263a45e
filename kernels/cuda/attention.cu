// FlashAttention-2 style attention, forward and backward (bf16/fp16 in, fp32 accumulation).
//
// Layout: Q (B, Sq, H, D), K/V (B, Sk, Hk, D) addressed by element strides (D contiguous), so the
// (B, H, S, D) views libtorch makes need no copy. GQA: query head h reads KV head h / (H / Hk).
// Tiles: 64 query rows x 64 keys per step, 4 warps, each warp owns 16 rows (forward) or 16 keys
// (backward). Shared rows are padded by 8 elements (16 bytes) so ldmatrix is bank-conflict free.
//
// Masks (all optional, combined with AND; see `allowed`):
//   causal      key j visible to query i iff j <= i + (Sk - Sq)   (bottom-right aligned, as for a KV cache)
//   key_keep    (B, Sk) u8: 0 = key masked. With q_flags (B, Sq) u8 it applies only to rows whose flag
//               is set (Mllama's vision mask: padded queries do not see padded keys).
//   block_mask  (B, Sq, nblk) u8: 0 = query i does not see keys [blk*kblock, (blk+1)*kblock)
//               (Mllama's cross-attention: text token x image tile).
// A query row that sees no key gets output 0 and lse = -inf (never NaN).
// LSE is stored in the log2 domain of the scaled scores: lse2 = log2(sum_j 2^(s_ij * scale * log2 e)).

struct AttnParams {
    const u16* q; const u16* k; const u16* v; u16* o; float* lse;      // lse: (B, H, Sq) contiguous
    const u16* dout; u16* dq; u16* dk; u16* dv; float* dq_acc; float* delta; // backward only
    const unsigned char* key_keep; const unsigned char* q_flags; const unsigned char* block_mask;
    const unsigned char* mask_cells;  // (B, ceil(Sq/64), ceil(Sk/32)) u8 or null: kernels/src/mask_cells.rs
    i64 q_bs, q_ss, q_hs, k_bs, k_ss, k_hs, v_bs, v_ss, v_hs, o_bs, o_ss, o_hs;  // element strides
    i64 do_bs, do_ss, do_hs;                                                     // dout strides
    int B, H, Hk, Sq, Sk;
    int causal, kblock, nblk;
    float scale;        // softmax scale (natural units)
    float scale_log2;   // scale * log2(e)
    int lpt_group;      // > 0: causal blocks longest first, in groups of this many pairs (`lpt_block`)
};

#define BR 64
#define BC 64
#define NWARPS 4

__device__ __forceinline__ bool allowed(const AttnParams& p, int b, int i, int j) {
    if (j >= p.Sk || i >= p.Sq) return false;
    if (p.causal && j > i + (p.Sk - p.Sq)) return false;
    if (p.key_keep) {
        const bool applies = p.q_flags ? p.q_flags[(i64)b * p.Sq + i] != 0 : true;
        if (applies && p.key_keep[(i64)b * p.Sk + j] == 0) return false;
    }
    if (p.block_mask && p.block_mask[((i64)b * p.Sq + i) * p.nblk + j / p.kblock] == 0) return false;
    return true;
}

// True when every key of [k0, k0+64) is visible to every query of [q0, q0+64): no per-element mask
// work at all (the common case; masking costs more instructions than the tile's MMAs). Rows past Sq
// are never stored, so they need no mask.
__device__ __forceinline__ bool tile_unmasked(const AttnParams& p, int q0, int k0) {
    if (p.key_keep || p.block_mask || k0 + BC > p.Sk) return false;
    return !p.causal || k0 + BC - 1 <= q0 + (p.Sk - p.Sq);
}

// Copies rows [row0, row0+64) of one head into shared memory (stride D+8); rows past S are zeros.
template <int D>
__device__ __forceinline__ void load_tile(u16* dst, const u16* src, i64 row_stride, int row0, int S) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < 64 * CH; c += NWARPS * 32) {
        const int r = c / CH, cc = c % CH;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (row0 + r < S) val = *reinterpret_cast<const uint4*>(src + (i64)(row0 + r) * row_stride + cc * 8);
        *reinterpret_cast<uint4*>(dst + r * (D + 8) + cc * 8) = val;
    }
}

// Asynchronous version (cp.async, zero-fill past S): the copy overlaps the previous tile's math.
// The caller commits the group and waits for it before reading.
template <int D>
__device__ __forceinline__ void load_tile_async(u16* dst, const u16* src, i64 row_stride, int row0, int S) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < 64 * CH; c += NWARPS * 32) {
        const int r = c / CH, cc = c % CH;
        const bool in = row0 + r < S;
        const u16* g = in ? src + (i64)(row0 + r) * row_stride + cc * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst + r * (D + 8) + cc * 8)), "l"(g), "r"(in ? 16 : 0));
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

template <bool BF16, int D>
__device__ void attn_fwd(const AttnParams& p) {
    extern __shared__ __align__(16) u16 smem[];
    constexpr int LD = D + 8, NTD = D / 8;
    u16* Qs = smem;
    u16* Kbuf = Qs + BR * LD;      // 2 stages of K, then 2 of V: tile kt+1 loads while kt computes
    u16* Vbuf = Kbuf + 2 * BC * LD;

    const int qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = qt * BR;
    const u16* qbase = p.q + b * p.q_bs + h * p.q_hs;
    const u16* kbase = p.k + b * p.k_bs + hk * p.k_hs;
    const u16* vbase = p.v + b * p.v_bs + hk * p.v_hs;

    load_tile_async<D>(Qs, qbase, p.q_ss, q0, p.Sq);

    int n_tiles = (p.Sk + BC - 1) / BC;
    if (p.causal) {
        const int last_key = q0 + BR - 1 + (p.Sk - p.Sq);  // the last key any row of this tile sees
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BC + 1);
    }

    float acc_o[NTD][4];
#pragma unroll
    for (int j = 0; j < NTD; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};  // rows g and g+8 of this warp
    const int row_a = q0 + warp * 16 + g, rows[2] = {row_a, row_a + 8};

    if (n_tiles > 0) {
        load_tile_async<D>(Kbuf, kbase, p.k_ss, 0, p.Sk);
        load_tile_async<D>(Vbuf, vbase, p.v_ss, 0, p.Sk);
    }
    cp_async_commit();
    for (int kt = 0; kt < n_tiles; ++kt) {
        const int k0 = kt * BC;
        const u16* Ks = Kbuf + (kt & 1) * BC * LD;
        const u16* Vs = Vbuf + (kt & 1) * BC * LD;
        if (kt + 1 < n_tiles) {  // prefetch the next tile into the other stage (freed by the last barrier)
            load_tile_async<D>(Kbuf + ((kt + 1) & 1) * BC * LD, kbase, p.k_ss, k0 + BC, p.Sk);
            load_tile_async<D>(Vbuf + ((kt + 1) & 1) * BC * LD, vbase, p.v_ss, k0 + BC, p.Sk);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[8][4];  // (16 rows, 64 keys) of S = Q K^T for this warp
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        warp_gemm<BF16, false, false, 8, D>(s, Qs, LD, warp * 16, Ks, LD, 0);

        float mx[2] = {NEG_INF, NEG_INF};
        if (tile_unmasked(p, q0, k0)) {
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[j][e] *= p.scale_log2;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
                }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = k0 + j * 8 + 2 * t + (e & 1);
                    const float v = allowed(p, b, rows[e >> 1], col) ? s[j][e] * p.scale_log2 : NEG_INF;
                    s[j][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m_run[r], mx[r]);
            const float m_use = m_new == NEG_INF ? 0.f : m_new;  // all masked so far: avoid inf - inf
            const float corr = exp2f(m_run[r] - m_use);
            m_run[r] = m_new;
            mx[r] = m_use;
            l_run[r] *= corr;
#pragma unroll
            for (int j = 0; j < NTD; ++j) {
                acc_o[j][2 * r] *= corr;
                acc_o[j][2 * r + 1] *= corr;
            }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pv = exp2f(s[j][e] - mx[e >> 1]);
                s[j][e] = pv;
                l_run[e >> 1] += pv;
            }
        // O += P V: P (16 x 64) from registers, V stored [key][d].
        warp_gemm_areg<BF16, true, NTD, 4>(acc_o, s, Vs, LD, 0);
        __syncthreads();  // this stage may be overwritten by the next prefetch
    }
    cp_async_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = rows[r];
        if (row < p.Sq) {
            u16* orow = p.o + b * p.o_bs + (i64)row * p.o_ss + h * p.o_hs;
#pragma unroll
            for (int j = 0; j < NTD; ++j)
                *reinterpret_cast<u32*>(orow + j * 8 + 2 * t) = pack2<BF16>(acc_o[j][2 * r] * inv, acc_o[j][2 * r + 1] * inv);
            if (t == 0) p.lse[((i64)b * p.H + h) * p.Sq + row] = l > 0.f ? m_run[r] + log2f(l) : NEG_INF;
        }
    }
}

// delta[b, h, i] = sum_d dO * O (fp32): the row term of dS = P * (dP - delta).
template <bool BF16, int D>
__device__ void attn_bwd_delta(const AttnParams& p) {
    // (64-bit: B x H x Sq rows pass 2^26 -- 2^31 threads -- at e.g. 16 x 32 x 131072)
    const i64 warp_global = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const i64 rows = (i64)p.B * p.H * p.Sq;
    if (warp_global >= rows) return;
    const int i = (int)(warp_global % p.Sq), h = (int)((warp_global / p.Sq) % p.H);
    const int b = (int)(warp_global / ((i64)p.Sq * p.H));
    const u16* o = p.o + b * p.o_bs + (i64)i * p.o_ss + h * p.o_hs;
    const u16* d = p.dout + b * p.do_bs + (i64)i * p.do_ss + h * p.do_hs;
    float acc = 0.f;
    for (int c = lane; c < D; c += 32) acc += to_f32<BF16>(o[c]) * to_f32<BF16>(d[c]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta[((i64)b * p.H + h) * p.Sq + i] = acc;
}

// One block per (key tile, KV head, batch); loops over the query heads of its group and the query
// tiles, so dK/dV need no atomics. dQ is accumulated in fp32 with atomics (dq_acc, (B, Sq, H, D)).
template <bool BF16, int D>
__device__ void attn_bwd(const AttnParams& p) {
    extern __shared__ __align__(16) u16 smem[];
    constexpr int LD = D + 8, NTD = D / 8, LDP = BR + 8;
    u16* Ks = smem;
    u16* Vs = Ks + BC * LD;
    u16* Qs = Vs + BC * LD;
    u16* dOs = Qs + BR * LD;
    u16* dSs = dOs + BR * LD;                                   // dS^T, stored [key][query]
    float* lse_s = reinterpret_cast<float*>(dSs + BC * LDP);   // (64)
    float* delta_s = lse_s + BR;                                // (64)

    const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int group = p.H / p.Hk;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k0 = kt * BC;
    load_tile<D>(Ks, p.k + b * p.k_bs + hk * p.k_hs, p.k_ss, k0, p.Sk);
    load_tile<D>(Vs, p.v + b * p.v_bs + hk * p.v_hs, p.v_ss, k0, p.Sk);

    float dk[NTD][4], dv[NTD][4];
#pragma unroll
    for (int j = 0; j < NTD; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
    const int key_a = k0 + warp * 16 + g, keys[2] = {key_a, key_a + 8};

    int qt_start = 0;
    if (p.causal) qt_start = max(0, k0 - (p.Sk - p.Sq)) / BR;
    const int n_qt = (p.Sq + BR - 1) / BR;

    for (int hh = 0; hh < group; ++hh) {
        const int h = hk * group + hh;
        for (int qt = qt_start; qt < n_qt; ++qt) {
            const int q0 = qt * BR;
            __syncthreads();
            load_tile<D>(Qs, p.q + b * p.q_bs + h * p.q_hs, p.q_ss, q0, p.Sq);
            load_tile<D>(dOs, p.dout + b * p.do_bs + h * p.do_hs, p.do_ss, q0, p.Sq);
            for (int r = threadIdx.x; r < BR; r += NWARPS * 32) {
                const bool in = q0 + r < p.Sq;
                const i64 idx = ((i64)b * p.H + h) * p.Sq + q0 + r;
                lse_s[r] = in ? p.lse[idx] : -NEG_INF;  // +inf: P = 0 for rows past Sq
                delta_s[r] = in ? p.delta[idx] : 0.f;
            }
            __syncthreads();

            // S^T and dP^T for this warp's 16 keys x 64 queries.
            float s[8][4], dp[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
            warp_gemm<BF16, false, false, 8, D>(s, Ks, LD, warp * 16, Qs, LD, 0);
            warp_gemm<BF16, false, false, 8, D>(dp, Vs, LD, warp * 16, dOs, LD, 0);
            const bool unmasked = tile_unmasked(p, q0, k0);
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = j * 8 + 2 * t + (e & 1);
                    const float lse = lse_s[qi];
                    const bool ok = unmasked || (lse != NEG_INF && allowed(p, b, q0 + qi, keys[e >> 1]));
                    const float pv = ok ? exp2f(s[j][e] * p.scale_log2 - lse) : 0.f;
                    s[j][e] = pv;                              // P^T
                    dp[j][e] = pv * (dp[j][e] - delta_s[qi]);  // dS^T (w.r.t. the scaled scores)
                }
            warp_gemm_areg<BF16, true, NTD, 4>(dv, s, dOs, LD, 0);  // dV += P^T dO
            warp_gemm_areg<BF16, true, NTD, 4>(dk, dp, Qs, LD, 0);  // dK += dS^T Q
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int qi = j * 8 + 2 * t;
                *reinterpret_cast<u32*>(dSs + (warp * 16 + g) * LDP + qi) = pack2<BF16>(dp[j][0], dp[j][1]);
                *reinterpret_cast<u32*>(dSs + (warp * 16 + g + 8) * LDP + qi) = pack2<BF16>(dp[j][2], dp[j][3]);
            }
            __syncthreads();
            // dQ (16 queries of this warp x D) += dS K, in chunks of 16 columns to bound registers.
            const int qa = q0 + warp * 16 + g;
#pragma unroll
            for (int n0 = 0; n0 < D; n0 += 16) {
                float dq[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
                warp_gemm<BF16, true, true, 2, BC>(dq, dSs, LDP, warp * 16, Ks, LD, n0);
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int qi = qa + (e >> 1) * 8;
                        if (qi < p.Sq) {
                            const int col = n0 + j * 8 + 2 * t + (e & 1);
                            atomicAdd(p.dq_acc + (((i64)b * p.Sq + qi) * p.H + h) * D + col, dq[j][e]);
                        }
                    }
            }
        }
    }
    // dK = scale * dS^T Q, dV = P^T dO; outputs (B, Sk, Hk, D) contiguous.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = keys[r];
        if (key >= p.Sk) continue;
        u16* dkr = p.dk + (((i64)b * p.Sk + key) * p.Hk + hk) * D;
        u16* dvr = p.dv + (((i64)b * p.Sk + key) * p.Hk + hk) * D;
#pragma unroll
        for (int j = 0; j < NTD; ++j) {
            *reinterpret_cast<u32*>(dkr + j * 8 + 2 * t) = pack2<BF16>(dk[j][2 * r] * p.scale, dk[j][2 * r + 1] * p.scale);
            *reinterpret_cast<u32*>(dvr + j * 8 + 2 * t) = pack2<BF16>(dv[j][2 * r], dv[j][2 * r + 1]);
        }
    }
}

// dq = scale * dq_acc, both (B, Sq, H, D) contiguous.
template <bool BF16>
__device__ void attn_bwd_dq(const AttnParams& p, int D) {
    const i64 n = (i64)p.B * p.Sq * p.H * D;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        p.dq[i] = from_f32<BF16>(p.dq_acc[i] * p.scale);
}

#define ATTN_KERNELS(NAME, BF16, D)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) attn_fwd_##NAME##_d##D(AttnParams p) {       \
        attn_fwd<BF16, D>(p);                                                                       \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128) attn_bwd_##NAME##_d##D(AttnParams p) {       \
        attn_bwd<BF16, D>(p);                                                                       \
    }                                                                                               \
    extern "C" __global__ void attn_bwd_delta_##NAME##_d##D(AttnParams p) { attn_bwd_delta<BF16, D>(p); }

// The Hopper source (attention_sm90a.cu) includes this file for its helpers only.
#ifndef ATTN_HELPERS_ONLY
ATTN_KERNELS(bf16, true, 64)
ATTN_KERNELS(bf16, true, 80)
ATTN_KERNELS(bf16, true, 128)
ATTN_KERNELS(f16, false, 64)
ATTN_KERNELS(f16, false, 80)
ATTN_KERNELS(f16, false, 128)

extern "C" __global__ void attn_bwd_dq_bf16(AttnParams p, int D) { attn_bwd_dq<true>(p, D); }
extern "C" __global__ void attn_bwd_dq_f16(AttnParams p, int D) { attn_bwd_dq<false>(p, D); }
#endif

// ================================================================================================
// Variant 3 (default; variant 2 above stays selectable for A/B timing and as a fallback).
// Tile shapes follow FlashAttention-2's sm80/sm90 choices (kernel_traits.h, launch templates):
//   forward   128 query rows x 64 keys per step, 4 warps, each warp owns 32 rows (two m16 tiles), so
//             every K/V fragment read from shared memory feeds twice the MMAs of variant 2;
//   backward  8 warps on a 64-key block, 64 queries per step, every product split into 32x32 warp
//             tiles so dK/dV (64 x D each) live across 8 warps (32 + 32 floats per thread at d128
//             instead of 64 + 64): no register spills, two blocks per SM.
// Softmax works in the log2 domain with the scale folded in: p = 2^(s * scale_log2 - m), one FFMA.
// This needs scale > 0 (max commutes with scaling); the Rust side checks it.
// ================================================================================================

// 2^x (ex2.approx.ftz: 2^-inf = 0, which the masking relies on).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// ldmatrix on a 32-bit shared-space address (saves the 64-bit generic pointers, and their
// registers, that `ldmatrix_x4` converts on every call).
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// This lane's ldmatrix address for the A operand (16 x 16 block at row m, column k of a [m][k]
// tile when !T, or of a [k][m] tile when T) and for the B operand (16 x 16 block at n, k; [n][k]
// when !T, [k][n] when T). Element strides LD; `base` is the tile's shared-space byte address.
template <bool T, int LD>
__device__ __forceinline__ u32 a_addr(u32 base, int m, int k) {
    const int lane = threadIdx.x & 31, mi = lane >> 3, r8 = lane & 7;
    return T ? base + 2 * ((k + r8 + (mi >> 1) * 8) * LD + m + (mi & 1) * 8)
             : base + 2 * ((m + r8 + (mi & 1) * 8) * LD + k + (mi >> 1) * 8);
}
template <bool T, int LD>
__device__ __forceinline__ u32 b_addr(u32 base, int n, int k) {
    const int lane = threadIdx.x & 31, mi = lane >> 3, r8 = lane & 7;
    return T ? base + 2 * ((k + r8 + (mi & 1) * 8) * LD + n + (mi >> 1) * 8)
             : base + 2 * ((n + r8 + (mi >> 1) * 8) * LD + k + (mi & 1) * 8);
}
// Byte offset of the 16 x 16 block (row/col step dm, dk) from the lane address above.
template <bool T, int LD>
__device__ __forceinline__ constexpr int blk_off(int dm, int dk) { return T ? 2 * (dk * LD + dm) : 2 * (dm * LD + dk); }

// One warp: acc(16*MT x 8*NT) += A(16*MT x K) * B(K x 8*NT), operands in shared memory (byte
// addresses As, Bs; strides LDA, LDB elements). TA: A stored [k][m] (else [m][k]); TB: B stored
// [k][n] (else [n][k]). A rows m0 + 16 i, B columns n0 ... Each B fragment loaded once feeds MT
// MMAs, which is what bigger warp tiles buy. All offsets inside are compile-time constants.
template <bool BF16, bool TA, bool TB, int MT, int NT, int K, int LDA, int LDB>
__device__ __forceinline__ void warp_mma(float (&acc)[MT][NT][4], u32 As, int m0, u32 Bs, int n0) {
    const u32 a0 = a_addr<TA, LDA>(As, m0, 0), b0 = b_addr<TB, LDB>(Bs, n0, 0);
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
        u32 a[MT][4];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            if (TA) ldsm_x4_trans(a[i], a0 + blk_off<TA, LDA>(16 * i, k0));
            else ldsm_x4(a[i], a0 + blk_off<TA, LDA>(16 * i, k0));
        }
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            u32 b[4];
            if (TB) ldsm_x4_trans(b, b0 + blk_off<TB, LDB>(8 * j, k0));
            else ldsm_x4(b, b0 + blk_off<TB, LDB>(8 * j, k0));
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                mma16816<BF16>(acc[i][j], a[i], b[0], b[1]);
                mma16816<BF16>(acc[i][j + 1], a[i], b[2], b[3]);
            }
        }
    }
}

// Same with A given as register fragments a[KS][MT][4] (16*KS columns): Q kept in registers, or
// P re-packed from the score accumulators (FlashAttention-2's trick, no shared-memory round trip).
template <bool BF16, bool TB, int MT, int NT, int KS, int LDB>
__device__ __forceinline__ void warp_mma_frag(float (&acc)[MT][NT][4], const u32 (&a)[KS][MT][4], u32 Bs, int n0) {
    const u32 b0 = b_addr<TB, LDB>(Bs, n0, 0);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            u32 b[4];
            if (TB) ldsm_x4_trans(b, b0 + blk_off<TB, LDB>(8 * j, 16 * ks));
            else ldsm_x4(b, b0 + blk_off<TB, LDB>(8 * j, 16 * ks));
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                mma16816<BF16>(acc[i][j], a[ks][i], b[0], b[1]);
                mma16816<BF16>(acc[i][j + 1], a[ks][i], b[2], b[3]);
            }
        }
    }
}

// A fragments of rows m0 + 16 i (i < MT), all 16*KS columns, of a [m][k] shared tile.
template <int MT, int KS, int LDA>
__device__ __forceinline__ void load_frags(u32 (&a)[KS][MT][4], u32 As, int m0) {
    const u32 a0 = a_addr<false, LDA>(As, m0, 0);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int i = 0; i < MT; ++i) ldsm_x4(a[ks][i], a0 + blk_off<false, LDA>(16 * i, 16 * ks));
}

// C-layout accumulators c[MT][2*KS][4] (16*MT rows x 16*KS columns, fp32) -> A fragments (bf16/fp16).
template <bool BF16, int MT, int KS>
__device__ __forceinline__ void pack_frags(u32 (&a)[KS][MT][4], const float (&c)[MT][2 * KS][4]) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            a[ks][i][0] = pack2<BF16>(c[i][2 * ks][0], c[i][2 * ks][1]);
            a[ks][i][1] = pack2<BF16>(c[i][2 * ks][2], c[i][2 * ks][3]);
            a[ks][i][2] = pack2<BF16>(c[i][2 * ks + 1][0], c[i][2 * ks + 1][1]);
            a[ks][i][3] = pack2<BF16>(c[i][2 * ks + 1][2], c[i][2 * ks + 1][3]);
        }
}

// Rows [row0, row0 + ROWS) of one head into shared memory (stride D + 8) with cp.async, zero-filled
// past S, by THREADS threads. The caller commits the group and waits for it before reading.
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows_async(u16* dst, const u16* src, i64 row_stride, int row0, int S) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    // Not unrolled: unrolling hoists one 64-bit address per chunk out of the caller's loop, and
    // those registers (8 per tile pair) are what pushed the backward over its 128-register cap.
#pragma unroll 1
    for (int c = threadIdx.x; c < ROWS * CH; c += THREADS) {
        const int r = c / CH, cc = c % CH;
        const bool in = row0 + r < S;
        const u16* g = in ? src + (i64)(row0 + r) * row_stride + cc * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst + r * (D + 8) + cc * 8)), "l"(g), "r"(in ? 16 : 0));
    }
}

// The host's mask tile states (kernels/src/mask_cells.rs), one byte per 64-query x 32-key cell,
// each for the 128 x 128 window starting there (so one load decides any tile of at most 128 rows
// and 128 keys starting at the cell): 1 = the key, query and block masks allow every pair of the
// window, 2 = none (variant 20's states only), 0 = some. No states (variants before 19): 0, every
// tile of a masked call is partial.
#define CELL_WHOLE 1
#define CELL_EMPTY 2
__device__ __forceinline__ int mask_tile_state(const AttnParams& p, int b, int q0, int k0) {
    if (!p.mask_cells || !(p.key_keep || p.block_mask)) return 0;
    const int nqc = (p.Sq + 63) >> 6, nkc = (p.Sk + 31) >> 5;
    return p.mask_cells[((i64)b * nqc + (q0 >> 6)) * nkc + (k0 >> 5)];
}

// Whether the masks allow no pair of the tile at (q0, k0): the caller masks it whole, without
// per-element loads.
__device__ __forceinline__ bool tile_empty(const AttnParams& p, int b, int q0, int k0) {
    return mask_tile_state(p, b, q0, k0) == CELL_EMPTY;
}

// Every key of [k0, k0 + bn) visible to every query of [q0, q0 + bm) (bm, bn <= 128): no
// per-element mask work.
__device__ __forceinline__ bool tile_full(const AttnParams& p, int b, int q0, int k0, int bn) {
    if (k0 + bn > p.Sk) return false;
    if ((p.key_keep || p.block_mask) && mask_tile_state(p, b, q0, k0) != CELL_WHOLE) return false;
    return !p.causal || k0 + bn - 1 <= q0 + (p.Sk - p.Sq);
}

// `allowed` with the common cases (causal, sequence tails) as plain compares: only key padding and
// block masks need its per-element loads. Tiles straddling the causal diagonal are 1 in 4 at
// s = 512, so this matters there.
__device__ __forceinline__ bool allowed3(const AttnParams& p, int b, int i, int j) {
    if (p.key_keep || p.block_mask) return allowed(p, b, i, j);
    return j < p.Sk && i < p.Sq && (!p.causal || j <= i + (p.Sk - p.Sq));
}

#define FWD3_BM 128
#define FWD3_THREADS 128

// Forward, variant 3. Grid (ceil(Sq / 128), H, B); block x runs query tile (last - x), so under a
// causal mask the longest tiles start first. BN keys per step: 64, or 32 at d128, where O alone
// takes 128 registers per thread and a 32 x 64 score tile (64 more) made ptxas spill (233
// registers and no spills with 32; FA2 picks 128 x 32 on sm86 for the same reason). QREG keeps
// this warp's Q fragments in registers for the whole key loop (d64: 32 registers; at d128 they
// would cost 64, so Q stays in shared memory there, as in FA2's default Is_Q_in_regs = false).
// Shared: Q (128 x D+8), then 2 stages of K and 2 of V (BN x D+8 each): 69.6 KB at d128, so two
// blocks (8 warps of <= 255 registers) fit on an SM.
template <bool BF16, int D, int BN, bool QREG>
__device__ void attn_fwd3(const AttnParams& p) {
    extern __shared__ __align__(16) u16 smem[];
    constexpr int LD = D + 8, NTD = D / 8, KSD = D / 16, MT = 2, NTS = BN / 8;
    u16* Qs = smem;
    u16* Kbuf = Qs + FWD3_BM * LD;
    u16* Vbuf = Kbuf + 2 * BN * LD;

    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.H / p.Hk);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int q0 = qt * FWD3_BM, wrow = warp * 16 * MT;  // this warp: rows q0 + wrow .. + 32
    const u16* qbase = p.q + b * p.q_bs + h * p.q_hs;
    const u16* kbase = p.k + b * p.k_bs + hk * p.k_hs;
    const u16* vbase = p.v + b * p.v_bs + hk * p.v_hs;
    const float sl2 = p.scale_log2;

    int n_tiles = (p.Sk + BN - 1) / BN;
    if (p.causal) {
        const int last_key = q0 + FWD3_BM - 1 + (p.Sk - p.Sq);  // the last key any row of this tile sees
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }

    load_rows_async<D, FWD3_BM, FWD3_THREADS>(Qs, qbase, p.q_ss, q0, p.Sq);
    cp_async_commit();  // group: Q
    if (n_tiles > 0) {
        load_rows_async<D, BN, FWD3_THREADS>(Kbuf, kbase, p.k_ss, 0, p.Sk);
        load_rows_async<D, BN, FWD3_THREADS>(Vbuf, vbase, p.v_ss, 0, p.Sk);
    }
    cp_async_commit();  // group: K/V tile 0

    u32 qf[QREG ? KSD : 1][MT][4];
    if (QREG) {
        cp_async_wait<1>();
        __syncthreads();
        load_frags<MT, QREG ? KSD : 1, LD>(qf, smem_addr(Qs), wrow);
    }

    float acc_o[MT][NTD][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NTD; ++j) acc_o[i][j][0] = acc_o[i][j][1] = acc_o[i][j][2] = acc_o[i][j][3] = 0.f;
    // Running max (log2 domain, scaled) and this thread's partial row sums for rows g, g + 8 of
    // each m16 tile; the quad's partial sums are added once at the end.
    float m_run[MT][2], l_run[MT][2];
#pragma unroll
    for (int i = 0; i < MT; ++i) m_run[i][0] = m_run[i][1] = NEG_INF, l_run[i][0] = l_run[i][1] = 0.f;

    for (int kt = 0; kt < n_tiles; ++kt) {
        const int k0 = kt * BN;
        const u16* Ks = Kbuf + (kt & 1) * BN * LD;
        const u16* Vs = Vbuf + (kt & 1) * BN * LD;
        if (kt + 1 < n_tiles) {  // prefetch the next tile into the other stage (freed by the last barrier)
            load_rows_async<D, BN, FWD3_THREADS>(Kbuf + ((kt + 1) & 1) * BN * LD, kbase, p.k_ss, k0 + BN, p.Sk);
            load_rows_async<D, BN, FWD3_THREADS>(Vbuf + ((kt + 1) & 1) * BN * LD, vbase, p.v_ss, k0 + BN, p.Sk);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        float s[MT][NTS][4];  // (32 rows, BN keys) of S = Q K^T, unscaled
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NTS; ++j) s[i][j][0] = s[i][j][1] = s[i][j][2] = s[i][j][3] = 0.f;
        if (QREG) warp_mma_frag<BF16, false, MT, NTS, QREG ? KSD : 1, LD>(s, qf, smem_addr(Ks), 0);
        else warp_mma<BF16, false, false, MT, NTS, D, LD, LD>(s, smem_addr(Qs), wrow, smem_addr(Ks), 0);

        if (!tile_full(p, b, q0, k0, BN)) {
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NTS; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = q0 + wrow + i * 16 + g + (e >> 1) * 8;
                        const int col = k0 + j * 8 + 2 * t + (e & 1);
                        if (!allowed3(p, b, row, col)) s[i][j][e] = NEG_INF;
                    }
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = NEG_INF;
#pragma unroll
                for (int j = 0; j < NTS; ++j) mx = fmaxf(mx, fmaxf(s[i][j][2 * r], s[i][j][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float m_new = fmaxf(m_run[i][r], mx * sl2);
                const float m_use = m_new == NEG_INF ? 0.f : m_new;  // all masked so far: avoid inf - inf
                const float corr = fast_exp2(m_run[i][r] - m_use);
                m_run[i][r] = m_new;
                l_run[i][r] *= corr;
#pragma unroll
                for (int j = 0; j < NTD; ++j) {
                    acc_o[i][j][2 * r] *= corr;
                    acc_o[i][j][2 * r + 1] *= corr;
                }
#pragma unroll
                for (int j = 0; j < NTS; ++j)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const float pv = fast_exp2(fmaf(s[i][j][e], sl2, -m_use));
                        s[i][j][e] = pv;
                        l_run[i][r] += pv;
                    }
            }
        // O += P V: P (32 x BN) as register fragments, V stored [key][d].
        u32 pf[NTS / 2][MT][4];
        pack_frags<BF16, MT, NTS / 2>(pf, s);
        warp_mma_frag<BF16, true, MT, NTD, NTS / 2, LD>(acc_o, pf, smem_addr(Vs), 0);
        __syncthreads();  // this stage may be overwritten by the next prefetch
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_run[i][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = q0 + wrow + i * 16 + g + r * 8;
            if (row < p.Sq) {
                u16* orow = p.o + b * p.o_bs + (i64)row * p.o_ss + h * p.o_hs;
#pragma unroll
                for (int j = 0; j < NTD; ++j)
                    *reinterpret_cast<u32*>(orow + j * 8 + 2 * t) = pack2<BF16>(acc_o[i][j][2 * r] * inv, acc_o[i][j][2 * r + 1] * inv);
                if (t == 0) p.lse[((i64)b * p.H + h) * p.Sq + row] = l > 0.f ? m_run[i][r] + log2f(l) : NEG_INF;
            }
        }
}

// lse and delta of query rows [q0, q0 + BM) of head h (BM floats each) with cp.async by threads
// 0 .. 2 BM; rows past Sq read 0 (their Q and dO are zero-filled too, so P dO = dS = 0).
template <int BM>
__device__ __forceinline__ void load_lse_delta_async(const AttnParams& p, float* lse_s, float* delta_s, int b, int h, int q0) {
    if (threadIdx.x < 2 * BM) {
        const int r = threadIdx.x % BM;
        const bool in = q0 + r < p.Sq;
        const float* src = threadIdx.x < BM ? p.lse : p.delta;
        float* dst = threadIdx.x < BM ? lse_s : delta_s;
        const float* gsrc = in ? src + ((i64)b * p.H + h) * p.Sq + q0 + r : src;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst + r)), "l"(gsrc), "r"(in ? 4 : 0));
    }
}

#define BWD3_BM 64
#define BWD3_BN 64
#define BWD3_THREADS 256

// Backward, variant 3: one block per (64-key tile, KV head, batch), 8 warps, looping over the query
// heads of its group and their 64-row query tiles (dK/dV need no atomics; dQ is accumulated in
// fp32 with atomics into dq_acc (B, Sq, H, D)). Per query tile:
//   1. S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries): warp (w & 1, w >> 1) owns keys
//      32 (w & 1) .. +32 x queries 16 (w >> 1) .. +16; P^T and dS^T go to shared memory once.
//   2. dV += P^T dO, dK += dS^T Q (64 keys x D): warp owns keys 32 (w & 1) x columns D/4 (w >> 1).
//   3. the next tile's Q, dO, lse, delta start loading (cp.async) -- they are no longer read --
//      while dQ = dS K (64 queries x D) runs with the same 32 x D/4 split and is added atomically.
// Registers at d128: dK, dV 32 + 32 floats, S/dP 16 + 16, dQ 32 (not live with S/dP).
// Shared: K, V, Q, dO (64 x D+8 each), P^T, dS^T (64 x 72), lse, delta: 87 KB at d128, so two
// blocks (16 warps) fit on an SM next to the 128-register cap of __launch_bounds__(256, 2).
template <bool BF16, int D>
__device__ void attn_bwd3(const AttnParams& p) {
    extern __shared__ __align__(16) u16 smem[];
    constexpr int LD = D + 8, LDP = BWD3_BM + 8, DW = D / 4, NTW = DW / 8;
    static_assert(NTW % 2 == 0, "each warp's column slice must be a multiple of 16");
    u16* Ks = smem;
    u16* Vs = Ks + BWD3_BN * LD;
    u16* Qs = Vs + BWD3_BN * LD;
    u16* dOs = Qs + BWD3_BM * LD;
    u16* Ps = dOs + BWD3_BM * LD;                               // P^T  [key][query]
    u16* dSs = Ps + BWD3_BN * LDP;                              // dS^T [key][query]
    float* lse_s = reinterpret_cast<float*>(dSs + BWD3_BN * LDP);  // (64)
    float* delta_s = lse_s + BWD3_BM;                              // (64)

    const int kt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int group = p.H / p.Hk;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wa = warp & 1, wb = warp >> 1;  // wa: 32-row half; wb: quarter (queries or columns)
    const int k0 = kt * BWD3_BN;
    const float sl2 = p.scale_log2;

    int qt_start = 0;
    if (p.causal) qt_start = max(0, k0 - (p.Sk - p.Sq)) / BWD3_BM;
    const int n_q = max(0, (p.Sq + BWD3_BM - 1) / BWD3_BM - qt_start);
    // Iterations: (query head, query tile) pairs, query tile fastest; none when n_q = 0.
    const int qt_end = qt_start + n_q, h_end = n_q > 0 ? (hk + 1) * group : hk * group;

    // Issues the loads of iteration `it` (Q, dO rows; lse, delta entries) into the single buffer.
    auto load_iter = [&](int h, int q0) {
        load_rows_async<D, BWD3_BM, BWD3_THREADS>(Qs, p.q + b * p.q_bs + h * p.q_hs, p.q_ss, q0, p.Sq);
        load_rows_async<D, BWD3_BM, BWD3_THREADS>(dOs, p.dout + b * p.do_bs + h * p.do_hs, p.do_ss, q0, p.Sq);
        load_lse_delta_async<BWD3_BM>(p, lse_s, delta_s, b, h, q0);
    };

    load_rows_async<D, BWD3_BN, BWD3_THREADS>(Ks, p.k + b * p.k_bs + hk * p.k_hs, p.k_ss, k0, p.Sk);
    load_rows_async<D, BWD3_BN, BWD3_THREADS>(Vs, p.v + b * p.v_bs + hk * p.v_hs, p.v_ss, k0, p.Sk);
    if (n_q > 0) load_iter(hk * group, qt_start * BWD3_BM);
    cp_async_commit();

    float dk[2][NTW][4], dv[2][NTW][4];  // keys 32 wa .. +32 (two m16 tiles) x columns DW wb .. +DW
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < NTW; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dk[i][j][e] = dv[i][j][e] = 0.f;

    for (int h = hk * group, qt = qt_start; h < h_end;) {  // this iteration's query head and tile
        const int q0 = qt * BWD3_BM;
        cp_async_wait<0>();
        __syncthreads();  // this tile's loads are visible; the last tile's dQ reads of dS^T are done

        // 1. S^T and dP^T: keys 32 wa .. +32, queries 16 wb .. +16. On tiles that need masking the
        // mask is evaluated first, into one bit per element, while only dK/dV are live: the general
        // mask test needs ~10 registers, which next to S^T and dP^T pushed the kernel past 128.
        const bool full = tile_full(p, b, q0, k0, BWD3_BN);
        u32 okbits = 0xffffu;  // bit (2 i + j) * 4 + e
        if (!full) {
            okbits = 0;
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int qi = 16 * wb + j * 8 + 2 * t + (e & 1);
                        const int key = k0 + 32 * wa + 16 * i + g + (e >> 1) * 8;
                        if (lse_s[qi] != NEG_INF && allowed3(p, b, q0 + qi, key)) okbits |= 1u << ((2 * i + j) * 4 + e);
                    }
        }
        float s[2][2][4], dp[2][2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[i][j][e] = dp[i][j][e] = 0.f;
        // 32 columns of D per step, not unrolled: fully unrolled, ptxas hoists fragments of every step
        // and spills under the 128-register cap (checked with ptxas -v; 0 spills this way).
#pragma unroll 1
        for (int kd = 0; kd < D; kd += 32) {
            warp_mma<BF16, false, false, 2, 2, 32, LD, LD>(s, smem_addr(Ks + kd), 32 * wa, smem_addr(Qs + kd), 16 * wb);
            warp_mma<BF16, false, false, 2, 2, 32, LD, LD>(dp, smem_addr(Vs + kd), 32 * wa, smem_addr(dOs + kd), 16 * wb);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = 16 * wb + j * 8 + 2 * t + (e & 1);
                    const bool ok = (okbits >> ((2 * i + j) * 4 + e)) & 1u;
                    const float pv = ok ? fast_exp2(fmaf(s[i][j][e], sl2, -lse_s[qi])) : 0.f;
                    s[i][j][e] = pv;                               // P^T
                    dp[i][j][e] = pv * (dp[i][j][e] - delta_s[qi]);  // dS^T (w.r.t. the scaled scores)
                }
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int off = (32 * wa + 16 * i + g + 8 * r) * LDP + 16 * wb + j * 8 + 2 * t;
                    *reinterpret_cast<u32*>(Ps + off) = pack2<BF16>(s[i][j][2 * r], s[i][j][2 * r + 1]);
                    *reinterpret_cast<u32*>(dSs + off) = pack2<BF16>(dp[i][j][2 * r], dp[i][j][2 * r + 1]);
                }
            }
        __syncthreads();

        // 2. dV += P^T dO, dK += dS^T Q: keys 32 wa .. +32, columns DW wb .. +DW.
        // At d128 one 16-query step at a time (not unrolled): unrolled, ptxas hoists every step's
        // fragments and spills dK/dV to make room. At d64 there is room, and unrolling is spill-free.
        constexpr int KQ = D >= 128 ? 16 : BWD3_BM;
#pragma unroll 1
        for (int kq = 0; kq < BWD3_BM; kq += KQ) {
            warp_mma<BF16, false, true, 2, NTW, KQ, LDP, LD>(dv, smem_addr(Ps + kq), 32 * wa, smem_addr(dOs + kq * LD), DW * wb);
            warp_mma<BF16, false, true, 2, NTW, KQ, LDP, LD>(dk, smem_addr(dSs + kq), 32 * wa, smem_addr(Qs + kq * LD), DW * wb);
        }
        __syncthreads();  // Q, dO, lse, delta are free

        // 3. prefetch the next tile, then dQ (queries 32 wa .. +32, columns DW wb .. +DW) += dS K.
        const int qt_next = qt + 1 < qt_end ? qt + 1 : qt_start, h_next = qt + 1 < qt_end ? h : h + 1;
        if (h_next < h_end) load_iter(h_next, qt_next * BWD3_BM);
        cp_async_commit();
        // In column halves when the slice allows (d128): 16 dQ floats live instead of 32.
        constexpr int NQ = NTW >= 4 ? NTW / 2 : NTW;
#pragma unroll
        for (int c0 = 0; c0 < NTW; c0 += NQ) {
            float dq[2][NQ][4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < NQ; ++j) dq[i][j][0] = dq[i][j][1] = dq[i][j][2] = dq[i][j][3] = 0.f;
            warp_mma<BF16, true, true, 2, NQ, BWD3_BN, LDP, LD>(dq, smem_addr(dSs), 32 * wa, smem_addr(Ks), DW * wb + 8 * c0);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const int qi = q0 + 32 * wa + 16 * i + g + 8 * r;
                    if (qi >= p.Sq) continue;
                    float* dst = p.dq_acc + (((i64)b * p.Sq + qi) * p.H + h) * D + DW * wb + 8 * c0 + 2 * t;
#pragma unroll
                    for (int j = 0; j < NQ; ++j) {
                        atomicAdd(dst + j * 8, dq[i][j][2 * r]);
                        atomicAdd(dst + j * 8 + 1, dq[i][j][2 * r + 1]);
                    }
                }
        }
        qt = qt_next;
        h = h_next;
    }
    cp_async_wait<0>();

    // dK = scale * dS^T Q, dV = P^T dO; outputs (B, Sk, Hk, D) contiguous.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = k0 + 32 * wa + 16 * i + g + 8 * r;
            if (key >= p.Sk) continue;
            u16* dkr = p.dk + (((i64)b * p.Sk + key) * p.Hk + hk) * D + DW * wb + 2 * t;
            u16* dvr = p.dv + (((i64)b * p.Sk + key) * p.Hk + hk) * D + DW * wb + 2 * t;
#pragma unroll
            for (int j = 0; j < NTW; ++j) {
                *reinterpret_cast<u32*>(dkr + j * 8) = pack2<BF16>(dk[i][j][2 * r] * p.scale, dk[i][j][2 * r + 1] * p.scale);
                *reinterpret_cast<u32*>(dvr + j * 8) = pack2<BF16>(dv[i][j][2 * r], dv[i][j][2 * r + 1]);
            }
        }
}

#define ATTN3_FWD(NAME, BF16, D, BN, QREG)                                                          \
    extern "C" __global__ void __launch_bounds__(FWD3_THREADS) attn_fwd3_##NAME##_d##D(AttnParams p) { \
        attn_fwd3<BF16, D, BN, QREG>(p);                                                            \
    }
#define ATTN3_BWD(NAME, BF16, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(BWD3_THREADS, 2) attn_bwd3_##NAME##_d##D(AttnParams p) { \
        attn_bwd3<BF16, D>(p);                                                                      \
    }

#ifndef ATTN_HELPERS_ONLY
// Key-tile sizes here must match `fwd3_block_n` in attention.rs (it sizes shared memory).
ATTN3_FWD(bf16, true, 64, 64, true)
ATTN3_FWD(bf16, true, 80, 64, false)
ATTN3_FWD(bf16, true, 128, 32, false)
ATTN3_FWD(f16, false, 64, 64, true)
ATTN3_FWD(f16, false, 80, 64, false)
ATTN3_FWD(f16, false, 128, 32, false)
// d80 backward stays on variant 2: 80 columns do not split into 4 warp slices of 16.
ATTN3_BWD(bf16, true, 64)
ATTN3_BWD(bf16, true, 128)
ATTN3_BWD(f16, false, 64)
ATTN3_BWD(f16, false, 128)
#endif
