// ================================================================================================
// Variant 7 forward: warp-specialized (FlashAttention-3's structure). Appended to the sm_90a source
// after attention_sm90.cu, whose wgmma wrappers and forward pieces (fwd4_qk, fwd4_pv,
// fwd4_softmax, fwd4_pack, fwd4_rescale, fwd4_store) it reuses unchanged: the math per tile is
// variant 5's. What changes is who loads and how the two math warpgroups share the tensor cores:
//   - Warpgroup 0 is the producer: one thread issues TMA tile loads (cp.async.bulk.tensor, the
//     copy engine writes the 128-byte swizzled layout wgmma reads, rows past the sequence filled
//     with zeros) and drops to 24 registers (setmaxnreg); the math warpgroups get 240.
//   - Stage hand-off by mbarriers instead of block barriers: full[s] completes when the tile's
//     bytes have landed (expect_tx), empty[s] when all 8 math warps are done reading it. K and V
//     have their own barriers, so S = Q K_{t+1} can start before V_t has arrived.
//   - Ping-pong: the two math warpgroups take turns issuing their GEMMs (named barriers 1 and 2
//     passed back and forth as a token), so one's softmax runs while the other's wgmmas occupy
//     the tensor cores; inside a warpgroup, variant 5's overlap (softmax of tile t+1 while
//     P_t V_t runs) stays.
// Block: 384 threads = producer warpgroup + 2 math warpgroups of 64 query rows; 128 keys per step.
// Shared: Q (128 x D), 2 stages of K and of V (128 x D each), 10 mbarriers: 160 KB + 1 KB
// alignment + 80 B at d128.
// ================================================================================================
#define FWD7_THREADS 384
#define FWD7_STAGES 2

// The tensor maps of Q, K, V (dimension 0: the head dim; 1-3: sequence, head, batch in order of
// increasing stride, the order the host found) and, per tensor, which map coordinate each of
// (sequence, head, batch) is.
struct __align__(64) Fwd7Maps {
    TmaMap q, k, v;
    int q_pos[3], k_pos[3], v_pos[3];
};

// One 128-row tile onto `bar`, its bytes announced.
template <int D>
__device__ __forceinline__ void fwd7_load_tile(u32 dst, const TmaMap& map, const int (&pos)[3], u32 bar, int row,
                                               int head, int batch) {
    mbar_arrive_expect_tx(bar, 128 * D * 2);
    tma_load_rows<D, 128>(dst, map, pos, bar, row, head, batch);
}

// Barriers: 8 bytes each from `bars`.
#define FWD7_Q_FULL 0
#define FWD7_K_FULL(s) (8 + 8 * (s))
#define FWD7_V_FULL(s) (24 + 8 * (s))
#define FWD7_K_EMPTY(s) (40 + 8 * (s))
#define FWD7_V_EMPTY(s) (56 + 8 * (s))
#define FWD7_Q_EMPTY 72
// Named barriers of the ping-pong token: math warpgroup w waits on 1 + w.
#define FWD7_SCHED_BAR 1

// K and V each pass through a ring of 2 stages; `idx` counts the tiles that went through the ring
// before (in this block, over all its query tiles). Tile idx takes stage idx & 1 and is its
// (idx >> 1)-th occupant, so it waits for the previous occupant's release, the ((idx >> 1) - 1)-th
// completion of that stage's empty barrier.
__device__ __forceinline__ int fwd7_stage(int idx) { return idx & 1; }
__device__ __forceinline__ u32 fwd7_parity(int idx) { return (idx >> 1) & 1; }  // of the wait for tile idx to land

