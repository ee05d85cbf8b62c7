// Decode attention over one layer of a KV cache on a CPU: an XLA FFI custom call (kvjax "native" kernels).
//
// The CPU counterpart of decode_attention.py's Pallas kernel. XLA:CPU has no Pallas backend, and
// its fusions of the jnp reference unpack every code twice and run far below memory speed, and each
// small XLA op of a decode step costs a microsecond or more; this handler reads each packed word
// once and attends over every part of a layer's cache in one call. Letters as in
// pallas_kernels.decode_attention:
//
//   layers               int32 [P]                          per part, which entry of its [L, ...] arrays
//   q                    float32 [b, k, g, h]
//   then 8 operands per part (P parts), in this order:
//   keys                 uint32 [L, b, k, c, h * kb / 32]    codes: code d in word d / per, bits (d % per) * kb
//                        or float [L, b, k, c, h]            kb = 16: keys stored as float16/bfloat16/float32
//   key_scale, key_zero  KIVI [L, b, k, c / G, h]           key[s, d] = code * scale[s / G, d] + zero[s / G, d]
//                        symmetric [L, b, k, c, 1]          x = (code - 2^(bits-1)) * scale (zero not read)
//   values               uint32 [L, b, k, c', h * vb / 32] or float [L, b, k, c', h] (vb = 16)
//   value_scale, value_zero  KIVI [L, b, k, c', h / G]       value[s, d] = code * scale[s, d / G] + zero[s, d / G]
//                        symmetric [L, b, k, c', 1]
//   valid                bool [b, c]                        key slots that take part
//   value_offset         int32 [b]                          key slot j's value is value slot value_offset + j
//   (operands a part does not read, such as a float side's scales, may be any array)
//   attributes: key_bits, value_bits, symmetric (int32 [P]), group_size, sm_scale
//   -> o float32 [b, k, g, h] (unnormalized), m, l float32 [b, k, g]: flash-decoding partials of
//      the union of the parts
//
// kvjax's tiered cache passes its sink and window (float keys and values), this step's token, each
// tier's packed slots and a KIVI tier's stage (float keys, packed values at the stage's slots): one
// call per layer; fp16's cache is one float part and the token. The layers are operands so that a
// decode step's layer scan hands over the cache's whole arrays: a slice of them would be copied out
// for the call, every layer, every step. Work is split into items of (row, kv head, up to kRows of
// its query heads, kBlock slots of one part); items run on the calling thread and, for calls with
// enough slots, on one helper per other thread of XLA's intra-op pool, and are merged here by
// log-sum-exp. Per slot, the keys' scale is folded into q (q * scale . code, once per group of G
// slots) and the values' scale into the probabilities, so codes are only unpacked and multiplied.
//
// The AVX-512 build (the portable one keeps plain loops) does every multiply-add of a query head
// once per 16 lanes, with all of an item's query heads sharing each unpacked or converted vector:
//   packed keys    along slots: word w of 16 slots from four loads and eight shuffles per four
//                  words; a 2- or 4-bit code becomes a float by one vpermps from a 16-entry table
//                  (a shift per code, per two codes at 2 bits), 8-bit codes by mask and convert
//   packed values  along channels: a slot's codes of 16 channels by a shift and a lookup (4 bits in
//                  groups of 32 channels: 32 per load); weights p * scale per slot and group
//   float keys     16 slots converted once (F16C for float16), 16 dot products per query head as
//                  16 chains, summed across lanes by one shuffle tree
//   float values   along channels, NG x 4 accumulators in registers, one conversion per slot
// Measured on a 2-core AMD EPYC (Zen 4: one 512-bit multiply-add per cycle and core; BENCHMARKS.md,
// pallas_kernels.cpu_bench): a kivi2 slot and kv head (3 query heads, h = 64) takes ~34 cycles on
// one core with the data in cache, of which 24 are its vector multiply-adds (keys and values each
// ~12, at the multiply-add bound) and ~10 the rest (folding scales, softmax, weights); over 30
// layers on two cores that is ~50% of the machine's multiply-add rate. The float16 part reads at
// ~80% of the copy bandwidth there, and at 58-77% on a 2-core Intel Xeon (with its lines fetched
// ahead: Ahead, below). BENCHMARKS.md has the runs.

#include <string>
#include <vector>

#include "cpu_kernels.h"  // (xla/ffi/api/ffi.h, float conversions, exp, RunItems)

namespace {

constexpr int kBlock = 512;                            // slots per work item (a multiple of every G used)
constexpr int kMaxHead = 256;
constexpr int kRows = 4;                               // query heads per work item, at most
// Below this many key slots x kv heads x rows a call runs on its own thread: waking the pool's threads
// cost more than they saved at 1k slots, batch 1, 3 kv heads (~3.5k; 2-core AMD EPYC, 30 layers:
// kivi2 1.17 ms inline, 1.94 with the pool; from 4k slots up the pool gains).
constexpr int64_t kParallelSlots = 8192;
constexpr int kKeysAhead = 2048;  // keys' bytes fetched ahead of their use

constexpr int kFloats = 16;  // a side's "width" when it is stored as floats, not codes

struct Problem;
struct Part;
using ItemFn = void (*)(const Problem&, const Part&, int row, int head, int q0, int s0, int s1, float* out);

// One part of a layer's cache, its arrays from their first element in this layer.
struct Part {
  int kb, vb;                  // key / value widths: 2, 4, 8 (codes) or kFloats
  bool symmetric;              // the codes' form: symmetric or KIVI
  int kc, vc;                  // slots of the key arrays / of the value arrays
  const uint32_t *k_codes = nullptr, *v_codes = nullptr;
  Floats keys{}, k_scale{}, k_zero{}, values{}, v_scale{}, v_zero{};  // keys, values: float sides
  const bool* valid;           // [b, kc]
  const int32_t* value_offset; // [b]
  int first_block, blocks;     // its blocks of kBlock key slots, numbered across the parts
  ItemFn fn[kRows];            // by query heads in the item
};

struct Problem {
  int b, k, g, h, G;
  float sm_scale;
  const float* q;
  std::vector<Part> parts;
  std::vector<int> part_of_block;
  int row_groups;  // ceil(g / kRows): items of kRows query heads (the last may have fewer)
  int blocks;      // blocks of all parts
  std::vector<float> out;  // per item: m [NG], l [NG], o [NG, h] of its NG <= kRows query heads
  int part_size() const { return kRows * (h + 2); }
};

// Lines fetched while the keys of 16 slots are scored: a float part's keys kKeysAhead bytes ahead of
// their use, and the values of those slots (codes, scales and zeros, or floats), so that the value
// pass finds them in the cache; nothing past the block. Measured over 30 layers of 8k slots: kivi2
// ~5% faster with its packed values fetched (AMD EPYC); the float16 part 1.2-1.4x faster with both
// (Intel Xeon: without them the hardware fetched at 45-52% of the copy rate, with them at 58-77%).
struct Ahead {
  struct Array {
    const char* first;  // the block's first slot
    size_t per_slot;    // bytes a slot
    size_t skip;        // bytes fetched ahead of the slots scored
    size_t end;         // the block's bytes: nothing at or past them is fetched
  };
  Array arrays[4];
  int count = 0;
  void Add(const void* first, size_t per_slot, int slots, size_t skip = 0) {
    arrays[count++] = {static_cast<const char*>(first), per_slot, skip, size_t(slots) * per_slot};
  }
  void Fetch(int t0, int slots) const {
    for (int a = 0; a < count; ++a) {
      const Array& x = arrays[a];
      const size_t end = std::min(x.end, size_t(t0 + slots) * x.per_slot + x.skip);
      for (size_t off = size_t(t0) * x.per_slot + x.skip; off < end; off += 64) FetchLine<false>(x.first + off);
    }
  }
};

#if defined(__AVX512F__)
// Vector helpers of the AVX-512 build.

inline __m512i LaneIndex() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }

