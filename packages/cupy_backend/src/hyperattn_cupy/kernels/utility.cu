// Small row-wise kernels (see utility.py):
//
//   row_dot        out[b, h, n] = sum_d a[b, h, n, d] * b[b, h, n, d] in fp32 (the backward's delta)
//   cast_rows      dst[b, h, n, :] = src[b, h, n, :] in dst's type (ADD: dst += src), e.g. fp32 -> bf16
//   draw_samples   the residual's key samples, hyperattn.sampling.sample_keys bit for bit
//   draw_key_norm_samples  sampling="key_norm": hyperattn.sampling.sample_keys_by_key_norm
//   sample_blocks  out[b, h, s, j] = k_rank[b, h, samples[b, h, s, j]] / block_size
//
// Row kernels: a block owns `block_rows` rows of one (batch, head): blockIdx.x = bh * row_blocks +
// row block (1-D grids: any number of rows).  Strides are in elements.
#include "common.cuh"

namespace hyperattn {

constexpr unsigned UTIL_FULL_MASK = 0xffffffffu;

// (b, h, first row, end row) of this block of a row kernel.
struct RowBlock {
  long long b, h, row0, row_end;
};

__device__ __forceinline__ RowBlock row_block(long long n, int num_heads, long long row_blocks, int block_rows) {
  const long long bh = blockIdx.x / row_blocks;
  const long long rb = blockIdx.x - bh * row_blocks;
  const long long b = bh / num_heads;
  const long long row0 = rb * block_rows;
  return RowBlock{b, bh - b * num_heads, row0, min(n, row0 + block_rows)};
}

// out [B, H, N] float32 contiguous; a, b [B, H, N, dim] of one type T, any strides.
// LANES lanes per row (a power of two <= 32) read d = lane, lane + LANES, ... and reduce with
// shuffles.  blockDim.x: a multiple of 32.
template <typename T, int LANES>
__global__ void row_dot(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out, long long n,
                        int num_heads, long long row_blocks, int block_rows, long long sa_b, long long sa_h,
                        long long sa_n, long long sa_d, long long sb_b, long long sb_h, long long sb_n,
                        long long sb_d, int dim) {
  static_assert(LANES >= 1 && LANES <= 32 && (LANES & (LANES - 1)) == 0, "LANES: a power of two <= 32");
  const RowBlock rb = row_block(n, num_heads, row_blocks, block_rows);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane / LANES, lane_in_row = lane % LANES;
  constexpr int ROWS_PER_WARP = 32 / LANES;
  const int rows_per_pass = (blockDim.x >> 5) * ROWS_PER_WARP;
  const T* a_bh = a + rb.b * sa_b + rb.h * sa_h;
  const T* b_bh = b + rb.b * sb_b + rb.h * sb_h;
  float* out_bh = out + ((rb.b * num_heads + rb.h) * n);
  // uniform loop bound per warp: every lane takes part in the shuffles
  for (long long first = rb.row0 + warp * ROWS_PER_WARP; first < rb.row_end; first += rows_per_pass) {
    const long long row = first + group;
    float acc = 0.0f;
    if (row < rb.row_end) {
      const T* ar = a_bh + row * sa_n;
      const T* br = b_bh + row * sb_n;
      for (int d = lane_in_row; d < dim; d += LANES) acc = fmaf(to_float(ar[d * sa_d]), to_float(br[d * sb_d]), acc);
    }
#pragma unroll
    for (int offset = LANES / 2; offset >= 1; offset >>= 1) acc += __shfl_xor_sync(UTIL_FULL_MASK, acc, offset);
    if (row < rb.row_end && lane_in_row == 0) out_bh[row] = acc;
  }
}

// dst = src (ADD: dst += src, in fp32) over [B, H, N, dim] views of any strides; S, D: __half,
// __nv_bfloat16 or float.  The block's rows x dim elements are spread over its threads.
template <typename S, typename D, bool ADD>
__global__ void cast_rows(const S* __restrict__ src, D* __restrict__ dst, long long n, int num_heads,
                          long long row_blocks, int block_rows, long long ss_b, long long ss_h, long long ss_n,
                          long long ss_d, long long sd_b, long long sd_h, long long sd_n, long long sd_d, int dim) {
  const RowBlock rb = row_block(n, num_heads, row_blocks, block_rows);
  const S* s_bh = src + rb.b * ss_b + rb.h * ss_h;
  D* d_bh = dst + rb.b * sd_b + rb.h * sd_h;
  const long long count = (rb.row_end - rb.row0) * dim;
  for (long long i = threadIdx.x; i < count; i += blockDim.x) {
    const long long r = i / dim;
    const long long d = i - r * dim;
    const long long row = rb.row0 + r;
    float value = to_float(s_bh[row * ss_n + d * ss_d]);
    D* target = d_bh + row * sd_n + d * sd_d;
    if (ADD) value += to_float(*target);
    *target = from_float<D>(value);
  }
}

// hyperattn.sampling: SplitMix64's constants.
constexpr unsigned long long SPLITMIX_GOLDEN = 0x9E3779B97F4A7C15ull;
constexpr unsigned long long SPLITMIX_MIX1 = 0xBF58476D1CE4E5B9ull;
constexpr unsigned long long SPLITMIX_MIX2 = 0x94D049BB133111EBull;
constexpr unsigned long long SAMPLE_STREAM = 0xD1B54A32D192ED03ull;
// hyperattn.sampling.PREFIX_FLOOR (2**-24): a segment lighter than this share of the prefix sum at
// its end draws uniformly.
constexpr double KEY_NORM_PREFIX_FLOOR = 5.9604644775390625e-08;

// The stream's key: seed (or, seed_in_memory, the int64 at seed_ptr, read when the kernel runs)
// + stream * STREAM, mod 2**64.
__device__ __forceinline__ unsigned long long stream_key(unsigned long long seed, const long long* seed_ptr,
                                                         int seed_in_memory, unsigned long long stream) {
  const unsigned long long s0 = seed_in_memory ? static_cast<unsigned long long>(*seed_ptr) : seed;
  return s0 + stream * SAMPLE_STREAM;
}

// hyperattn.sampling.mix: SplitMix64's finaliser of key + (i + 1) * GOLDEN, its high 32 bits.
__device__ __forceinline__ unsigned long long counter_bits(unsigned long long key, long long i) {
  unsigned long long z = key + (static_cast<unsigned long long>(i) + 1ull) * SPLITMIX_GOLDEN;
  z = (z ^ (z >> 30)) * SPLITMIX_MIX1;
  z = (z ^ (z >> 27)) * SPLITMIX_MIX2;
  z = z ^ (z >> 31);
  return z >> 32;
}

// out [B, Hk, S, m] contiguous (OutT: int, or long long from n_k = 2**31): element i (the
// spec's counter, ((b * Hk + h) * S + s) * m + j) is
//     key  = seed + stream * STREAM                          (mod 2**64)
//     z    = key + (i + 1) * GOLDEN; z = (z ^ z >> 30) * MIX1; z = (z ^ z >> 27) * MIX2; z ^= z >> 31
//     out  = k_start[s] + ((z >> 32) * k_len[s]) >> 32       (s = (i % per_head) / m)
// all in uint64, as hyperattn.sampling.mix / sample_keys.  The seed is `seed`, or with
// seed_in_memory the int64 at seed_ptr, read when the kernel runs (a CUDA graph replays the
// current value).  Grid: ceil(total / block_elems) blocks of block_elems elements.
template <typename OutT>
__global__ void draw_samples(OutT* __restrict__ out, const long long* __restrict__ k_start,
                             const long long* __restrict__ k_len, unsigned long long seed,
                             const long long* __restrict__ seed_ptr, int seed_in_memory, unsigned long long stream,
                             long long total, long long per_head, long long m, int block_elems) {
  const unsigned long long key = stream_key(seed, seed_ptr, seed_in_memory, stream);
  const long long begin = static_cast<long long>(blockIdx.x) * block_elems;
  const long long end = min(total, begin + block_elems);
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const unsigned long long bits = counter_bits(key, i);
    const long long segment = (i % per_head) / m;
    const unsigned long long span = static_cast<unsigned long long>(k_len[segment]);
    const long long drawn = static_cast<long long>((bits * span) >> 32) + k_start[segment];
    out[i] = static_cast<OutT>(drawn);
  }
}

