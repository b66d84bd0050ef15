// Paged decode attention: out[row][h] = softmax(q[row][h] . K^T * scale) . V
// over tokens 0..context_lens[row] of the row's sequence, query head h
// reading KV head h / (heads / kv_heads) (GQA), K/V read from the paged pool
// (f32 or bf16), everything accumulated in f32.
//
// One block per (query head, row), TANDEM_DECODE_WARPS warps. The warps take
// the context's tokens round robin; each keeps an online softmax (max, sum,
// weighted V sum) with its lanes owning dimensions lane, lane + 32, ... of
// the head. The warps' partials then meet in shared memory and are merged.
// Dynamic shared memory: warps x (head_dim + 2) floats.
//
// `tables` holds every row's block table back to back; `table_starts[row]`
// is where the row's begins. The host checked that every table covers its
// context and that every page lies inside the pool.
#if !defined(TANDEM_DECODE_WARPS)
#error "TANDEM_DECODE_WARPS is passed by the Rust side"
#endif

template <typename T>
__device__ __forceinline__ void tandem_paged_decode(const float* __restrict__ q, const T* __restrict__ pool,
                                                    const unsigned int* __restrict__ tables,
                                                    const unsigned int* __restrict__ table_starts,
                                                    const unsigned int* __restrict__ context_lens,
                                                    float* __restrict__ out, unsigned int heads,
                                                    unsigned int kv_heads, unsigned int head_dim,
                                                    unsigned int page_tokens, unsigned int num_layers,
                                                    unsigned int layer, float scale) {
    extern __shared__ float parts[];
    const unsigned int h = blockIdx.x, row = blockIdx.y;
    const unsigned int lane = threadIdx.x % TANDEM_WARP, warp = threadIdx.x / TANDEM_WARP;
    const unsigned int warps = blockDim.x / TANDEM_WARP;
    const unsigned int kv_head = h / (heads / kv_heads);
    const TandemPaged g = tandem_paged(page_tokens, num_layers, layer, kv_heads, head_dim);
    const unsigned long long v_off = (unsigned long long)page_tokens * g.row_elems;
    const unsigned int* table = tables + table_starts[row];
    const unsigned int ctx = context_lens[row];
    const float* qh = q + ((unsigned long long)row * heads + h) * head_dim;

    float qr[TANDEM_DIMS_PER_LANE], acc[TANDEM_DIMS_PER_LANE];
#pragma unroll
    for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
        const unsigned int d = lane + j * TANDEM_WARP;
        qr[j] = d < head_dim ? qh[d] : 0.f;
        acc[j] = 0.f;
    }
    float m = TANDEM_NEG_INF, l = 0.f;
    for (unsigned int t = warp; t < ctx; t += warps) {
        const T* k = pool + tandem_k_offset(g, table, t, kv_head, head_dim);
        const T* v = k + v_off;
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
            const unsigned int d = lane + j * TANDEM_WARP;
            if (d < head_dim) dot = fmaf(qr[j], tandem_load(k + d), dot);
        }
        float a, p;
        tandem_online(tandem_warp_sum(dot) * scale, m, l, a, p);
#pragma unroll
        for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
            const unsigned int d = lane + j * TANDEM_WARP;
            acc[j] = acc[j] * a + (d < head_dim ? p * tandem_load(v + d) : 0.f);
        }
    }

    float* part = parts + warp * (head_dim + 2);
    if (lane == 0) {
        part[0] = m;
        part[1] = l;
    }
#pragma unroll
    for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
        const unsigned int d = lane + j * TANDEM_WARP;
        if (d < head_dim) part[2 + d] = acc[j];
    }
    __syncthreads();

    // Merge: every warp's partial rescaled to the largest max. Warp 0 holds
    // token 0, so the max is finite; idle warps carry m = -inf, l = 0.
    float big = TANDEM_NEG_INF;
    for (unsigned int w = 0; w < warps; ++w) big = fmaxf(big, parts[w * (head_dim + 2)]);
    float sum = 0.f;
    for (unsigned int w = 0; w < warps; ++w) {
        const float* pw = parts + w * (head_dim + 2);
        sum += pw[1] * expf(pw[0] - big);
    }
    float* oh = out + ((unsigned long long)row * heads + h) * head_dim;
    for (unsigned int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (unsigned int w = 0; w < warps; ++w) {
            const float* pw = parts + w * (head_dim + 2);
            o += pw[2 + d] * expf(pw[0] - big);
        }
        oh[d] = o / sum;
    }
}

#define TANDEM_PAGED_DECODE(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const float* __restrict__ q, const T* __restrict__ pool,                  \
                                    const unsigned int* __restrict__ tables,                                  \
                                    const unsigned int* __restrict__ table_starts,                            \
                                    const unsigned int* __restrict__ context_lens, float* __restrict__ out,   \
                                    unsigned int heads, unsigned int kv_heads, unsigned int head_dim,         \
                                    unsigned int page_tokens, unsigned int num_layers, unsigned int layer,    \
                                    float scale) {                                                            \
        tandem_paged_decode<T>(q, pool, tables, table_starts, context_lens, out, heads, kv_heads, head_dim,   \
                               page_tokens, num_layers, layer, scale);                                        \
    }

TANDEM_PAGED_DECODE(tandem_paged_decode_f32, float)
TANDEM_PAGED_DECODE(tandem_paged_decode_bf16, tandem_bf16)
