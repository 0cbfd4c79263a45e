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
    i64 q_bs, q_ss, q_hs, k_bs, k_ss, k_hs, v_bs, v_ss, v_hs, o_bs, o_ss, o_hs;  // element strides
    i64 do_bs, do_ss, do_hs;                                                     // dout strides
    int B, H, Hk, Sq, Sk;
    int causal, kblock, nblk;
    float scale;        // softmax scale (natural units)
    float scale_log2;   // scale * log2(e)
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
    const int warp_global = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    const i64 rows = (i64)p.B * p.H * p.Sq;
    if (warp_global >= rows) return;
    const int i = warp_global % p.Sq, h = (warp_global / p.Sq) % p.H, b = warp_global / ((i64)p.Sq * p.H);
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

ATTN_KERNELS(bf16, true, 64)
ATTN_KERNELS(bf16, true, 80)
ATTN_KERNELS(bf16, true, 128)
ATTN_KERNELS(f16, false, 64)
ATTN_KERNELS(f16, false, 80)
ATTN_KERNELS(f16, false, 128)

extern "C" __global__ void attn_bwd_dq_bf16(AttnParams p, int D) { attn_bwd_dq<true>(p, D); }
extern "C" __global__ void attn_bwd_dq_f16(AttnParams p, int D) { attn_bwd_dq<false>(p, D); }
