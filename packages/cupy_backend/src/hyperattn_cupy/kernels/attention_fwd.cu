// The forward attention kernel of the CuPy backend: one block per query tile (grid.x = tiles,
// grid.y = batch x query heads), the same semantics as the Triton backend's attention_fwd_kernel
// (hyperattn_triton/kernels/attention.py; tile-table format: hyperattn/tiles.py).
//
// A tile (seg, blk, q0, q1, k0, k1, diag) is rows at positions [q0, q1) against keys at positions
// [k0, k1) (through QOrder / KOrder when PERMUTED: gathered in-kernel, never copied sorted);
// CAUSAL keeps key j for row i when j <= i + diag.  With HAS_SAMPLES the m sample slots of
// segment seg follow (keys Samples[b, hk, seg, :], their key blocks SampleBlock[b, hk, seg, :]):
// a slot drawn from the tile's own key block blk is left out (that block is computed exactly),
// the others weigh exp(LogW[seg]), or with DRAW_WEIGHTS exp(DrawLogW[b, hk, seg, j]) each (importance
// sampling: a log weight per draw, laid out as Samples).  Online softmax in base 2 and fp32, then (o, lse) merged by
// log-sum-exp into the running (Out, Lse), or written without reading when OVERWRITE.
//
// Template parameters: T (__half, __nv_bfloat16 or float inputs), TOut (T or float: the running
// Out), HEAD_DIM / V_DIM (the true head dims) and D_PAD / DV_PAD (their padded widths, powers of
// two >= 16: the shared-memory tiles' widths), BLOCK_M rows per tile, BLOCK_N keys per step,
// WARPS per block, and the flags.  All compile-time: the loops over the head dims unroll.
//
// Pipeline (per key step, one K and one V buffer in shared memory, filled by cp.async when the
// rows are 16-byte aligned and contiguous, else by plain loads):
//   wait K[s]; S = Q K[s]^T; issue K[s+1]; mask + softmax; wait V[s]; O += P V[s]; issue V[s+1]
// so that each buffer's next load overlaps the other half of the step.  The key indices (and
// log-weight biases) of step s+1 are written to a double-buffered shared table at the top of step
// s, from registers loaded one step earlier (their global latency hides behind a whole step).
//
// fp16 / bf16: tensor cores through mma.sync.m16n8k16 (fp32 accumulators), operands by ldmatrix;
// each warp owns 16 * MT rows, so the softmax's row reductions are quad shuffles and P feeds the
// P V product from registers (the accumulator layout of S is the A-operand layout of P).
// fp32: exact fp32 SIMT arithmetic (THREADS / BLOCK_M threads per row), P through shared memory.
//
// Shared memory (dynamic; attention_forward.shared_bytes mirrors SmemLayout below):
//   Q [BLOCK_M][D_PAD + PAD] T, K [BLOCK_N][D_PAD + PAD] T, V [BLOCK_N][DV_PAD + PAD] T
//   (PAD = 16 bytes: ldmatrix rows land on distinct banks), P [BLOCK_M][BLOCK_N + 1] float (fp32
//   only), row indices [BLOCK_M] int, key indices [2][BLOCK_N] int, key biases [2][BLOCK_N] float.
#include "common.cuh"

namespace hyperattn {
namespace fwd_detail {

template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };
template <bool C, typename A, typename B> struct pick { using type = A; };
template <typename A, typename B> struct pick<false, A, B> { using type = B; };

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x in one instruction (ex2.approx, as Triton's exp2): 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// -- shared memory layout --------------------------------------------------------------------
template <typename T, int BLOCK_M, int BLOCK_N, int D_PAD, int DV_PAD, bool SIMT>
struct SmemLayout {
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));  // one 16-byte chunk per row
  static constexpr int LDQ = D_PAD + PAD;                      // Q and K row stride (elements)
  static constexpr int LDV = DV_PAD + PAD;                     // V row stride (elements)
  static constexpr int LDP = BLOCK_N + 1;                      // P row stride (floats, fp32 only)
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + BLOCK_M * LDQ * static_cast<int>(sizeof(T));
  static constexpr int V_OFF = K_OFF + BLOCK_N * LDQ * static_cast<int>(sizeof(T));
  static constexpr int P_OFF = V_OFF + BLOCK_N * LDV * static_cast<int>(sizeof(T));
  static constexpr int QIDX_OFF = P_OFF + (SIMT ? BLOCK_M * LDP * 4 : 0);
  static constexpr int KIDX_OFF = QIDX_OFF + BLOCK_M * 4;
  static constexpr int KBIAS_OFF = KIDX_OFF + 2 * BLOCK_N * 4;
  static constexpr int BYTES = KBIAS_OFF + 2 * BLOCK_N * 4;
};

