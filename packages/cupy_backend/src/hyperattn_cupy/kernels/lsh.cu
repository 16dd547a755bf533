// LSH hashing: the Gray-code rank of the sign pattern of x @ P, in one launch (see lsh.py).
//
//   codes[b, h, n] = gray_rank(sum_j [x[b, h, n, :] . P[:, j] > 0] << j)
//   gray_rank(c)   = c ^ (c >> 1) ^ (c >> 2) ^ ...     (the rank of c in the reflected Gray code)
//
// Layout of the work: a block owns `block_rows` rows of one (batch, head); every warp hashes 4 rows
// at a time, 8 lanes per row, and loads LSH_BATCHES such groups before hashing them.  Lane l of a row holds D_PAD / 8 values of x in fp32 registers, in
// runs of VEC = 4 (2 for D_PAD = 16): d = VEC * l + 8 * VEC * i + v.  The projections sit in shared
// memory, transposed and zero-padded to [R8, D_PAD] (R8 = num_projs rounded up to 8), and a lane
// reads its VEC weights of a projection in one vector load: the 8 lanes of a row read 8
// consecutive vectors (no bank conflicts), the 4 rows of a warp the same ones (broadcast), and
// there is one shared load per VEC multiply-adds.
//
// The projections are taken 8 at a time: each lane forms 8 partial dot products, and a butterfly
// of 3 shuffle steps (4 + 2 + 1 shuffles) both sums them over the 8 lanes and transposes them, so
// that lane l ends with the whole dot product of projection j0 + l: 7 shuffles per 8 projections
// instead of 24 for 8 separate reductions.  A warp ballot then gathers the sign bits: byte g of the
// ballot is the 8 bits of row group g.  All arithmetic is fp32 (x is widened on load).
#include "common.cuh"