// float(i & mask) for i in 0..15: `_mm512_permutexvar_ps(x, table)` reads the low 4 bits of each
// lane of x, so a code of B <= 4 bits in a lane's low bits becomes a float in one instruction
// (instead of mask and convert), whatever lies above it. kHigh2 reads the second 2-bit code.
alignas(64) constexpr float kLow2[16] = {0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3};
alignas(64) constexpr float kHigh2[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
alignas(64) constexpr float kLow4[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Sixteen floats from element i of a float32 / float16 / bfloat16 array.
struct LoadF32 {
  const float* p;
  __m512 operator()(size_t i) const { return _mm512_loadu_ps(p + i); }
};
struct LoadF16 {
  const uint16_t* p;
  __m512 operator()(size_t i) const {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
  }
};
struct LoadBF16 {
  const uint16_t* p;
  __m512 operator()(size_t i) const {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))), 16));
  }
};

// f(load) with the loader of x's type, from element `first`.
template <class F>
inline void WithLoader(const Floats& x, size_t first, F&& f) {
  switch (x.type) {
    case ffi::DataType::F32: return f(LoadF32{static_cast<const float*>(x.data) + first});
    case ffi::DataType::F16: return f(LoadF16{static_cast<const uint16_t*>(x.data) + first});
    default: return f(LoadBF16{static_cast<const uint16_t*>(x.data) + first});
  }
}

// out[j] = the sum of v[j]'s 16 lanes, for 16 vectors: a tree of 15 adds and 30 shuffles.
inline __m512 Reduce16(const __m512 (&v)[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i] at 0 and 2, v[2i + 1] at 1 and 3
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: v[4i .. 4i + 3], one partial sum each
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes: v[8i ..] from lanes 0+1, 2+3, then v[8i + 4 ..] likewise
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The bits of keep[0 .. 16) as a mask.
inline __mmask16 KeepMask(const bool* keep) {
  return _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep)), _mm_set1_epi8(1));
}

// scores[r, t] = q_r . key_t * sm_scale for n float key slots (kept ones; EMPTY_MAX elsewhere). Per
// 16 slots: each key converted once into a small buffer, then per query head 16 dot products of h / 16
// vectors each, summed across lanes by one Reduce16.
template <int NG, class Load>
void FloatKeyScoresV(Load load, int n, int h, const float (*__restrict q)[kMaxHead], const bool* __restrict keep,
                     float sm_scale, float (*__restrict scores)[kBlock], const Ahead& ahead) {
  alignas(64) float key[16][kMaxHead];
  const int chunks = h / 16;
  const __m512 empty = _mm512_set1_ps(kEmptyMax), scale = _mm512_set1_ps(sm_scale);
  for (int t0 = 0; t0 < n; t0 += 16) {
    const int lanes = std::min(16, n - t0);
    ahead.Fetch(t0, lanes);
    const __mmask16 kept = KeepMask(keep + t0);  // (false past the block's end)
    if (!kept) {
      for (int r = 0; r < NG; ++r) _mm512_store_ps(scores[r] + t0, empty);
      continue;
    }
    for (int j = 0; j < 16; ++j)  // (an empty slot may hold NaN: its dot product is replaced below)
      for (int c = 0; c < chunks; ++c)
        _mm512_store_ps(key[j] + 16 * c, j < lanes ? load(size_t(t0 + j) * h + 16 * c) : _mm512_setzero_ps());
    for (int r = 0; r < NG; ++r) {
      __m512 dots[16];  // 16 independent chains of multiply-adds
      const __m512 q0 = _mm512_load_ps(q[r]);
      for (int j = 0; j < 16; ++j) dots[j] = _mm512_mul_ps(q0, _mm512_load_ps(key[j]));
      for (int c = 1; c < chunks; ++c) {
        const __m512 qc = _mm512_load_ps(q[r] + 16 * c);
        for (int j = 0; j < 16; ++j) dots[j] = _mm512_fmadd_ps(qc, _mm512_load_ps(key[j] + 16 * c), dots[j]);
      }
      _mm512_store_ps(scores[r] + t0, _mm512_mask_blend_ps(kept, empty, _mm512_mul_ps(Reduce16(dots), scale)));
    }
  }
}

// o[r, d0 + d] += sum_t p[r, t] * value_t[d0 + d] for d < 16 * CS, over the kept of n float value slots:
// NG x CS accumulators in registers, one conversion per slot and vector.
template <int NG, int CS, class Load>
void FloatValueMixV(Load load, int n, int h, int d0, const bool* __restrict keep, const float (*__restrict p)[kBlock],
                    float* __restrict o) {
  __m512 acc[NG][CS];
  for (int r = 0; r < NG; ++r)
    for (int c = 0; c < CS; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int t = 0; t < n; ++t) {
    if (!keep[t]) continue;  // (not multiplied by p = 0: the slot may hold NaN)
    for (int c = 0; c < CS; ++c) {
      const __m512 x = load(size_t(t) * h + d0 + 16 * c);
      for (int r = 0; r < NG; ++r) acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[r][t]), x, acc[r][c]);
    }
  }
  for (int r = 0; r < NG; ++r)
    for (int c = 0; c < CS; ++c) {
      float* at = o + r * h + d0 + 16 * c;
      _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), acc[r][c]));
    }
}