// Whether rows of a (batch, head) slice can be copied in 16-byte chunks: contiguous columns, a
// whole number of chunks per row, and every row start 16-byte aligned.
template <typename T, int DIM>
__device__ __forceinline__ bool rows_vectorizable(const T* base, long long s_n, long long s_d) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  return s_d == 1 && DIM % VEC == 0 && s_n % VEC == 0 &&
         reinterpret_cast<unsigned long long>(base) % 16 == 0;
}

// Rows idx[0..ROWS) (-1: a row that does not count, zero-filled) of base, columns [0, COLS) with
// zeros from DIM on, into dst (row stride LD).  Zero-filled rows and columns keep every score and
// product finite: a masked key's score is -inf by its bias, and 0 * garbage could be NaN.
template <typename T, int ROWS, int COLS, int DIM, int LD, int THREADS>
__device__ __forceinline__ void load_rows(T* dst, const T* __restrict__ base, const int* idx, long long s_n,
                                          long long s_d, bool vec) {
  constexpr int VEC = 16 / static_cast<int>(sizeof(T));
  constexpr int CPR = COLS / VEC;  // chunks per row
  constexpr int CHUNKS = ROWS * CPR;
  constexpr int ITERS = (CHUNKS + THREADS - 1) / THREADS;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int c = static_cast<int>(threadIdx.x) + it * THREADS;
    if (CHUNKS % THREADS == 0 || c < CHUNKS) {
      const int r = c / CPR;
      const int col = (c % CPR) * VEC;
      const int row = idx[r];
      T* d = dst + r * LD + col;
      if (vec) {
        const bool ok = row >= 0 && col < DIM;
        cp_async_16(d, ok ? base + row * s_n + col : base, ok);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const bool ok = row >= 0 && col + e < DIM;
          d[e] = ok ? base[row * s_n + (col + e) * s_d] : from_float<T>(0.f);
        }
      }
    }
  }
}

// -- key slots of a step -------------------------------------------------------------------------
// Steps [0, block_steps) are the tile's keys, BLOCK_N positions each; then the sample slots.
struct KeySource {
  const int* k_order;      // KOrder of (b, hk) (PERMUTED)
  const int* samples;      // Samples of (b, hk, seg)
  const int* sample_block; // SampleBlock of (b, hk, seg)
  int k0, k1, block_steps, num_samples, blk;
  const float* draw_log_w; // DrawLogW of (b, hk, seg), or nullptr: every draw weighs sample_bias
  float sample_bias;       // LogW[seg] in raw score units (/ scale), added to a sample's score
  float to_score;          // a natural log weight -> raw score units: LOG2E / scale_log2
};

// One slot's raw values, loaded a step before they are needed.
struct SlotFetch {
  int key, key_block;
  float bias;  // a sample's score bias (raw score units)
  bool in_range, sample;
};

template <int BLOCK_N, bool PERMUTED, bool HAS_SAMPLES>
__device__ __forceinline__ SlotFetch fetch_slot(const KeySource& src, int step, int slot) {
  SlotFetch f{-1, -1, 0.f, false, false};
  if (!HAS_SAMPLES || step < src.block_steps) {
    const int pos = src.k0 + step * BLOCK_N + slot;
    f.in_range = pos < src.k1;
    if (f.in_range) f.key = PERMUTED ? src.k_order[pos] : pos;
  } else {
    const int j = (step - src.block_steps) * BLOCK_N + slot;
    f.sample = true;
    f.in_range = j < src.num_samples;
    if (f.in_range) {
      f.key = src.samples[j];
      f.key_block = src.sample_block[j];
      f.bias = src.draw_log_w != nullptr ? src.draw_log_w[j] * src.to_score : src.sample_bias;
    }
  }
  return f;
}

// The slot's entry of the step's shared table: its key (-1: does not count) and score bias.
__device__ __forceinline__ void commit_slot(const SlotFetch& f, const KeySource& src, int* kidx, float* kbias,
                                            int slot) {
  const bool keep = f.in_range && !(f.sample && f.key_block == src.blk);
  kidx[slot] = keep ? f.key : -1;
  kbias[slot] = keep ? (f.sample ? f.bias : 0.f) : neg_inf();
}

// -- writing a tile's rows: _store_partial ---------------------------------------------------------
struct RowMerge {
  float l_div;         // o = acc / l_div (1 for a row without keys: o = 0)
  float a, c, total;   // merged = (a * o_old + c * o) / total
  bool read_old;       // Lse > -inf: the running Out holds something (else it is never read)
  float lse;           // the Lse to store
};

