// The attention backward: a dQ kernel over query tiles and a dK/dV kernel over key tiles.
//
// The same computation as the Triton backend's attention_bwd_dq_kernel / attention_bwd_dkdv_kernel
// (hyperattn_triton/kernels/attention.py), FlashAttention's formulas with the final Lse and Delta:
//   P  = exp2(S * scale_log2 - lse * LOG2E [+ log_w * LOG2E for sample slots]),  S = q . k
// where log_w is the segment's LogW[seg], or with DRAW_WEIGHTS each slot's DrawLogW[b, hk, seg, j]
// (importance sampling: a log weight per draw, laid out as Samples).
//   dP = dO . v,   dS = P * (dP - delta) * scale,   dQ += dS K,   dK += dS^T Q,   dV += P^T dO
//
// dQ (attention_bwd_dq): grid (T, B * Hq); one block per query-side tile row (seg, blk, q0, q1, k0, k1,
// diag).  It stages its rows' q and dO once, walks the tile's keys [k0, k1) (through KOrder when
// PERMUTED; causal: key j counts for row i when j <= i + diag) and then, with HAS_SAMPLES, the
// segment's sample slots (those drawn from key block blk, the rows' own, left out), and owns its rows:
// dq (fp32) is read, added to and written once (written without reading when OVERWRITE).
//
// dK/dV (attention_bwd_dkdv): grid (T, B * Hk); one block per key-side tile row (seg, blk, k0, k1, q0,
// q1, diag): keys [k0, k1) (or, with SAMPLES, the sample slots [k0, k1) of segment seg) against rows
// [q0, q1) of every query head of its KV group.  With SAMPLES a row whose sorted position's key block
// (QBlock[position], int32 [Nq]) is the slot's key block does not count, and the block's partial sums
// are added with fp32 atomics (slots are seen by every row chunk of the segment, and draws repeat);
// without, the tile owns its keys (read-add-write, or write when OVERWRITE).
//
// Masking (as in the Triton kernels): rows past q1 are staged as q = dO = 0 with lse = delta = 0, so
// their P is finite and their dS and P^T dO are 0: they need no mask.  Keys past k1 are zero-filled;
// the dQ kernel masks them explicitly (a zero key gives P = exp2(-lse2), which overflows for very
// negative lse, and inf * 0 is NaN); the dK/dV kernel never stores their rows (each output row of
// the matrix products depends on its own key only), so it needs masks only for causality and for the
// samples' own block.
//
// Element types: T in {__half, __nv_bfloat16, float} for Q, K, V; TDO is T or float (dO is converted
// to T when staged); Lse, Delta and the gradients DQ, DK, DV are float32.  Index arrays are int32:
// QOrder [B, Hq, Nq], KOrder [B, Hk, Nk], Samples / SampleBlock [B, Hk, S, m] (slots contiguous),
// LogW float32 [S], DrawLogW float32 [B, Hk, S, m] (Samples' strides), QBlock int32 [Nq] (contiguous).
// Every stride is an int64 element stride (any layout); row and key indices are int (they come from
// int32 orders), offsets are int64.
//
// Template parameters: D_PAD, DV_PAD (the head dims padded to a power of two >= 16, see
// launches.padded_dim) are compile-time; the true head dims head_dim, v_dim are runtime arguments, so
// that e.g. D = 80 and D = 128 share a kernel (the padding is zero-filled).  BLOCK_M rows and BLOCK_N
// keys per tile step, WARPS warps per block.
//
// fp16 / bf16: tensor cores through inline-PTX mma.sync.m16n8k16 (fp32 accumulators) fed by ldmatrix
// from shared memory; scores and probabilities stay in registers (the accumulator layout of m16n8 is
// the A-operand layout of the next product, FlashAttention-2 style).  Warps split the tile's rows (dQ)
// or keys (dK/dV) in slices of 16, so BLOCK_M (dQ) / BLOCK_N (dK/dV) must be a multiple of 16 * WARPS.
// fp32: exact fp32 SIMT arithmetic (a 16-column thread grid), matching the Triton kernels' "ieee"
// precision; probabilities go through shared memory.
//
// Dynamic shared memory: see DqSmem / DkdvSmem below (the host mirrors them in
// attention_backward.py); it may exceed 48 KiB (Kernel.launch opts in).
#include "common.cuh"