// Codes d0 .. d0 + 15 of one slot (its words) as floats.
template <int B>
inline __m512 Codes16(const uint32_t* __restrict words, int d0) {
  if constexpr (B == 2) {  // one word: lane i shifted by 2i, then looked up
    const __m512i shifts = _mm512_slli_epi32(LaneIndex(), 1);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi32(int32_t(words[d0 / 16])), shifts),
                                 _mm512_load_ps(kLow2));
  } else if constexpr (B == 4) {  // two words: lane i takes word i / 8, shifted by 4 (i % 8)
    const __m512i lane = LaneIndex();
    const __m512i pair = _mm512_set1_epi64(int64_t(words[d0 / 8]) | int64_t(words[d0 / 8 + 1]) << 32);
    const __m512i x = _mm512_permutexvar_epi32(_mm512_srli_epi32(lane, 3), pair);
    return _mm512_permutexvar_ps(
        _mm512_srlv_epi32(x, _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 2)), _mm512_load_ps(kLow4));
  } else {  // four words: one byte per code
    return _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + d0 / 4))));
  }
}

// o[r, d] += sum_t pv[r, d / span, t] * code d of slot t over the n slots of a block (codes [n, vw],
// pv [NG, 8, kBlock]; span a multiple of 16: each vector of 16 channels in one group), 64 channels
// at a time: NG x 4 accumulators stay in registers.
template <int VB, int NG, int CS>
void ValueMixV(const uint32_t* __restrict codes, int vw, int n, int h, int d0, int span, const float* __restrict pv,
               float* __restrict o) {
  __m512 acc[NG][CS];
  for (int r = 0; r < NG; ++r)
    for (int c = 0; c < CS; ++c) acc[r][c] = _mm512_setzero_ps();
  int group[CS];
  for (int c = 0; c < CS; ++c) group[c] = (d0 + 16 * c) / span;
  for (int t = 0; t < n; ++t) {
    const uint32_t* words = codes + size_t(t) * vw;
    for (int c = 0; c < CS; ++c) {
      const __m512 x = Codes16<VB>(words, d0 + 16 * c);
      for (int r = 0; r < NG; ++r)
        acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(pv[(size_t(r) * 8 + group[c]) * kBlock + t]), x, acc[r][c]);
    }
  }
  for (int r = 0; r < NG; ++r)
    for (int c = 0; c < CS; ++c) {
      float* at = o + r * h + d0 + 16 * c;
      _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), acc[r][c]));
    }
}

// pv[r, g, t] = p[r, t] * scale[t, g] and oz[r, g] = sum_t p[r, t] * zero[t, g] for the n slots of a
// block with two value groups per slot, scales and zeros float16 [n, 2] (KIVI at h = 2 G): 16 slots'
// 32 halves per load, split into the two groups by two shuffles, in one pass (p is 0 past n).
template <int NG>
inline void WeighPairs(const uint16_t* __restrict scale, const uint16_t* __restrict zero, int n,
                       const float (*__restrict p)[kBlock], float (*__restrict pv)[8][kBlock], float (*__restrict oz)[8]) {
  const __m512i even = _mm512_slli_epi32(LaneIndex(), 1), odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  __m512 z[NG][2];
  for (int r = 0; r < NG; ++r) z[r][0] = z[r][1] = _mm512_setzero_ps();
  auto pair = [&](const uint16_t* x, int t, __mmask32 m, __m512& g0, __m512& g1) {
    const __m512i raw = _mm512_maskz_loadu_epi16(m, x + 2 * t);
    const __m512 a = _mm512_cvtph_ps(_mm512_castsi512_si256(raw)), b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(raw, 1));
    g0 = _mm512_permutex2var_ps(a, even, b);
    g1 = _mm512_permutex2var_ps(a, odd, b);
  };
  for (int t = 0; t < n; t += 16) {
    const int lanes = std::min(16, n - t);
    const __mmask32 m = lanes == 16 ? ~__mmask32(0) : __mmask32((1u << (2 * lanes)) - 1);
    __m512 s0, s1, z0, z1;
    pair(scale, t, m, s0, s1);
    pair(zero, t, m, z0, z1);
    for (int r = 0; r < NG; ++r) {
      const __m512 pr = _mm512_load_ps(p[r] + t);
      _mm512_store_ps(pv[r][0] + t, _mm512_mul_ps(pr, s0));
      _mm512_store_ps(pv[r][1] + t, _mm512_mul_ps(pr, s1));
      z[r][0] = _mm512_fmadd_ps(pr, z0, z[r][0]);
      z[r][1] = _mm512_fmadd_ps(pr, z1, z[r][1]);
    }
  }
  for (int r = 0; r < NG; ++r) oz[r][0] = _mm512_reduce_add_ps(z[r][0]), oz[r][1] = _mm512_reduce_add_ps(z[r][1]);
}

// ValueMixV for 4-bit codes and groups of a multiple of 32 channels, 32 channels per load: 16 bytes
// widened to 16 lanes, whose low nibbles (even channels) and high nibbles (odd channels) are each
// one lookup; the even and odd sums are interleaved back at the end. SC: 32-channel pieces, 1 or 2.
template <int NG, int SC>
void ValueMix4V(const uint32_t* __restrict codes, int vw, int n, int h, int d0, int span, const float* __restrict pv,
                float* __restrict o) {
  __m512 even[NG][SC], odd[NG][SC];
  for (int r = 0; r < NG; ++r)
    for (int c = 0; c < SC; ++c) even[r][c] = odd[r][c] = _mm512_setzero_ps();
  int group[SC];
  for (int c = 0; c < SC; ++c) group[c] = (d0 + 32 * c) / span;
  const __m512 table = _mm512_load_ps(kLow4);
  for (int t = 0; t < n; ++t) {
    const uint32_t* words = codes + size_t(t) * vw + d0 / 8;
    for (int c = 0; c < SC; ++c) {
      const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + 4 * c)));
      const __m512 lo = _mm512_permutexvar_ps(x, table), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), table);
      for (int r = 0; r < NG; ++r) {
        const __m512 w = _mm512_set1_ps(pv[(size_t(r) * 8 + group[c]) * kBlock + t]);
        even[r][c] = _mm512_fmadd_ps(w, lo, even[r][c]);
        odd[r][c] = _mm512_fmadd_ps(w, hi, odd[r][c]);
      }
    }
  }
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int r = 0; r < NG; ++r)
    for (int c = 0; c < SC; ++c) {
      float* at = o + r * h + d0 + 32 * c;
      _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), _mm512_permutex2var_ps(even[r][c], first, odd[r][c])));
      _mm512_storeu_ps(at + 16,
                       _mm512_add_ps(_mm512_loadu_ps(at + 16), _mm512_permutex2var_ps(even[r][c], second, odd[r][c])));
    }
}
#endif  // __AVX512F__

