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
// Shared: Q (128 x D), 2 stages of K and of V (128 x D each), 9 mbarriers: 160 KB + 1 KB alignment
// + 72 B at d128. Producer load order K_0, (K_{t+1}, V_t) for t = 0.., the order the math
// warpgroups consume them in, so waiting on an empty stage can never block a tile they need first.
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
// Named barriers of the ping-pong token: math warpgroup w waits on 1 + w.
#define FWD7_SCHED_BAR 1

// The producer thread. A stage s is used by tiles s, s + 2, ...: the j-th use (tile 2 j + s)
// waits for its previous occupant's release, the (j - 1)-th completion of empty[s] (parity (j - 1) & 1).
template <int D>
__device__ __forceinline__ void fwd7_produce(const Fwd7Maps& m, u32 Qs, u32 Kst, u32 Vst, u32 bars, int q0, int h, int hk, int b,
                             int n_tiles) {
    constexpr u32 KV_BYTES = FWD4_BN * D * 2;
    fwd7_load_tile<D>(Qs, m.q, m.q_pos, bars + FWD7_Q_FULL, q0, h, b);
    fwd7_load_tile<D>(Kst, m.k, m.k_pos, bars + FWD7_K_FULL(0), 0, hk, b);
#pragma unroll 1
    for (int t = 0; t < n_tiles; ++t) {
        if (t + 1 < n_tiles) {
            const int s = (t + 1) & 1, j = (t + 1) >> 1;
            if (j > 0) mbar_wait_or_trap(bars + FWD7_K_EMPTY(s), (j - 1) & 1);
            fwd7_load_tile<D>(Kst + s * KV_BYTES, m.k, m.k_pos, bars + FWD7_K_FULL(s), (t + 1) * FWD4_BN, hk, b);
        }
        const int s = t & 1, j = t >> 1;
        if (j > 0) mbar_wait_or_trap(bars + FWD7_V_EMPTY(s), (j - 1) & 1);
        fwd7_load_tile<D>(Vst + s * KV_BYTES, m.v, m.v_pos, bars + FWD7_V_FULL(s), t * FWD4_BN, hk, b);
    }
    // The tail: the last tile's K and V released means every load landed and was consumed.
    const int s = (n_tiles - 1) & 1, j = (n_tiles - 1) >> 1;
    mbar_wait_or_trap(bars + FWD7_K_EMPTY(s), j & 1);
    mbar_wait_or_trap(bars + FWD7_V_EMPTY(s), j & 1);
}

// Grid (ceil(Sq / 128), H, B), query tiles in reverse order (causal: longest first), as variant 4.
// Inlined into the kernel (as is the producer), so every instruction after a setmaxnreg is
// compiled under that register budget, not a callee's.
template <bool BF16, int D>
__device__ __forceinline__ void attn_fwd7(const Fwd7Maps& maps, const AttnParams& p) {
    extern __shared__ __align__(16) u16 smem[];
    constexpr int BM = FWD4_BM, BN = FWD4_BN;
    constexpr u32 Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
    const u32 base = (smem_addr(smem) + 1023u) & ~1023u;
    const u32 Qs = base, Kst = Qs + Q_BYTES, Vst = Kst + FWD7_STAGES * KV_BYTES;
    const u32 bars = Vst + FWD7_STAGES * KV_BYTES;

    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (p.H / p.Hk);
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
    const int q0 = qt * BM;
    int n_tiles = (p.Sk + BN - 1) / BN;
    if (p.causal) {
        const int last_key = q0 + BM - 1 + (p.Sk - p.Sq);
        n_tiles = min(n_tiles, last_key < 0 ? 0 : last_key / BN + 1);
    }

    if (threadIdx.x == 0) {
        mbar_init(bars + FWD7_Q_FULL, 1);
        for (int s = 0; s < FWD7_STAGES; ++s) {
            mbar_init(bars + FWD7_K_FULL(s), 1);
            mbar_init(bars + FWD7_V_FULL(s), 1);
            mbar_init(bars + FWD7_K_EMPTY(s), 8);  // one arrival per math warp
            mbar_init(bars + FWD7_V_EMPTY(s), 8);
        }
        mbar_init_fence();
    }
    __syncthreads();  // the last block-wide barrier: the roles part here

    // The hand-off needs the kernel to start at exactly 168 registers per thread (384 x 168 =
    // 128 x 24 + 256 x 240), which the host checks (`FWD7_ENTRY_REGISTERS` in attention.rs):
    // with fewer, setmaxnreg.inc would wait forever for registers the block does not own.
    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (threadIdx.x == 0 && n_tiles > 0) fwd7_produce<D>(maps, Qs, Kst, Vst, bars, q0, h, hk, b, n_tiles);
        return;
    }
    setmaxnreg_inc<240>();
    const int cw = wg - 1;                         // math warpgroup 0 or 1
    const int row0 = q0 + cw * 64 + warp * 16;     // this thread's rows: row0 + g (+ 8)
    const u32 q_wg = Qs + cw * 64 * 128;           // its 64 rows of every Q column block

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};
    float corr[2];
    float s[BN / 2];
    u32 pa[BN / 16][4];

    if (n_tiles > 0) {
        if (cw == 0) named_barrier_arrive(FWD7_SCHED_BAR, 256);  // math warpgroup 0 has the first turn
        mbar_wait(bars + FWD7_Q_FULL, 0);
        mbar_wait(bars + FWD7_K_FULL(0), 0);
        wgmma_fence();
        fwd4_qk<BF16, D>(s, q_wg, Kst);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(s);
        if (lane == 0) mbar_arrive(bars + FWD7_K_EMPTY(0));
        fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, 0);
        fwd4_pack<BF16>(pa, s);
        // Every tile but the last; the wgmmas are issued unconditionally (see variant 5).
