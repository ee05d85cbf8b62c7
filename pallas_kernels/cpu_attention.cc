// Decode attention over one packed tier on a CPU: an XLA FFI custom call (kvjax "native" kernels).
//
// The CPU counterpart of decode_attention.py's Pallas kernel. XLA:CPU has no Pallas backend, and
// its fusions of the jnp reference unpack every code twice and run far below memory speed; this
// handler reads each packed word once. Shapes and semantics are those of
// pallas_kernels.decode_attention (letters from its docstring):
//
//   layer                int32 []                           which layer of the [L, ...] arrays below
//   q                    float32 [b, k, g, h]
//   k_codes, v_codes     uint32  [L, b, k, c, h * bits / 32] code d in word d / per, bits (d % per) * bits
//   KIVI keys            k_scale, k_zero [L, b, k, c / G, h] key[s, d] = code * scale[s / G, d] + zero[s / G, d]
//   KIVI values          v_scale, v_zero [L, b, k, c, h / G] value[s, d] = code * scale[s, d / G] + zero[s, d / G]
//   symmetric            k_scale, v_scale [L, b, k, c, 1]    x = (code - 2^(bits-1)) * scale (zeros ignored)
//   valid                bool [b, c]                         slots that take part
//   -> o float32 [b, k, g, h] (unnormalized), m, l float32 [b, k, g]: flash-decoding partials
//
// The layer is an operand so that a decode step's layer scan hands over the cache's whole arrays:
// a slice of them would be copied out for the call, every layer, every step. Scales and zeros may be
// float16, bfloat16 or float32. Work is split into items of (row, kv head, up to kRows of its
// query heads, kBlock slots); items run on XLA's intra-op thread pool and the calling thread, and
// the blocks of one query head are merged here by log-sum-exp. Per slot, the keys' scale is folded into q
// (q * scale . code, once per group of G slots) and the values' scale into the probabilities, so
// codes are only unpacked (shift, mask, convert) and multiplied.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kEmptyMax = -3.4028234663852886e38f;  // decode_attention.EMPTY_MAX
constexpr int kBlock = 512;                            // slots per work item (a multiple of every G used)
constexpr int kMaxHead = 256;
constexpr int kRows = 4;                               // query heads per work item, at most

float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float Bf16ToFloat(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A float16 / bfloat16 / float32 array (scales, zeros), from its first element in this layer.
struct Floats {
  const void* data;
  ffi::DataType type;
};

// n values of `x` from element `start`, as float32.
void ToFloat(const Floats& x, size_t start, int n, float* out) {
  switch (x.type) {
    case ffi::DataType::F32:
      std::memcpy(out, static_cast<const float*>(x.data) + start, n * sizeof(float));
      return;
    case ffi::DataType::F16: {
      const uint16_t* p = static_cast<const uint16_t*>(x.data) + start;
      int i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))));
#endif
      for (; i < n; ++i) out[i] = HalfToFloat(p[i]);
      return;
    }
    default: {  // BF16 (checked before any work)
      const uint16_t* p = static_cast<const uint16_t*>(x.data) + start;
      for (int i = 0; i < n; ++i) out[i] = Bf16ToFloat(p[i]);
      return;
    }
  }
}

// exp(x) for x <= 0 in plain arithmetic the compiler vectorizes (Cephes' expf polynomial, ~2 ulp);
// below -87 (where float32 exp is subnormal or 0) it gives 0.
inline float ExpNonPositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);  // (not the add-and-subtract trick: reassociation folds it)
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, 4);
  return x < -87.0f ? 0.0f : p * two_n;
}

struct Problem {
  int b, k, g, h, c, G;
  bool symmetric;
  float sm_scale;
  const float* q;
  const uint32_t *k_codes, *v_codes;
  Floats k_scale, k_zero, v_scale, v_zero;
  const bool* valid;
  int row_groups;  // ceil(g / kRows): items of kRows query heads (the last may have fewer)
  int blocks;      // blocks of kBlock slots
  std::vector<float> part;  // per item: m [NG], l [NG], o [NG, h] of its NG <= kRows query heads
  int part_size() const { return kRows * (h + 2); }
};