// sampling="key_norm" (hyperattn.sampling.sample_keys_by_key_norm, up to the rounding of the prefix
// sums): out (OutT keys) and log_w (float32), contiguous [B, Hk, S, m], from the key weights
// `weights` (float32 ||k||**4) and their inclusive float64 prefix sums `prefix` (both contiguous
// [B, Hk, Nk]).  Draw j < m_u of a segment is stratified uniform over m_u strata; the others are
// stratified on the segment's CDF (a binary search of `search_steps` >= the bit length of the
// longest span halvings), or uniform over m_n strata where the segment's total is not above
// KEY_NORM_PREFIX_FLOOR of the prefix sum at its end.  Each draw's log weight is
// -log(m_u / n + m_n * p_x) (p_x = w_x / total, or 1 / n uniformly).  The counter of element
// (b, h, s, j) is (b * kv_total + head_ids[h]) * S * m + s * m + j (a KV head of a larger call).
template <typename OutT>
__global__ void draw_key_norm_samples(OutT* __restrict__ out, float* __restrict__ log_w,
                                      const float* __restrict__ weights, const double* __restrict__ prefix,
                                      const long long* __restrict__ k_start, const long long* __restrict__ k_len,
                                      const long long* __restrict__ head_ids, unsigned long long seed,
                                      const long long* __restrict__ seed_ptr, int seed_in_memory,
                                      unsigned long long stream, long long total, long long per_head, long long m,
                                      long long m_u, long long m_n, int kv_heads, long long kv_total, long long n_k,
                                      int search_steps, int block_elems) {
  const unsigned long long key = stream_key(seed, seed_ptr, seed_in_memory, stream);
  const long long begin = static_cast<long long>(blockIdx.x) * block_elems;
  const long long end = min(total, begin + block_elems);
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const long long bh = i / per_head, offs = i - bh * per_head;
    const long long b = bh / kv_heads, head = head_ids[bh - b * kv_heads];
    const unsigned long long bits = counter_bits(key, (b * kv_total + head) * per_head + offs);
    const long long segment = offs / m, slot = offs - segment * m;
    const long long start = k_start[segment], span = k_len[segment];
    const double* pre = prefix + bh * n_k;
    const double base = start > 0 ? pre[start - 1] : 0.0;
    const double last = pre[start + span - 1];
    const double seg_total = last - base;
    const bool weighed = seg_total > last * KEY_NORM_PREFIX_FLOOR;
    const bool norm_draw = slot >= m_u;
    const long long stratum = norm_draw ? slot - m_u : slot;
    const long long strata = norm_draw ? max(m_n, 1ll) : m_u;
    const long long offset = static_cast<long long>((bits * static_cast<unsigned long long>(span)) >> 32);
    long long drawn = start + (stratum * span + offset) / strata;
    if (norm_draw && weighed) {  // the first key whose inclusive prefix sum passes the target
      const double target = base + (static_cast<double>(stratum) + static_cast<double>(bits) * 0x1p-32) /
                                       static_cast<double>(max(m_n, 1ll)) * seg_total;
      long long lo = start, hi = start + span;
      for (int step = 0; step < search_steps && lo < hi; ++step) {
        const long long mid = (lo + hi) / 2;
        if (pre[mid] > target) hi = mid;
        else lo = mid + 1;
      }
      drawn = min(lo, start + span - 1);
    }
    const double n = static_cast<double>(span);
    const double p = weighed ? static_cast<double>(weights[bh * n_k + drawn]) / seg_total : 1.0 / n;
    out[i] = static_cast<OutT>(drawn);
    log_w[i] = -logf(static_cast<float>(static_cast<double>(m_u) / n + static_cast<double>(m_n) * p));
  }
}