// The producer thread's loads for one query tile at q0 with n_tiles > 0 key tiles, its first K and
// V taking ring index kv0; q_use: Q tiles this block loaded before, each released by the math
// warpgroups once their last S = Q K^T is done. Load order K_0, Q, (K_{t+1}, V_t) for t = 0..,
// the order the math warpgroups consume them in (K_0 before Q: its stage is free one key tile
// before Q is), so waiting on an empty stage can never block a tile they need first; the next
// query tile's K_0 and Q wait for this one's last reads, after every K and V of it was issued.
template <int D>
__device__ __forceinline__ void fwd7_produce(const Fwd7Maps& m, u32 Qs, u32 Kst, u32 Vst, u32 bars, int q0, int h,
                                             int hk, int b, int n_tiles, int kv0, int q_use) {
    constexpr u32 KV_BYTES = FWD4_BN * D * 2;
    auto load_k = [&](int t) {
        const int idx = kv0 + t, s = fwd7_stage(idx), j = idx >> 1;
        if (j > 0) mbar_wait_or_trap(bars + FWD7_K_EMPTY(s), (j - 1) & 1);
        fwd7_load_tile<D>(Kst + s * KV_BYTES, m.k, m.k_pos, bars + FWD7_K_FULL(s), t * FWD4_BN, hk, b);
    };
    auto load_v = [&](int t) {
        const int idx = kv0 + t, s = fwd7_stage(idx), j = idx >> 1;
        if (j > 0) mbar_wait_or_trap(bars + FWD7_V_EMPTY(s), (j - 1) & 1);
        fwd7_load_tile<D>(Vst + s * KV_BYTES, m.v, m.v_pos, bars + FWD7_V_FULL(s), t * FWD4_BN, hk, b);
    };
    load_k(0);
    if (q_use > 0) mbar_wait_or_trap(bars + FWD7_Q_EMPTY, (q_use - 1) & 1);
    fwd7_load_tile<D>(Qs, m.q, m.q_pos, bars + FWD7_Q_FULL, q0, h, b);
#pragma unroll 1
    for (int t = 0; t < n_tiles; ++t) {
        if (t + 1 < n_tiles) load_k(t + 1);
        load_v(t);
    }
}

// The producer's tail: the last K and V (ring index `last`) released means every load landed and
// was consumed. (Its watchdog also catches a math warpgroup stuck on a barrier.)
__device__ __forceinline__ void fwd7_produce_tail(u32 bars, int last) {
    const int s = fwd7_stage(last);
    mbar_wait_or_trap(bars + FWD7_K_EMPTY(s), (last >> 1) & 1);
    mbar_wait_or_trap(bars + FWD7_V_EMPTY(s), (last >> 1) & 1);
}

// Key tiles the query tile at q0 attends to (causal: up to the diagonal, which may be 0 when
// Sq > Sk).
__device__ __forceinline__ int fwd7_key_tiles(const AttnParams& p, int q0) {
    int n_tiles = (p.Sk + FWD4_BN - 1) / FWD4_BN;
    if (p.causal) {
        const int last_key = q0 + FWD4_BM - 1 + (p.Sk - p.Sq);
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / FWD4_BN + 1);
    }
    return n_tiles;
}