namespace hyperattn {
namespace bwd {

template <typename A, typename B> struct SameType { static constexpr bool value = false; };
template <typename A> struct SameType<A, A> { static constexpr bool value = true; };

// 2^x in one instruction (as Triton's tl.exp2): the backward is bound by instruction issue.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The block's dynamic shared memory in bytes (the host's size, checked against the layout's).
__device__ __forceinline__ unsigned dynamic_smem_bytes() {
  unsigned n;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
  return n;
}

// A launch whose shared memory is smaller than the kernel's layout would read and write out of
// bounds: stop it at once (a host-side mismatch with attention_backward.py).
__device__ __forceinline__ void check_smem(unsigned needed) {
  if (dynamic_smem_bytes() < needed) __trap();
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core helpers (fp16 / bf16).  mma.m16n8k16 fragments, with g = lane / 4, t = lane % 4:
//   A (16 x 16, row major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16 x 8, "col")      b0: (k 2t..2t+1, n g)  b1: (k 2t+8.., n g)
//   C (16 x 8, fp32)       c0, c1: (g, 2t..2t+1)  c2, c3: (g+8, 2t..2t+1)
// so the C fragments of two adjacent n8 tiles, packed to 16 bits, are the A fragment of a k16 step.
// ---------------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// c += A B for one m16n8k16 tile (fp32 accumulators).
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"
      " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
      " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one register of two 16-bit values (lo in the low half: the lower column).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// A fragment of the 16 x 16 block at (row0, col0) of a row-major shared matrix [m][k] (stride ld).
template <typename T>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const T* s, int ld, int row0, int col0, int lane) {
  ldmatrix_x4(a, s + (row0 + (lane & 15)) * ld + col0 + ((lane >> 4) << 3));
}

// B fragments of two n8 tiles (n0 .. n0 + 15) x k16 (k0 ..) from a shared matrix stored [n][k]
// (B^T row major: K for Q K^T): b[0], b[1] for n0 .. n0+7 and b[2], b[3] for n0+8 .. n0+15.
template <typename T>
__device__ __forceinline__ void load_b_nk(unsigned (&b)[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + (((lane >> 3) & 1) << 3));
}

// The same fragments from a shared matrix stored [k][n] (B row major: K for dS K), transposed on load.
template <typename T>
__device__ __forceinline__ void load_b_kn(unsigned (&b)[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * ld + n0 + ((lane >> 4) << 3));
}

// acc[MROWS/16 = 1][N/8][4] += A (16 rows at row0 of s_a, [m][k], K_DIM wide) x B^T (s_b stored [n][k], N rows):
// a 16 x N tile of S = A B^T.  k16 steps at or past k_dim (zero padding) are skipped.
template <typename T, int K_DIM, int N>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const T* s_a, int lda, int row0, const T* s_b, int ldb,
                                        int k_dim, int lane) {
#pragma unroll
  for (int kk = 0; kk < K_DIM / 16; ++kk) {
    if (kk * 16 >= k_dim) break;
    unsigned a[4];
    load_a(a, s_a, lda, row0, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < N / 16; ++np) {
      unsigned b[4];
      load_b_nk(b, s_b, ldb, np * 16, kk * 16, lane);
      mma16816<T>(acc[2 * np], a, b[0], b[1]);
      mma16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// out[N_OUT/8][4] += X B for X a 16 x K register tile (fp32 C fragments x[K/8][4], rounded to T) and
// B stored [k][n] in shared memory (K rows, N_OUT columns); output n16 pairs at or past n_dim skipped.
template <typename T, int K, int N_OUT>
__device__ __forceinline__ void mma_xb(float (&out)[N_OUT / 8][4], const float (&x)[K / 8][4], const T* s_b, int ldb,
                                       int n_dim, int lane) {
#pragma unroll
  for (int kc = 0; kc < K / 16; ++kc) {
    const unsigned a[4] = {pack2<T>(x[2 * kc][0], x[2 * kc][1]), pack2<T>(x[2 * kc][2], x[2 * kc][3]),
                           pack2<T>(x[2 * kc + 1][0], x[2 * kc + 1][1]), pack2<T>(x[2 * kc + 1][2], x[2 * kc + 1][3])};
#pragma unroll
    for (int np = 0; np < N_OUT / 16; ++np) {
      if (np * 16 >= n_dim) break;
      unsigned b[4];
      load_b_kn(b, s_b, ldb, np * 16, kc * 16, lane);
      mma16816<T>(out[2 * np], a, b[0], b[1]);
      mma16816<T>(out[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Staging gathered rows into shared memory.
// ---------------------------------------------------------------------------------------------------

// True when rows of src can be read 16 bytes at a time: unit column stride, 16-byte aligned rows and
// whole 16-byte chunks of columns.  (Uniform over the block: one branch per staging.)
template <typename TG>
__device__ __forceinline__ bool rows_vectorizable(const TG* src, long long s_n, long long s_d, int ncols) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(TG));
  return s_d == 1 && ncols % VEC == 0 && s_n % VEC == 0 && (reinterpret_cast<unsigned long long>(src) & 15) == 0;
}

// dst[r][c] (row stride LD, type TS) = src[row_of(r)][c] converted, for r < ROWS, c < COLS; zero for
// rows with row_of(r) < 0 and columns >= ncols.  NT threads share the work.
template <int ROWS, int COLS, int LD, int NT, typename TS, typename TG, typename RowOf>
__device__ __forceinline__ void stage_rows(TS* __restrict__ dst, const TG* __restrict__ src, long long s_n,
                                           long long s_d, int ncols, RowOf row_of) {
  const int tid = threadIdx.x;
  if (rows_vectorizable(src, s_n, s_d, ncols)) {
    constexpr int VEC = 16 / static_cast<int>(sizeof(TG));
    constexpr int CHUNKS = COLS / VEC;  // per row
    constexpr int TOTAL = ROWS * CHUNKS;
    static_assert(COLS % VEC == 0, "padded head dims are multiples of 16");
    // a straight (16-byte) copy when the element types agree and the rows stay 16-byte aligned
    constexpr bool COPY = SameType<TS, TG>::value && (LD * sizeof(TS)) % 16 == 0;
#pragma unroll 4
    for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
      const int i = tid + it * NT;
      if (TOTAL % NT != 0 && i >= TOTAL) break;
      const int r = i / CHUNKS, c = (i % CHUNKS) * VEC;
      const int idx = row_of(r);
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (idx >= 0 && c < ncols) raw = *reinterpret_cast<const uint4*>(src + idx * s_n + c);
      TS* out = dst + r * LD + c;
      if constexpr (COPY) {
        *reinterpret_cast<uint4*>(out) = raw;
      } else {
        const TG* e = reinterpret_cast<const TG*>(&raw);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = from_float<TS>(to_float(e[j]));
      }
    }
  } else {  // any strides: one element at a time
    constexpr int TOTAL = ROWS * COLS;
#pragma unroll 4
    for (int i = tid; i < TOTAL; i += NT) {
      const int r = i / COLS, c = i % COLS;
      const int idx = row_of(r);
      const float x = (idx >= 0 && c < ncols) ? to_float(src[idx * s_n + c * s_d]) : 0.0f;
      dst[r * LD + c] = from_float<TS>(x);
    }
  }
}

// stage_rows through cp.async (16-byte copies, zero-filled where row_of(r) < 0 or c >= ncols), to be
// waited for with cp_async_wait, when the rows are vectorizable and the element types agree; else
// stage_rows itself (synchronous: the data is in place when it returns).
template <int ROWS, int COLS, int LD, int NT, typename TS, typename TG, typename RowOf>
__device__ __forceinline__ void stage_rows_async(TS* __restrict__ dst, const TG* __restrict__ src, long long s_n,
                                                 long long s_d, int ncols, RowOf row_of) {
  if constexpr (SameType<TS, TG>::value && (LD * sizeof(TS)) % 16 == 0) {
    if (rows_vectorizable(src, s_n, s_d, ncols)) {
      constexpr int VEC = 16 / static_cast<int>(sizeof(TG));
      constexpr int CHUNKS = COLS / VEC;  // per row
      constexpr int TOTAL = ROWS * CHUNKS;
#pragma unroll
      for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
        const int i = static_cast<int>(threadIdx.x) + it * NT;
        if (TOTAL % NT != 0 && i >= TOTAL) break;
        const int r = i / CHUNKS, c = (i % CHUNKS) * VEC;
        const int idx = row_of(r);
        const bool ok = idx >= 0 && c < ncols;
        cp_async_16(dst + r * LD + c, ok ? src + idx * s_n + c : src, ok);
      }
      return;
    }
  }
  stage_rows<ROWS, COLS, LD, NT>(dst, src, s_n, s_d, ncols, row_of);
}

// ---------------------------------------------------------------------------------------------------
// Arguments, with the (batch, head) offsets applied.
// ---------------------------------------------------------------------------------------------------
template <typename T, typename TDO>
struct DqArgs {
  const T* q; const T* k; const T* v; const TDO* dout; const float* lse; const float* delta; float* dq;
  const int* q_order; const int* k_order; const int* samples; const int* sample_blocks;  // samples: the segment's row
  const float* draw_log_w;  // DRAW_WEIGHTS: the segment's row of DrawLogW (else nullptr: every slot weighs log_w2)
  long long sq_n, sq_d, sk_n, sk_d, sv_n, sv_d, sdo_n, sdo_d, sl_n, sdq_n, sdq_d;
  int q0, q1, k0, k1, diag, blk;
  int num_samples, head_dim, v_dim;
  float scale, scale_log2, log_w2;  // log_w2: the segment's log sample weight in base 2 (0: per-draw weights)
};

template <typename T, typename TDO>
struct DkdvArgs {
  const T* q; const T* k; const T* v; const TDO* dout; const float* lse; const float* delta; float* dk; float* dv;
  const int* q_order; const int* k_order; const int* q_block; const int* samples; const int* sample_blocks;
  const float* draw_log_w;  // SAMPLES: the segment's row of DrawLogW, or nullptr (every slot weighs bias2)
  long long sq_b, sq_h, sq_n, sq_d, sdo_b, sdo_h, sdo_n, sdo_d, sl_b, sl_h, sl_n, sqo_b, sqo_h;
  long long sk_n, sk_d, sv_n, sv_d, sdk_n, sdk_d, sdv_n, sdv_d;
  int b, hk, group;
  int q0, q1, k0, k1, diag;
  int head_dim, v_dim;
  float scale, scale_log2, bias2;  // bias2: the sample slots' log weight in base 2 (0: keys, per-draw weights)
};

// Shared-memory layouts (byte offsets).  16-bit: rows padded by 8 elements (16 bytes), so the 8 rows
// an ldmatrix reads fall in distinct banks.  fp32: rows padded by 1 element, so that the SIMT loops'
// 16 threads reading one column of 16 rows fall in distinct banks.
template <typename T, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, bool DRAW_WEIGHTS = false>
struct DqSmem {
  static constexpr bool F32 = SameType<T, float>::value;
  static constexpr int PAD = F32 ? 1 : 8;
  static constexpr int LDQ = D_PAD + PAD, LDV = DV_PAD + PAD, LDS = BLOCK_N + 1;
  static constexpr int Q = 0;                                                  // T [BLOCK_M][LDQ]
  static constexpr int DO = Q + BLOCK_M * LDQ * (int)sizeof(T);                // T [BLOCK_M][LDV]
  // 16-bit: two K/V buffers (a step's copies land in one while the other is read) and three key
  // tables (written a step ahead, from indices loaded two steps ahead); fp32 stages synchronously
  // into one of each
  static constexpr int STAGES = F32 ? 1 : 2, KEY_TABLES = F32 ? 1 : 3;
  static constexpr int K = DO + BLOCK_M * LDV * (int)sizeof(T);                // T [BLOCK_N][LDQ]
  static constexpr int V = K + BLOCK_N * LDQ * (int)sizeof(T);                 // T [BLOCK_N][LDV]
  static constexpr int STAGE = BLOCK_N * (LDQ + LDV) * (int)sizeof(T);         // bytes of one K/V buffer
  static constexpr int DS = K + STAGES * STAGE;                                // fp32 only: float [BLOCK_M][LDS]
  static constexpr int KEY = DS + (F32 ? BLOCK_M * LDS * 4 : 0);               // int [KEY_TABLES][BLOCK_N]: key, or -1
  // DRAW_WEIGHTS: float [KEY_TABLES][BLOCK_N], the slots' per-draw log weights in base 2
  static constexpr int BIAS = KEY + KEY_TABLES * BLOCK_N * 4;
  static constexpr int BYTES = BIAS + (DRAW_WEIGHTS ? KEY_TABLES * BLOCK_N * 4 : 0);
};

template <typename T, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N>
struct DkdvSmem {
  static constexpr bool F32 = SameType<T, float>::value;
  static constexpr int PAD = F32 ? 1 : 8;
  static constexpr int LDQ = D_PAD + PAD, LDV = DV_PAD + PAD, LDP = BLOCK_M + 1;
  static constexpr int K = 0;                                                  // T [BLOCK_N][LDQ]
  static constexpr int V = K + BLOCK_N * LDQ * (int)sizeof(T);                 // T [BLOCK_N][LDV]
  static constexpr int Q = V + BLOCK_N * LDV * (int)sizeof(T);                 // T [BLOCK_M][LDQ]
  static constexpr int DO = Q + BLOCK_M * LDQ * (int)sizeof(T);                // T [BLOCK_M][LDV]
  // 16-bit: two q, dO buffers (a step's copies land in one while the other is read) and three row
  // tables (written a step ahead); fp32 stages synchronously into one of each
  static constexpr int STAGES = F32 ? 1 : 2, ROW_TABLES = F32 ? 1 : 3;
  static constexpr int STAGE = BLOCK_M * (LDQ + LDV) * (int)sizeof(T);         // bytes of one q, dO buffer
  static constexpr int P = Q + STAGES * STAGE;                                 // fp32 only: float [BLOCK_N][LDP]
  // a row table: five [BLOCK_M] arrays, at + t * TABLE for table t
  static constexpr int ROW_LIM = P + (F32 ? BLOCK_N * LDP * 4 : 0);            // int: row + diag
  static constexpr int OFF2 = ROW_LIM + BLOCK_M * 4;                           // float: lse2 - bias2
  static constexpr int DELTA = OFF2 + BLOCK_M * 4;                             // float
  static constexpr int RBLK = DELTA + BLOCK_M * 4;                             // int: QBlock of the row
  static constexpr int ROWS = RBLK + BLOCK_M * 4;                              // int: the row (-1: none)
  static constexpr int TABLE = 5 * BLOCK_M * 4;
  static constexpr int BYTES = ROW_LIM + ROW_TABLES * TABLE;
};

// ---------------------------------------------------------------------------------------------------
// dQ, tensor cores.  Warp w owns rows [16 w MT, 16 (w + 1) MT) of the tile (MT slices of 16).
// ---------------------------------------------------------------------------------------------------

// dq += dS K for the staged keys (s_key[c]: key index, or -1 for a key that does not count).
// off2 / delta / row_lim: the thread's rows (g and g + 8 of each slice): lse2 (minus the keys' log
// weight), delta, row + diag.  DRAW_BIAS: s_bias[c] (base 2) is added to key c's exponent (the
// sample steps of DRAW_WEIGHTS; off2 is then lse2 itself).
template <typename T, int D_PAD, int DV_PAD, int BLOCK_N, int MT, bool CAUSAL, bool DRAW_BIAS, typename L>
__device__ __forceinline__ void dq_step_mma(const unsigned char* smem, int stage, const int* s_key,
                                            const float* s_bias, int warp_row0,
                                            int lane, const float (&off2)[MT][2], const float (&delta)[MT][2],
                                            const int (&row_lim)[MT][2], float scale, float scale_log2,
                                            int head_dim, int v_dim, float (&dq)[MT][D_PAD / 8][4]) {
  const T* Qs = reinterpret_cast<const T*>(smem + L::Q);
  const T* DOs = reinterpret_cast<const T*>(smem + L::DO);
  const T* Ks = reinterpret_cast<const T*>(smem + L::K + stage * L::STAGE);
  const T* Vs = reinterpret_cast<const T*>(smem + L::V + stage * L::STAGE);
  constexpr int NT = BLOCK_N / 8;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int row0 = warp_row0 + mt * 16;
    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
    mma_abt<T, D_PAD, BLOCK_N>(s, Qs, L::LDQ, row0, Ks, L::LDQ, head_dim, lane);    // S = Q K^T
    mma_abt<T, DV_PAD, BLOCK_N>(dp, DOs, L::LDV, row0, Vs, L::LDV, v_dim, lane);    // dP = dO V^T
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int2 keys = *reinterpret_cast<const int2*>(s_key + n * 8 + 2 * (lane & 3));
      float2 bias = make_float2(0.0f, 0.0f);
      if (DRAW_BIAS) bias = *reinterpret_cast<const float2*>(s_bias + n * 8 + 2 * (lane & 3));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = (e & 1) ? keys.y : keys.x;
        const int ri = e >> 1;
        bool ok = key >= 0;
        if (CAUSAL) ok = ok && key <= row_lim[mt][ri];
        float x = s[n][e] * scale_log2 - off2[mt][ri];
        if (DRAW_BIAS) x += (e & 1) ? bias.y : bias.x;
        const float p = ok ? fast_exp2(x) : 0.0f;
        s[n][e] = p * (dp[n][e] - delta[mt][ri]) * scale;  // dS, in place of S
      }
    }
    mma_xb<T, BLOCK_N, D_PAD>(dq[mt], s, Ks, L::LDQ, head_dim, lane);               // dq += dS K
  }
}

template <typename T, typename TDO, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, bool PERMUTED,
          bool CAUSAL, bool HAS_SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__device__ __forceinline__ void dq_body_mma(const DqArgs<T, TDO>& a, unsigned char* smem) {
  using L = DqSmem<T, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, DRAW_WEIGHTS>;
  constexpr int NTHREADS = WARPS * 32;
  constexpr int MT = BLOCK_M / (16 * WARPS);
  static_assert(BLOCK_M % (16 * WARPS) == 0, "dQ (fp16/bf16): BLOCK_M must be a multiple of 16 * WARPS");
  static_assert(BLOCK_N % 16 == 0, "dQ (fp16/bf16): BLOCK_N must be a multiple of 16");
  T* Qs = reinterpret_cast<T*>(smem + L::Q);
  T* DOs = reinterpret_cast<T*>(smem + L::DO);
  int* key_tables = reinterpret_cast<int*>(smem + L::KEY);  // [3][BLOCK_N]: the tables of steps s % 3
  float* bias_tables = reinterpret_cast<float*>(smem + L::BIAS);  // DRAW_WEIGHTS: [3][BLOCK_N], as key_tables
  static_assert(BLOCK_N <= NTHREADS, "dQ (fp16/bf16): one thread per key slot of a step");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  auto row_of = [&](int r) -> int {
    const int pos = a.q0 + r;
    return pos < a.q1 ? (PERMUTED ? a.q_order[pos] : pos) : -1;
  };
  stage_rows<BLOCK_M, D_PAD, L::LDQ, NTHREADS>(Qs, a.q, a.sq_n, a.sq_d, a.head_dim, row_of);
  stage_rows<BLOCK_M, DV_PAD, L::LDV, NTHREADS>(DOs, a.dout, a.sdo_n, a.sdo_d, a.v_dim, row_of);

  // this thread's rows: g and g + 8 of each of the warp's slices
  const int warp_row0 = warp * MT * 16;
  int rows[MT][2], row_lim[MT][2];
  float lse2[MT][2], delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int row = row_of(warp_row0 + mt * 16 + (lane >> 2) + 8 * ri);
      rows[mt][ri] = row;
      row_lim[mt][ri] = (row >= 0 ? row : 0) + a.diag;
      lse2[mt][ri] = row >= 0 ? a.lse[row * a.sl_n] * LOG2E : 0.0f;  // masked rows: lse = delta = 0
      delta[mt][ri] = row >= 0 ? a.delta[row * a.sl_n] : 0.0f;
    }

  float dq[MT][D_PAD / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < D_PAD / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[mt][n][e] = 0.0f;

  // Steps: the tile's keys [k0, k1) in BLOCK_N slots each, then (HAS_SAMPLES) the segment's sample
  // slots, weighted by exp(log_w), those drawn from the rows' own key block left out.
  const int block_steps = a.k1 > a.k0 ? (a.k1 - a.k0 + BLOCK_N - 1) / BLOCK_N : 0;
  const int steps = block_steps + (HAS_SAMPLES ? (a.num_samples + BLOCK_N - 1) / BLOCK_N : 0);
  auto key_at = [&](int step, int r) -> int {  // slot r's key (-1: does not count)
    if (!HAS_SAMPLES || step < block_steps) {
      const int pos = a.k0 + step * BLOCK_N + r;
      return pos < a.k1 ? (PERMUTED ? a.k_order[pos] : pos) : -1;
    }
    const int slot = (step - block_steps) * BLOCK_N + r;
    return (slot < a.num_samples && a.sample_blocks[slot] != a.blk) ? a.samples[slot] : -1;
  };
  // slot r's per-draw log weight in base 2 (sample steps with draw weights; 0 elsewhere)
  constexpr bool draws = HAS_SAMPLES && DRAW_WEIGHTS;
  auto bias_at = [&](int step, int r) -> float {
    const int slot = (step - block_steps) * BLOCK_N + r;
    return (step >= block_steps && slot < a.num_samples) ? a.draw_log_w[slot] * LOG2E : 0.0f;
  };
  float off2[MT][2];  // sample slots: lse2 minus the segment's log weight (lse2 itself with per-draw weights)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) off2[mt][ri] = lse2[mt][ri] - a.log_w2;
  // K/V of a step into buffer `stage`, through cp.async where the rows allow (one commit group per step)
  auto issue = [&](int stage, const int* keys) {
    auto key_of = [&](int r) -> int { return keys[r]; };
    stage_rows_async<BLOCK_N, D_PAD, L::LDQ, NTHREADS>(reinterpret_cast<T*>(smem + L::K + stage * L::STAGE), a.k,
                                                       a.sk_n, a.sk_d, a.head_dim, key_of);
    stage_rows_async<BLOCK_N, DV_PAD, L::LDV, NTHREADS>(reinterpret_cast<T*>(smem + L::V + stage * L::STAGE), a.v,
                                                        a.sv_n, a.sv_d, a.v_dim, key_of);
  };

  // Pipeline: step s + 1's copies are in flight while step s computes.  A step's key table is
  // written (from registers loaded a step earlier, so that their global latency hides behind a
  // whole step) at the top of step s - 1, into table (s % 3), whose last reader was step s - 3.
  int next = -1;
  float next_bias = 0.0f;
  if (tid < BLOCK_N) {
    if (steps > 0) key_tables[tid] = key_at(0, tid);
    if (draws && steps > 0) bias_tables[tid] = bias_at(0, tid);
    if (steps > 1) next = key_at(1, tid);
    if (draws && steps > 1) next_bias = bias_at(1, tid);
  }
  __syncthreads();  // step 0's table (and the staged q, dO)
  if (steps > 0) issue(0, key_tables);
  cp_async_commit();
#pragma unroll 1
  for (int step = 0; step < steps; ++step) {
    if (tid < BLOCK_N) {
      if (step + 1 < steps) key_tables[((step + 1) % 3) * BLOCK_N + tid] = next;
      if (draws && step + 1 < steps) bias_tables[((step + 1) % 3) * BLOCK_N + tid] = next_bias;
      if (step + 2 < steps) next = key_at(step + 2, tid);
      if (draws && step + 2 < steps) next_bias = bias_at(step + 2, tid);
    }
    __syncthreads();  // step s + 1's table is visible, and every warp is done with step s - 1's buffer
    if (step + 1 < steps) issue((step + 1) & 1, key_tables + ((step + 1) % 3) * BLOCK_N);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of step s landed
    __syncthreads();     // and everyone's
    const int* keys = key_tables + (step % 3) * BLOCK_N;
    const float* biases = bias_tables + (step % 3) * BLOCK_N;
    if (!HAS_SAMPLES || step < block_steps)
      dq_step_mma<T, D_PAD, DV_PAD, BLOCK_N, MT, CAUSAL, false, L>(smem, step & 1, keys, biases, warp_row0, lane, lse2,
                                                                   delta, row_lim, a.scale, a.scale_log2, a.head_dim,
                                                                   a.v_dim, dq);
    else  // sample slots (with per-draw weights: each slot's bias)
      dq_step_mma<T, D_PAD, DV_PAD, BLOCK_N, MT, false, draws, L>(smem, step & 1, keys, biases, warp_row0, lane, off2,
                                                                  delta, row_lim, a.scale, a.scale_log2, a.head_dim,
                                                                  a.v_dim, dq);
  }
  cp_async_wait<0>();  // no copy outlives the block

  // the rows are this block's: read-add-write (or write) dq
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int row = rows[mt][ri];
      if (row < 0) continue;
      float* out = a.dq + row * a.sdq_n;
#pragma unroll
      for (int n = 0; n < D_PAD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = n * 8 + 2 * (lane & 3) + e;
          if (d >= a.head_dim) continue;
          float* p = out + d * a.sdq_d;
          const float x = dq[mt][n][2 * ri + e];
          *p = OVERWRITE ? x : *p + x;
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// dQ, fp32 SIMT.  Thread (ty, tx) of a 16-column grid owns rows ty + i TY and columns tx + 16 j.
// ---------------------------------------------------------------------------------------------------
template <int D_PAD, int DV_PAD, int BLOCK_N, int NTHREADS, int RI, bool CAUSAL, bool DRAW_BIAS, typename L>
__device__ __forceinline__ void dq_step_simt(unsigned char* smem, int tx, int ty, const float (&off2)[RI],
                                             const float (&delta)[RI], const int (&row_lim)[RI], float scale,
                                             float scale_log2, int head_dim, int v_dim, float (&dq)[RI][D_PAD / 16]) {
  constexpr int TY = NTHREADS / 16, CJ = BLOCK_N / 16, DJ = D_PAD / 16;
  const float* Qs = reinterpret_cast<const float*>(smem + L::Q);
  const float* DOs = reinterpret_cast<const float*>(smem + L::DO);
  const float* Ks = reinterpret_cast<const float*>(smem + L::K);
  const float* Vs = reinterpret_cast<const float*>(smem + L::V);
  float* dSs = reinterpret_cast<float*>(smem + L::DS);
  const int* s_key = reinterpret_cast<const int*>(smem + L::KEY);
  const float* s_bias = reinterpret_cast<const float*>(smem + L::BIAS);  // DRAW_BIAS: per-draw log weights, base 2
  float s[RI][CJ], dp[RI][CJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CJ; ++j) s[i][j] = dp[i][j] = 0.0f;
#pragma unroll 2
  for (int d = 0; d < head_dim; ++d) {
    float qv[RI], kv[CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i) qv[i] = Qs[(ty + i * TY) * L::LDQ + d];
#pragma unroll
    for (int j = 0; j < CJ; ++j) kv[j] = Ks[(tx + 16 * j) * L::LDQ + d];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) s[i][j] = fmaf(qv[i], kv[j], s[i][j]);
  }
#pragma unroll 2
  for (int d = 0; d < v_dim; ++d) {
    float ov[RI], vv[CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i) ov[i] = DOs[(ty + i * TY) * L::LDV + d];
#pragma unroll
    for (int j = 0; j < CJ; ++j) vv[j] = Vs[(tx + 16 * j) * L::LDV + d];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) dp[i][j] = fmaf(ov[i], vv[j], dp[i][j]);
  }
#pragma unroll
  for (int j = 0; j < CJ; ++j) {
    const int key = s_key[tx + 16 * j];
    const float bias = DRAW_BIAS ? s_bias[tx + 16 * j] : 0.0f;
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      bool ok = key >= 0;
      if (CAUSAL) ok = ok && key <= row_lim[i];
      const float p = ok ? fast_exp2(s[i][j] * scale_log2 - off2[i] + bias) : 0.0f;
      dSs[(ty + i * TY) * L::LDS + tx + 16 * j] = p * (dp[i][j] - delta[i]) * scale;
    }
  }
  __syncthreads();  // dS complete
#pragma unroll 2
  for (int c = 0; c < BLOCK_N; ++c) {
    float dsv[RI], kv[DJ];
#pragma unroll
    for (int i = 0; i < RI; ++i) dsv[i] = dSs[(ty + i * TY) * L::LDS + c];
#pragma unroll
    for (int j = 0; j < DJ; ++j) kv[j] = Ks[c * L::LDQ + tx + 16 * j];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < DJ; ++j) dq[i][j] = fmaf(dsv[i], kv[j], dq[i][j]);
  }
}

