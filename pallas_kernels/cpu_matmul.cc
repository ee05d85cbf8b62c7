// x @ W^T with W in one of llama.cpp's block-quantized forms, read where it lies: an XLA FFI custom
// call (kvjax's "native" weights), computing what pallas_kernels.block_matmul.matmul_reference does.
//
//   layer   int32 [1]              the entry of the weights' [L, ...] array to read
//   x       float32 [m, K]         activations (a decode step's tokens, m = batch; or a prompt chunk's)
//   w       uint8 [L, N, K/32*B]   N rows of K weights, in blocks of 32 along K of B bytes each:
//             Q4_0 (B=18): float16 d, 16 bytes of 4-bit q   -> d * (q - 8)
//             Q4_1 (B=20): float16 d, float16 m, 16 bytes    -> d * q + m
//             Q8_0 (B=34): float16 d, 32 int8 q              -> d * q
//           (byte j of a 4-bit block holds element j in its low nibble and element j + 16 in its high)
//   attribute kind: 0 Q4_0, 1 Q4_1, 2 Q8_0 (block_matmul.Kind)
//   -> y float32 [m, N], y[i, n] = sum_k x[i, k] * W[n, k]
//
// Each block is converted to float32 in registers, exactly the values gguf's dequantization gives:
// d * q is exact in float32 (an 11-bit significand times a 4- or 8-bit integer), so d * q + m rounds
// once, fused or not. Sums are float32, so y equals the reference up to summation order. Two ways:
//   few rows (m < kPanelFrom: decode)  a work item is a run of weight rows; per NR weight rows and R
//       activation rows (R x NR <= 16), one accumulator of 16 lanes per output (reduced at the end
//       of a row): each block is unpacked once per R activation rows (a 4-bit block by a lookup in
//       the 16 values it can hold), each x vector loaded once per NR weight rows
//   many rows (a prompt chunk)  a work item is a panel of kPanel weight rows, converted once into
//       float32 W^T [K, kPanel]; then a float GEMM's inner loop: per k, x[r, k] broadcast times
//       the panel's two vectors, for kPanelR rows r at a time (as fast as XLA's float32 dot)
// Items run on the calling thread and the other threads of XLA's intra-op pool when the product is
// large enough to pay for them.

#include <string>

#include "cpu_kernels.h"

namespace {

constexpr int kBlock = 32;                    // weights per block
// From this much work the pool's threads help: a product's multiply-adds, or 8 per byte of its
// weights, whichever is more (one core of the Intel Xeon multiplies ~40 G a second, and a single row
// reads blocks from memory at ~9 GB/s, where two cores read nearly twice that). Measured over 30
// layers: the k / v projections at 8 rows (0.9 M multiply-adds, 110 KB) took 0.62 ms alone and 0.91
// with help; q at 1 row (0.3 M, 207 KB) 0.74 alone and 0.62 with help.
constexpr int64_t kParallelWork = 1 << 20;
constexpr int kItemsPerThread = 8;            // work items per thread: the last ones even out
constexpr int kPanelFrom = 144;               // activation rows from which panels pay (measured: BENCHMARKS.md)

enum Kind : int32_t { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

int BlockBytes(int32_t kind) { return kind == kQ4_0 ? 18 : kind == kQ4_1 ? 20 : 34; }

inline float Half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return HalfToFloat(h);
#endif
}

struct Product {
  const float* x;      // [m, K]
  const uint8_t* w;    // this layer's [N, row_bytes]
  float* y;            // [m, N]
  int m, K, N, row_bytes, blocks;
  int32_t kind;
};

#if defined(__AVX512F__)
alignas(64) constexpr float kNibbles[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
alignas(64) constexpr float kCentered[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

// The 32 weights of a block as two vectors of 16 (elements 0-15, 16-31). A 4-bit block first makes
// the 16 values it can hold (d * q + m, or d * (q - 8), for q = 0..15: one multiply-add, rounded
// once as gguf's), then each nibble picks its value: vpermps reads only an index's low 4 bits, so
// the low nibbles need no mask and the high ones one shift.
template <int32_t K>
inline void Unpack(const uint8_t* block, __m512& lo, __m512& hi) {
  if constexpr (K == kQ8_0) {
    const __m512 d = _mm512_set1_ps(Half(block));
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 2)))));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 18)))));
  } else {
    int32_t dm;  // Q4_1: float16 d, m; Q4_0: float16 d (and the block's first two codes, unused)
    std::memcpy(&dm, block, 4);
    const __m512 both = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dm)));
    const __m512 d = _mm512_permutexvar_ps(_mm512_setzero_si512(), both);
    const __m512 table = K == kQ4_1 ? _mm512_fmadd_ps(d, _mm512_load_ps(kNibbles),
                                                      _mm512_permutexvar_ps(_mm512_set1_epi32(1), both))
                                    : _mm512_mul_ps(d, _mm512_load_ps(kCentered));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(block + (K == kQ4_1 ? 4 : 2))));
    lo = _mm512_permutexvar_ps(q, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
  }
}