// m2: the row's running maximum (base 2, scaled), l: its sum; lse_ptr: its Lse (nullptr: a row
// outside the tile).  Reads Lse (unless OVERWRITE): call it for every row before storing any.
template <bool OVERWRITE>
__device__ __forceinline__ RowMerge row_merge(float m2, float l, const float* lse_ptr) {
  RowMerge r;
  const bool has_keys = l > 0.f;
  r.l_div = has_keys ? l : 1.f;
  const float lse_new = has_keys ? (m2 + log2f(l)) * LN2 : neg_inf();
  if (OVERWRITE || lse_ptr == nullptr) {
    r.a = 0.f, r.c = 1.f, r.total = 1.f, r.read_old = false, r.lse = lse_new;
    return r;
  }
  const float l_old = *lse_ptr;
  const float top = fmaxf(l_old, lse_new);
  const float top_safe = top == neg_inf() ? 0.f : top;
  r.a = expf(l_old - top_safe);
  r.c = expf(lse_new - top_safe);
  const float total = r.a + r.c;
  r.total = total > 0.f ? total : 1.f;
  r.lse = top_safe + logf(total);  // -inf when neither has keys
  r.read_old = l_old > neg_inf();
  return r;
}

template <typename TOut, bool OVERWRITE>
__device__ __forceinline__ void store_value(TOut* p, float acc, const RowMerge& r) {
  float o = acc / r.l_div;
  if (!OVERWRITE) {
    const float old = r.read_old ? to_float(*p) : 0.f;
    o = (r.a * old + r.c * o) / r.total;
  }
  *p = from_float<TOut>(o);
}

// -- tensor-core tiles (fp16 / bf16) --------------------------------------------------------------
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// c += a b: m16n8k16, A row-major (4 regs), B column-major (2 regs), fp32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                               unsigned b1);
template <> __device__ __forceinline__ void mma16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                             unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4],
                                                                    unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// A warp's rows of the tile and their online-softmax state, in mma fragments: warp w owns rows
// [16 MT w, 16 MT (w + 1)); lane (g = lane / 4, t = lane % 4) holds rows g and g + 8 of each
// m-tile and, of each 8-column n-tile, columns 2t and 2t + 1 (the m16n8 accumulator layout).
template <typename T, int V_DIM, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, int LDQ, int LDV>
struct MmaRows {
  static constexpr int MT = BLOCK_M / (16 * WARPS);  // m-tiles per warp
  static constexpr int NT = BLOCK_N / 8;             // n-tiles of S
  static constexpr int NV = DV_PAD / 8;              // n-tiles of O
  static_assert(BLOCK_M % (16 * WARPS) == 0, "fp16/bf16: BLOCK_M must be a multiple of 16 * WARPS");
  static_assert(BLOCK_N % 16 == 0, "fp16/bf16: BLOCK_N must be a multiple of 16");

  float s[MT][NT][4];  // scores, then probabilities
  float o[MT][NV][4];  // unnormalized output
  float m[MT][2];      // running row maxima (base 2, scaled)
  float l[MT][2];      // running row sums: this lane's columns only (summed over the quad at the end)
  int rows[MT][2];     // row indices (-1: outside the tile)
  int warp, lane;

  __device__ __forceinline__ int local_row(int mt, int h) const {
    return warp * 16 * MT + mt * 16 + (lane >> 2) + 8 * h;
  }

  __device__ __forceinline__ void init(const int* qidx, float* /* P: fp32 only */) {
    warp = static_cast<int>(threadIdx.x) / 32;
    lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        m[mt][h] = neg_inf();
        l[mt][h] = 0.f;
        rows[mt][h] = qidx[local_row(mt, h)];
      }
#pragma unroll
      for (int nv = 0; nv < NV; ++nv)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nv][e] = 0.f;
    }
  }

  // s = Q K^T over the padded head dim (its zero columns add nothing).
  __device__ __forceinline__ void scores(const T* Qs, const T* Ks) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int kd = 0; kd < D_PAD / 16; ++kd) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)  // A: rows lane % 16, columns 8 (lane / 16) of the 16 x 16 block
        ldmatrix_x4(a[mt], Qs + (warp * 16 * MT + mt * 16 + (lane & 15)) * LDQ + kd * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        // B of n-tiles 2np, 2np + 1: keys (lane % 8) + 8 (lane / 16), columns 8 ((lane / 8) % 2)
        unsigned b[4];
        ldmatrix_x4(b, Ks + (np * 16 + (lane & 7) + (lane >> 4) * 8) * LDQ + kd * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(s[mt][2 * np], a[mt], b[0], b[1]);
          mma16816<T>(s[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  // Scores that do not count become -inf: a key's bias (0, a log weight, or -inf), and causality
  // (key index > row index + diag).  Either is skipped where the whole step passes it.
  __device__ __forceinline__ void mask(const int* kidx, const float* kbias, bool bias, bool causal, int diag) {
    if (bias) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float kb = kbias[nt * 8 + (lane & 3) * 2 + e];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            s[mt][nt][e] += kb;
            s[mt][nt][2 + e] += kb;
          }
        }
    }
    if (causal) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kidx[nt * 8 + (lane & 3) * 2 + e];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              if (key > rows[mt][h] + diag) s[mt][nt][2 * h + e] = neg_inf();
        }
    }
  }

  // _online_step: maxima over the raw scores, scaled per row, so each probability is one FMA and an exp2.
  __device__ __forceinline__ void softmax(float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = neg_inf();
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the row's 4 lanes
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[mt][h], mx * scale_log2);
        const float m_safe = m_new == neg_inf() ? 0.f : m_new;
        const float alpha = fast_exp2(m[mt][h] - m_safe);
        m[mt][h] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(s[mt][nt][2 * h + e], scale_log2, -m_safe));
            s[mt][nt][2 * h + e] = p;
            sum += p;
          }
        l[mt][h] = l[mt][h] * alpha + sum;
