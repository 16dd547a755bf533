// Shared device helpers of the CuPy backend's kernels (included by every .cu file).
//
// Element types: __half, __nv_bfloat16 or float inputs; arithmetic and accumulation in float.
// Strides are in elements (int64).  A tile table row is int64 [7] (see hyperattn/tiles.py):
// query-side (segment, key block, q0, q1, k0, k1, diag), key-side (segment, key block, k0, k1, q0, q1, diag).
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace hyperattn {

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// -- asynchronous copies (sm_80+) -------------------------------------------------------------------
// 16 bytes global -> shared, or 16 zero bytes when !fill (src-size 0: nothing is read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = fill ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are in flight (then __syncthreads for
// the block's copies).
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

struct Tile {
  long long seg, blk, a0, a1, b0, b1, diag;
};

// Row blockIdx.x of a tile table.
__device__ __forceinline__ Tile load_tile(const long long* __restrict__ tiles) {
  const long long* t = tiles + 7 * static_cast<long long>(blockIdx.x);
  return Tile{t[0], t[1], t[2], t[3], t[4], t[5], t[6]};
}

// (batch, head, kv head) of program axis 1, which runs over batch x heads (heads = num_heads);
// group = query heads per KV head.
__device__ __forceinline__ void program_heads(int num_heads, int group, int& b, int& h, int& hk) {
  const int bh = blockIdx.y;
  b = bh / num_heads;
  h = bh - b * num_heads;
  hk = h / group;
}

}  // namespace hyperattn