#pragma unroll 1
        for (int kt = 0; kt + 1 < n_tiles; ++kt) {
            const int sk = (kt + 1) & 1, sv = kt & 1;
            mbar_wait(bars + FWD7_K_FULL(sk), ((kt + 1) >> 1) & 1);
            mbar_wait(bars + FWD7_V_FULL(sv), (kt >> 1) & 1);
            named_barrier(FWD7_SCHED_BAR + cw, 256);  // our turn on the tensor cores
            wgmma_fence();
            fwd4_qk<BF16, D>(s, q_wg, Kst + sk * KV_BYTES);
            wgmma_commit();
            fwd4_pv<BF16, D>(o, pa, Vst + sv * KV_BYTES);
            wgmma_commit();
            named_barrier_arrive(FWD7_SCHED_BAR + (1 - cw), 256);  // the other warpgroup's turn
            wgmma_wait<1>();  // S_{kt+1} done: K_{kt+1} is free
            fence_regs(s);
            if (lane == 0) mbar_arrive(bars + FWD7_K_EMPTY(sk));
            fwd4_softmax(s, m_run, l_run, corr, p, b, q0, row0, (kt + 1) * BN);
            wgmma_wait0();  // P_kt V_kt done: O, the P fragments and V_kt are free
            fence_regs(o);
            if (lane == 0) mbar_arrive(bars + FWD7_V_EMPTY(sv));
            fwd4_rescale<D>(o, corr);
            fwd4_pack<BF16>(pa, s);
        }
        const int sv = (n_tiles - 1) & 1;
        mbar_wait(bars + FWD7_V_FULL(sv), ((n_tiles - 1) >> 1) & 1);
        wgmma_fence();
        fwd4_pv<BF16, D>(o, pa, Vst + sv * KV_BYTES);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(o);
        if (lane == 0) mbar_arrive(bars + FWD7_V_EMPTY(sv));  // the producer's tail waits for it
    }
    fwd4_store<BF16, D>(p, b, h, row0, o, m_run, l_run);
}

#define ATTN7_FWD(NAME, BF16, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FWD7_THREADS, 1)                                                    \
        attn_fwd7_##NAME##_d##D(const __grid_constant__ Fwd7Maps maps, AttnParams p) {                               \
        attn_fwd7<BF16, D>(maps, p);                                                                                 \
    }
// Head dims here must match `v7_forward` in attention.rs.
ATTN7_FWD(bf16, true, 64)
ATTN7_FWD(bf16, true, 128)
ATTN7_FWD(f16, false, 64)
ATTN7_FWD(f16, false, 128)