// The h codes of one slot as floats: words [h * B / 32] -> out [h].
template <int B>
inline void Unpack(const uint32_t* __restrict words, int h, float* __restrict out) {
  constexpr int per = 32 / B;
  constexpr uint32_t mask = (1u << B) - 1;
  for (int w = 0; w < h / per; ++w)
    for (int e = 0; e < per; ++e) out[w * per + e] = float((words[w] >> (e * B)) & mask);
}

// planes[j, t] = x[t * per + j]: n slots' per values, as one row per value.
inline void Deinterleave(const float* __restrict x, int n, int per, float (*__restrict planes)[kBlock]) {
  int t = 0;
#if defined(__AVX512F__)
  if (per == 1) {
    std::copy(x, x + n, planes[0]);
    return;
  }
  if (per == 2) {  // even and odd elements of 32: two two-source shuffles
    const __m512i even = _mm512_slli_epi32(LaneIndex(), 1), odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (; t + 16 <= n; t += 16) {
      const __m512 a = _mm512_loadu_ps(x + 2 * t), b = _mm512_loadu_ps(x + 2 * t + 16);
      _mm512_store_ps(planes[0] + t, _mm512_permutex2var_ps(a, even, b));
      _mm512_store_ps(planes[1] + t, _mm512_permutex2var_ps(a, odd, b));
    }
  }
  const __m512i at = _mm512_mullo_epi32(LaneIndex(), _mm512_set1_epi32(per));
  for (; t + 16 <= n; t += 16)
    for (int j = 0; j < per; ++j) _mm512_store_ps(planes[j] + t, _mm512_i32gather_ps(at, x + t * per + j, 4));
#endif
  for (; t < n; ++t)
    for (int j = 0; j < per; ++j) planes[j][t] = x[t * per + j];
}

#if defined(__AVX512F__)
// x[i] = word w0 + i of each of 16 slots (codes [16, kw], kw a multiple of 4): four vectors of four
// slots' four words (whole lines when kw is 4), then eight two-source shuffles.
inline void Words4(const uint32_t* __restrict codes, int kw, int w0, __m512i (&x)[4]) {
  __m512i z[4];  // z[i]: slots 4i .. 4i + 3, words w0 .. w0 + 3 of each
  auto line = [&](int slot) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + size_t(slot) * kw + w0)); };
  for (int i = 0; i < 4; ++i)
    z[i] = kw == 4 ? _mm512_loadu_si512(codes + 16 * i)
                   : _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(line(4 * i)),
                                                                                line(4 * i + 1), 1),
                                                           line(4 * i + 2), 2),
                                        line(4 * i + 3), 3);
  // words w0, w0 + 1 (and w0 + 2, w0 + 3) of 8 slots: element 4 s + w of a pair of z
  const __m512i even = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(2));
  const __m512i a0 = _mm512_permutex2var_epi32(z[0], even, z[1]), a1 = _mm512_permutex2var_epi32(z[0], odd, z[1]);
  const __m512i b0 = _mm512_permutex2var_epi32(z[2], even, z[3]), b1 = _mm512_permutex2var_epi32(z[2], odd, z[3]);
  x[0] = _mm512_shuffle_i64x2(a0, b0, _MM_SHUFFLE(1, 0, 1, 0));
  x[1] = _mm512_shuffle_i64x2(a0, b0, _MM_SHUFFLE(3, 2, 3, 2));
  x[2] = _mm512_shuffle_i64x2(a1, b1, _MM_SHUFFLE(1, 0, 1, 0));
  x[3] = _mm512_shuffle_i64x2(a1, b1, _MM_SHUFFLE(3, 2, 3, 2));
}

// sums[e % 2][r] += sum_e at[r][e] * code e of x's lanes (one word of 16 slots): a shift and a
// lookup per code (2 bits: per two codes), or shift, mask and convert (8 bits). Two sums per query
// head: one chain of multiply-adds per head would wait on their latency.
template <int KB, int NG>
inline void AccumulateWord(__m512i x, const float* const (&at)[NG], __m512 (&sums)[2][NG]) {
  constexpr int per = 32 / KB;
  if constexpr (KB == 2) {
    const __m512 low = _mm512_load_ps(kLow2), high = _mm512_load_ps(kHigh2);
#pragma GCC unroll 8
    for (int e = 0; e < per; e += 2) {
      const __m512i y = _mm512_srli_epi32(x, e * KB);
      const __m512 c0 = _mm512_permutexvar_ps(y, low), c1 = _mm512_permutexvar_ps(y, high);
      for (int r = 0; r < NG; ++r) {
        sums[0][r] = _mm512_fmadd_ps(_mm512_set1_ps(at[r][e]), c0, sums[0][r]);
        sums[1][r] = _mm512_fmadd_ps(_mm512_set1_ps(at[r][e + 1]), c1, sums[1][r]);
      }
    }
  } else if constexpr (KB == 4) {
    const __m512 table = _mm512_load_ps(kLow4);
#pragma GCC unroll 8
    for (int e = 0; e < per; ++e) {
      const __m512 code = _mm512_permutexvar_ps(_mm512_srli_epi32(x, e * KB), table);
      for (int r = 0; r < NG; ++r) sums[e % 2][r] = _mm512_fmadd_ps(_mm512_set1_ps(at[r][e]), code, sums[e % 2][r]);
    }
  } else {
    const __m512i m = _mm512_set1_epi32(0xff);
#pragma GCC unroll 4
    for (int e = 0; e < per; ++e) {
      const __m512 code = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(x, e * KB), m));
      for (int r = 0; r < NG; ++r) sums[e % 2][r] = _mm512_fmadd_ps(_mm512_set1_ps(at[r][e]), code, sums[e % 2][r]);
    }
  }
}
#endif

