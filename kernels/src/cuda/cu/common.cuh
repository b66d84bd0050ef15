// Shared by every Tandem kernel (prepended to each source before NVRTC
// compiles it): KV element loads and warp reductions. No CUDA headers are
// included, so NVRTC needs nothing but itself.
//
// The sizes below come from the Rust side as -D options (src/cuda/launch.rs
// is their single source); compiling without them is an error.
#if !defined(TANDEM_WARP) || !defined(TANDEM_MAX_HEAD_DIM)
#error "compile through tandem_kernels::cuda (it passes the -DTANDEM_* sizes)"
#endif

// Head dimensions each lane of a warp owns in the attention kernels.
#define TANDEM_DIMS_PER_LANE (TANDEM_MAX_HEAD_DIM / TANDEM_WARP)

// -inf without math.h (NVRTC has no INFINITY macro without headers).
#define TANDEM_NEG_INF __uint_as_float(0xff800000u)

// A bf16 KV element as its bit pattern: the high half of an f32.
typedef unsigned short tandem_bf16;

__device__ __forceinline__ float tandem_load(const float* p) { return *p; }

__device__ __forceinline__ float tandem_load(const tandem_bf16* p) {
    return __uint_as_float(((unsigned int)*p) << 16);
}

__device__ __forceinline__ float tandem_warp_sum(float v) {
#pragma unroll
    for (int o = TANDEM_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Offsets into the paged pool, laid out [page][layer][k|v][token][kv_head][head_dim]
// (DESIGN.md §3): one layer of one page is contiguous, V follows K within it.
struct TandemPaged {
    unsigned long long row_elems;    // kv_heads * head_dim
    unsigned long long layer_elems;  // 2 * page_tokens * row_elems
    unsigned long long page_elems;   // num_layers * layer_elems
    unsigned int page_tokens;
    unsigned int layer;
};

__device__ __forceinline__ TandemPaged tandem_paged(unsigned int page_tokens, unsigned int num_layers,
                                                    unsigned int layer, unsigned int kv_heads,
                                                    unsigned int head_dim) {
    TandemPaged g;
    g.row_elems = (unsigned long long)kv_heads * head_dim;
    g.layer_elems = 2ull * page_tokens * g.row_elems;
    g.page_elems = (unsigned long long)num_layers * g.layer_elems;
    g.page_tokens = page_tokens;
    g.layer = layer;
    return g;
}

// The K row of token `t` (of the sequence whose block table is `table`) for
// one KV head; its V row is `page_tokens * row_elems` further.
__device__ __forceinline__ unsigned long long tandem_k_offset(const TandemPaged& g, const unsigned int* table,
                                                              unsigned int t, unsigned int kv_head,
                                                              unsigned int head_dim) {
    const unsigned long long page = table[t / g.page_tokens];
    const unsigned int slot = t % g.page_tokens;
    return page * g.page_elems + g.layer * g.layer_elems + slot * g.row_elems +
           (unsigned long long)kv_head * head_dim;
}

// One step of an online softmax: folds score `s` into (m, l) and returns the
// factors for the running sums (`a` for what was there, `p` for the new value).
__device__ __forceinline__ void tandem_online(float s, float& m, float& l, float& a, float& p) {
    const float m_new = fmaxf(m, s);
    a = expf(m - m_new);  // m = -inf at the start: a = 0
    p = expf(s - m_new);
    l = l * a + p;
    m = m_new;
}