// The h codes of one slot as floats: words [h * B / 32] -> out [h] (h a multiple of 16).
template <int B>
inline void Unpack(const uint32_t* __restrict words, int h, float* __restrict out) {
  constexpr int per = 32 / B;
#if defined(__AVX512F__)
  constexpr int words_per_vector = 16 / per;
  alignas(64) static const int32_t lane_word[16] = {0 / per, 1 / per, 2 / per, 3 / per, 4 / per, 5 / per,
                                                    6 / per, 7 / per, 8 / per, 9 / per, 10 / per, 11 / per,
                                                    12 / per, 13 / per, 14 / per, 15 / per};
  const __m512i which = _mm512_load_si512(lane_word);
  const __m512i shifts = _mm512_mullo_epi32(_mm512_sub_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                                               3, 2, 1, 0),
                                                              _mm512_mullo_epi32(which, _mm512_set1_epi32(per))),
                                            _mm512_set1_epi32(B));
  const __m512i mask = _mm512_set1_epi32((1 << B) - 1);
  for (int v = 0; v < h / 16; ++v) {
    const __m512i w = per == 16 ? _mm512_set1_epi32(int32_t(words[v]))
                                : _mm512_permutexvar_epi32(
                                      which, _mm512_maskz_loadu_epi32(__mmask16((1 << words_per_vector) - 1),
                                                                      words + v * words_per_vector));
    _mm512_storeu_ps(out + 16 * v, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(w, shifts), mask)));
  }
#else
  constexpr uint32_t mask = (1u << B) - 1;
  for (int d = 0; d < h; ++d) out[d] = float((words[d / per] >> ((d % per) * B)) & mask);
#endif
}

// planes[j, t] = x[t * per + j]: n slots' per values, as one row per value.
inline void Deinterleave(const float* __restrict x, int n, int per, float (*__restrict planes)[kBlock]) {
  int t = 0;
#if defined(__AVX512F__)
  const __m512i at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                        _mm512_set1_epi32(per));
  for (; t + 16 <= n; t += 16)
    for (int j = 0; j < per; ++j) _mm512_store_ps(planes[j] + t, _mm512_i32gather_ps(at, x + t * per + j, 4));
#endif
  for (; t < n; ++t)
    for (int j = 0; j < per; ++j) planes[j][t] = x[t * per + j];
}

// acc[r, j] = sum_d weights[r, d] * code d of slot j, for 16 slots: codes [16, kw] (rows past the
// block's end read as zeros: `slots` of them are real).
template <int KB, int NG>
inline void KeyDots(const uint32_t* __restrict codes, int kw, int slots, const float (*__restrict weights)[kMaxHead],
                    float (*__restrict acc)[16]) {
  constexpr int per = 32 / KB;
  constexpr uint32_t mask = (1u << KB) - 1;
#if defined(__AVX512F__)
  __m512 sums[NG];
  for (int r = 0; r < NG; ++r) sums[r] = _mm512_setzero_ps();
  const __m512i m = _mm512_set1_epi32(int32_t(mask));
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(kw));
  const __mmask16 real = __mmask16((1u << slots) - 1);
  for (int w = 0; w < kw; ++w) {
    const __m512i x = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, rows, codes + w, 4);  // word w of each slot
#pragma GCC unroll 16
    for (int e = 0; e < per; ++e) {
      const __m512 code = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, e * KB), m));
      for (int r = 0; r < NG; ++r) sums[r] = _mm512_fmadd_ps(_mm512_set1_ps(weights[r][w * per + e]), code, sums[r]);
    }
  }
  for (int r = 0; r < NG; ++r) _mm512_store_ps(acc[r], sums[r]);
#else
  for (int r = 0; r < NG; ++r) std::fill(acc[r], acc[r] + 16, 0.0f);
  for (int j = 0; j < slots; ++j)
    for (int w = 0; w < kw; ++w)
      for (int e = 0; e < per; ++e)
        for (int r = 0; r < NG; ++r) acc[r][j] += weights[r][w * per + e] * float((codes[j * kw + w] >> (e * KB)) & mask);
#endif
}