// acc[r, j] = sum_d weights[r, d] * code d of slot j, for 16 slots: codes [16, kw] (rows past the
// block's end read as zeros: `slots` of them are real).
template <int KB, int NG>
inline void KeyDots(const uint32_t* __restrict codes, int kw, int slots, const float (*__restrict weights)[kMaxHead],
                    float (*__restrict acc)[16]) {
  constexpr int per = 32 / KB;
  constexpr uint32_t mask = (1u << KB) - 1;
#if defined(__AVX512F__)
  __m512 sums[2][NG];
  for (int r = 0; r < NG; ++r) sums[0][r] = sums[1][r] = _mm512_setzero_ps();
  if (slots == 16 && kw % 4 == 0) {
    for (int w0 = 0; w0 < kw; w0 += 4) {
      __m512i x[4];
      Words4(codes, kw, w0, x);
      for (int i = 0; i < 4; ++i) {
        const float* at[NG];
        for (int r = 0; r < NG; ++r) at[r] = weights[r] + (w0 + i) * per;
        AccumulateWord<KB, NG>(x[i], at, sums);
      }
    }
  } else {  // word w of each slot: one gather
    const __m512i rows = _mm512_mullo_epi32(LaneIndex(), _mm512_set1_epi32(kw));
    const __mmask16 real = __mmask16((1u << slots) - 1);
    for (int w = 0; w < kw; ++w) {
      const float* at[NG];
      for (int r = 0; r < NG; ++r) at[r] = weights[r] + w * per;
      AccumulateWord<KB, NG>(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), real, rows, codes + w, 4), at, sums);
    }
  }
  for (int r = 0; r < NG; ++r) _mm512_store_ps(acc[r], _mm512_add_ps(sums[0][r], sums[1][r]));
#else
  // word w of the 16 slots side by side, so that the compiler vectorizes the slots
  for (int r = 0; r < NG; ++r) std::fill(acc[r], acc[r] + 16, 0.0f);
  uint32_t x[16];
  for (int w = 0; w < kw; ++w) {
    for (int j = 0; j < 16; ++j) x[j] = j < slots ? codes[j * kw + w] : 0;
    for (int e = 0; e < per; ++e)
      for (int r = 0; r < NG; ++r) {
        const float weight = weights[r][w * per + e];
        for (int j = 0; j < 16; ++j) acc[r][j] += weight * float((x[j] >> (e * KB)) & mask);
      }
  }
#endif
}

// o[r, d] += sum_t pv[r, d / span, t] * code d of slot t, over the n slots of a block (codes [n, vw],
// pv [NG, 8, kBlock]).
template <int VB, int NG>
inline void ValueMix(const uint32_t* __restrict codes, int vw, int n, int h, int span, const float* __restrict pv,
                     float* __restrict o) {
#if defined(__AVX512F__)
  if (VB == 4 && span % 32 == 0) {  // (and so h % 32 == 0)
    int d0 = 0;
    for (; d0 + 64 <= h; d0 += 64) ValueMix4V<NG, 2>(codes, vw, n, h, d0, span, pv, o);
    if (d0 < h) ValueMix4V<NG, 1>(codes, vw, n, h, d0, span, pv, o);
    return;
  }
  if (span % 16 == 0) {  // each vector of 16 channels in one group
    int d0 = 0;
    for (; d0 + 64 <= h; d0 += 64) ValueMixV<VB, NG, 4>(codes, vw, n, h, d0, span, pv, o);
    switch ((h - d0) / 16) {
      case 3: ValueMixV<VB, NG, 3>(codes, vw, n, h, d0, span, pv, o); break;
      case 2: ValueMixV<VB, NG, 2>(codes, vw, n, h, d0, span, pv, o); break;
      case 1: ValueMixV<VB, NG, 1>(codes, vw, n, h, d0, span, pv, o); break;
      default: break;
    }
    return;
  }
#endif
  auto weight = [&](int r, int mg, int t) { return pv[(size_t(r) * 8 + mg) * kBlock + t]; };
  alignas(64) float code[kMaxHead];
  for (int t = 0; t < n; ++t) {
    Unpack<VB>(codes + size_t(t) * vw, h, code);
    for (int r = 0; r < NG; ++r)
      for (int mg = 0; mg < h / span; ++mg) {  // (no division per channel: the loop over d vectorizes)
        const float w = weight(r, mg, t);
        for (int d = mg * span; d < (mg + 1) * span; ++d) o[r * h + d] += w * code[d];
      }
  }
}

// scores[r, t] = q_r . key_t * sm_scale over n slots of float keys from element `first` (kept slots
// only, EMPTY_MAX elsewhere).
template <int NG>
void FloatKeyScores(const Floats& keys, size_t first, int n, int h, const float (*__restrict q)[kMaxHead],
                    const bool* __restrict keep, float sm_scale, float (*__restrict scores)[kBlock],
                    const Ahead& ahead) {
#if defined(__AVX512F__)
  WithLoader(keys, first, [&](auto load) { FloatKeyScoresV<NG>(load, n, h, q, keep, sm_scale, scores, ahead); });
#else
  alignas(64) float key[kMaxHead];
  for (int t = 0; t < n; ++t) {
    if (!keep[t]) {
      for (int r = 0; r < NG; ++r) scores[r][t] = kEmptyMax;
      continue;
    }
    if (t % 16 == 0) ahead.Fetch(t, std::min(16, n - t));
    ToFloat(keys, first + size_t(t) * h, h, key);
    for (int r = 0; r < NG; ++r) {
      float s = 0.0f;
      for (int d = 0; d < h; ++d) s += q[r][d] * key[d];
      scores[r][t] = s * sm_scale;
    }
  }
#endif
}

// o[r, d] += sum_t p[r, t] * value_t[d] over the kept of n slots of float values from element
// `first` (an empty slot may hold anything, even NaN: it is skipped, not multiplied by 0).
template <int NG>
void FloatValueMix(const Floats& values, size_t first, int n, int h, const bool* __restrict keep,
                   const float (*__restrict p)[kBlock], float* __restrict o) {
#if defined(__AVX512F__)
  WithLoader(values, first, [&](auto load) {
    int d0 = 0;
    for (; d0 + 64 <= h; d0 += 64) FloatValueMixV<NG, 4>(load, n, h, d0, keep, p, o);
    switch ((h - d0) / 16) {
      case 3: FloatValueMixV<NG, 3>(load, n, h, d0, keep, p, o); break;
      case 2: FloatValueMixV<NG, 2>(load, n, h, d0, keep, p, o); break;
      case 1: FloatValueMixV<NG, 1>(load, n, h, d0, keep, p, o); break;
      default: break;
    }
  });
#else
  alignas(64) float value[kMaxHead];
  for (int t = 0; t < n; ++t) {
    if (!keep[t]) continue;
    ToFloat(values, first + size_t(t) * h, h, value);
    for (int r = 0; r < NG; ++r) {
      const float w = p[r][t];
      for (int d = 0; d < h; ++d) o[r * h + d] += w * value[d];
    }
  }
#endif
}