#pragma unroll
        for (int nv = 0; nv < NV; ++nv) {
          o[mt][nv][2 * h] *= alpha;
          o[mt][nv][2 * h + 1] *= alpha;
        }
      }
  }

  // o += P V, P (rounded to T, as Triton's p.to(v.dtype)) straight from the score registers.
  __device__ __forceinline__ void accumulate(const T* Vs) {
#pragma unroll
    for (int kn = 0; kn < BLOCK_N / 16; ++kn) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kn][0], s[mt][2 * kn][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kn][2], s[mt][2 * kn][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kn + 1][0], s[mt][2 * kn + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kn + 1][2], s[mt][2 * kn + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < NV / 2; ++np) {
        // B of n-tiles 2np, 2np + 1 (V is [key][dv]: transposed): keys (lane % 8) + 8 ((lane / 8) % 2),
        // columns 8 (lane / 16)
        unsigned b[4];
        ldmatrix_x4_trans(b, Vs + (kn * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDV + np * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<T>(o[mt][2 * np], a[mt], b[0], b[1]);
          mma16816<T>(o[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
  }

  template <typename TOut, bool OVERWRITE>
  __device__ __forceinline__ void store(TOut* out, float* lse, long long so_n, long long so_d, long long sl_n) {
    RowMerge merge[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float sum = l[mt][h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int row = rows[mt][h];
        merge[mt][h] = row_merge<OVERWRITE>(m[mt][h], sum, row >= 0 ? lse + row * sl_n : nullptr);
      }
    __syncwarp();  // the quad's lanes have read Lse before its first lane writes it
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = rows[mt][h];
        if (row < 0) continue;
        if ((lane & 3) == 0) lse[row * sl_n] = merge[mt][h].lse;
        TOut* out_row = out + row * so_n;
#pragma unroll
        for (int nv = 0; nv < NV; ++nv)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = nv * 8 + (lane & 3) * 2 + e;
            if (col < V_DIM) store_value<TOut, OVERWRITE>(out_row + col * so_d, o[mt][nv][2 * h + e], merge[mt][h]);
          }
      }
  }
};

// -- SIMT tiles (fp32) ---------------------------------------------------------------------------
// TPR = THREADS / BLOCK_M consecutive lanes per row: lane u of row r holds the scores of keys
// u + TPR i and the output columns 4 (u + TPR g) + [0, 4).
template <int HEAD_DIM, int V_DIM, int D_PAD, int DV_PAD, int BLOCK_M, int BLOCK_N, int WARPS, int LDQ, int LDV,
          int LDP>
struct SimtRows {
  static constexpr int THREADS = WARPS * 32;
  static constexpr int TPR = THREADS / BLOCK_M;
  static constexpr int KPT = BLOCK_N / TPR;         // keys per thread
  static constexpr int VG = DV_PAD / (4 * TPR);     // float4 output groups per thread
  static constexpr int D4 = (HEAD_DIM + 3) / 4;     // float4 chunks of a Q / K row that hold data
  static_assert(THREADS % BLOCK_M == 0 && TPR <= 32, "fp32: WARPS * 32 must be a multiple of BLOCK_M");
  static_assert(BLOCK_N % TPR == 0 && DV_PAD % (4 * TPR) == 0, "fp32: keys and columns must split over a row's threads");

  float s[KPT];
  float4 o[VG];
  float m, l;
  int row, r, u;
  float* Ps;

  __device__ __forceinline__ void init(const int* qidx, float* P) {
    r = static_cast<int>(threadIdx.x) / TPR;
    u = static_cast<int>(threadIdx.x) % TPR;
    row = qidx[r];
    Ps = P;
    m = neg_inf();
    l = 0.f;
#pragma unroll
    for (int g = 0; g < VG; ++g) o[g] = make_float4(0.f, 0.f, 0.f, 0.f);
  }

  __device__ __forceinline__ void scores(const float* Qs, const float* Ks) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) s[i] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D4; ++d) {
      const float4 q = *reinterpret_cast<const float4*>(Qs + r * LDQ + 4 * d);
#pragma unroll
      for (int i = 0; i < KPT; ++i) {
        const float4 k = *reinterpret_cast<const float4*>(Ks + (u + TPR * i) * LDQ + 4 * d);
        s[i] = fmaf(q.x, k.x, s[i]);
        s[i] = fmaf(q.y, k.y, s[i]);
        s[i] = fmaf(q.z, k.z, s[i]);
        s[i] = fmaf(q.w, k.w, s[i]);
      }
    }
  }

  __device__ __forceinline__ void mask(const int* kidx, const float* kbias, bool bias, bool causal, int diag) {
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const int c = u + TPR * i;
      if (bias) s[i] += kbias[c];
      if (causal && kidx[c] > row + diag) s[i] = neg_inf();
    }
  }

  __device__ __forceinline__ float row_reduce_max(float x) const {
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
  }
  __device__ __forceinline__ float row_reduce_sum(float x) const {
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
  }

  // The probabilities go to P (read by the row's lanes after the block's next barrier).
  __device__ __forceinline__ void softmax(float scale_log2) {
    float mx = neg_inf();
#pragma unroll
    for (int i = 0; i < KPT; ++i) mx = fmaxf(mx, s[i]);
    mx = row_reduce_max(mx);
    const float m_new = fmaxf(m, mx * scale_log2);
    const float m_safe = m_new == neg_inf() ? 0.f : m_new;
    const float alpha = fast_exp2(m - m_safe);
    m = m_new;
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < KPT; ++i) {
      const float p = fast_exp2(fmaf(s[i], scale_log2, -m_safe));
      Ps[r * LDP + u + TPR * i] = p;
      sum += p;
    }
    l = l * alpha + sum;