// One math warpgroup's part of a query tile (its 64 rows): the loop over n_tiles key tiles whose
// K and V take ring indices kv0.., then O and lse out. q_use as for the producer. A tile without
// keys (n_tiles 0) stores zeros and lse = -inf without touching the barriers.
template <bool BF16, int D>
__device__ __forceinline__ void fwd7_consume(const AttnParams& p, u32 Qs, u32 Kst, u32 Vst, u32 bars, int cw, int b,
                                             int h, int q0, int n_tiles, int kv0, int q_use) {
    constexpr int BN = FWD4_BN;
    constexpr u32 KV_BYTES = BN * D * 2;
    const int warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int row0 = q0 + cw * 64 + warp * 16;  // this thread's rows: row0 + g (+ 8)
    const u32 q_wg = Qs + cw * 64 * 128;        // its 64 rows of every Q column block

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
    float corr[2];
    float s[BN / 2];
    u32 pa[BN / 16][4];

    if (n_tiles > 0) {
        const int s0 = fwd7_stage(kv0);
        mbar_wait(bars + FWD7_Q_FULL, q_use & 1);
        mbar_wait(bars + FWD7_K_FULL(s0), fwd7_parity(kv0));
        wgmma_fence();
        fwd4_qk<BF16, D>(s, q_wg, Kst + s0 * KV_BYTES);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(s);
        if (lane == 0) {
            mbar_arrive(bars + FWD7_K_EMPTY(s0));
            if (n_tiles == 1) mbar_arrive(bars + FWD7_Q_EMPTY);  // the last read of Q
        }
        fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, 0);
        fwd4_pack<BF16>(pa, s);
        // Every tile but the last; the wgmmas are issued unconditionally (see variant 5).
#pragma unroll 1
        for (int kt = 0; kt + 1 < n_tiles; ++kt) {
            const int ik = kv0 + kt + 1, iv = kv0 + kt;  // ring indices of K_{kt+1}, V_kt
            const int sk = fwd7_stage(ik), sv = fwd7_stage(iv);
            mbar_wait(bars + FWD7_K_FULL(sk), fwd7_parity(ik));
            mbar_wait(bars + FWD7_V_FULL(sv), fwd7_parity(iv));
            named_barrier(FWD7_SCHED_BAR + cw, 256);  // our turn on the tensor cores
            wgmma_fence();
            fwd4_qk<BF16, D>(s, q_wg, Kst + sk * KV_BYTES);
            wgmma_commit();
            fwd4_pv<BF16, D>(o, pa, Vst + sv * KV_BYTES);
            wgmma_commit();
            named_barrier_arrive(FWD7_SCHED_BAR + (1 - cw), 256);  // the other warpgroup's turn
            wgmma_wait<1>();  // S_{kt+1} done: K_{kt+1} is free
            fence_regs(s);
            if (lane == 0) {
                mbar_arrive(bars + FWD7_K_EMPTY(sk));
                if (kt + 2 == n_tiles) mbar_arrive(bars + FWD7_Q_EMPTY);  // the last read of Q
            }
            fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, (kt + 1) * BN);
            wgmma_wait0();  // P_kt V_kt done: O, the P fragments and V_kt are free
            fence_regs(o);
            if (lane == 0) mbar_arrive(bars + FWD7_V_EMPTY(sv));
            fwd4_rescale<D>(o, corr);
            fwd4_pack<BF16>(pa, s);
        }
        const int iv = kv0 + n_tiles - 1, sv = fwd7_stage(iv);
        mbar_wait(bars + FWD7_V_FULL(sv), fwd7_parity(iv));
        wgmma_fence();
        fwd4_pv<BF16, D>(o, pa, Vst + sv * KV_BYTES);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(o);
        if (lane == 0) mbar_arrive(bars + FWD7_V_EMPTY(sv));  // the producer's tail waits for it
    }
    fwd4_store<BF16, D>(p, b, h, row0, o, m_run, l_run);
}

// Shared memory of variants 7 and 12 (Q, 2 stages of K and of V, 1024-aligned) and the barriers,
// initialized by thread 0 and visible to the block when this returns.
struct Fwd7Smem {
    u32 Qs, Kst, Vst, bars;
};
template <int D>
__device__ __forceinline__ Fwd7Smem fwd7_smem_setup() {
    extern __shared__ __align__(16) u16 smem[];
    constexpr u32 Q_BYTES = FWD4_BM * D * 2, KV_BYTES = FWD4_BN * D * 2;
    Fwd7Smem sm;
    sm.Qs = (smem_addr(smem) + 1023u) & ~1023u;
    sm.Kst = sm.Qs + Q_BYTES;
    sm.Vst = sm.Kst + FWD7_STAGES * KV_BYTES;
    sm.bars = sm.Vst + FWD7_STAGES * KV_BYTES;
    if (threadIdx.x == 0) {
        mbar_init(sm.bars + FWD7_Q_FULL, 1);
        mbar_init(sm.bars + FWD7_Q_EMPTY, 8);  // one arrival per math warp
        for (int s = 0; s < FWD7_STAGES; ++s) {
            mbar_init(sm.bars + FWD7_K_FULL(s), 1);
            mbar_init(sm.bars + FWD7_V_FULL(s), 1);
            mbar_init(sm.bars + FWD7_K_EMPTY(s), 8);
            mbar_init(sm.bars + FWD7_V_EMPTY(s), 8);
        }
        mbar_init_fence();
    }
    __syncthreads();  // the last block-wide barrier: the roles part here
    return sm;
}