// out [B, Hk, S, m] int32 contiguous = k_rank[b, h, samples[b, h, s, j]] / block_size (ranks are
// non-negative: C division is the floor); samples contiguous (SampleT: int or long long), k_rank
// [B, Hk, Nk] of RankT (int or long long), any strides.  count = S * m per (batch, KV head).
template <typename SampleT, typename RankT>
__global__ void sample_blocks(const SampleT* __restrict__ samples, const RankT* __restrict__ k_rank,
                              int* __restrict__ out, long long total, long long count, int kv_heads, long long sr_b,
                              long long sr_h, long long sr_n, long long block_size, int block_elems) {
  const long long begin = static_cast<long long>(blockIdx.x) * block_elems;
  const long long end = min(total, begin + block_elems);
  for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const long long bh = i / count;
    const long long b = bh / kv_heads, h = bh - b * kv_heads;
    const long long key = static_cast<long long>(samples[i]);
    const long long r = static_cast<long long>(k_rank[b * sr_b + h * sr_h + key * sr_n]);
    out[i] = static_cast<int>(r / block_size);
  }
}

}  // namespace hyperattn

#ifdef HYPERATTN_COMPILE_CHECK
#define HYPERATTN_ROW_DOT(T, L)                                                                                 \
  template __global__ void hyperattn::row_dot<T, L>(const T*, const T*, float*, long long, int, long long, int, \
                                                    long long, long long, long long, long long, long long,     \
                                                    long long, long long, long long, int);
