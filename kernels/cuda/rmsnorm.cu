// Fused RMSNorm (Llama / Mllama): y = w * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps),
// statistics in fp32, the normalized value rounded to the input dtype before the weight multiply
// (exactly transformers' MllamaTextRMSNorm order). x, y: (N, C) rows contiguous, C % 8 == 0.
// Backward: dx = rstd * (dxh - xh * mean(dxh * xh)), with xh = x * rstd, dxh = dy * w;
//           dw = sum over rows of dy * xh (per-block partials, then one atomicAdd per column).

#define RMS_THREADS 256

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // scratch reuse across calls
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < RMS_THREADS / 32; ++w) total += scratch[w];
    return total;
}

template <bool BF16>
__device__ void rmsnorm_fwd(const u16* x, const u16* w, u16* y, float* rstd_out, int N, int C, float eps) {
    __shared__ float scratch[RMS_THREADS / 32];
    const int row = blockIdx.x;
    if (row >= N) return;
    const u16* xr = x + (i64)row * C;
    u16* yr = y + (i64)row * C;
    float ss = 0.f;
    for (int c = threadIdx.x * 8; c < C; c += RMS_THREADS * 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(xr + c);
        const u16* e = reinterpret_cast<const u16*>(&v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float f = to_f32<BF16>(e[k]);
            ss += f * f;
        }
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) / C + eps);
    if (threadIdx.x == 0) rstd_out[row] = rstd;
    for (int c = threadIdx.x * 8; c < C; c += RMS_THREADS * 8) {
        const uint4 v = *reinterpret_cast<const uint4*>(xr + c);
        const uint4 wv = *reinterpret_cast<const uint4*>(w + c);
        const u16* e = reinterpret_cast<const u16*>(&v);
        const u16* we = reinterpret_cast<const u16*>(&wv);
        uint4 out;
        u16* o = reinterpret_cast<u16*>(&out);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float xh = to_f32<BF16>(from_f32<BF16>(to_f32<BF16>(e[k]) * rstd));
            o[k] = from_f32<BF16>(to_f32<BF16>(we[k]) * xh);
        }
        *reinterpret_cast<uint4*>(yr + c) = out;
    }
}

// Each block handles `rows_per_block` rows; dw_acc (C) fp32 must be zeroed by the caller.
template <bool BF16>
__device__ void rmsnorm_bwd(const u16* x, const u16* w, const u16* dy, const float* rstd_in, u16* dx,
                            float* dw_acc, int N, int C, int rows_per_block) {
    __shared__ float scratch[RMS_THREADS / 32];
    extern __shared__ float dw_part[];  // (C)
    for (int c = threadIdx.x; c < C; c += RMS_THREADS) dw_part[c] = 0.f;
    const int r0 = blockIdx.x * rows_per_block;
    for (int row = r0; row < min(N, r0 + rows_per_block); ++row) {
        const u16* xr = x + (i64)row * C;
        const u16* dyr = dy + (i64)row * C;
        const float rstd = rstd_in[row];
        float dot = 0.f;  // sum_c dxh * xh
        for (int c = threadIdx.x; c < C; c += RMS_THREADS) {
            const float xh = to_f32<BF16>(xr[c]) * rstd;
            const float g = to_f32<BF16>(dyr[c]);
            dot += g * to_f32<BF16>(w[c]) * xh;
            dw_part[c] += g * to_f32<BF16>(from_f32<BF16>(xh));
        }
        const float mean_dot = block_sum(dot, scratch) / C;
        for (int c = threadIdx.x; c < C; c += RMS_THREADS) {
            const float xh = to_f32<BF16>(xr[c]) * rstd;
            const float dxh = to_f32<BF16>(dyr[c]) * to_f32<BF16>(w[c]);
            dx[(i64)row * C + c] = from_f32<BF16>(rstd * (dxh - xh * mean_dot));
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += RMS_THREADS) atomicAdd(dw_acc + c, dw_part[c]);
}

extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_fwd_bf16(const u16* x, const u16* w, u16* y, float* rstd, int N, int C, float eps) {
    rmsnorm_fwd<true>(x, w, y, rstd, N, C, eps);
}
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_fwd_f16(const u16* x, const u16* w, u16* y, float* rstd, int N, int C, float eps) {
    rmsnorm_fwd<false>(x, w, y, rstd, N, C, eps);
}
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_bwd_bf16(const u16* x, const u16* w, const u16* dy, const float* rstd, u16* dx, float* dw, int N, int C, int rpb) {
    rmsnorm_bwd<true>(x, w, dy, rstd, dx, dw, N, C, rpb);
}
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_bwd_f16(const u16* x, const u16* w, const u16* dy, const float* rstd, u16* dx, float* dw, int N, int C, int rpb) {
    rmsnorm_bwd<false>(x, w, dy, rstd, dx, dw, N, C, rpb);
}
