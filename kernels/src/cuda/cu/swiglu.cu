// SwiGLU in place: gate[i] = silu(gate[i]) * up[i], grid-stride.
extern "C" __global__ void tandem_silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up,
                                               unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = gate[i];
        gate[i] = g / (1.f + expf(-g)) * up[i];
    }
}