template <typename TDO, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, bool PERMUTED, bool CAUSAL,
          bool HAS_SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__device__ __forceinline__ void dq_body_simt(const DqArgs<float, TDO>& a, unsigned char* smem) {
  using L = DqSmem<float, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, DRAW_WEIGHTS>;
  constexpr int NTHREADS = WARPS * 32, TY = NTHREADS / 16, RI = BLOCK_M / TY, DJ = D_PAD / 16;
  static_assert(BLOCK_M % TY == 0, "dQ (fp32): BLOCK_M must be a multiple of 2 * WARPS");
  static_assert(BLOCK_N % 16 == 0, "dQ (fp32): BLOCK_N must be a multiple of 16");
  float* Qs = reinterpret_cast<float*>(smem + L::Q);
  float* DOs = reinterpret_cast<float*>(smem + L::DO);
  float* Ks = reinterpret_cast<float*>(smem + L::K);
  float* Vs = reinterpret_cast<float*>(smem + L::V);
  int* s_key = reinterpret_cast<int*>(smem + L::KEY);
  float* s_bias = reinterpret_cast<float*>(smem + L::BIAS);  // DRAW_WEIGHTS
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

  auto row_of = [&](int r) -> int {
    const int pos = a.q0 + r;
    return pos < a.q1 ? (PERMUTED ? a.q_order[pos] : pos) : -1;
  };
  stage_rows<BLOCK_M, D_PAD, L::LDQ, NTHREADS>(Qs, a.q, a.sq_n, a.sq_d, a.head_dim, row_of);
  stage_rows<BLOCK_M, DV_PAD, L::LDV, NTHREADS>(DOs, a.dout, a.sdo_n, a.sdo_d, a.v_dim, row_of);

  int rows[RI], row_lim[RI];
  float lse2[RI], delta[RI];
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    const int row = row_of(ty + i * TY);
    rows[i] = row;
    row_lim[i] = (row >= 0 ? row : 0) + a.diag;
    lse2[i] = row >= 0 ? a.lse[row * a.sl_n] * LOG2E : 0.0f;
    delta[i] = row >= 0 ? a.delta[row * a.sl_n] : 0.0f;
  }
  float dq[RI][DJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) dq[i][j] = 0.0f;

  for (int start = a.k0; start < a.k1; start += BLOCK_N) {
    auto key_of = [&](int r) -> int {
      const int pos = start + r;
      return pos < a.k1 ? (PERMUTED ? a.k_order[pos] : pos) : -1;
    };
    __syncthreads();  // the previous step is done with Ks, Vs, s_key and dS
    stage_rows<BLOCK_N, D_PAD, L::LDQ, NTHREADS>(Ks, a.k, a.sk_n, a.sk_d, a.head_dim, key_of);
    stage_rows<BLOCK_N, DV_PAD, L::LDV, NTHREADS>(Vs, a.v, a.sv_n, a.sv_d, a.v_dim, key_of);
    for (int r = tid; r < BLOCK_N; r += NTHREADS) s_key[r] = key_of(r);
    __syncthreads();
    dq_step_simt<D_PAD, DV_PAD, BLOCK_N, NTHREADS, RI, CAUSAL, false, L>(smem, tx, ty, lse2, delta, row_lim, a.scale,
                                                                         a.scale_log2, a.head_dim, a.v_dim, dq);
  }
  if (HAS_SAMPLES) {
    constexpr bool draws = DRAW_WEIGHTS;  // per-draw weights: each slot's bias (and log_w2 = 0)
    float off2[RI];
#pragma unroll
    for (int i = 0; i < RI; ++i) off2[i] = lse2[i] - a.log_w2;
    for (int start = 0; start < a.num_samples; start += BLOCK_N) {
      auto key_of = [&](int r) -> int {
        const int slot = start + r;
        return (slot < a.num_samples && a.sample_blocks[slot] != a.blk) ? a.samples[slot] : -1;
      };
      __syncthreads();
      stage_rows<BLOCK_N, D_PAD, L::LDQ, NTHREADS>(Ks, a.k, a.sk_n, a.sk_d, a.head_dim, key_of);
      stage_rows<BLOCK_N, DV_PAD, L::LDV, NTHREADS>(Vs, a.v, a.sv_n, a.sv_d, a.v_dim, key_of);
      for (int r = tid; r < BLOCK_N; r += NTHREADS) {
        s_key[r] = key_of(r);
        if (draws) s_bias[r] = start + r < a.num_samples ? a.draw_log_w[start + r] * LOG2E : 0.0f;
      }
      __syncthreads();
      dq_step_simt<D_PAD, DV_PAD, BLOCK_N, NTHREADS, RI, false, draws, L>(smem, tx, ty, off2, delta, row_lim, a.scale,
                                                                          a.scale_log2, a.head_dim, a.v_dim, dq);
    }
  }
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    if (rows[i] < 0) continue;
    float* out = a.dq + rows[i] * a.sdq_n;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + 16 * j;
      if (d >= a.head_dim) continue;
      float* p = out + d * a.sdq_d;
      *p = OVERWRITE ? dq[i][j] : *p + dq[i][j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// dK/dV.  Staging of one step of rows (of query head h): q, dO and the rows' lse2 - bias2, delta,
// row + diag and sorted-position key block.
// ---------------------------------------------------------------------------------------------------
template <typename T, typename TDO, int BLOCK_M, int D_PAD, int DV_PAD, int NTHREADS, bool PERMUTED, bool CAUSAL,
          bool SAMPLES, typename L>
__device__ __forceinline__ void dkdv_stage_rows(const DkdvArgs<T, TDO>& a, unsigned char* smem, int h, int start) {
  const int* q_order = a.q_order + a.b * a.sqo_b + h * a.sqo_h;
  auto row_of = [&](int r) -> int {
    const int pos = start + r;
    return pos < a.q1 ? (PERMUTED ? q_order[pos] : pos) : -1;
  };
  const T* q = a.q + a.b * a.sq_b + h * a.sq_h;
  const TDO* dout = a.dout + a.b * a.sdo_b + h * a.sdo_h;
  stage_rows<BLOCK_M, D_PAD, L::LDQ, NTHREADS>(reinterpret_cast<T*>(smem + L::Q), q, a.sq_n, a.sq_d, a.head_dim,
                                               row_of);
  stage_rows<BLOCK_M, DV_PAD, L::LDV, NTHREADS>(reinterpret_cast<T*>(smem + L::DO), dout, a.sdo_n, a.sdo_d, a.v_dim,
                                                row_of);
  for (int r = threadIdx.x; r < BLOCK_M; r += NTHREADS) {
    const int row = row_of(r);
    const long long l = a.b * a.sl_b + h * a.sl_h + static_cast<long long>(row) * a.sl_n;
    // masked rows: lse2 - bias2 = delta = 0 (P = 1, dS = 0, and dO = 0)
    reinterpret_cast<float*>(smem + L::OFF2)[r] = row >= 0 ? a.lse[l] * LOG2E - a.bias2 : 0.0f;
    reinterpret_cast<float*>(smem + L::DELTA)[r] = row >= 0 ? a.delta[l] : 0.0f;
    if (CAUSAL) reinterpret_cast<int*>(smem + L::ROW_LIM)[r] = (row >= 0 ? row : 0) + a.diag;
    if (SAMPLES) reinterpret_cast<int*>(smem + L::RBLK)[r] = row >= 0 ? a.q_block[start + r] : -2;
  }
}

// Rows per pass of the dK/dV step (fp16/bf16): S^T and dP^T of a pass of RC rows take RC registers per
// thread on top of the dk, dv accumulators' KT (D_PAD + DV_PAD) / 2; passes of 64 rows at D = 128
// spill on sm_80, so the step takes the widest of 64, 32, 16 rows dividing BLOCK_M that keeps the sum
// within a budget: 160 registers, 96 below sm_90 (on sm_80 ptxas caps the pipelined kernel at 168
// registers and passes of 64 rows at D = 64 spill; sm_86 / sm_89 take the same budget, not measured).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int DKDV_PASS_REGISTERS = 96;
#else
constexpr int DKDV_PASS_REGISTERS = 160;
#endif
template <int BLOCK_M, int KT, int D_PAD, int DV_PAD>
struct DkdvRowChunk {
  static constexpr int ACC = KT * (D_PAD + DV_PAD) / 2;
  static constexpr int value = (BLOCK_M % 64 == 0 && ACC + 64 <= DKDV_PASS_REGISTERS) ? 64
                             : (BLOCK_M % 32 == 0 && ACC + 32 <= DKDV_PASS_REGISTERS) ? 32 : 16;
};

// dK/dV, tensor cores.  Warp w owns keys [16 w KT, 16 (w + 1) KT) of the tile (KT slices of 16);
// per pass of ROW_CHUNK rows it forms S^T = K Q^T and dP^T = V dO^T (keys x rows) in registers.
// keys / key_blocks: the thread's keys (g and g + 8 of each slice) and, for samples, their key blocks;
// DRAW_BIAS: key_bias (base 2) is added to each key's exponent (per-draw sample weights).
template <typename T, int D_PAD, int DV_PAD, int BLOCK_M, int KT, bool CAUSAL, bool SAMPLES, bool DRAW_BIAS,
          typename L>
__device__ __forceinline__ void dkdv_step_mma(const unsigned char* smem, int stage, int table, int warp_key0, int lane,
                                              const int (&keys)[KT][2], const int (&key_blocks)[KT][2],
                                              const float (&key_bias)[KT][2], float scale,
                                              float scale_log2, int head_dim, int v_dim, float (&dk)[KT][D_PAD / 8][4],
                                              float (&dv)[KT][DV_PAD / 8][4]) {
  const T* Ks = reinterpret_cast<const T*>(smem + L::K);
  const T* Vs = reinterpret_cast<const T*>(smem + L::V);
  const T* Qs = reinterpret_cast<const T*>(smem + L::Q + stage * L::STAGE);
  const T* DOs = reinterpret_cast<const T*>(smem + L::DO + stage * L::STAGE);
  const float* s_off2 = reinterpret_cast<const float*>(smem + L::OFF2 + table * L::TABLE);
  const float* s_delta = reinterpret_cast<const float*>(smem + L::DELTA + table * L::TABLE);
  const int* s_row_lim = reinterpret_cast<const int*>(smem + L::ROW_LIM + table * L::TABLE);
  const int* s_rblk = reinterpret_cast<const int*>(smem + L::RBLK + table * L::TABLE);
  constexpr int RC = DkdvRowChunk<BLOCK_M, KT, D_PAD, DV_PAD>::value;
  constexpr int NR = RC / 8;
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    const int key0 = warp_key0 + kt * 16;
#pragma unroll
    for (int r0 = 0; r0 < BLOCK_M; r0 += RC) {
      const T* Qc = Qs + r0 * L::LDQ;  // this pass's rows
      const T* DOc = DOs + r0 * L::LDV;
      float s[NR][4], dp[NR][4];
#pragma unroll
      for (int n = 0; n < NR; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
      mma_abt<T, D_PAD, RC>(s, Ks, L::LDQ, key0, Qc, L::LDQ, head_dim, lane);    // S^T = K Q^T
      mma_abt<T, DV_PAD, RC>(dp, Vs, L::LDV, key0, DOc, L::LDV, v_dim, lane);    // dP^T = V dO^T
#pragma unroll
      for (int n = 0; n < NR; ++n) {
        const int c = r0 + n * 8 + 2 * (lane & 3);  // the thread's rows c, c + 1 (columns of S^T)
        const float2 off2 = *reinterpret_cast<const float2*>(s_off2 + c);
        const float2 delta = *reinterpret_cast<const float2*>(s_delta + c);
        int2 row_lim = make_int2(0, 0), rblk = make_int2(0, 0);
        if (CAUSAL) row_lim = *reinterpret_cast<const int2*>(s_row_lim + c);
        if (SAMPLES) rblk = *reinterpret_cast<const int2*>(s_rblk + c);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ki = e >> 1;  // key g or g + 8 of the slice
          const bool hi = e & 1;
          float x = s[n][e] * scale_log2 - (hi ? off2.y : off2.x);
          if (DRAW_BIAS) x += key_bias[kt][ki];
          float p = fast_exp2(x);
          if (CAUSAL) p = keys[kt][ki] <= (hi ? row_lim.y : row_lim.x) ? p : 0.0f;
          if (SAMPLES) p = key_blocks[kt][ki] != (hi ? rblk.y : rblk.x) ? p : 0.0f;
          s[n][e] = p;                                                   // P^T
          dp[n][e] = p * (dp[n][e] - (hi ? delta.y : delta.x)) * scale;  // dS^T
        }
      }
      mma_xb<T, RC, DV_PAD>(dv[kt], s, DOc, L::LDV, v_dim, lane);                // dv += P^T dO
      mma_xb<T, RC, D_PAD>(dk[kt], dp, Qc, L::LDQ, head_dim, lane);              // dk += dS^T Q
    }
  }
}

