// The segment sort's counting sort of small codes (at most 8 bits: nb <= 256 buckets), in three
// launches (see sorting.py for the algorithm and the host tables):
//
//   chunk_histogram  hist[row, t, c]  = how many positions of chunk t have code c
//   bucket_starts    first[row, t, c] = where chunk t's first code-c position goes: the segment's
//                    start + its positions of smaller codes + code-c positions in its earlier chunks
//   chunk_scatter    order[row, dest] = p, rank[row, p] = dest - segment start, where dest is
//                    first[row, t, code] + the number of earlier positions of chunk t with that code
//
// Host tables (int64, row-major): chunks [T, 4] (p0, p1, piece start, is gap) cover [0, N) in
// order, pieces being the segments and the gaps between them; parts [P, 5] (t0, t1, segment
// start, u0, u1): part [u0, u1) of the chunks [t0, t1) of one segment.  Gap chunks keep their
// positions in place (order[p] = p, rank[p] = 0); their histograms are never written nor read.
//
// Rows: the (batch, head) rows of the codes, row r at codes + r * sc_row (positions sc_n apart);
// order, rank: contiguous [rows, n]; hist, first: contiguous [rows, T, nb].  Grids are 1-D,
// blockIdx.x = row * (T or P) + chunk or part, so any number of rows fits.
#include "common.cuh"

