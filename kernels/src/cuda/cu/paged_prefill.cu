// Chunked causal prefill attention over paged KV. Sequence s appends
// q_lens[s] new tokens after cached_lens[s] tokens already in its pages; the
// new tokens' K/V were written to the pool before the call (as the CPU
// forward pass does), so new token i, at position cached + i, attends to
// positions 0..=cached + i: the cached pages and the new tokens up to itself.
// Query rows of all sequences are concatenated; q_starts[s] is the first row
// of sequence s. Query head h reads KV head h / (heads / kv_heads) (GQA). K/V
// are f32 or bf16; everything is accumulated in f32.
//
// One block per (tile of TANDEM_PREFILL_Q_TILE query rows, head, sequence).
// The block stages TANDEM_PREFILL_KV_TILE tokens' K and V at a time in
// shared memory as f32 (dynamic shared memory: 2 x KV_TILE x head_dim
// floats); each warp owns Q_TILE / warps query rows and keeps an online
// softmax per row, its lanes owning dimensions lane, lane + 32, ...
#if !defined(TANDEM_PREFILL_Q_TILE) || !defined(TANDEM_PREFILL_KV_TILE) || !defined(TANDEM_PREFILL_WARPS)
#error "the TANDEM_PREFILL_* sizes are passed by the Rust side"
#endif
#define TANDEM_ROWS_PER_WARP (TANDEM_PREFILL_Q_TILE / TANDEM_PREFILL_WARPS)

template <typename T>
__device__ __forceinline__ void tandem_paged_prefill(
    const float* __restrict__ q, const T* __restrict__ pool, const unsigned int* __restrict__ tables,
    const unsigned int* __restrict__ table_starts, const unsigned int* __restrict__ q_starts,
    const unsigned int* __restrict__ q_lens, const unsigned int* __restrict__ cached_lens, float* __restrict__ out,
    unsigned int heads, unsigned int kv_heads, unsigned int head_dim, unsigned int page_tokens,
    unsigned int num_layers, unsigned int layer, float scale) {
    extern __shared__ float kv_tile[];
    float* k_tile = kv_tile;
    float* v_tile = kv_tile + TANDEM_PREFILL_KV_TILE * head_dim;
    const unsigned int h = blockIdx.y, seq = blockIdx.z;
    const unsigned int q_len = q_lens[seq];
    const unsigned int q0 = blockIdx.x * TANDEM_PREFILL_Q_TILE;
    // Sequences shorter than the longest leave whole blocks idle; the block
    // leaves before any barrier.
    if (q0 >= q_len) return;
    const unsigned int q1 = min(q0 + (unsigned int)TANDEM_PREFILL_Q_TILE, q_len);
    const unsigned int cached = cached_lens[seq];
    const unsigned int kv_end = cached + q1;  // what the tile's last row sees
    const unsigned int lane = threadIdx.x % TANDEM_WARP, warp = threadIdx.x / TANDEM_WARP;
    const unsigned int kv_head = h / (heads / kv_heads);
    const TandemPaged g = tandem_paged(page_tokens, num_layers, layer, kv_heads, head_dim);
    const unsigned long long v_off = (unsigned long long)page_tokens * g.row_elems;
    const unsigned int* table = tables + table_starts[seq];
    const unsigned long long row0 = q_starts[seq];

    float qr[TANDEM_ROWS_PER_WARP][TANDEM_DIMS_PER_LANE], acc[TANDEM_ROWS_PER_WARP][TANDEM_DIMS_PER_LANE];
    float m[TANDEM_ROWS_PER_WARP], l[TANDEM_ROWS_PER_WARP];
#pragma unroll
    for (int i = 0; i < TANDEM_ROWS_PER_WARP; ++i) {
        const unsigned int r = q0 + warp * TANDEM_ROWS_PER_WARP + i;
        const float* qh = q + ((row0 + r) * heads + h) * head_dim;
#pragma unroll
        for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
            const unsigned int d = lane + j * TANDEM_WARP;
            qr[i][j] = (r < q1 && d < head_dim) ? qh[d] : 0.f;
            acc[i][j] = 0.f;
        }
        m[i] = TANDEM_NEG_INF;
        l[i] = 0.f;
    }

    for (unsigned int kv0 = 0; kv0 < kv_end; kv0 += TANDEM_PREFILL_KV_TILE) {
        const unsigned int n = min((unsigned int)TANDEM_PREFILL_KV_TILE, kv_end - kv0);
        __syncthreads();  // every warp is done with the previous tile
        for (unsigned int idx = threadIdx.x; idx < n * head_dim; idx += blockDim.x) {
            const unsigned int tt = idx / head_dim, d = idx % head_dim;
            const T* k = pool + tandem_k_offset(g, table, kv0 + tt, kv_head, head_dim);
            k_tile[idx] = tandem_load(k + d);
            v_tile[idx] = tandem_load(k + v_off + d);
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < TANDEM_ROWS_PER_WARP; ++i) {
            const unsigned int r = q0 + warp * TANDEM_ROWS_PER_WARP + i;
            if (r >= q1) continue;  // warp-uniform
            const unsigned int seen = cached + r + 1;  // causal: positions 0..=cached + r
            if (seen <= kv0) continue;
            const unsigned int lim = min(n, seen - kv0);
            for (unsigned int tt = 0; tt < lim; ++tt) {
                float dot = 0.f;
#pragma unroll
                for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
                    const unsigned int d = lane + j * TANDEM_WARP;
                    if (d < head_dim) dot = fmaf(qr[i][j], k_tile[tt * head_dim + d], dot);
                }
                float a, p;
                tandem_online(tandem_warp_sum(dot) * scale, m[i], l[i], a, p);
#pragma unroll
                for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
                    const unsigned int d = lane + j * TANDEM_WARP;
                    acc[i][j] = acc[i][j] * a + (d < head_dim ? p * v_tile[tt * head_dim + d] : 0.f);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < TANDEM_ROWS_PER_WARP; ++i) {
        const unsigned int r = q0 + warp * TANDEM_ROWS_PER_WARP + i;
        if (r >= q1) continue;
        float* oh = out + ((row0 + r) * heads + h) * head_dim;
        const float inv = 1.f / l[i];
#pragma unroll
        for (int j = 0; j < TANDEM_DIMS_PER_LANE; ++j) {
            const unsigned int d = lane + j * TANDEM_WARP;
            if (d < head_dim) oh[d] = acc[i][j] * inv;
        }
    }
}

#define TANDEM_PAGED_PREFILL(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const float* __restrict__ q, const T* __restrict__ pool,                   \
                                    const unsigned int* __restrict__ tables,                                   \
                                    const unsigned int* __restrict__ table_starts,                             \
                                    const unsigned int* __restrict__ q_starts,                                 \
                                    const unsigned int* __restrict__ q_lens,                                   \
                                    const unsigned int* __restrict__ cached_lens, float* __restrict__ out,     \
                                    unsigned int heads, unsigned int kv_heads, unsigned int head_dim,          \
                                    unsigned int page_tokens, unsigned int num_layers, unsigned int layer,     \
                                    float scale) {                                                             \
        tandem_paged_prefill<T>(q, pool, tables, table_starts, q_starts, q_lens, cached_lens, out, heads,      \
                                kv_heads, head_dim, page_tokens, num_layers, layer, scale);                    \
    }

TANDEM_PAGED_PREFILL(tandem_paged_prefill_f32, float)
TANDEM_PAGED_PREFILL(tandem_paged_prefill_bf16, tandem_bf16)