template <typename T, typename TDO, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, bool PERMUTED,
          bool CAUSAL, bool SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__device__ __forceinline__ void dkdv_body_mma(const DkdvArgs<T, TDO>& a, unsigned char* smem) {
  using L = DkdvSmem<T, D_PAD, DV_PAD, BLOCK_M, BLOCK_N>;
  constexpr int NTHREADS = WARPS * 32;
  constexpr int KT = BLOCK_N / (16 * WARPS);
  static_assert(BLOCK_N % (16 * WARPS) == 0, "dK/dV (fp16/bf16): BLOCK_N must be a multiple of 16 * WARPS");
  static_assert(BLOCK_M % 16 == 0, "dK/dV (fp16/bf16): BLOCK_M must be a multiple of 16");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  auto key_of = [&](int r) -> int {
    const int pos = a.k0 + r;
    return pos < a.k1 ? (SAMPLES ? a.samples[pos] : PERMUTED ? a.k_order[pos] : pos) : -1;
  };
  stage_rows<BLOCK_N, D_PAD, L::LDQ, NTHREADS>(reinterpret_cast<T*>(smem + L::K), a.k, a.sk_n, a.sk_d, a.head_dim,
                                               key_of);
  stage_rows<BLOCK_N, DV_PAD, L::LDV, NTHREADS>(reinterpret_cast<T*>(smem + L::V), a.v, a.sv_n, a.sv_d, a.v_dim,
                                                key_of);

  // this thread's keys: g and g + 8 of each of the warp's slices, and (samples) their key blocks and
  // per-draw log weights (base 2)
  const int warp_key0 = warp * KT * 16;
  int keys[KT][2], key_blocks[KT][2];
  float key_bias[KT][2];
#pragma unroll
  for (int kt = 0; kt < KT; ++kt)
#pragma unroll
    for (int ki = 0; ki < 2; ++ki) {
      const int r = warp_key0 + kt * 16 + (lane >> 2) + 8 * ki;
      const bool slot = SAMPLES && a.k0 + r < a.k1;
      keys[kt][ki] = key_of(r);
      key_blocks[kt][ki] = slot ? a.sample_blocks[a.k0 + r] : -1;
      key_bias[kt][ki] = DRAW_WEIGHTS && slot ? a.draw_log_w[a.k0 + r] * LOG2E : 0.0f;
    }

  float dk[KT][D_PAD / 8][4], dv[KT][DV_PAD / 8][4];
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
    for (int n = 0; n < D_PAD / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[kt][n][e] = 0.0f;
#pragma unroll
    for (int n = 0; n < DV_PAD / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dv[kt][n][e] = 0.0f;
  }

  // Steps: rows [q0, q1) in BLOCK_M each, of every query head of the KV group.  Pipeline: step s + 1's
  // copies of q and dO are in flight while step s computes.  A step's row table is filled at the top
  // of step s - 1 (its row indices loaded a step before that, so that their global latency hides
  // behind a whole step) into table s % 3, whose last reader was step s - 3.
  static_assert(BLOCK_M <= NTHREADS, "dK/dV (fp16/bf16): one thread per row of a step");
  const int row_steps = a.q1 > a.q0 ? (a.q1 - a.q0 + BLOCK_M - 1) / BLOCK_M : 0;
  const int steps = row_steps * a.group;
  auto head_of = [&](int step) -> int { return a.hk * a.group + step / row_steps; };
  auto position_of = [&](int step, int r) -> int { return a.q0 + (step % row_steps) * BLOCK_M + r; };
  auto row_at = [&](int step, int r) -> int {
    const int pos = position_of(step, r);
    return pos < a.q1 ? (PERMUTED ? a.q_order[a.b * a.sqo_b + head_of(step) * a.sqo_h + pos] : pos) : -1;
  };
  // row r of step `step`'s table t: masked rows get lse2 - bias2 = delta = 0 (P = 1, dS = 0, dO = 0)
  auto fill_table = [&](int step, int t, int r, int row) {
    unsigned char* base = smem + t * L::TABLE;
    const long long l = a.b * a.sl_b + head_of(step) * a.sl_h + static_cast<long long>(row) * a.sl_n;
    reinterpret_cast<int*>(base + L::ROWS)[r] = row;
    reinterpret_cast<float*>(base + L::OFF2)[r] = row >= 0 ? a.lse[l] * LOG2E - a.bias2 : 0.0f;
    reinterpret_cast<float*>(base + L::DELTA)[r] = row >= 0 ? a.delta[l] : 0.0f;
    if (CAUSAL) reinterpret_cast<int*>(base + L::ROW_LIM)[r] = (row >= 0 ? row : 0) + a.diag;
    if (SAMPLES) reinterpret_cast<int*>(base + L::RBLK)[r] = row >= 0 ? a.q_block[position_of(step, r)] : -2;
  };
  // q and dO of a step into buffer `stage`, through cp.async where the rows allow
  auto issue = [&](int step, int stage, int t) {
    const int* rows = reinterpret_cast<const int*>(smem + t * L::TABLE + L::ROWS);
    auto row_of = [&](int r) -> int { return rows[r]; };
    const int h = head_of(step);
    stage_rows_async<BLOCK_M, D_PAD, L::LDQ, NTHREADS>(reinterpret_cast<T*>(smem + L::Q + stage * L::STAGE),
                                                       a.q + a.b * a.sq_b + h * a.sq_h, a.sq_n, a.sq_d, a.head_dim,
                                                       row_of);
    stage_rows_async<BLOCK_M, DV_PAD, L::LDV, NTHREADS>(reinterpret_cast<T*>(smem + L::DO + stage * L::STAGE),
                                                        a.dout + a.b * a.sdo_b + h * a.sdo_h, a.sdo_n, a.sdo_d,
                                                        a.v_dim, row_of);
  };
  int next_row = -1;
  if (tid < BLOCK_M) {
    if (steps > 0) fill_table(0, 0, tid, row_at(0, tid));
    if (steps > 1) next_row = row_at(1, tid);
  }
  __syncthreads();  // step 0's table (and the staged k, v)
  if (steps > 0) issue(0, 0, 0);
  cp_async_commit();
#pragma unroll 1
  for (int step = 0; step < steps; ++step) {
    if (tid < BLOCK_M) {
      if (step + 1 < steps) fill_table(step + 1, (step + 1) % 3, tid, next_row);
      if (step + 2 < steps) next_row = row_at(step + 2, tid);
    }
    __syncthreads();  // step s + 1's table is visible, and every warp is done with step s - 1's buffer
    if (step + 1 < steps) issue(step + 1, (step + 1) & 1, (step + 1) % 3);
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of step s landed
    __syncthreads();     // and everyone's
    dkdv_step_mma<T, D_PAD, DV_PAD, BLOCK_M, KT, CAUSAL, SAMPLES, SAMPLES && DRAW_WEIGHTS, L>(
        smem, step & 1, step % 3, warp_key0, lane, keys, key_blocks, key_bias, a.scale, a.scale_log2, a.head_dim,
        a.v_dim, dk, dv);
  }
  cp_async_wait<0>();  // no copy outlives the block

#pragma unroll
  for (int kt = 0; kt < KT; ++kt)
#pragma unroll
    for (int ki = 0; ki < 2; ++ki) {
      const int key = keys[kt][ki];
      if (key < 0) continue;  // past k1: never stored
      float* out_k = a.dk + key * a.sdk_n;
      float* out_v = a.dv + key * a.sdv_n;
#pragma unroll
      for (int n = 0; n < D_PAD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = n * 8 + 2 * (lane & 3) + e;
          if (d >= a.head_dim) continue;
          float* p = out_k + d * a.sdk_d;
          const float x = dk[kt][n][2 * ki + e];
          if (SAMPLES) atomicAdd(p, x);  // every chunk of rows adds into the same sample keys, and draws repeat
          else *p = OVERWRITE ? x : *p + x;
        }
#pragma unroll
      for (int n = 0; n < DV_PAD / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = n * 8 + 2 * (lane & 3) + e;
          if (d >= a.v_dim) continue;
          float* p = out_v + d * a.sdv_d;
          const float x = dv[kt][n][2 * ki + e];
          if (SAMPLES) atomicAdd(p, x);
          else *p = OVERWRITE ? x : *p + x;
        }
    }
}

// dK/dV, fp32 SIMT.  Thread (ty, tx) owns keys ty + i TY and, per product, columns tx + 16 j; P^T and
// then dS^T pass through one shared buffer (two would not fit at D = 128 on sm_80).
template <typename TDO, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, bool PERMUTED, bool CAUSAL,
          bool SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__device__ __forceinline__ void dkdv_body_simt(const DkdvArgs<float, TDO>& a, unsigned char* smem) {
  using L = DkdvSmem<float, D_PAD, DV_PAD, BLOCK_M, BLOCK_N>;
  constexpr int NTHREADS = WARPS * 32, TY = NTHREADS / 16, KI = BLOCK_N / TY, RJ = BLOCK_M / 16;
  constexpr int DJ = D_PAD / 16, VJ = DV_PAD / 16;
  static_assert(BLOCK_N % TY == 0, "dK/dV (fp32): BLOCK_N must be a multiple of 2 * WARPS");
  static_assert(BLOCK_M % 16 == 0, "dK/dV (fp32): BLOCK_M must be a multiple of 16");
  const float* Ks = reinterpret_cast<const float*>(smem + L::K);
  const float* Vs = reinterpret_cast<const float*>(smem + L::V);
  const float* Qs = reinterpret_cast<const float*>(smem + L::Q);
  const float* DOs = reinterpret_cast<const float*>(smem + L::DO);
  float* Ps = reinterpret_cast<float*>(smem + L::P);
  const float* s_off2 = reinterpret_cast<const float*>(smem + L::OFF2);
  const float* s_delta = reinterpret_cast<const float*>(smem + L::DELTA);
  const int* s_row_lim = reinterpret_cast<const int*>(smem + L::ROW_LIM);
  const int* s_rblk = reinterpret_cast<const int*>(smem + L::RBLK);
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;

  auto key_of = [&](int r) -> int {
    const int pos = a.k0 + r;
    return pos < a.k1 ? (SAMPLES ? a.samples[pos] : PERMUTED ? a.k_order[pos] : pos) : -1;
  };
  stage_rows<BLOCK_N, D_PAD, L::LDQ, NTHREADS>(reinterpret_cast<float*>(smem + L::K), a.k, a.sk_n, a.sk_d, a.head_dim,
                                               key_of);
  stage_rows<BLOCK_N, DV_PAD, L::LDV, NTHREADS>(reinterpret_cast<float*>(smem + L::V), a.v, a.sv_n, a.sv_d, a.v_dim,
                                                key_of);
  // the thread's keys and (samples) their key blocks and per-draw log weights (base 2; 0 without)
  constexpr bool draws = SAMPLES && DRAW_WEIGHTS;
  int keys[KI], key_blocks[KI];
  float key_bias[KI];
#pragma unroll
  for (int i = 0; i < KI; ++i) {
    const int r = ty + i * TY;
    const bool slot = SAMPLES && a.k0 + r < a.k1;
    keys[i] = key_of(r);
    key_blocks[i] = slot ? a.sample_blocks[a.k0 + r] : -1;
    key_bias[i] = draws && slot ? a.draw_log_w[a.k0 + r] * LOG2E : 0.0f;
  }
  float dk[KI][DJ], dv[KI][VJ];
#pragma unroll
  for (int i = 0; i < KI; ++i) {
#pragma unroll
    for (int j = 0; j < DJ; ++j) dk[i][j] = 0.0f;
#pragma unroll
    for (int j = 0; j < VJ; ++j) dv[i][j] = 0.0f;
  }

  for (int g = 0; g < a.group; ++g) {
    const int h = a.hk * a.group + g;
    for (int start = a.q0; start < a.q1; start += BLOCK_M) {
      __syncthreads();  // the previous step is done with Qs, DOs, Ps and the row data
      dkdv_stage_rows<float, TDO, BLOCK_M, D_PAD, DV_PAD, NTHREADS, PERMUTED, CAUSAL, SAMPLES, L>(a, smem, h, start);
      __syncthreads();
      float s[KI][RJ], dp[KI][RJ];
#pragma unroll
      for (int i = 0; i < KI; ++i)
#pragma unroll
        for (int j = 0; j < RJ; ++j) s[i][j] = dp[i][j] = 0.0f;
#pragma unroll 2
      for (int d = 0; d < a.head_dim; ++d) {
        float kv[KI], qv[RJ];
#pragma unroll
        for (int i = 0; i < KI; ++i) kv[i] = Ks[(ty + i * TY) * L::LDQ + d];
#pragma unroll
        for (int j = 0; j < RJ; ++j) qv[j] = Qs[(tx + 16 * j) * L::LDQ + d];
#pragma unroll
        for (int i = 0; i < KI; ++i)
#pragma unroll
          for (int j = 0; j < RJ; ++j) s[i][j] = fmaf(kv[i], qv[j], s[i][j]);
      }
#pragma unroll 2
      for (int d = 0; d < a.v_dim; ++d) {
        float vv[KI], ov[RJ];
#pragma unroll
        for (int i = 0; i < KI; ++i) vv[i] = Vs[(ty + i * TY) * L::LDV + d];
#pragma unroll
        for (int j = 0; j < RJ; ++j) ov[j] = DOs[(tx + 16 * j) * L::LDV + d];
#pragma unroll
        for (int i = 0; i < KI; ++i)
#pragma unroll
          for (int j = 0; j < RJ; ++j) dp[i][j] = fmaf(vv[i], ov[j], dp[i][j]);
      }
#pragma unroll
      for (int j = 0; j < RJ; ++j) {
        const int c = tx + 16 * j;
        const float off2 = s_off2[c], delta = s_delta[c];
#pragma unroll
        for (int i = 0; i < KI; ++i) {
          float p = fast_exp2(s[i][j] * a.scale_log2 - off2 + (draws ? key_bias[i] : 0.0f));
          if (CAUSAL) p = keys[i] <= s_row_lim[c] ? p : 0.0f;
          if (SAMPLES) p = key_blocks[i] != s_rblk[c] ? p : 0.0f;
          Ps[(ty + i * TY) * L::LDP + c] = p;
          dp[i][j] = p * (dp[i][j] - delta) * a.scale;  // dS^T, kept until P^T is used
        }
      }
      __syncthreads();  // P^T complete
#pragma unroll 2
      for (int c = 0; c < BLOCK_M; ++c) {  // dv += P^T dO
        float pv[KI], ov[VJ];
#pragma unroll
        for (int i = 0; i < KI; ++i) pv[i] = Ps[(ty + i * TY) * L::LDP + c];
#pragma unroll
        for (int j = 0; j < VJ; ++j) ov[j] = DOs[c * L::LDV + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < KI; ++i)
#pragma unroll
          for (int j = 0; j < VJ; ++j) dv[i][j] = fmaf(pv[i], ov[j], dv[i][j]);
      }
      __syncthreads();  // done with P^T
#pragma unroll
      for (int j = 0; j < RJ; ++j)
#pragma unroll
        for (int i = 0; i < KI; ++i) Ps[(ty + i * TY) * L::LDP + tx + 16 * j] = dp[i][j];
      __syncthreads();  // dS^T complete
#pragma unroll 2
      for (int c = 0; c < BLOCK_M; ++c) {  // dk += dS^T Q
        float dsv[KI], qv[DJ];
#pragma unroll
        for (int i = 0; i < KI; ++i) dsv[i] = Ps[(ty + i * TY) * L::LDP + c];
#pragma unroll
        for (int j = 0; j < DJ; ++j) qv[j] = Qs[c * L::LDQ + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < KI; ++i)
#pragma unroll
          for (int j = 0; j < DJ; ++j) dk[i][j] = fmaf(dsv[i], qv[j], dk[i][j]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < KI; ++i) {
    if (keys[i] < 0) continue;
    float* out_k = a.dk + keys[i] * a.sdk_n;
    float* out_v = a.dv + keys[i] * a.sdv_n;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + 16 * j;
      if (d >= a.head_dim) continue;
      float* p = out_k + d * a.sdk_d;
      if (SAMPLES) atomicAdd(p, dk[i][j]);
      else *p = OVERWRITE ? dk[i][j] : *p + dk[i][j];
    }
#pragma unroll
    for (int j = 0; j < VJ; ++j) {
      const int d = tx + 16 * j;
      if (d >= a.v_dim) continue;
      float* p = out_v + d * a.sdv_d;
      if (SAMPLES) atomicAdd(p, dv[i][j]);
      else *p = OVERWRITE ? dv[i][j] : *p + dv[i][j];
    }
  }
}

}  // namespace bwd

// ---------------------------------------------------------------------------------------------------
// The kernels.  Argument order as the Triton kernels' (strides in elements, int64), then head_dim and
// v_dim (the true head dims; D_PAD / DV_PAD are their padded widths).
// ---------------------------------------------------------------------------------------------------

// dQ over a query-side tile table: grid (T, B * Hq), WARPS * 32 threads,
// DqSmem<T, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, DRAW_WEIGHTS>::BYTES of dynamic shared memory.  With
// HAS_SAMPLES and DRAW_WEIGHTS the sample slots weigh DrawLogW (a log weight per draw), else LogW[seg].
template <typename T, typename TDO, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, bool PERMUTED,
          bool CAUSAL, bool HAS_SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__global__ void __launch_bounds__(WARPS * 32) attention_bwd_dq(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const TDO* __restrict__ DO,
    const float* __restrict__ Lse, const float* __restrict__ Delta, float* __restrict__ DQ,
    const long long* __restrict__ Tiles, const int* __restrict__ QOrder, const int* __restrict__ KOrder,
    const int* __restrict__ Samples, const int* __restrict__ SampleBlock, const float* __restrict__ LogW,
    const float* __restrict__ DrawLogW,
    long long sq_b, long long sq_h, long long sq_n, long long sq_d,
    long long sk_b, long long sk_h, long long sk_n, long long sk_d,
    long long sv_b, long long sv_h, long long sv_n, long long sv_d,
    long long sdo_b, long long sdo_h, long long sdo_n, long long sdo_d,
    long long sl_b, long long sl_h, long long sl_n,
    long long sdq_b, long long sdq_h, long long sdq_n, long long sdq_d,
    long long sqo_b, long long sqo_h, long long sko_b, long long sko_h,
    long long ss_b, long long ss_h, long long ss_s,
    int num_heads, int group, float scale, float scale_log2, int num_samples, int head_dim, int v_dim) {
  static_assert(HAS_SAMPLES || !DRAW_WEIGHTS, "per-draw weights are the samples'");
  extern __shared__ __align__(16) unsigned char smem[];
  bwd::check_smem(bwd::DqSmem<T, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, DRAW_WEIGHTS>::BYTES);
  int b, h, hk;
  program_heads(num_heads, group, b, h, hk);
  const Tile tile = load_tile(Tiles);
  bwd::DqArgs<T, TDO> a;
  a.q = Q + b * sq_b + h * sq_h;
  a.k = K + b * sk_b + hk * sk_h;
  a.v = V + b * sv_b + hk * sv_h;
  a.dout = DO + b * sdo_b + h * sdo_h;
  a.lse = Lse + b * sl_b + h * sl_h;
  a.delta = Delta + b * sl_b + h * sl_h;  // delta shares lse's strides
  a.dq = DQ + b * sdq_b + h * sdq_h;
  a.q_order = QOrder + b * sqo_b + h * sqo_h;
  a.k_order = KOrder + b * sko_b + hk * sko_h;
  const long long sample_row = b * ss_b + hk * ss_h + tile.seg * ss_s;
  a.samples = Samples + (HAS_SAMPLES ? sample_row : 0);
  a.sample_blocks = SampleBlock + (HAS_SAMPLES ? sample_row : 0);
  a.draw_log_w = DRAW_WEIGHTS ? DrawLogW + sample_row : nullptr;
  a.sq_n = sq_n; a.sq_d = sq_d; a.sk_n = sk_n; a.sk_d = sk_d; a.sv_n = sv_n; a.sv_d = sv_d;
  a.sdo_n = sdo_n; a.sdo_d = sdo_d; a.sl_n = sl_n; a.sdq_n = sdq_n; a.sdq_d = sdq_d;
  a.blk = static_cast<int>(tile.blk);
  a.q0 = static_cast<int>(tile.a0); a.q1 = static_cast<int>(tile.a1);
  a.k0 = static_cast<int>(tile.b0); a.k1 = static_cast<int>(tile.b1);
  a.diag = static_cast<int>(tile.diag);
  a.num_samples = num_samples; a.head_dim = head_dim; a.v_dim = v_dim;
  a.scale = scale; a.scale_log2 = scale_log2;
  a.log_w2 = HAS_SAMPLES && !DRAW_WEIGHTS ? LogW[tile.seg] * LOG2E : 0.0f;
  if constexpr (bwd::SameType<T, float>::value)
    bwd::dq_body_simt<TDO, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, WARPS, PERMUTED, CAUSAL, HAS_SAMPLES, OVERWRITE,
                      DRAW_WEIGHTS>(a, smem);
  else
    bwd::dq_body_mma<T, TDO, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, WARPS, PERMUTED, CAUSAL, HAS_SAMPLES, OVERWRITE,
                     DRAW_WEIGHTS>(a, smem);
}

// dK/dV over a key-side tile table (keys, or with SAMPLES sample slots): grid (T, B * Hk), WARPS * 32
// threads, DkdvSmem<T, D_PAD, DV_PAD, BLOCK_M, BLOCK_N>::BYTES of dynamic shared memory.  Sample slots
// are never causal and always add (atomically); they weigh DrawLogW with DRAW_WEIGHTS, else LogW[seg].
template <typename T, typename TDO, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, bool PERMUTED,
          bool CAUSAL, bool SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__global__ void __launch_bounds__(WARPS * 32) attention_bwd_dkdv(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const TDO* __restrict__ DO,
    const float* __restrict__ Lse, const float* __restrict__ Delta, float* __restrict__ DK, float* __restrict__ DV,
    const long long* __restrict__ Tiles, const int* __restrict__ QOrder, const int* __restrict__ KOrder,
    const int* __restrict__ QBlock, const int* __restrict__ Samples, const int* __restrict__ SampleBlock,
    const float* __restrict__ LogW, const float* __restrict__ DrawLogW,
    long long sq_b, long long sq_h, long long sq_n, long long sq_d,
    long long sk_b, long long sk_h, long long sk_n, long long sk_d,
    long long sv_b, long long sv_h, long long sv_n, long long sv_d,
    long long sdo_b, long long sdo_h, long long sdo_n, long long sdo_d,
    long long sl_b, long long sl_h, long long sl_n,
    long long sdk_b, long long sdk_h, long long sdk_n, long long sdk_d,
    long long sdv_b, long long sdv_h, long long sdv_n, long long sdv_d,
    long long sqo_b, long long sqo_h, long long sko_b, long long sko_h,
    long long ss_b, long long ss_h, long long ss_s,
    int num_kv_heads, int group, float scale, float scale_log2, int head_dim, int v_dim) {
  static_assert(!(SAMPLES && (CAUSAL || OVERWRITE)), "sample slots are never causal and always add");
  static_assert(SAMPLES || !DRAW_WEIGHTS, "per-draw weights are the sample slots'");
  extern __shared__ __align__(16) unsigned char smem[];
  bwd::check_smem(bwd::DkdvSmem<T, D_PAD, DV_PAD, BLOCK_M, BLOCK_N>::BYTES);
  int b, hk, unused;
  program_heads(num_kv_heads, 1, b, hk, unused);
  const Tile tile = load_tile(Tiles);
  bwd::DkdvArgs<T, TDO> a;
  a.q = Q; a.dout = DO; a.lse = Lse; a.delta = Delta;  // per query head: offsets applied per step
  a.k = K + b * sk_b + hk * sk_h;
  a.v = V + b * sv_b + hk * sv_h;
  a.dk = DK + b * sdk_b + hk * sdk_h;
  a.dv = DV + b * sdv_b + hk * sdv_h;
  a.q_order = QOrder;
  a.k_order = KOrder + b * sko_b + hk * sko_h;
  a.q_block = QBlock;
  const long long sample_row = b * ss_b + hk * ss_h + tile.seg * ss_s;
  a.samples = Samples + (SAMPLES ? sample_row : 0);
  a.sample_blocks = SampleBlock + (SAMPLES ? sample_row : 0);
  a.draw_log_w = DRAW_WEIGHTS ? DrawLogW + sample_row : nullptr;
  a.sq_b = sq_b; a.sq_h = sq_h; a.sq_n = sq_n; a.sq_d = sq_d;
  a.sdo_b = sdo_b; a.sdo_h = sdo_h; a.sdo_n = sdo_n; a.sdo_d = sdo_d;
  a.sl_b = sl_b; a.sl_h = sl_h; a.sl_n = sl_n; a.sqo_b = sqo_b; a.sqo_h = sqo_h;
  a.sk_n = sk_n; a.sk_d = sk_d; a.sv_n = sv_n; a.sv_d = sv_d;
  a.sdk_n = sdk_n; a.sdk_d = sdk_d; a.sdv_n = sdv_n; a.sdv_d = sdv_d;
  a.b = b; a.hk = hk; a.group = group;
  a.k0 = static_cast<int>(tile.a0); a.k1 = static_cast<int>(tile.a1);
  a.q0 = static_cast<int>(tile.b0); a.q1 = static_cast<int>(tile.b1);
  a.diag = static_cast<int>(tile.diag);
  a.head_dim = head_dim; a.v_dim = v_dim;
  a.scale = scale; a.scale_log2 = scale_log2;
  a.bias2 = SAMPLES && !DRAW_WEIGHTS ? LogW[tile.seg] * LOG2E : 0.0f;
  if constexpr (bwd::SameType<T, float>::value)
    bwd::dkdv_body_simt<TDO, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, WARPS, PERMUTED, CAUSAL, SAMPLES, OVERWRITE,
                        DRAW_WEIGHTS>(a, smem);
  else
    bwd::dkdv_body_mma<T, TDO, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, WARPS, PERMUTED, CAUSAL, SAMPLES, OVERWRITE,
                       DRAW_WEIGHTS>(a, smem);
}

}  // namespace hyperattn

#ifdef HYPERATTN_COMPILE_CHECK
// The tuned launches (launches.DEFAULT_LAUNCHES "dq" / "dkdv"), instantiated for nvcc's ahead-of-time
// check (compiler.nvcc_check): taking their addresses instantiates them.
#define HA_DQ_W(T, TDO, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER, DRAW) \
  reinterpret_cast<const void*>(                                         \
      &hyperattn::attention_bwd_dq<T, TDO, D, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER, DRAW>)
#define HA_DKDV_W(T, TDO, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER, DRAW) \
  reinterpret_cast<const void*>(                                           \
      &hyperattn::attention_bwd_dkdv<T, TDO, D, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER, DRAW>)
#define HA_DQ(T, TDO, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER) \
  HA_DQ_W(T, TDO, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER, false)
#define HA_DKDV(T, TDO, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER) \
  HA_DKDV_W(T, TDO, D, BM, BN, W, PERM, CAUSAL, SAMPLES, OVER, false)
const void* const hyperattn_bwd_compile_check[] = {
    // dQ: sparse pieces (LSH order, samples, first piece) and exact causal pieces (adding)
    HA_DQ(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 4, true, false, true, true),
    HA_DQ(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, true, false, true, true),
    HA_DQ(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 4, false, true, false, false),
    HA_DQ(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, false, true, false, false),
    HA_DQ(__half, __half, 64, 64, 64, 4, true, false, true, false),
    HA_DQ(__half, __half, 128, 64, 64, 4, false, true, false, true),
    HA_DQ(__nv_bfloat16, float, 128, 64, 64, 4, true, false, true, false),  // fp32 dO
    HA_DQ(float, float, 64, 64, 64, 4, true, false, true, true),
    HA_DQ(__nv_bfloat16, __nv_bfloat16, 256, 32, 32, 2, true, false, true, true),
    // dK/dV: block keys (first piece), sample slots, exact causal keys (adding)
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 64, 32, 64, 4, true, false, false, true),
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, true, false, false, true),
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 64, 32, 64, 4, true, false, true, false),
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, true, false, true, false),
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 64, 32, 64, 4, false, true, false, false),
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, false, true, false, false),
    HA_DKDV(__half, __half, 128, 64, 64, 4, true, false, false, false),
    HA_DKDV(float, float, 64, 64, 64, 4, true, false, true, false),  // fp32 (not tuned): the 32-row launch spills 64 B on sm_80
    HA_DKDV(__nv_bfloat16, __nv_bfloat16, 256, 32, 32, 2, true, false, false, true),
    // sampling="key_norm": per-draw weights (dQ of sparse pieces, dK/dV of their sample slots)
    HA_DQ_W(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 4, true, false, true, true, true),
    HA_DQ_W(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, true, false, true, false, true),
    HA_DQ_W(float, float, 64, 64, 64, 4, true, false, true, true, true),
    HA_DKDV_W(__nv_bfloat16, __nv_bfloat16, 64, 32, 64, 4, true, false, true, false, true),
    HA_DKDV_W(__nv_bfloat16, __nv_bfloat16, 128, 64, 64, 4, true, false, true, false, true),
    HA_DKDV_W(float, float, 64, 64, 64, 4, true, false, true, false, true),
};
#undef HA_DQ
#undef HA_DKDV
#undef HA_DQ_W
#undef HA_DKDV_W
#endif  // HYPERATTN_COMPILE_CHECK