namespace hyperattn {

constexpr unsigned SORT_FULL_MASK = 0xffffffffu;

struct SortChunk {
  long long p0, p1, piece_start, is_gap;
};

__device__ __forceinline__ SortChunk load_chunk(const long long* __restrict__ chunks, long long t) {
  const long long* c = chunks + 4 * t;
  return SortChunk{c[0], c[1], c[2], c[3]};
}

// hist[row, t, :] of one chunk (shared-memory atomics: counts do not depend on order).
// Grid: rows * num_chunks blocks; any blockDim; dynamic shared memory nb * 4 bytes.
template <typename CodeT>
__global__ void chunk_histogram(const long long* __restrict__ chunks, long long num_chunks,
                                const CodeT* __restrict__ codes, long long sc_row, long long sc_n,
                                int* __restrict__ hist, int nb) {
  extern __shared__ int counts[];  // [nb]
  const long long row = blockIdx.x / num_chunks, t = blockIdx.x - row * num_chunks;
  const SortChunk chunk = load_chunk(chunks, t);
  if (chunk.is_gap != 0) return;  // uniform over the block
  for (int c = threadIdx.x; c < nb; c += blockDim.x) counts[c] = 0;
  __syncthreads();
  const CodeT* row_codes = codes + row * sc_row;
  for (long long p = chunk.p0 + threadIdx.x; p < chunk.p1; p += blockDim.x) {
    atomicAdd(&counts[static_cast<int>(row_codes[p * sc_n])], 1);
  }
  __syncthreads();
  int* out = hist + (row * num_chunks + t) * nb;
  for (int c = threadIdx.x; c < nb; c += blockDim.x) out[c] = counts[c];
}

// first[row, t, :] for the chunks t of one segment part [u0, u1).  One thread per code:
// blockDim.x >= nb, a power of two (the scan over codes is a Hillis-Steele scan over the block);
// dynamic shared memory blockDim.x * 4 bytes.  Grid: rows * num_parts blocks.
__global__ void bucket_starts(const long long* __restrict__ parts, long long num_parts, const int* __restrict__ hist,
                              int* __restrict__ first, long long num_chunks, int nb) {
  extern __shared__ int scan[];  // [blockDim.x]
  const long long row = blockIdx.x / num_parts, part = blockIdx.x - row * num_parts;
  const long long* pr = parts + 5 * part;
  const long long t0 = pr[0], t1 = pr[1], segment_start = pr[2], u0 = pr[3], u1 = pr[4];
  const int c = threadIdx.x;
  const int* h = hist + row * num_chunks * nb + c;
  int before = 0, total = 0;  // code-c positions in the segment's chunks before the part, in all of them
  if (c < nb) {
#pragma unroll 8
    for (long long t = t0; t < u0; ++t) before += h[t * nb];
    total = before;
#pragma unroll 8
    for (long long t = u0; t < t1; ++t) total += h[t * nb];
  }
  // inclusive scan of the totals over codes
  scan[c] = total;
  for (int offset = 1; offset < blockDim.x; offset <<= 1) {
    __syncthreads();
    const int add = c >= offset ? scan[c - offset] : 0;
    __syncthreads();
    scan[c] += add;
  }
  if (c >= nb) return;
  int carry = static_cast<int>(segment_start) + (scan[c] - total) + before;  // smaller codes, earlier chunks
  int* f = first + row * num_chunks * nb + c;
#pragma unroll 4
  for (long long t = u0; t < u1; ++t) {
    f[t * nb] = carry;
    carry += h[t * nb];
  }
}

// Scatter one chunk, stably.  The chunk is taken in rounds of blockDim.x positions (thread i:
// position p0 + round + i).  In a round, a warp finds the lanes of equal codes with
// __match_any_sync (a lane's rank among them: the lower lanes of its group), the group leaders
// write per-warp counts to shared memory, and one scan over the warps per code turns them into
// each warp's first destination; `base` carries the per-code destinations across rounds.
// Grid: rows * num_chunks blocks; blockDim.x a multiple of 32; dynamic shared memory
// (blockDim.x / 32 + 1) * nb * 4 bytes.
template <typename CodeT>
__global__ void chunk_scatter(const long long* __restrict__ chunks, long long num_chunks,
                              const CodeT* __restrict__ codes, long long sc_row, long long sc_n,
                              const int* __restrict__ first, int* __restrict__ order, int* __restrict__ rank,
                              long long n, int nb) {
  extern __shared__ int shared[];
  const int warps = blockDim.x >> 5;
  int* counts = shared;             // [warps, nb]: per-warp counts, then per-warp first destinations
  int* base = shared + warps * nb;  // [nb]: the next destination of each code
  const long long row = blockIdx.x / num_chunks, t = blockIdx.x - row * num_chunks;
  const SortChunk chunk = load_chunk(chunks, t);
  int* row_order = order + row * n;
  int* row_rank = rank + row * n;
  if (chunk.is_gap != 0) {  // positions outside every segment stay where they are
    for (long long p = chunk.p0 + threadIdx.x; p < chunk.p1; p += blockDim.x) {
      row_order[p] = static_cast<int>(p);
      row_rank[p] = 0;
    }
    return;
  }
  const CodeT* row_codes = codes + row * sc_row;
  const int* row_first = first + (row * num_chunks + t) * nb;
  for (int c = threadIdx.x; c < nb; c += blockDim.x) base[c] = row_first[c];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (long long round = chunk.p0; round < chunk.p1; round += blockDim.x) {
    for (int i = threadIdx.x; i < warps * nb; i += blockDim.x) counts[i] = 0;
    __syncthreads();  // counts zeroed; base written (first round) or advanced (later rounds)
    const long long p = round + threadIdx.x;
    const bool valid = p < chunk.p1;
    const int code = valid ? static_cast<int>(row_codes[p * sc_n]) : nb;  // nb: no bucket
    const unsigned peers = __match_any_sync(SORT_FULL_MASK, code);
    const int in_warp = __popc(peers & lower_lanes);
    if (valid && in_warp == 0) counts[warp * nb + code] = __popc(peers);
    __syncthreads();
    for (int c = threadIdx.x; c < nb; c += blockDim.x) {  // exclusive scan over warps, from base
      int next = base[c];
      for (int w = 0; w < warps; ++w) {
        const int k = counts[w * nb + c];
        counts[w * nb + c] = next;
        next += k;
      }
      base[c] = next;
    }
    __syncthreads();
    if (valid) {
      const int dest = counts[warp * nb + code] + in_warp;
      row_order[dest] = static_cast<int>(p);
      row_rank[p] = dest - static_cast<int>(chunk.piece_start);
    }
    __syncthreads();  // counts read before the next round zeroes them
  }
}

}  // namespace hyperattn

#ifdef HYPERATTN_COMPILE_CHECK
#define HYPERATTN_SORT(C)                                                                                     \
  template __global__ void hyperattn::chunk_histogram<C>(const long long*, long long, const C*, long long,    \
                                                         long long, int*, int);                              \
  template __global__ void hyperattn::chunk_scatter<C>(const long long*, long long, const C*, long long,      \
                                                       long long, const int*, int*, int*, long long, int);
HYPERATTN_SORT(int)
HYPERATTN_SORT(long long)
#endif