// o[r, d] += sum_t pv[r, d / span, t] * code d of slot t, over the n slots of a block (codes [n, vw],
// pv [NG, 8, kBlock]).
template <int VB, int NG>
inline void ValueMix(const uint32_t* __restrict codes, int vw, int n, int h, int span, const float* __restrict pv,
                     float* __restrict o) {
  auto weight = [&](int r, int mg, int t) { return pv[(size_t(r) * 8 + mg) * kBlock + t]; };
  alignas(64) float code[kMaxHead];
#if defined(__AVX512F__)
  if (h % 64 == 0) {
    for (int d0 = 0; d0 < h; d0 += 64) {  // 64 channels at a time: NG x 4 accumulators stay in registers
      __m512 sums[NG][4];
      for (int r = 0; r < NG; ++r)
        for (int v = 0; v < 4; ++v) sums[r][v] = _mm512_setzero_ps();
      for (int t = 0; t < n; ++t) {
        Unpack<VB>(codes + size_t(t) * vw + d0 * VB / 32, 64, code);
        for (int v = 0; v < 4; ++v) {
          const __m512 x = _mm512_load_ps(code + 16 * v);
          const int mg = (d0 + 16 * v) / span;
          for (int r = 0; r < NG; ++r) sums[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(weight(r, mg, t)), x, sums[r][v]);
        }
      }
      for (int r = 0; r < NG; ++r)
        for (int v = 0; v < 4; ++v)
          _mm512_storeu_ps(o + r * h + d0 + 16 * v, _mm512_add_ps(_mm512_loadu_ps(o + r * h + d0 + 16 * v), sums[r][v]));
    }
    return;
  }
#endif
  for (int t = 0; t < n; ++t) {
    Unpack<VB>(codes + size_t(t) * vw, h, code);
    for (int r = 0; r < NG; ++r)
      for (int d = 0; d < h; ++d) o[r * h + d] += weight(r, d / span, t) * code[d];
  }
}

