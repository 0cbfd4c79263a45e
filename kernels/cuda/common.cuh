// Shared device helpers, prepended to every kernel source by the Rust side (NVRTC gets no
// include paths: no CUDA headers are needed at all). Element types are raw 16-bit words
// (`u16`) for bf16 and fp16; conversions and tensor-core ops are inline PTX (sm_80+).
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf16_to_f32(u16 x) { return __uint_as_float(((u32)x) << 16); }
__device__ __forceinline__ float f16_to_f32(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
template <bool BF16> __device__ __forceinline__ float to_f32(u16 x) { return BF16 ? bf16_to_f32(x) : f16_to_f32(x); }

template <bool BF16> __device__ __forceinline__ u16 from_f32(float x) {
    u16 r;
    if (BF16) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// Two floats into one 32-bit word: `lo` in the low half (the lower column index).
template <bool BF16> __device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// ldmatrix: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i of every lane
// receives matrix i's (row lane/4, cols 2*(lane%4), +1) -- or the transpose with .trans.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// D(16x8, f32) += A(16x16) * B(16x8). Fragment layouts (g = lane/4, t = lane%4):
//   A: a0 (row g, k 2t..2t+1), a1 (row g+8, same k), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
//   B: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g)
//   C: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1)
template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// One warp: acc(16 x 8*NT) += A(16 x K) * B(K x 8*NT), both operands in shared memory.
//   TA = false: A stored [m][k] (row m0.. of As);  TA = true: A stored [k][m] (column m0.. of As)
//   TB = false: B stored [n][k] (row n0.. of Bs);  TB = true: B stored [k][n] (column n0.. of Bs)
// Strides lda/ldb are in elements; rows must be 16-byte aligned. NT is even.
template <bool BF16, bool TA, bool TB, int NT, int K>
__device__ __forceinline__ void warp_gemm(float (&acc)[NT][4], const u16* As, int lda, int m0,
                                          const u16* Bs, int ldb, int n0) {
    const int lane = threadIdx.x & 31, mi = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int k0 = 0; k0 < K; k0 += 16) {
        u32 a[4];
        if (TA) ldmatrix_x4_trans(a, As + (k0 + r8 + (mi >> 1) * 8) * lda + m0 + (mi & 1) * 8);
        else ldmatrix_x4(a, As + (m0 + r8 + (mi & 1) * 8) * lda + k0 + (mi >> 1) * 8);
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            const int n = n0 + j * 8;
            u32 b[4];
            if (TB) ldmatrix_x4_trans(b, Bs + (k0 + r8 + (mi & 1) * 8) * ldb + n + (mi >> 1) * 8);
            else ldmatrix_x4(b, Bs + (n + r8 + (mi >> 1) * 8) * ldb + k0 + (mi & 1) * 8);
            mma16816<BF16>(acc[j], a, b[0], b[1]);
            mma16816<BF16>(acc[j + 1], a, b[2], b[3]);
        }
    }
}

// Same, with A (16 x 16*KS) given as fragments in registers: a C-layout tile of 16 x 16*KS
// floats (acc_in[2*KS][4]) is re-packed into A fragments (FlashAttention-2's P trick).
template <bool BF16, bool TB, int NT, int KS>
__device__ __forceinline__ void warp_gemm_areg(float (&acc)[NT][4], const float (&acc_in)[2 * KS][4],
                                               const u16* Bs, int ldb, int n0) {
    const int lane = threadIdx.x & 31, mi = lane >> 3, r8 = lane & 7;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        u32 a[4];
        a[0] = pack2<BF16>(acc_in[2 * ks][0], acc_in[2 * ks][1]);
        a[1] = pack2<BF16>(acc_in[2 * ks][2], acc_in[2 * ks][3]);
        a[2] = pack2<BF16>(acc_in[2 * ks + 1][0], acc_in[2 * ks + 1][1]);
        a[3] = pack2<BF16>(acc_in[2 * ks + 1][2], acc_in[2 * ks + 1][3]);
        const int k0 = ks * 16;
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
            const int n = n0 + j * 8;
            u32 b[4];
            if (TB) ldmatrix_x4_trans(b, Bs + (k0 + r8 + (mi & 1) * 8) * ldb + n + (mi >> 1) * 8);
            else ldmatrix_x4(b, Bs + (n + r8 + (mi >> 1) * 8) * ldb + k0 + (mi & 1) * 8);
            mma16816<BF16>(acc[j], a, b[0], b[1]);
            mma16816<BF16>(acc[j + 1], a, b[2], b[3]);
        }
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
