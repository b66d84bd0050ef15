// RMSNorm as Llama's: out = x / sqrt(mean(x^2) + eps) * weight, one block per
// row. The sum of squares is accumulated in f32 (the CPU oracle uses f64).
// Dynamic shared memory: one float per warp.
extern "C" __global__ void tandem_rms_norm_f32(const float* __restrict__ x, const float* __restrict__ weight,
                                               float* __restrict__ out, unsigned int dim, float eps) {
    extern __shared__ float warp_sums[];
    const unsigned long long row = blockIdx.x;
    const float* xr = x + row * dim;
    float* orow = out + row * dim;
    const unsigned int lane = threadIdx.x % TANDEM_WARP, warp = threadIdx.x / TANDEM_WARP;
    const unsigned int warps = blockDim.x / TANDEM_WARP;

    float s = 0.f;
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) s = fmaf(xr[i], xr[i], s);
    s = tandem_warp_sum(s);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        float t = lane < warps ? warp_sums[lane] : 0.f;
        t = tandem_warp_sum(t);
        if (lane == 0) warp_sums[0] = t;
    }
    __syncthreads();
    const float inv = 1.f / sqrtf(warp_sums[0] / (float)dim + eps);
    for (unsigned int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = weight[i] * (xr[i] * inv);
}