// Partials of NG query heads (q0..q0 + NG - 1) of (row, head) over slots
// [s0, s1) into `out` (m [NG], l [NG], o [NG, h]).
//   keys: vectorized along slots. Word w of 16 consecutive slots is one gather, so code d of
//         all 16 is one shift and mask; q * scale of the slots' group multiplies it (no per-slot
//         horizontal sums).
//   values: vectorized along channels; each slot's codes are unpacked once, and p * scale
//         (one number per slot, row and channel group) multiplies them.
template <int KB, int VB, int NG>
void Item(const Problem& P, int row, int head, int q0, int s0, int s1, float* __restrict out) {
  const int h = P.h, G = P.G, c = P.c, n = s1 - s0, n16 = (n + 15) / 16 * 16;
  const int kw = h * KB / 32, vw = h * VB / 32;
  const size_t bh = size_t(row) * P.k + head;
  const bool* valid = P.valid + size_t(row) * c;
  float* m = out;
  float* l = out + NG;
  float* o = out + 2 * NG;
  std::fill(out, out + NG * (h + 2), 0.0f);
  for (int r = 0; r < NG; ++r) m[r] = kEmptyMax;
  bool any = false;
  for (int t = s0; t < s1 && !any; ++t) any = valid[t];
  if (!any) return;

  alignas(64) float q[NG][kMaxHead], qs[NG][kMaxHead], qz[NG], qsum[NG] = {}, scale[kMaxHead], zero[kMaxHead];
  alignas(64) float scores[NG][kBlock];
  alignas(64) bool keep[kBlock];
  for (int r = 0; r < NG; ++r) {
    const float* src = P.q + (bh * P.g + q0 + r) * h;
    std::copy(src, src + h, q[r]);
    for (int d = 0; d < h; ++d) qsum[r] += q[r][d];
  }
  for (int t = 0; t < n16; ++t) keep[t] = t < n && valid[s0 + t];
  const uint32_t* kc = P.k_codes + (bh * c + s0) * kw;

  // keys: scores[r, t] = q_r . key_t * sm_scale, 16 slots at a time; a group of G slots folds its
  // per-channel scale and zero into q (qs = q * scale, qz = q . zero), and where G < 16 (or 16 does
  // not divide G) the 16 slots are scored once per group they touch
  alignas(64) float acc[NG][16];
  int folded = -1;  // the group qs, qz hold
  for (int r = 0; r < NG; ++r) std::fill(scores[r] + n, scores[r] + n16, kEmptyMax);  // past the block's end
  for (int t0 = 0; t0 < n16; t0 += 16) {
    const int lanes = std::min(16, n - t0);
    if (P.symmetric) {
      KeyDots<KB, NG>(kc + size_t(t0) * kw, kw, lanes, q, acc);
      alignas(64) float s[16] = {};
      ToFloat(P.k_scale, bh * c + s0 + t0, lanes, s);
      for (int r = 0; r < NG; ++r)
        for (int j = 0; j < lanes; ++j) {
          const float x = (acc[r][j] - float(1 << (KB - 1)) * qsum[r]) * s[j] * P.sm_scale;
          scores[r][t0 + j] = keep[t0 + j] ? x : kEmptyMax;
        }
      continue;
    }
    for (int group = (s0 + t0) / G; group * G < s0 + t0 + lanes; ++group) {
      if (group != folded) {
        folded = group;
        const size_t at = (bh * (c / G) + group) * h;
        ToFloat(P.k_scale, at, h, scale);
        ToFloat(P.k_zero, at, h, zero);
        for (int r = 0; r < NG; ++r) {
          float z = 0.0f;
          for (int d = 0; d < h; ++d) {
            qs[r][d] = q[r][d] * scale[d];
            z += q[r][d] * zero[d];
          }
          qz[r] = z;
        }
      }
      KeyDots<KB, NG>(kc + size_t(t0) * kw, kw, lanes, qs, acc);
      const int j0 = std::max(0, group * G - s0 - t0), j1 = std::min(lanes, (group + 1) * G - s0 - t0);
      for (int r = 0; r < NG; ++r)
        for (int j = j0; j < j1; ++j) scores[r][t0 + j] = keep[t0 + j] ? (acc[r][j] + qz[r]) * P.sm_scale : kEmptyMax;
    }
  }
  // softmax numerators: p = exp(s - m), which is 0 on empty slots (s = EMPTY_MAX, far below m)
  for (int r = 0; r < NG; ++r) {
    float mx = kEmptyMax;
    for (int t = 0; t < n16; ++t) mx = std::max(mx, scores[r][t]);
    float sum = 0.0f;
    for (int t = 0; t < n16; ++t) {
      const float p = ExpNonPositive(std::min(scores[r][t] - mx, 0.0f));
      scores[r][t] = p;
      sum += p;
    }
    m[r] = mx;
    l[r] = sum;
  }
  // values: o[r, d] = sum_t p[r, t] (code[t, d] * scale[t, d / G] + zero[t, d / G])
  const int per_slot = P.symmetric ? 1 : h / G;  // <= 8 (checked)
  alignas(64) float side[kBlock * 8], vscale[8][kBlock], vzero[8][kBlock], pv[NG][8][kBlock];
  ToFloat(P.v_scale, (bh * c + s0) * per_slot, n * per_slot, side);
  Deinterleave(side, n, per_slot, vscale);
  if (!P.symmetric) {
    ToFloat(P.v_zero, (bh * c + s0) * per_slot, n * per_slot, side);
    Deinterleave(side, n, per_slot, vzero);
  }
  float oz[NG][8] = {};
  for (int r = 0; r < NG; ++r)
    for (int mg = 0; mg < per_slot; ++mg) {
      float z = 0.0f;
      for (int t = 0; t < n; ++t) {
        pv[r][mg][t] = scores[r][t] * vscale[mg][t];
        z += P.symmetric ? pv[r][mg][t] : scores[r][t] * vzero[mg][t];
      }
      oz[r][mg] = z;
    }
  ValueMix<VB, NG>(P.v_codes + (bh * c + s0) * vw, vw, n, h, P.symmetric ? h : G, &pv[0][0][0], o);
  for (int r = 0; r < NG; ++r)
    for (int d = 0; d < h; ++d)
      o[r * h + d] += P.symmetric ? -float(1 << (VB - 1)) * oz[r][0] : oz[r][d / G];
}