#define HYPERATTN_ROW_DOT_LANES(T) HYPERATTN_ROW_DOT(T, 4) HYPERATTN_ROW_DOT(T, 8) HYPERATTN_ROW_DOT(T, 16) \
  HYPERATTN_ROW_DOT(T, 32)
HYPERATTN_ROW_DOT_LANES(__half)
HYPERATTN_ROW_DOT_LANES(__nv_bfloat16)
HYPERATTN_ROW_DOT_LANES(float)

#define HYPERATTN_CAST(S, D, A)                                                                                   \
  template __global__ void hyperattn::cast_rows<S, D, A>(const S*, D*, long long, int, long long, int, long long, \
                                                         long long, long long, long long, long long, long long,   \
                                                         long long, long long, int);
#define HYPERATTN_CAST_TO(S, A) HYPERATTN_CAST(S, __half, A) HYPERATTN_CAST(S, __nv_bfloat16, A) HYPERATTN_CAST(S, float, A)
#define HYPERATTN_CAST_ALL(A) HYPERATTN_CAST_TO(__half, A) HYPERATTN_CAST_TO(__nv_bfloat16, A) HYPERATTN_CAST_TO(float, A)
HYPERATTN_CAST_ALL(false)
HYPERATTN_CAST_ALL(true)

#define HYPERATTN_DRAW(O)                                                                                  \
  template __global__ void hyperattn::draw_samples<O>(O*, const long long*, const long long*,              \
                                                      unsigned long long, const long long*, int,           \
                                                      unsigned long long, long long, long long, long long, int);
HYPERATTN_DRAW(int)
HYPERATTN_DRAW(long long)

#define HYPERATTN_DRAW_KEY_NORM(O)                                                                              \
  template __global__ void hyperattn::draw_key_norm_samples<O>(                                                 \
      O*, float*, const float*, const double*, const long long*, const long long*, const long long*,           \
      unsigned long long, const long long*, int, unsigned long long, long long, long long, long long, long long, \
      long long, int, long long, long long, int, int);
HYPERATTN_DRAW_KEY_NORM(int)
HYPERATTN_DRAW_KEY_NORM(long long)

#define HYPERATTN_SAMPLE_BLOCKS(S, R)                                                                            \
  template __global__ void hyperattn::sample_blocks<S, R>(const S*, const R*, int*, long long, long long, int,   \
                                                          long long, long long, long long, long long, int);
HYPERATTN_SAMPLE_BLOCKS(int, int)
HYPERATTN_SAMPLE_BLOCKS(int, long long)
HYPERATTN_SAMPLE_BLOCKS(long long, int)
HYPERATTN_SAMPLE_BLOCKS(long long, long long)
#endif