// Softmax numerators of a block: scores[r, t] -> exp(scores[r, t] - m[r]) for t < n16 (0 on empty
// slots, whose score EMPTY_MAX lies far below m), l[r] their sum.
template <int NG>
inline void Softmax(float (*__restrict scores)[kBlock], int n16, float* __restrict m, float* __restrict l) {
  for (int r = 0; r < NG; ++r) {
#if defined(__AVX512F__)
    __m512 mx = _mm512_set1_ps(kEmptyMax);
    for (int t = 0; t < n16; t += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(scores[r] + t));
    const float top = _mm512_reduce_max_ps(mx);
    const __m512 mv = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int t = 0; t < n16; t += 16) {
      const __m512 p = ExpNonPositiveV(_mm512_min_ps(_mm512_sub_ps(_mm512_load_ps(scores[r] + t), mv), _mm512_setzero_ps()));
      _mm512_store_ps(scores[r] + t, p);
      sum = _mm512_add_ps(sum, p);
    }
    m[r] = top;
    l[r] = _mm512_reduce_add_ps(sum);
#else
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
#endif
  }
}

// scores[j] = keep[j] ? (acc[j] + add) * mul[j] * sm_scale : EMPTY_MAX for j in [j0, j1) (mul null: 1).
inline void ScoreLanes(const float* __restrict acc, const float* __restrict mul, float add, float sm_scale,
                       const bool* __restrict keep, int j0, int j1, float* __restrict scores) {
#if defined(__AVX512F__)
  const __mmask16 range = __mmask16(((1u << j1) - 1) & ~((1u << j0) - 1));
  const __mmask16 kept = KeepMask(keep);
  __m512 x = _mm512_add_ps(_mm512_load_ps(acc), _mm512_set1_ps(add));
  if (mul) x = _mm512_mul_ps(x, _mm512_loadu_ps(mul));
  x = _mm512_mul_ps(x, _mm512_set1_ps(sm_scale));
  _mm512_mask_storeu_ps(scores, range, _mm512_mask_blend_ps(kept, _mm512_set1_ps(kEmptyMax), x));
#else
  for (int j = j0; j < j1; ++j) scores[j] = keep[j] ? (acc[j] + add) * (mul ? mul[j] : 1.0f) * sm_scale : kEmptyMax;
#endif
}