// Grid (ceil(Sq / 128), H, B), query tiles in reverse order (causal: longest first), as variant 4.
// Inlined into the kernel (as are the producer and the math), so every instruction after a
// setmaxnreg is compiled under that register budget, not a callee's. The hand-off needs the kernel
// to start at exactly 168 registers per thread (384 x 168 = 128 x 24 + 256 x 240), which the host
// checks (`FWD7_ENTRY_REGISTERS` in attention.rs): with fewer, setmaxnreg.inc would wait forever
// for registers the block does not own. The same holds for variant 12.
template <bool BF16, int D>
__device__ __forceinline__ void attn_fwd7(const Fwd7Maps& maps, const AttnParams& p) {
    const Fwd7Smem sm = fwd7_smem_setup<D>();
    int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (p.lpt_group > 0) {  // variant 17 (attention_sm90.cu): the last query tile is the longest
        int level, pair;
        lpt_block(p.lpt_group, level, pair);
        qt = gridDim.x - 1 - level;
        h = pair % gridDim.y;
        b = pair / gridDim.y;
    }
    const int wg = threadIdx.x >> 7;
    const int q0 = qt * FWD4_BM, n_tiles = fwd7_key_tiles(p, q0);
    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (threadIdx.x == 0 && n_tiles > 0) {
            fwd7_produce<D>(maps, sm.Qs, sm.Kst, sm.Vst, sm.bars, q0, h, h / (p.H / p.Hk), b, n_tiles, 0, 0);
            fwd7_produce_tail(sm.bars, n_tiles - 1);
        }
        return;
    }
    setmaxnreg_inc<240>();
    const int cw = wg - 1;  // math warpgroup 0 or 1
    if (cw == 0 && n_tiles > 0) named_barrier_arrive(FWD7_SCHED_BAR, 256);  // math warpgroup 0 has the first turn
    fwd7_consume<BF16, D>(p, sm.Qs, sm.Kst, sm.Vst, sm.bars, cw, b, h, q0, n_tiles, 0, 0);
}

// ================================================================================================
// Variant 12 forward: variant 7, persistent. One block per SM (the host launches min(units, SMs)
// blocks); block i takes work units i, i + gridDim.x, ... of a static schedule, and its producer
// loads the next query tile's Q, K_0, V_0 while the math warpgroups still finish this one (its
// last P V, the rescale and the stores of O and lse), so those no longer run with the tensor
// cores idle once per query tile. The K and V rings, their barriers' phases and the ping-pong
// token carry over from one query tile to the next; Q has its own empty barrier, released after a
// tile's last S = Q K^T.
// Measured on an H200 (variant 7, 2026-11-27): forward TFLOP/s at s2048 was 0.86x of s8192 full
// and 0.65x causal, consistent with a fixed cost per block of ~3 key tiles' time.
// Schedule: units in order of (batch, head, tile) so that the blocks running at once share K and
// V in L2. Without a mask a unit is one query tile; causal, a unit pairs query tile n_qt - 1 - i
// (the longest) with tile i (the shortest), so every unit has about the same work and the static
// round robin stays balanced (a lone middle tile when n_qt is odd).
// ================================================================================================
struct Fwd12Schedule {
    int n_qt, per_head, units;
};
__device__ __forceinline__ Fwd12Schedule fwd12_schedule(const AttnParams& p) {
    const int n_qt = (p.Sq + FWD4_BM - 1) / FWD4_BM;
    const int per_head = p.causal ? (n_qt + 1) / 2 : n_qt;
    return {n_qt, per_head, per_head * p.H * p.B};
}
// Query tile `part` (0 or 1) of unit u, with its head and batch; false when the unit has no such
// tile.
__device__ __forceinline__ bool fwd12_tile(const Fwd12Schedule& sc, const AttnParams& p, int u, int part, int& qt,
                                           int& h, int& b) {
    const int i = u % sc.per_head, hb = u / sc.per_head;
    h = hb % p.H;
    b = hb / p.H;
    if (!p.causal) {
        qt = i;
        return part == 0;
    }
    qt = part == 0 ? sc.n_qt - 1 - i : i;
    return part == 0 || i < sc.n_qt - 1 - i;
}
// Calls f(q0, h, b, n_tiles) for each query tile of this block, in schedule order (the producer
// and both math warpgroups walk the same sequence).
template <typename F>
__device__ __forceinline__ void fwd12_for_each_tile(const AttnParams& p, F&& f) {
    const Fwd12Schedule sc = fwd12_schedule(p);
#pragma unroll 1
    for (int u = blockIdx.x; u < sc.units; u += gridDim.x)
#pragma unroll 1
        for (int part = 0; part < 2; ++part) {
            int qt, h, b;
            if (!fwd12_tile(sc, p, u, part, qt, h, b)) continue;
            f(qt * FWD4_BM, h, b, fwd7_key_tiles(p, qt * FWD4_BM));
        }
}