#pragma unroll
    for (int g = 0; g < VG; ++g) o[g].x *= alpha, o[g].y *= alpha, o[g].z *= alpha, o[g].w *= alpha;
  }

  __device__ __forceinline__ void accumulate(const float* Vs) {
#pragma unroll 4
    for (int j = 0; j < BLOCK_N; ++j) {
      const float p = Ps[r * LDP + j];
#pragma unroll
      for (int g = 0; g < VG; ++g) {
        const float4 v = *reinterpret_cast<const float4*>(Vs + j * LDV + 4 * (u + TPR * g));
        o[g].x = fmaf(p, v.x, o[g].x);
        o[g].y = fmaf(p, v.y, o[g].y);
        o[g].z = fmaf(p, v.z, o[g].z);
        o[g].w = fmaf(p, v.w, o[g].w);
      }
    }
  }

  template <typename TOut, bool OVERWRITE>
  __device__ __forceinline__ void store(TOut* out, float* lse, long long so_n, long long so_d, long long sl_n) {
    const float sum = row_reduce_sum(l);
    const RowMerge merge = row_merge<OVERWRITE>(m, sum, row >= 0 ? lse + row * sl_n : nullptr);
    __syncwarp();  // the row's lanes have read Lse before its first lane writes it
    if (row < 0) return;
    if (u == 0) lse[row * sl_n] = merge.lse;
    TOut* out_row = out + row * so_n;
#pragma unroll
    for (int g = 0; g < VG; ++g) {
      const int col = 4 * (u + TPR * g);
      const float vals[4] = {o[g].x, o[g].y, o[g].z, o[g].w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (col + e < V_DIM) store_value<TOut, OVERWRITE>(out_row + (col + e) * so_d, vals[e], merge);
    }
  }
};

// Blocks per SM that ptxas must leave registers for (__launch_bounds__).  Without it ptxas picks
// its own cap for some instantiations and spills there; fp16/bf16 tiles up to 64 wide take up to
// 168 registers a thread (3 blocks of 4 warps, 1 of 8), wider ones up to 255 (2 blocks of 4 warps,
// 1 of 8); on sm_80 every tile takes up to 255 (at 168, 128-row tiles spill there); fp32 is not tuned.
// (A constant, not a constexpr function: NVRTC refuses functions without __device__.)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int NARROW_FOUR_WARP_BLOCKS = 2;
#else
constexpr int NARROW_FOUR_WARP_BLOCKS = 3;
#endif
template <typename T, int D_PAD, int DV_PAD, int WARPS>
struct MinBlocks {
  static constexpr int FOUR_WARPS = D_PAD <= 64 && DV_PAD <= 64 ? NARROW_FOUR_WARP_BLOCKS : 2;  // blocks of 4 warps
  static constexpr int SCALED = FOUR_WARPS * 4 / WARPS;
  static constexpr int value = same_type<T, float>::value ? 1 : (SCALED < 1 ? 1 : SCALED);
};

}  // namespace fwd_detail