namespace hyperattn {

constexpr int LSH_LANES = 8;     // lanes per row (and projections per butterfly)
constexpr int LSH_ROWS_PER_WARP = 32 / LSH_LANES;
constexpr int LSH_BATCHES = 2;   // row groups of a warp whose loads are in flight together
constexpr unsigned FULL_MASK = 0xffffffffu;

// VEC consecutive elements (VEC * sizeof(T) bytes, aligned to that) in one load, widened to fp32.
template <int BYTES> struct VectorOf;
template <> struct VectorOf<4> { using type = unsigned; };
template <> struct VectorOf<8> { using type = uint2; };
template <> struct VectorOf<16> { using type = uint4; };
template <typename T, int VEC>
__device__ __forceinline__ void load_run(const T* __restrict__ p, float (&out)[VEC]) {
  using V = typename VectorOf<VEC * static_cast<int>(sizeof(T))>::type;
  const V raw = __ldg(reinterpret_cast<const V*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = to_float(e[v]);
}

// Sum acc[0..8) over the 8 lanes of a row group and leave projection `lane & 7`'s sum in acc[0].
// Step s: lanes with bit s set keep the upper half of the live accumulators and send the lower
// half to their partner (lane ^ s), which does the opposite; both add what they receive.
__device__ __forceinline__ void butterfly_transpose_sum(float (&acc)[LSH_LANES], int lane_in_row) {
#pragma unroll
  for (int s = LSH_LANES / 2; s >= 1; s >>= 1) {
    const bool upper = (lane_in_row & s) != 0;
#pragma unroll
    for (int i = 0; i < s; ++i) {
      const float send = upper ? acc[i] : acc[i + s];
      const float keep = upper ? acc[i + s] : acc[i];
      acc[i] = keep + __shfl_xor_sync(FULL_MASK, send, s);
    }
  }
}

// c ^ (c >> 1) ^ (c >> 2) ^ ... ^ (c >> 63), by doubling shifts.
__device__ __forceinline__ unsigned long long gray_rank(unsigned long long c) {
#pragma unroll
  for (int shift = 1; shift < 64; shift <<= 1) c ^= c >> shift;
  return c;
}

// codes [B, H, N] (n-stride 1; b, h strides sc_b, sc_h) of x [B, H, N, dim] (any strides, in
// elements) and the fp32 projections proj [dim, num_projs] (contiguous).
//
// T: __half, __nv_bfloat16 or float.  CodeT: int (num_projs < 32) or long long.  D_PAD: dim
// rounded up to a power of two >= 16 (each lane holds D_PAD / 8 values).
// Grid: B * H * row_blocks blocks (row_blocks = ceil(N / block_rows)), blockIdx.x = bh * row_blocks
// + row block.  blockDim.x: a multiple of 32.  Dynamic shared memory: R8 * D_PAD * 4 bytes.
template <typename T, typename CodeT, int D_PAD>
__global__ void lsh_codes(const T* __restrict__ x, const float* __restrict__ proj, CodeT* __restrict__ codes,
                          long long n, int num_heads, long long row_blocks, int block_rows, long long sx_b,
                          long long sx_h, long long sx_n, long long sx_d, long long sc_b, long long sc_h, int dim,
                          int num_projs) {
  static_assert(D_PAD % 16 == 0, "D_PAD must be a multiple of 16");
  constexpr int PER_LANE = D_PAD / LSH_LANES;
  constexpr int VEC = PER_LANE >= 4 ? 4 : PER_LANE;  // x values per run, projection weights per load
  constexpr int RUNS = PER_LANE / VEC;
  extern __shared__ float4 shared_raw[];  // float4: 16-byte aligned for the vector loads
  float* shared_proj = reinterpret_cast<float*>(shared_raw);  // [R8, D_PAD], transposed, zero-padded
  const int r8 = (num_projs + LSH_LANES - 1) / LSH_LANES * LSH_LANES;

  const long long bh = blockIdx.x / row_blocks;
  const long long row_block = blockIdx.x - bh * row_blocks;
  const long long b = bh / num_heads, h = bh - b * num_heads;

  for (int i = threadIdx.x; i < r8 * D_PAD; i += blockDim.x) {
    const int j = i / D_PAD, d = i - j * D_PAD;
    shared_proj[i] = (j < num_projs && d < dim) ? proj[static_cast<long long>(d) * num_projs + j] : 0.0f;
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = lane / LSH_LANES, lane_in_row = lane % LSH_LANES;
  const long long row0 = row_block * block_rows;
  const long long row_end = min(n, row0 + block_rows);
  const int rows_per_pass = (blockDim.x >> 5) * LSH_ROWS_PER_WARP * LSH_BATCHES;
  const T* x_bh = x + b * sx_b + h * sx_h;

  // Rows whose runs of VEC values are one aligned vector load each (the usual contiguous layout).
  const bool vec = sx_d == 1 && dim % VEC == 0 && sx_n % VEC == 0 &&
                   reinterpret_cast<unsigned long long>(x_bh) % (VEC * sizeof(T)) == 0;

  // LSH_BATCHES row groups per warp and pass: all their loads are issued before the first
  // product, so that a warp keeps that many rows' reads in flight (the kernel is bound by the
  // latency of these reads, not by its arithmetic).  The loop bound is the same for all lanes of
  // a warp: every lane takes part in the shuffles.
  for (long long first = row0 + warp * LSH_ROWS_PER_WARP * LSH_BATCHES; first < row_end; first += rows_per_pass) {
    float xs[LSH_BATCHES][RUNS][VEC];
#pragma unroll
    for (int bt = 0; bt < LSH_BATCHES; ++bt) {
      const long long row = first + bt * LSH_ROWS_PER_WARP + group;
      const bool valid = row < row_end;
#pragma unroll
      for (int i = 0; i < RUNS; ++i) {
        const int d0 = VEC * lane_in_row + LSH_LANES * VEC * i;
        if (vec) {
          if (valid && d0 < dim) {
            load_run<T, VEC>(x_bh + row * sx_n + d0, xs[bt][i]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) xs[bt][i][v] = 0.0f;
          }
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const int d = d0 + v;
            xs[bt][i][v] = (valid && d < dim) ? to_float(x_bh[row * sx_n + d * sx_d]) : 0.0f;
          }
        }
      }
    }
#pragma unroll
    for (int bt = 0; bt < LSH_BATCHES; ++bt) {
      const long long row = first + bt * LSH_ROWS_PER_WARP + group;
      unsigned long long code = 0;
      for (int j0 = 0; j0 < r8; j0 += LSH_LANES) {
        float acc[LSH_LANES];
#pragma unroll
        for (int k = 0; k < LSH_LANES; ++k) acc[k] = 0.0f;
        const float* p = shared_proj + j0 * D_PAD + VEC * lane_in_row;
#pragma unroll
        for (int i = 0; i < RUNS; ++i) {
#pragma unroll
          for (int k = 0; k < LSH_LANES; ++k) {
            const float* pk = p + k * D_PAD + LSH_LANES * VEC * i;
            float w[VEC];
            if constexpr (VEC == 4) {
              const float4 q = *reinterpret_cast<const float4*>(pk);
              w[0] = q.x;
              w[1] = q.y;
              w[2] = q.z;
              w[3] = q.w;
            } else {
              const float2 q = *reinterpret_cast<const float2*>(pk);
              w[0] = q.x;
              w[1] = q.y;
            }
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[k] = fmaf(xs[bt][i][v], w[v], acc[k]);
          }
        }
        butterfly_transpose_sum(acc, lane_in_row);
        // padded projections (j >= num_projs) are zero, so their sums are 0 and their bits 0
        const unsigned ballot = __ballot_sync(FULL_MASK, acc[0] > 0.0f);
        code |= static_cast<unsigned long long>((ballot >> (LSH_LANES * group)) & 0xffu) << j0;
      }
      if (row < row_end && lane_in_row == 0) {
        codes[b * sc_b + h * sc_h + row] = static_cast<CodeT>(gray_rank(code));
      }
    }
  }
}

}  // namespace hyperattn

#ifdef HYPERATTN_COMPILE_CHECK
// The launch table's instantiations (every head-dim tier, every input dtype, both code widths).
#define HYPERATTN_LSH(T, C, D)                                                                          \
  template __global__ void hyperattn::lsh_codes<T, C, D>(const T*, const float*, C*, long long, int, long long, \
                                                         int, long long, long long, long long, long long,        \
                                                         long long, long long, int, int);
#define HYPERATTN_LSH_DIMS(T, C) \
  HYPERATTN_LSH(T, C, 16) HYPERATTN_LSH(T, C, 32) HYPERATTN_LSH(T, C, 64) HYPERATTN_LSH(T, C, 128) HYPERATTN_LSH(T, C, 256)
HYPERATTN_LSH_DIMS(__half, int)
HYPERATTN_LSH_DIMS(__nv_bfloat16, int)
HYPERATTN_LSH_DIMS(float, int)
HYPERATTN_LSH_DIMS(__half, long long)
HYPERATTN_LSH_DIMS(__nv_bfloat16, long long)
HYPERATTN_LSH_DIMS(float, long long)
#endif