// Partials of NG query heads (q0..q0 + NG - 1) of (row, head) over key slots [s0, s1) of part T
// into `out` (m [NG], l [NG], o [NG, h]). In the vector build:
//   packed keys: vectorized along slots. Word w of 16 consecutive slots comes from four loads and
//         eight shuffles per four words (or one gather), so code d of all 16 is a shift and a lookup;
//         q * scale of the slots' group multiplies it (no per-slot horizontal sums).
//   packed values: vectorized along channels; each slot's codes are unpacked once (a shift and a
//         lookup per 16 channels), and p * scale (one number per slot, row and channel group)
//         multiplies them.
//   float keys: 16 slots at a time, converted once, every query head's dot products summed across
//         lanes by one shuffle tree; float values: along channels, all query heads at once.
template <int KB, int VB, int NG>
void Item(const Problem& P, const Part& T, int row, int head, int q0, int s0, int s1, float* __restrict out) {
  const int h = P.h, G = P.G, n = s1 - s0, n16 = (n + 15) / 16 * 16;
  const size_t bh = size_t(row) * P.k + head;
  const bool* valid = T.valid + size_t(row) * T.kc;
  const size_t v0 = bh * T.vc + size_t(T.value_offset[row]) + s0;  // the value slot of key slot s0
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
  for (int r = 0; r < NG; ++r) std::fill(scores[r] + n, scores[r] + n16, kEmptyMax);  // past the block's end

  Ahead ahead;  // fetched during the key pass (packed keys fetch their own lines, below)
  auto add = [&](const Floats& x, size_t first, size_t per_slot, size_t skip = 0) {
    const size_t width = ffi::ByteWidth(x.type);
    ahead.Add(static_cast<const char*>(x.data) + first * width, per_slot * width, n, skip);
  };
  if constexpr (KB == kFloats) add(T.keys, (bh * T.kc + s0) * h, h, kKeysAhead);
  if constexpr (VB == kFloats) {
    add(T.values, v0 * h, h);
  } else {
    const int per_slot = T.symmetric ? 1 : h / G;
    ahead.Add(T.v_codes + v0 * (h * VB / 32), h * VB / 8, n);
    add(T.v_scale, v0 * per_slot, per_slot);
    if (!T.symmetric) add(T.v_zero, v0 * per_slot, per_slot);
  }

  // keys: scores[r, t] = q_r . key_t * sm_scale
  if constexpr (KB == kFloats) {
    FloatKeyScores<NG>(T.keys, (bh * T.kc + s0) * h, n, h, q, keep, P.sm_scale, scores, ahead);
  } else {
    // 16 slots at a time; a group of G slots folds its per-channel scale and zero into q
    // (qs = q * scale, qz = q . zero), and where G < 16 (or 16 does not divide G) the 16 slots
    // are scored once per group they touch
    const int kw = h * KB / 32;
    const uint32_t* kc = T.k_codes + (bh * T.kc + s0) * kw;
    alignas(64) float acc[NG][16];
    int folded = -1;  // the group qs, qz hold
    // the codes' lines kKeysAhead bytes ahead into L1 (over 120 layers of 8k slots, beyond L3, one
    // core: kivi2, kivi4, int8 2-4% faster; fetching the first lines at the block's start too, or
    // the groups' scales and zeros, or 128 slots ahead at any width, made it slower)
    for (int t0 = 0; t0 < n16; t0 += 16) {
      const int lanes = std::min(16, n - t0);
      ahead.Fetch(t0, lanes);
      if (t0 * kw * 4 + kKeysAhead < n * kw * 4)
        for (int off = 0; off < 16 * kw * 4; off += 64)
          FetchLine<true>(reinterpret_cast<const char*>(kc + size_t(t0) * kw) + kKeysAhead + off);
      if (T.symmetric) {  // x = (code - 2^(bits-1)) * scale per slot
        KeyDots<KB, NG>(kc + size_t(t0) * kw, kw, lanes, q, acc);
        alignas(64) float s[16] = {};
        ToFloat(T.k_scale, bh * T.kc + s0 + t0, lanes, s);
        for (int r = 0; r < NG; ++r)
          ScoreLanes(acc[r], s, -float(1 << (KB - 1)) * qsum[r], P.sm_scale, keep + t0, 0, lanes, scores[r] + t0);
        continue;
      }
      for (int group = (s0 + t0) / G; group * G < s0 + t0 + lanes; ++group) {
        if (group != folded) {
          folded = group;
          const size_t at = (bh * (T.kc / G) + group) * h;
          ToFloat(T.k_scale, at, h, scale);
          ToFloat(T.k_zero, at, h, zero);
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
        for (int r = 0; r < NG; ++r) ScoreLanes(acc[r], nullptr, qz[r], P.sm_scale, keep + t0, j0, j1, scores[r] + t0);
      }
    }
  }
  Softmax<NG>(scores, n16, m, l);

  // values: o[r, d] = sum_t p[r, t] value_t[d]
  if constexpr (VB == kFloats) {
    FloatValueMix<NG>(T.values, v0 * h, n, h, keep, scores, o);
  } else {
    // codes: value_t[d] = code[t, d] * scale[t, d / G] + zero[t, d / G] (KIVI)
    const int per_slot = T.symmetric ? 1 : h / G;  // <= 8 (checked)
    alignas(64) float side[kBlock * 8], vscale[8][kBlock], vzero[8][kBlock], pv[NG][8][kBlock];
    float oz[NG][8] = {};  // sum_t p * zero (KIVI), sum_t p * scale (symmetric)
    bool weighed = false;
#if defined(__AVX512F__)
    if (per_slot == 2 && !T.symmetric && T.v_scale.type == ffi::DataType::F16 && T.v_zero.type == ffi::DataType::F16) {
      WeighPairs<NG>(static_cast<const uint16_t*>(T.v_scale.data) + v0 * 2,
                     static_cast<const uint16_t*>(T.v_zero.data) + v0 * 2, n, scores, pv, oz);
      weighed = true;
    }
#endif
    if (!weighed) {
      ToFloat(T.v_scale, v0 * per_slot, n * per_slot, side);
      Deinterleave(side, n, per_slot, vscale);
      if (!T.symmetric) {
        ToFloat(T.v_zero, v0 * per_slot, n * per_slot, side);
        Deinterleave(side, n, per_slot, vzero);
      }
    }
    for (int r = 0; r < NG && !weighed; ++r)
      for (int mg = 0; mg < per_slot; ++mg) {
        const float* p = scores[r];
        const float* s = vscale[mg];
        const float* zr = T.symmetric ? vscale[mg] : vzero[mg];
        float* w = pv[r][mg];
        int t = 0;
        float z = 0.0f;
#if defined(__AVX512F__)
        __m512 z0 = _mm512_setzero_ps(), z1 = _mm512_setzero_ps();  // two chains: the sum waits on neither
        for (; t + 32 <= n; t += 32) {
          const __m512 p0 = _mm512_load_ps(p + t), p1 = _mm512_load_ps(p + t + 16);
          _mm512_store_ps(w + t, _mm512_mul_ps(p0, _mm512_load_ps(s + t)));
          _mm512_store_ps(w + t + 16, _mm512_mul_ps(p1, _mm512_load_ps(s + t + 16)));
          z0 = _mm512_fmadd_ps(p0, _mm512_load_ps(zr + t), z0);
          z1 = _mm512_fmadd_ps(p1, _mm512_load_ps(zr + t + 16), z1);
        }
        z = _mm512_reduce_add_ps(_mm512_add_ps(z0, z1));
#endif
        for (; t < n; ++t) {
          w[t] = p[t] * s[t];
          z += p[t] * zr[t];
        }
        oz[r][mg] = z;
      }
    const int vw = h * VB / 32;
    const int span = T.symmetric ? h : G;
    ValueMix<VB, NG>(T.v_codes + v0 * vw, vw, n, h, span, &pv[0][0][0], o);
    for (int r = 0; r < NG; ++r)
      for (int mg = 0; mg < per_slot; ++mg) {
        const float add = T.symmetric ? -float(1 << (VB - 1)) * oz[r][0] : oz[r][mg];
        for (int d = mg * span; d < (mg + 1) * span; ++d) o[r * h + d] += add;
      }
  }
}

template <int KB, int NG>
ItemFn PickValues(int vb) {
  switch (vb) {
    case 2: return Item<KB, 2, NG>;
    case 4: return Item<KB, 4, NG>;
    case 8: return Item<KB, 8, NG>;
    default: return Item<KB, kFloats, NG>;
  }
}

template <int NG>
ItemFn PickKeys(int kb, int vb) {
  switch (kb) {
    case 2: return PickValues<2, NG>(vb);
    case 4: return PickValues<4, NG>(vb);
    case 8: return PickValues<8, NG>(vb);
    default: return PickValues<kFloats, NG>(vb);
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

// Part p (operands 8p .. 8p + 7) of the call, checked against q's shape [b, k, g, h].
ffi::ErrorOr<Part> ReadPart(const ffi::RemainingArgs& args, int p, int32_t layer, int kb, int vb, bool symmetric,
                            const Problem& P) {
  auto arg = [&](int j) { return args.get<ffi::AnyBuffer>(size_t(8 * p + j)); };
  ffi::ErrorOr<ffi::AnyBuffer> buffers[8] = {arg(0), arg(1), arg(2), arg(3), arg(4), arg(5), arg(6), arg(7)};
  for (auto& x : buffers)
    if (x.has_error()) return ffi::Unexpected(x.error());
  const ffi::AnyBuffer &keys = *buffers[0], &k_scale = *buffers[1], &k_zero = *buffers[2], &values = *buffers[3],
                       &v_scale = *buffers[4], &v_zero = *buffers[5], &valid = *buffers[6], &offset = *buffers[7];
  auto bad = [p](const char* what) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("part " + std::to_string(p) + ": " + what));
  };
  auto ok_bits = [](int x) { return x == 2 || x == 4 || x == 8 || x == kFloats; };
  if (!ok_bits(kb) || !ok_bits(vb)) return bad("bits must be 2, 4, 8 or 16");
  if (kb != kFloats && vb == kFloats) return bad("packed keys with float values are not supported");
  auto kd = keys.dimensions(), vd = values.dimensions();
  if (kd.size() != 5 || vd.size() != 5) return bad("keys and values must be rank 5");
  if (layer < 0 || layer >= kd[0] || layer >= vd[0]) return bad("layer index out of range");
  const int64_t b = P.b, k = P.k, h = P.h, G = P.G, kc = kd[3], vc = vd[3];
  Part T;
  T.kb = kb, T.vb = vb, T.symmetric = symmetric, T.kc = int(kc), T.vc = int(vc);
  auto side = [&](const ffi::AnyBuffer& x, int bits, int64_t slots, const ffi::AnyBuffer& scale,
                  const ffi::AnyBuffer& zero, bool is_key, const uint32_t** codes, Floats* floats, Floats* s,
                  Floats* z) -> const char* {
    if (bits == kFloats) {
      if (!IsFloat(x.element_type()) || !HasDims(x, {x.dimensions()[0], b, k, slots, h}))
        return "float keys/values must be float [L, b, k, c, h]";
      *floats = LayerOf(x, layer);
      return nullptr;
    }
    if (x.element_type() != ffi::DataType::U32 || !HasDims(x, {x.dimensions()[0], b, k, slots, h * bits / 32}))
      return "codes must be uint32 [L, b, k, c, h * bits / 32]";
    *codes = static_cast<const uint32_t*>(x.untyped_data()) + LayerOffset(x.dimensions(), layer);
    for (const ffi::AnyBuffer* a : {&scale, &zero}) {
      if (symmetric && a == &zero) break;
      if (!IsFloat(a->element_type())) return "scales and zeros must be float16, bfloat16 or float32";
      const int64_t L = a->dimensions().size() ? a->dimensions()[0] : 0;
      const bool fits = symmetric ? HasDims(*a, {L, b, k, slots, 1})
                        : is_key  ? slots % G == 0 && HasDims(*a, {L, b, k, slots / G, h})
                                  : HasDims(*a, {L, b, k, slots, h / G});
      if (!fits || layer >= L) return "scales or zeros of the wrong shape";
    }
    *s = LayerOf(scale, layer);
    if (!symmetric) *z = LayerOf(zero, layer);
    return nullptr;
  };
  if (const char* e = side(keys, kb, kc, k_scale, k_zero, true, &T.k_codes, &T.keys, &T.k_scale, &T.k_zero)) return bad(e);
  if (const char* e = side(values, vb, vc, v_scale, v_zero, false, &T.v_codes, &T.values, &T.v_scale, &T.v_zero))
    return bad(e);
  if (valid.element_type() != ffi::DataType::PRED || !HasDims(valid, {b, kc})) return bad("valid must be bool [b, c]");
  if (offset.element_type() != ffi::DataType::S32 || !HasDims(offset, {b})) return bad("value_offset must be int32 [b]");
  T.valid = static_cast<const bool*>(valid.untyped_data());
  T.value_offset = static_cast<const int32_t*>(offset.untyped_data());
  for (int64_t row = 0; row < b; ++row)
    if (T.value_offset[row] < 0 || T.value_offset[row] + kc > vc) return bad("value slots out of range");
  for (int rows = 1; rows <= kRows; ++rows) T.fn[rows - 1] = Pick(rows, kb, vb);
  return T;
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layers, ffi::Buffer<ffi::F32> q, ffi::RemainingArgs args,
                ffi::Span<const int32_t> key_bits, ffi::Span<const int32_t> value_bits,
                ffi::Span<const int32_t> symmetric, int32_t group_size, float sm_scale, ffi::ResultBuffer<ffi::F32> o,
                ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> l) {
  auto qd = q.dimensions();
  if (qd.size() != 4) return ffi::Error::InvalidArgument("q must be rank 4");
  const size_t parts = key_bits.size();
  if (args.size() != 8 * parts || value_bits.size() != parts || symmetric.size() != parts ||
      layers.element_count() != parts)
    return ffi::Error::InvalidArgument("8 operands, widths, a form and a layer per part");
  Problem P;
  P.b = int(qd[0]), P.k = int(qd[1]), P.g = int(qd[2]), P.h = int(qd[3]), P.G = group_size;
  P.sm_scale = sm_scale;
  P.q = q.typed_data();
  if (P.h > kMaxHead || P.h % 16) return ffi::Error::InvalidArgument("unsupported head dim");
  P.blocks = 0;
  for (size_t p = 0; p < parts; ++p) {
    const bool sym = symmetric[p] != 0;
    const bool grouped = !sym && (key_bits[p] != kFloats || value_bits[p] != kFloats);
    if (grouped && (P.G <= 0 || P.h % P.G || P.h / P.G > 8))
      return ffi::Error::InvalidArgument("unsupported group size");
    auto T = ReadPart(args, int(p), layers.typed_data()[p], key_bits[p], value_bits[p], sym, P);
    if (T.has_error()) return T.error();
    T->first_block = P.blocks;
    T->blocks = (T->kc + kBlock - 1) / kBlock;
    P.blocks += T->blocks;
    P.part_of_block.insert(P.part_of_block.end(), T->blocks, int(p));
    P.parts.push_back(*T);
  }
  P.row_groups = (P.g + kRows - 1) / kRows;
  const int heads = P.b * P.k, total = heads * P.row_groups * P.blocks;
  P.out.assign(size_t(total) * P.part_size(), 0.0f);
  if (total) {
    int64_t slots = 0;  // key slots x kv heads x rows: the work, roughly
    for (const Part& T : P.parts) slots += int64_t(T.kc) * heads * P.row_groups;
    // the pool has a thread per core and this thread works too: one helper fewer, or a core would
    // time-slice two workers and the call wait for an item whose thread is descheduled
    const int helpers = slots < kParallelSlots ? 0 : int(pool.num_threads()) - 1;
    RunItems(pool, total, helpers, [&P](int i) {
      const int block = i % P.blocks, rest = i / P.blocks;  // item = ((row * k + head) * row_groups + rg) * blocks + block
      const int rg = rest % P.row_groups, bh = rest / P.row_groups;
      const Part& T = P.parts[P.part_of_block[block]];
      const int s0 = (block - T.first_block) * kBlock, s1 = std::min(T.kc, s0 + kBlock);
      const int q0 = rg * kRows, rows = std::min(kRows, P.g - q0);
      T.fn[rows - 1](P, T, bh / P.k, bh % P.k, q0, s0, s1, P.out.data() + size_t(i) * P.part_size());
    });
  }
  // merge the blocks of each query head
  const int g = P.g, h = P.h;
  float *od = o->typed_data(), *md = m->typed_data(), *ld = l->typed_data();
  for (int bh = 0; bh < heads; ++bh) {
    for (int i = 0; i < g; ++i) {
      const int rg = i / kRows, r = i % kRows, ng = std::min(kRows, g - rg * kRows);
      auto part = [&](int blk) { return P.out.data() + size_t((bh * P.row_groups + rg) * P.blocks + blk) * P.part_size(); };
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxLayerAttention, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layers, one per part
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .RemainingArgs()                // 8 per part
                                  .Attr<ffi::Span<const int32_t>>("key_bits")
                                  .Attr<ffi::Span<const int32_t>>("value_bits")
                                  .Attr<ffi::Span<const int32_t>>("symmetric")
                                  .Attr<int32_t>("group_size")
                                  .Attr<float>("sm_scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>()   // m
                                  .Ret<ffi::Buffer<ffi::F32>>()); // l