using ItemFn = void (*)(const Problem&, int, int, int, int, int, float*);

template <int KB, int NG>
ItemFn PickValues(int vb) {
  switch (vb) {
    case 2: return Item<KB, 2, NG>;
    case 4: return Item<KB, 4, NG>;
    default: return Item<KB, 8, NG>;
  }
}

template <int NG>
ItemFn PickKeys(int kb, int vb) {
  switch (kb) {
    case 2: return PickValues<2, NG>(vb);
    case 4: return PickValues<4, NG>(vb);
    default: return PickValues<8, NG>(vb);
  }
}

// The item function for `rows` (1 to kRows) query heads at these widths.
ItemFn Pick(int rows, int kb, int vb) {
  switch (rows) {
    case 1: return PickKeys<1>(kb, vb);
    case 2: return PickKeys<2>(kb, vb);
    case 3: return PickKeys<3>(kb, vb);
    default: return PickKeys<4>(kb, vb);
  }
}

// Runs items [0, total) on the pool's threads and this one; returns when all are done. Helpers that
// start after the work is gone return at once (the shared state outlives this call).
// Runs items [0, total) on the pool's threads and this one; returns when all are done. Helpers that
// start after the work is gone return at once (the shared state outlives this call).
struct Work {
  std::atomic<int> next{0};
  int total = 0;
  int done = 0;
  std::mutex mu;
  std::condition_variable cv;
  Problem* problem = nullptr;
  ItemFn fn[kRows] = {};  // by query heads in the item
  void Run() {
    int ran = 0;
    for (int i; (i = next.fetch_add(1)) < total; ++ran) {
      Problem& P = *problem;
      const int block = i % P.blocks, rest = i / P.blocks;  // item = ((row * k + head) * row_groups + rg) * blocks + block
      const int rg = rest % P.row_groups, bh = rest / P.row_groups;
      const int s0 = block * kBlock, s1 = std::min(P.c, s0 + kBlock);
      const int q0 = rg * kRows, rows = std::min(kRows, P.g - q0);
      fn[rows - 1](P, bh / P.k, bh % P.k, q0, s0, s1, P.part.data() + size_t(i) * P.part_size());
    }
    if (ran) {
      std::lock_guard<std::mutex> lock(mu);
      done += ran;
      if (done == total) cv.notify_all();
    }
  }
};

// Layer `layer` of a [L, ...] array: the element offset of its first element.
template <typename Dims>
size_t LayerOffset(const Dims& dims, int32_t layer) {
  size_t per_layer = 1;
  for (size_t i = 1; i < dims.size(); ++i) per_layer *= size_t(dims[i]);
  return per_layer * size_t(layer);
}

