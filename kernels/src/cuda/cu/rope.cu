// RoPE in place with the Hugging Face "rotate half" layout, as
// kernels/src/ops.rs: in each head of each row, the pair (i, i + head_dim/2)
// turns by the angle whose cosine and sine are cos[row][i], sin[row][i]
// (tables of rows x head_dim/2, one row per token as model/src/forward.rs
// builds them). One thread per pair, grid-stride.
extern "C" __global__ void tandem_rope_f32(float* __restrict__ x, const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t, unsigned int rows, unsigned int heads,
                                           unsigned int head_dim) {
    const unsigned long long half = head_dim / 2;
    const unsigned long long total = (unsigned long long)rows * heads * half;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += stride) {
        const unsigned long long i = idx % half, row_head = idx / half;
        const unsigned long long row = row_head / heads;
        float* h = x + row_head * head_dim;
        const float c = cos_t[row * half + i], s = sin_t[row * half + i];
        const float x1 = h[i], x2 = h[i + half];
        h[i] = x1 * c - x2 * s;
        h[i + half] = x2 * c + x1 * s;
    }
}