// One query tile (blockIdx.x: row of Tiles) of one (batch, query head) (blockIdx.y), WARPS * 32
// threads, fwd_detail::SmemLayout<...>::BYTES bytes of dynamic shared memory.
//
// Q [B, Hq, Nq, D], K [B, Hk, Nk, D], V [B, Hk, Nk, Dv], Out [B, Hq, Nq, Dv], Lse [B, Hq, Nq]
// (element strides s*_b, s*_h, s*_n, s*_d; Lse's sl_b, sl_h, sl_n); Tiles int64 [T, 7] contiguous;
// QOrder int32 [B, Hq, Nq] / KOrder int32 [B, Hk, Nk] (strides (b, h), positions contiguous; read
// when PERMUTED); Samples / SampleBlock int32 [B, Hk, S, m] (strides (b, h, s), slots contiguous;
// read when HAS_SAMPLES), LogW float32 [S], DrawLogW float32 [B, Hk, S, m] (Samples' strides; read
// instead of LogW when DRAW_WEIGHTS); num_heads = Hq, group = Hq / Hk, scale_log2 =
// scale * log2(e), num_samples = m.  Positions, indices and diag fit in int32 (the orders do).
template <typename T, typename TOut, int HEAD_DIM, int D_PAD, int V_DIM, int DV_PAD, int BLOCK_M, int BLOCK_N,
          int WARPS, bool PERMUTED, bool CAUSAL, bool HAS_SAMPLES, bool OVERWRITE, bool DRAW_WEIGHTS>