template <bool BF16, int D>
__device__ __forceinline__ void attn_fwd12(const Fwd7Maps& maps, const AttnParams& p) {
    const Fwd7Smem sm = fwd7_smem_setup<D>();
    const int wg = threadIdx.x >> 7;
    int kv = 0, q_use = 0;  // K/V tiles and Q tiles through the rings so far
    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (threadIdx.x != 0) return;
        fwd12_for_each_tile(p, [&](int q0, int h, int b, int n_tiles) {
            if (n_tiles == 0) return;
            fwd7_produce<D>(maps, sm.Qs, sm.Kst, sm.Vst, sm.bars, q0, h, h / (p.H / p.Hk), b, n_tiles, kv, q_use);
            kv += n_tiles;
            ++q_use;
        });
        if (kv > 0) fwd7_produce_tail(sm.bars, kv - 1);
        return;
    }
    setmaxnreg_inc<240>();
    const int cw = wg - 1;  // math warpgroup 0 or 1
    // Math warpgroup 0 has the first turn. Each query tile's loop passes the token the same number
    // of times in both warpgroups and ends with warpgroup 1's arrival for warpgroup 0 pending (or
    // this one, if no loop ran yet), so the next tile starts in the same state.
    if (cw == 0) named_barrier_arrive(FWD7_SCHED_BAR, 256);
    fwd12_for_each_tile(p, [&](int q0, int h, int b, int n_tiles) {
        fwd7_consume<BF16, D>(p, sm.Qs, sm.Kst, sm.Vst, sm.bars, cw, b, h, q0, n_tiles, kv, q_use);
        if (n_tiles > 0) {
            kv += n_tiles;
            ++q_use;
        }
    });
}

// Variant 7's and variant 12's entries (tensor maps first, as the host passes them).
#define ATTN7_FWD(NAME, BF16, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FWD7_THREADS, 1)                                                    \
        attn_fwd7_##NAME##_d##D(const __grid_constant__ Fwd7Maps maps, AttnParams p) {                               \
        attn_fwd7<BF16, D>(maps, p);                                                                                 \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(FWD7_THREADS, 1)                                                    \
        attn_fwd12_##NAME##_d##D(const __grid_constant__ Fwd7Maps maps, AttnParams p) {                              \
        attn_fwd12<BF16, D>(maps, p);                                                                                \
    }
// Head dims here must match `v4_forward` in attention.rs.
ATTN7_FWD(bf16, true, 64)
ATTN7_FWD(bf16, true, 128)
ATTN7_FWD(f16, false, 64)
ATTN7_FWD(f16, false, 128)