Floats LayerOf(const ffi::AnyBuffer& x, int32_t layer) {
  const size_t offset = LayerOffset(x.dimensions(), layer) * ffi::ByteWidth(x.element_type());
  return {static_cast<const char*>(x.untyped_data()) + offset, x.element_type()};
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layer_index, ffi::Buffer<ffi::F32> q,
                ffi::Buffer<ffi::U32> k_codes, ffi::AnyBuffer k_scale, ffi::AnyBuffer k_zero,
                ffi::Buffer<ffi::U32> v_codes, ffi::AnyBuffer v_scale, ffi::AnyBuffer v_zero,
                ffi::Buffer<ffi::PRED> valid, int32_t key_bits, int32_t value_bits, int32_t group_size,
                int32_t symmetric, float sm_scale, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> m,
                ffi::ResultBuffer<ffi::F32> l) {
  auto qd = q.dimensions();
  auto cd = k_codes.dimensions();
  if (qd.size() != 4 || cd.size() != 5) return ffi::Error::InvalidArgument("q must be rank 4 and codes rank 5");
  for (const ffi::AnyBuffer* s : {&k_scale, &k_zero, &v_scale, &v_zero}) {
    auto t = s->element_type();
    if (t != ffi::DataType::F32 && t != ffi::DataType::F16 && t != ffi::DataType::BF16)
      return ffi::Error::InvalidArgument("scales and zeros must be float16, bfloat16 or float32");
  }
  auto ok_bits = [](int b) { return b == 2 || b == 4 || b == 8; };
  if (!ok_bits(key_bits) || !ok_bits(value_bits)) return ffi::Error::InvalidArgument("bits must be 2, 4 or 8");
  const int32_t layer = layer_index.typed_data()[0];
  if (layer < 0 || layer >= cd[0]) return ffi::Error::InvalidArgument("layer index out of range");
  Problem P;
  P.b = int(qd[0]), P.k = int(qd[1]), P.g = int(qd[2]), P.h = int(qd[3]), P.c = int(cd[3]);
  P.G = group_size, P.symmetric = symmetric != 0;
  P.sm_scale = sm_scale;
  if (P.h > kMaxHead || P.h % 16 || (!P.symmetric && (P.G <= 0 || P.h % P.G || P.h / P.G > 8)))
    return ffi::Error::InvalidArgument("unsupported head dim or group size");
  P.q = q.typed_data();
  P.k_codes = k_codes.typed_data() + LayerOffset(cd, layer);
  P.v_codes = v_codes.typed_data() + LayerOffset(v_codes.dimensions(), layer);
  P.k_scale = LayerOf(k_scale, layer), P.k_zero = LayerOf(k_zero, layer);
  P.v_scale = LayerOf(v_scale, layer), P.v_zero = LayerOf(v_zero, layer);
  P.valid = valid.typed_data();
  P.row_groups = (P.g + kRows - 1) / kRows;
  P.blocks = (P.c + kBlock - 1) / kBlock;
  const int heads = P.b * P.k, total = heads * P.row_groups * P.blocks;
  P.part.assign(size_t(total) * P.part_size(), 0.0f);
  if (total) {
    auto work = std::make_shared<Work>();
    work->total = total, work->problem = &P;
    for (int rows = 1; rows <= kRows; ++rows) work->fn[rows - 1] = Pick(rows, key_bits, value_bits);
    const int helpers = int(std::min<int64_t>(pool.num_threads(), total - 1));
    for (int i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
    work->Run();
    std::unique_lock<std::mutex> lock(work->mu);
    work->cv.wait(lock, [&] { return work->done == work->total; });
  }
  // merge the blocks of each query head
  const int g = P.g, h = P.h;
  float *od = o->typed_data(), *md = m->typed_data(), *ld = l->typed_data();
  for (int bh = 0; bh < heads; ++bh) {
    for (int i = 0; i < g; ++i) {
      const int rg = i / kRows, r = i % kRows, ng = std::min(kRows, g - rg * kRows);
      auto part = [&](int blk) { return P.part.data() + size_t((bh * P.row_groups + rg) * P.blocks + blk) * P.part_size(); };
      float mx = kEmptyMax;
      for (int blk = 0; blk < P.blocks; ++blk) mx = std::max(mx, part(blk)[r]);
      float sum = 0.0f;
      float* oi = od + (size_t(bh) * g + i) * h;
      std::fill(oi, oi + h, 0.0f);
      for (int blk = 0; blk < P.blocks; ++blk) {
        const float* pt = part(blk);
        if (pt[ng + r] == 0.0f) continue;  // no valid slot in this block
        const float w = std::exp(pt[r] - mx);
        sum += w * pt[ng + r];
        for (int d = 0; d < h; ++d) oi[d] += w * pt[2 * ng + r * h + d];
      }
      md[size_t(bh) * g + i] = mx;
      ld[size_t(bh) * g + i] = sum;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxPackedAttention, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer index (a scalar)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::U32>>()   // k_codes
                                  .Arg<ffi::AnyBuffer>()          // k_scale
                                  .Arg<ffi::AnyBuffer>()          // k_zero
                                  .Arg<ffi::Buffer<ffi::U32>>()   // v_codes
                                  .Arg<ffi::AnyBuffer>()          // v_scale
                                  .Arg<ffi::AnyBuffer>()          // v_zero
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid
                                  .Attr<int32_t>("key_bits")
                                  .Attr<int32_t>("value_bits")
                                  .Attr<int32_t>("group_size")
                                  .Attr<int32_t>("symmetric")
                                  .Attr<float>("sm_scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>()   // m
                                  .Ret<ffi::Buffer<ffi::F32>>()); // l