__global__ void __launch_bounds__(WARPS * 32, fwd_detail::MinBlocks<T, D_PAD, DV_PAD, WARPS>::value)
attention_fwd(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, TOut* __restrict__ Out,
              float* __restrict__ Lse, const long long* __restrict__ Tiles, const int* __restrict__ QOrder,
              const int* __restrict__ KOrder, const int* __restrict__ Samples, const int* __restrict__ SampleBlock,
              const float* __restrict__ LogW, const float* __restrict__ DrawLogW,
              long long sq_b, long long sq_h, long long sq_n, long long sq_d,
              long long sk_b, long long sk_h, long long sk_n, long long sk_d,
              long long sv_b, long long sv_h, long long sv_n, long long sv_d,
              long long so_b, long long so_h, long long so_n, long long so_d,
              long long sl_b, long long sl_h, long long sl_n,
              long long sqo_b, long long sqo_h, long long sko_b, long long sko_h,
              long long ss_b, long long ss_h, long long ss_s,
              int num_heads, int group, float scale_log2, int num_samples) {
  using namespace fwd_detail;
  constexpr bool SIMT = same_type<T, float>::value;
  constexpr int THREADS = WARPS * 32;
  using L = SmemLayout<T, BLOCK_M, BLOCK_N, D_PAD, DV_PAD, SIMT>;
  static_assert(same_type<TOut, T>::value || same_type<TOut, float>::value, "Out is the input dtype or float");
  static_assert(HAS_SAMPLES || !DRAW_WEIGHTS, "per-draw weights are the samples'");
  static_assert(HEAD_DIM <= D_PAD && V_DIM <= DV_PAD && D_PAD % 16 == 0 && DV_PAD % 16 == 0, "padded head dims");
  static_assert(BLOCK_N <= THREADS, "one thread per key slot of a step");
  using Rows = typename pick<SIMT, SimtRows<HEAD_DIM, V_DIM, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, WARPS, L::LDQ, L::LDV, L::LDP>,
                             MmaRows<T, V_DIM, D_PAD, DV_PAD, BLOCK_M, BLOCK_N, WARPS, L::LDQ, L::LDV>>::type;

  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + L::Q_OFF);
  T* Ks = reinterpret_cast<T*>(smem + L::K_OFF);
  T* Vs = reinterpret_cast<T*>(smem + L::V_OFF);
  float* Ps = reinterpret_cast<float*>(smem + L::P_OFF);
  int* qidx = reinterpret_cast<int*>(smem + L::QIDX_OFF);
  int* kidx = reinterpret_cast<int*>(smem + L::KIDX_OFF);       // [2][BLOCK_N]: step parity
  float* kbias = reinterpret_cast<float*>(smem + L::KBIAS_OFF);  // [2][BLOCK_N]

  int b, h, hk;
  program_heads(num_heads, group, b, h, hk);
  const Tile tile = load_tile(Tiles);
  const int q0 = static_cast<int>(tile.a0), q1 = static_cast<int>(tile.a1);
  const int diag = static_cast<int>(tile.diag);
  const int tid = static_cast<int>(threadIdx.x);

  const T* q_base = Q + b * sq_b + h * sq_h;
  const T* k_base = K + b * sk_b + hk * sk_h;
  const T* v_base = V + b * sv_b + hk * sv_h;

  KeySource src;
  src.k0 = static_cast<int>(tile.b0);
  src.k1 = static_cast<int>(tile.b1);
  src.k_order = KOrder + b * sko_b + hk * sko_h;
  src.block_steps = src.k1 > src.k0 ? (src.k1 - src.k0 + BLOCK_N - 1) / BLOCK_N : 0;
  src.blk = static_cast<int>(tile.blk);
  src.num_samples = HAS_SAMPLES ? num_samples : 0;
  src.samples = Samples;
  src.sample_block = SampleBlock;
  src.draw_log_w = nullptr;
  src.sample_bias = 0.f;
  src.to_score = LOG2E / scale_log2;
  if (HAS_SAMPLES) {
    const long long sample_row = b * ss_b + hk * ss_h + tile.seg * ss_s;
    src.samples = Samples + sample_row;
    src.sample_block = SampleBlock + sample_row;
    src.sample_bias = LogW[tile.seg] * src.to_score;  // in raw score units
    if (DRAW_WEIGHTS) src.draw_log_w = DrawLogW + sample_row;
  }
  const int steps = src.block_steps + (HAS_SAMPLES ? (src.num_samples + BLOCK_N - 1) / BLOCK_N : 0);

  // Prologue: the tile's row indices and step 0's key table; step 1's slots fetched into registers.
  const int* q_order = QOrder + b * sqo_b + h * sqo_h;
  for (int i = tid; i < BLOCK_M; i += THREADS) {
    const int pos = q0 + i;
    qidx[i] = pos < q1 ? (PERMUTED ? q_order[pos] : pos) : -1;
  }
  SlotFetch next{-1, -1, 0.f, false, false};
  if (tid < BLOCK_N) {
    if (steps > 0) commit_slot(fetch_slot<BLOCK_N, PERMUTED, HAS_SAMPLES>(src, 0, tid), src, kidx, kbias, tid);
    if (steps > 1) next = fetch_slot<BLOCK_N, PERMUTED, HAS_SAMPLES>(src, 1, tid);
  }
  __syncthreads();

  const bool q_vec = rows_vectorizable<T, HEAD_DIM>(q_base, sq_n, sq_d);
  const bool k_vec = rows_vectorizable<T, HEAD_DIM>(k_base, sk_n, sk_d);
  const bool v_vec = rows_vectorizable<T, V_DIM>(v_base, sv_n, sv_d);
  // cp.async groups, oldest first: Q, K[0], V[0], then K[s + 1] and V[s + 1] in step s (empty
  // groups where there is nothing to load, so that "all but the newest group" always means the
  // buffer about to be read).
  load_rows<T, BLOCK_M, D_PAD, HEAD_DIM, L::LDQ, THREADS>(Qs, q_base, qidx, sq_n, sq_d, q_vec);
  cp_async_commit();
  if (steps > 0) load_rows<T, BLOCK_N, D_PAD, HEAD_DIM, L::LDQ, THREADS>(Ks, k_base, kidx, sk_n, sk_d, k_vec);
  cp_async_commit();
  if (steps > 0) load_rows<T, BLOCK_N, DV_PAD, V_DIM, L::LDV, THREADS>(Vs, v_base, kidx, sv_n, sv_d, v_vec);
  cp_async_commit();

  Rows rows;
  rows.init(qidx, Ps);

  for (int step = 0; step < steps; ++step) {
    const int cur = (step & 1) * BLOCK_N, nxt = BLOCK_N - cur;
    // Step s + 1's key table into the half of step s - 1 (whose last reader, step s - 1's mask,
    // is behind the last barrier); step s + 2's slots fetched into registers.
    if (tid < BLOCK_N) {
      if (step + 1 < steps) commit_slot(next, src, kidx + nxt, kbias + nxt, tid);
      if (step + 2 < steps) next = fetch_slot<BLOCK_N, PERMUTED, HAS_SAMPLES>(src, step + 2, tid);
    }
    cp_async_wait<1>();  // K[s] (and Q) landed
    __syncthreads();
    rows.scores(Qs, Ks);
    __syncthreads();  // every warp is done with K[s]
    if (step + 1 < steps) load_rows<T, BLOCK_N, D_PAD, HEAD_DIM, L::LDQ, THREADS>(Ks, k_base, kidx + nxt, sk_n, sk_d, k_vec);
    cp_async_commit();

    // Masks where some score of the step may not count: a partial step of keys, or samples (their
    // log weight, and -inf for the rows' own block); causality unless every key of the step is at
    // or below the tile's first row's diagonal (positions are indices when not PERMUTED).
    const bool block_step = step < src.block_steps;
    const bool bias = !block_step || src.k1 - src.k0 - step * BLOCK_N < BLOCK_N;
    const bool causal = CAUSAL && block_step && (PERMUTED || src.k0 + (step + 1) * BLOCK_N - 1 > q0 + diag);
    rows.mask(kidx + cur, kbias + cur, bias, causal, diag);
    rows.softmax(scale_log2);

    cp_async_wait<1>();  // V[s] landed (K[s + 1] may be in flight)
    __syncthreads();
    rows.accumulate(Vs);
    __syncthreads();  // every warp is done with V[s]
    if (step + 1 < steps) load_rows<T, BLOCK_N, DV_PAD, V_DIM, L::LDV, THREADS>(Vs, v_base, kidx + nxt, sv_n, sv_d, v_vec);
    cp_async_commit();
  }
  cp_async_wait<0>();  // no copy outlives the block (a tile without keys never waited for Q)

  rows.template store<TOut, OVERWRITE>(Out + b * so_b + h * so_h, Lse + b * sl_b + h * sl_h, so_n, so_d, sl_n);
}

}  // namespace hyperattn