template <int32_t K>
inline void DequantizeBlock(const uint8_t* block, float* out) {
  __m512 lo, hi;
  Unpack<K>(block, lo, hi);
  _mm512_storeu_ps(out, lo);
  _mm512_storeu_ps(out + 16, hi);
}

// y[i0 .. i0+R, n0 .. n0+NR] from R activation rows and NR weight rows: each block of a weight row
// converted once, each x vector loaded once per NR weight rows, one accumulator of 16 lanes per
// output (reduced at the end of the row). The rows two tiles on are fetched into L2 meanwhile (at
// one activation row the hardware alone read ~5 GB/s of blocks from memory on one core, ~9 with
// them; a fetch past the matrix's end is harmless: fetches do not fault).
template <int32_t K, int R, int NR>
void Tile(const Product& P, int i0, int n0) {
  __m512 acc[R][NR];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  const uint8_t* rows = P.w + size_t(n0) * P.row_bytes;
  const float* x = P.x + size_t(i0) * P.K;
  const char* ahead = reinterpret_cast<const char*>(rows) + 2 * NR * P.row_bytes;  // rows two tiles on
  for (int b = 0; b < P.blocks; ++b) {
    for (int off = b * NR * BlockBytes(K); off < (b + 1) * NR * BlockBytes(K); off += 64) FetchLine<false>(ahead + off);
    __m512 lo[NR], hi[NR];
    for (int j = 0; j < NR; ++j) Unpack<K>(rows + size_t(j) * P.row_bytes + size_t(b) * BlockBytes(K), lo[j], hi[j]);
    for (int r = 0; r < R; ++r) {
      const __m512 x_lo = _mm512_loadu_ps(x + size_t(r) * P.K + b * kBlock);
      const __m512 x_hi = _mm512_loadu_ps(x + size_t(r) * P.K + b * kBlock + 16);
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(x_hi, hi[j], _mm512_fmadd_ps(x_lo, lo[j], acc[r][j]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) P.y[size_t(i0 + r) * P.N + n0 + j] = _mm512_reduce_add_ps(acc[r][j]);
}
#else
// The portable build: a block dequantized to 32 floats, then plain loops.
template <int32_t K>
inline void DequantizeBlock(const uint8_t* block, float* out) {
  const float d = Half(block);
  if constexpr (K == kQ8_0) {
    for (int i = 0; i < kBlock; ++i) out[i] = d * float(int8_t(block[2 + i]));
  } else {
    const float m = K == kQ4_1 ? Half(block + 2) : 0.0f;
    const uint8_t* q = block + (K == kQ4_1 ? 4 : 2);
    const int offset = K == kQ4_0 ? 8 : 0;
    for (int i = 0; i < 16; ++i) {
      out[i] = d * float(int(q[i] & 15) - offset) + m;
      out[i + 16] = d * float(int(q[i] >> 4) - offset) + m;
    }
  }
}

template <int32_t K, int R, int NR>
void Tile(const Product& P, int i0, int n0) {
  float acc[R][NR][kBlock] = {};
  float w[NR][kBlock];
  for (int b = 0; b < P.blocks; ++b) {
    for (int j = 0; j < NR; ++j)
      DequantizeBlock<K>(P.w + size_t(n0 + j) * P.row_bytes + size_t(b) * BlockBytes(K), w[j]);
    for (int r = 0; r < R; ++r) {
      const float* x = P.x + size_t(i0 + r) * P.K + b * kBlock;
      for (int j = 0; j < NR; ++j)
        for (int i = 0; i < kBlock; ++i) acc[r][j][i] += x[i] * w[j][i];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NR; ++j) {
      float s = 0.0f;
      for (int i = 0; i < kBlock; ++i) s += acc[r][j][i];
      P.y[size_t(i0 + r) * P.N + n0 + j] = s;
    }
}
#endif

// Many activation rows: a panel of kPanel weight rows is converted once into float32 W^T [K, kPanel]
// (scratch in L1/L2), then every R activation rows multiply it as a float GEMM does: per k, two
// vectors of the panel times x[r, k] broadcast, 2 R accumulators of outputs (no horizontal sums).
constexpr int kPanel = 32;
constexpr int kPanelR = 6;  // activation rows a panel tile (12 accumulators)

template <int32_t K>
void FillPanel(const Product& P, int n0, float* wt) {  // wt [K, kPanel]; rows past N are zeros
  float block[kBlock];
  for (int j = 0; j < kPanel; ++j) {
    if (n0 + j >= P.N) {
      for (int k = 0; k < P.K; ++k) wt[size_t(k) * kPanel + j] = 0.0f;
      continue;
    }
    const uint8_t* row = P.w + size_t(n0 + j) * P.row_bytes;
    for (int b = 0; b < P.blocks; ++b) {
      DequantizeBlock<K>(row + size_t(b) * BlockBytes(K), block);
      for (int i = 0; i < kBlock; ++i) wt[size_t(b * kBlock + i) * kPanel + j] = block[i];
    }
  }
}

template <int R>
void PanelTile(const Product& P, const float* wt, int i0, int n0) {
  float out[R][kPanel];
#if defined(__AVX512F__)
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const float* x = P.x + size_t(i0) * P.K;
  for (int k = 0; k < P.K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(wt + size_t(k) * kPanel), w1 = _mm512_loadu_ps(wt + size_t(k) * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[size_t(r) * P.K + k]);
      acc[r][0] = _mm512_fmadd_ps(xr, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xr, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(out[r], acc[r][0]);
    _mm512_storeu_ps(out[r] + 16, acc[r][1]);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < kPanel; ++j) out[r][j] = 0.0f;
  for (int k = 0; k < P.K; ++k)
    for (int r = 0; r < R; ++r) {
      const float xr = P.x[size_t(i0 + r) * P.K + k];
      for (int j = 0; j < kPanel; ++j) out[r][j] += xr * wt[size_t(k) * kPanel + j];
    }
#endif
  const int n = std::min(kPanel, P.N - n0);
  for (int r = 0; r < R; ++r) std::copy(out[r], out[r] + n, P.y + size_t(i0 + r) * P.N + n0);
}

// Panels [p0, p1) of y for every activation row.
template <int32_t K>
void Panels(const Product& P, int p0, int p1) {
  std::unique_ptr<float[]> wt(new float[size_t(P.K) * kPanel]);
  for (int p = p0; p < p1; ++p) {
    FillPanel<K>(P, p * kPanel, wt.get());
    int i0 = 0;
    for (; i0 + kPanelR <= P.m; i0 += kPanelR) PanelTile<kPanelR>(P, wt.get(), i0, p * kPanel);
    switch (P.m - i0) {
      case 1: PanelTile<1>(P, wt.get(), i0, p * kPanel); break;
      case 2: PanelTile<2>(P, wt.get(), i0, p * kPanel); break;
      case 3: PanelTile<3>(P, wt.get(), i0, p * kPanel); break;
      case 4: PanelTile<4>(P, wt.get(), i0, p * kPanel); break;
      case 5: PanelTile<5>(P, wt.get(), i0, p * kPanel); break;
      default: break;
    }
  }
}

// A tile of `rows` (1 .. kTile / NR) activation rows from i0 and NR weight rows from n0.
constexpr int kTile = 16;  // activation rows x weight rows of a tile, at most (its accumulators)

template <int32_t K, int NR, int R = 1>
void TileOf(const Product& P, int i0, int rows, int n0) {
  if constexpr (R * NR <= kTile) {
    if (rows == R) return Tile<K, R, NR>(P, i0, n0);
    TileOf<K, NR, R + 1>(P, i0, rows, n0);
  }
}

// Rows [n0, n1) of y for every activation row, NR weight rows a tile (what is left over of n1 - n0,
// one a tile) and as many activation rows as kTile allows.
template <int32_t K, int NR>
void RowsBy(const Product& P, int n0, int n1) {
  int n = n0;
  for (; n + NR <= n1; n += NR)
    for (int i0 = 0; i0 < P.m; i0 += kTile / NR) TileOf<K, NR>(P, i0, std::min(kTile / NR, P.m - i0), n);
  for (; n < n1; ++n)
    for (int i0 = 0; i0 < P.m; i0 += kTile) TileOf<K, 1>(P, i0, std::min(kTile, P.m - i0), n);
}

// Rows [n0, n1) of y for every activation row (fewer than kPanelFrom): 8 weight rows a tile for one
// activation row, else 4 (and up to 4 activation rows). Measured on one core of an Intel Xeon
// (2026-12-07, 30 to 1,000 layers of a 1536 x 576 Q4_1 matrix): at 8 activation rows, tiles of 4 x 4
// ran 1.2x faster than 8 x 2 and 1.5x faster than 8 x 1, whose loads of x (one per multiply-add)
// bound them; at 26 rows 1.3x faster than 8 x 2.
template <int32_t K>
void Rows(const Product& P, int n0, int n1) {
  if (P.m == 1) return RowsBy<K, 8>(P, n0, n1);
  RowsBy<K, 4>(P, n0, n1);
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::F32> x,
                ffi::Buffer<ffi::U8> w, int32_t kind, ffi::ResultBuffer<ffi::F32> y) {
  auto bad = [](const std::string& what) { return ffi::Error::InvalidArgument("block matmul: " + what); };
  if (kind < kQ4_0 || kind > kQ8_0) return bad("unknown block kind");
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2) return bad("x must be [m, K]");
  if (wd.size() != 3) return bad("w must be [L, N, row bytes]");
  Product P;
  P.m = int(xd[0]), P.K = int(xd[1]), P.N = int(wd[1]), P.row_bytes = int(wd[2]), P.kind = kind;
  if (P.K % kBlock) return bad("K must be a multiple of 32");
  P.blocks = P.K / kBlock;
  if (int64_t(P.blocks) * BlockBytes(kind) != P.row_bytes) return bad("a row of w must hold K/32 blocks of its kind");
  if (!HasDims(*y, {P.m, P.N})) return bad("y must be [m, N]");
  if (layer.element_count() != 1) return bad("layer must be one int32");
  const int32_t at = layer.typed_data()[0];
  if (at < 0 || at >= wd[0]) return bad("layer index out of range");
  P.x = x.typed_data();
  P.w = w.typed_data() + LayerOffset(wd, at);
  P.y = y->typed_data();
  if (P.m == 0 || P.N == 0) return ffi::Error::Success();

  const int64_t work = std::max(int64_t(P.m) * P.N * P.K, int64_t(8) * P.N * P.row_bytes);
  const int threads = work < kParallelWork ? 1 : int(pool.num_threads());
  if (P.m >= kPanelFrom) {  // a panel an item
    const int panels = (P.N + kPanel - 1) / kPanel;
    auto run = [&P](int i) {
      switch (P.kind) {
        case kQ4_0: return Panels<kQ4_0>(P, i, i + 1);
        case kQ4_1: return Panels<kQ4_1>(P, i, i + 1);
        default: return Panels<kQ8_0>(P, i, i + 1);
      }
    };
    RunItems(pool, panels, threads - 1, run);
    return ffi::Error::Success();
  }
  const int per_item = std::max(8, (P.N / (threads * kItemsPerThread) + 7) / 8 * 8);  // rows, a multiple of any tile's
  const int items = (P.N + per_item - 1) / per_item;
  auto run = [&P, per_item](int i) {
    const int n0 = i * per_item, n1 = std::min(P.N, n0 + per_item);
    switch (P.kind) {
      case kQ4_0: return Rows<kQ4_0>(P, n0, n1);
      case kQ4_1: return Rows<kQ4_1>(P, n0, n1);
      default: return Rows<kQ8_0>(P, n0, n1);
    }
  };
  RunItems(pool, items, threads - 1, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxBlockMatmul, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::U8>>()   // w
                                  .Attr<int32_t>("kind")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y