#ifdef HYPERATTN_COMPILE_CHECK
// The tuned launches (launches.py, "forward"): exact pieces (not PERMUTED, causal or not, no
// samples) and sparse pieces (PERMUTED, not causal, with samples), first piece (OVERWRITE) or
// merged, fp16 / bf16 Out in the input dtype, at D = Dv = 64 (128 x 32, 4 warps) and 128
// (64 x 64, 4 warps); one fp32 launch (fp32 Out) and one D = 256 launch (64 x 32, 4 warps).
#define HYPERATTN_FWD_PARAMS(T, TOut)                                                                            \
  const T* __restrict__, const T* __restrict__, const T* __restrict__, TOut* __restrict__, float* __restrict__,  \
      const long long* __restrict__, const int* __restrict__, const int* __restrict__, const int* __restrict__,  \
      const int* __restrict__, const float* __restrict__, const float* __restrict__, long long, long long,      \
      long long, long long, long long, long long, long long, long long, long long, long long, long long,         \
      long long, long long, long long, long long, long long, long long, long long, long long, long long,         \
      long long, long long, long long, long long, long long, long long, int, int, float, int
#define HYPERATTN_FWD_W(T, TOut, D, DP, DV, DVP, BM, BN, W, PERM, CAUS, SAMP, OVER, DRAW)                     \
  template __global__ void                                                                                   \
  hyperattn::attention_fwd<T, TOut, D, DP, DV, DVP, BM, BN, W, PERM, CAUS, SAMP, OVER, DRAW>(                 \
      HYPERATTN_FWD_PARAMS(T, TOut));
#define HYPERATTN_FWD(T, TOut, D, DP, DV, DVP, BM, BN, W, PERM, CAUS, SAMP, OVER) \
  HYPERATTN_FWD_W(T, TOut, D, DP, DV, DVP, BM, BN, W, PERM, CAUS, SAMP, OVER, false)

HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 64, 128, 32, 4, false, false, false, true)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 64, 128, 32, 4, false, true, false, true)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 64, 128, 32, 4, true, false, true, false)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 64, 128, 32, 4, true, false, true, true)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 128, 128, 128, 128, 64, 64, 4, false, false, false, true)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 128, 128, 128, 128, 64, 64, 4, false, true, false, true)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 128, 128, 128, 128, 64, 64, 4, true, false, true, false)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 128, 128, 128, 128, 64, 64, 4, true, false, true, true)
HYPERATTN_FWD(__half, __half, 64, 64, 64, 64, 128, 32, 4, false, true, false, true)
HYPERATTN_FWD(__half, __half, 64, 64, 64, 64, 128, 32, 4, true, false, true, false)
HYPERATTN_FWD(__half, __half, 128, 128, 128, 128, 64, 64, 4, false, true, false, true)
HYPERATTN_FWD(__half, __half, 128, 128, 128, 128, 64, 64, 4, true, false, true, false)
HYPERATTN_FWD(__half, float, 128, 128, 128, 128, 64, 64, 4, true, false, true, false)
HYPERATTN_FWD(float, float, 128, 128, 128, 128, 64, 64, 4, true, false, true, false)
HYPERATTN_FWD(__nv_bfloat16, __nv_bfloat16, 256, 256, 256, 256, 64, 32, 4, true, false, true, false)
// sampling="key_norm": per-draw weights
HYPERATTN_FWD_W(__nv_bfloat16, __nv_bfloat16, 64, 64, 64, 64, 128, 32, 4, true, false, true, false, true)
HYPERATTN_FWD_W(__nv_bfloat16, __nv_bfloat16, 128, 128, 128, 128, 64, 64, 4, true, false, true, true, true)

#undef HYPERATTN_FWD
#undef HYPERATTN_FWD_W
#undef HYPERATTN_FWD_PARAMS
#endif  // HYPERATTN_COMPILE_CHECK
