// Attention of a prompt chunk's many queries over float keys and values on a CPU: an XLA FFI custom
// call (kvjax "native" kernels), computing what pallas_kernels.xla_attention.chunk_partials computes.
//
//   layers       int32 [2 P]                     per bank, the entry of its keys' and of its values'
//                                                [L, ...] arrays to read
//   q            float32 [b, t, n, h]            query head n = kv head * g + j (g = n / k)
//   o, m, l      float32 [b, t, n, h], [b, t, n] x 2: flash-decoding partials so far (aliased to
//                the results: what one call leaves, the next continues)
//   then 3 operands per bank (P banks: slots held apart, e.g. the sinks and window, a tier decoded):
//     keys       float16/bfloat16/float32 [Lk, b, k, c, h]
//     values     float16/bfloat16/float32 [Lv, b, k, c, h]
//     mask       bool [b, t, c]                  which of the bank's slots each query sees (any pattern)
//   attribute sm_scale
//   -> o, m, l: the partials of what came in and of the slots each query sees in every bank,
//      m = max s, l = sum exp(s - m), o = sum exp(s - m) v over them with s = q . key * sm_scale; a
//      query that sees nothing keeps what came in (m = EMPTY_MAX, l = 0, o = 0 at first).
//
// Flash attention, everything vectorized along queries: a work item is (row, kv head, up to four of
// its query heads, a tile of tokens) and holds its queries transposed, q^T [h, L] with L = 16 x the
// item's query vectors (a vector: 16 consecutive tokens of one query head; all of a kv head's query
// heads share each key and value of a block), and o^T [h, L] with m, l [L], once for all the banks
// (a call per bank would move the queries and partials in and out each time: ~0.8 ms a call at
// 1024 tokens of SmolLM2-135M, measured). Per block of kSlots slots of a bank that some token of
// the tile sees (the others are skipped; a tile that sees nothing is not touched): its keys and values are
// converted to float32 once (rows no token of the tile sees are zeroed: they may hold NaN), then
//   scores   s^T[slot, L] = key_slot . q^T: per slot a broadcast of key[d] times the query vectors,
//            NA slots x MV vectors of accumulators in registers, masked by the tile's mask bits
//   softmax  online: the block's max per query is a vertical max of vectors, then exp (the polynomial
//            of cpu_kernels.h), o^T and l rescaled by exp(m_old - m_new)
//   values   o^T[d, L] += v_slot[d] * p^T[slot, L]: DA channels x MV vectors of accumulators
// so every multiply-add is a vector one, with no transposes and no horizontal sums. The mask is
// first packed, per row and 16 tokens, into 16 bits per slot (one AVX-512 mask per query vector).
// Items run on the calling thread and one helper per other thread of XLA's intra-op pool.

#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace {

constexpr int kSlots = 64;      // slots per block
constexpr int kLanes = 16;      // tokens per query vector (bits of a mask word)
constexpr int kMaxHeads = 4;    // query heads per item
constexpr int kMaxVectors = 6;  // query vectors per item (heads x vectors of tokens)
constexpr int kMaxHead = 256;
constexpr int64_t kParallelPairs = 1 << 16;  // query x slot pairs from which the pool's threads help

#if defined(__AVX512F__)
using Vec = __m512;
using Bits = __mmask16;
inline Vec Load(const float* p) { return _mm512_load_ps(p); }
inline void Store(float* p, Vec x) { _mm512_store_ps(p, x); }
inline Vec Set1(float x) { return _mm512_set1_ps(x); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec Sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec Max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec Select(Bits m, Vec yes, Vec no) { return _mm512_mask_blend_ps(m, no, yes); }
inline Vec ExpOrZero(Bits m, Vec x) { return _mm512_maskz_mov_ps(m, ExpNonPositiveV(x)); }
#else
// The portable build: 16 lanes as plain loops (the compiler vectorizes them for what it targets).
struct Vec {
  float x[kLanes];
};
using Bits = uint16_t;
inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(v.x, p, sizeof(v.x));
  return v;
}
inline void Store(float* p, const Vec& v) { std::memcpy(p, v.x, sizeof(v.x)); }
inline Vec Set1(float x) {
  Vec v;
  for (float& e : v.x) e = x;
  return v;
}
template <class F>
inline Vec Map(const Vec& a, const Vec& b, F f) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.x[i] = f(a.x[i], b.x[i]);
  return v;
}
inline Vec Fma(const Vec& a, const Vec& b, const Vec& c) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.x[i] = a.x[i] * b.x[i] + c.x[i];
  return v;
}
inline Vec Mul(const Vec& a, const Vec& b) { return Map(a, b, [](float x, float y) { return x * y; }); }
inline Vec Add(const Vec& a, const Vec& b) { return Map(a, b, [](float x, float y) { return x + y; }); }
inline Vec Sub(const Vec& a, const Vec& b) { return Map(a, b, [](float x, float y) { return x - y; }); }
inline Vec Max(const Vec& a, const Vec& b) { return Map(a, b, [](float x, float y) { return std::max(x, y); }); }
inline Vec Select(Bits m, const Vec& yes, const Vec& no) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.x[i] = (m >> i) & 1 ? yes.x[i] : no.x[i];
  return v;
}
inline Vec ExpOrZero(Bits m, const Vec& x) {
  Vec v;
  for (int i = 0; i < kLanes; ++i) v.x[i] = (m >> i) & 1 ? ExpNonPositive(x.x[i]) : 0.0f;
  return v;
}
#endif

struct Bank {
  Floats keys, values;          // this layer's [b, k, c, h]
  const bool* mask;             // [b, t, c]
  int c, blocks, padded;        // slots; blocks of kSlots slots; blocks * kSlots
  std::vector<uint16_t> bits;   // [b, vectors, padded]: bit i of slot j: token 16 v + i sees j
};

struct Chunk {
  int b, t, n, k, g, h;
  float sm_scale;
  const float* q;
  std::vector<Bank> banks;
  const float *o_in, *m_in, *l_in;
  float *o, *m, *l;
  int vectors;                  // ceil(t / 16): query vectors per query head and row
  int groups;                   // items of query heads per kv head
  int tv;                       // query vectors (of 16 tokens) per query head in an item
  int tiles;                    // ceil(vectors / tv): items of tokens per row
  const uint16_t* BitsOf(const Bank& B, int row, int vector) const {
    return B.bits.data() + (size_t(row) * vectors + vector) * B.padded;
  }
};

// bits[row, v, j] = sum_i mask[row, 16 v + i, j] << i: the slots of bank B tokens 16 v .. 16 v + 15
// of `row` see.
void PackMask(const Chunk& C, Bank& B, int row, int v) {
  uint16_t* out = B.bits.data() + (size_t(row) * C.vectors + v) * B.padded;
  const int tokens = std::min(kLanes, C.t - kLanes * v);
  const bool* first = B.mask + (size_t(row) * C.t + kLanes * v) * B.c;
  int j = 0;
#if defined(__AVX512F__)
  // 64 slots at a time: each token's 64 bytes -> a byte of value 1 << (i % 8) where seen, ORed into
  // the low (tokens 0-7) or high (8-15) bytes, widened to 16-bit words
  for (; j < B.c; j += 64) {
    const __mmask64 in = B.c - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (B.c - j)) - 1;
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    for (int i = 0; i < tokens; ++i) {
      const __mmask64 seen = _mm512_test_epi8_mask(_mm512_maskz_loadu_epi8(in, first + size_t(i) * B.c + j),
                                                   _mm512_set1_epi8(1));
      __m512i& half = i < 8 ? lo : hi;
      half = _mm512_or_si512(half, _mm512_maskz_set1_epi8(seen, char(1 << (i % 8))));
    }
    const __m512i w0 = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)),
                                       _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)), 8));
    const __m512i w1 = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
                                       _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1)), 8));
    _mm512_storeu_si512(out + j, w0);  // (padded: c rounded up to a multiple of 64 slots)
    _mm512_storeu_si512(out + j + 32, w1);
  }
#endif
  for (; j < B.c; ++j) {
    uint16_t w = 0;
    for (int i = 0; i < tokens; ++i) w |= uint16_t(first[size_t(i) * B.c + j] ? 1u << i : 0u);
    out[j] = w;
  }
}

// Float32 scratch of one item, 64-byte aligned, one per thread (grown as needed).
float* Scratch(size_t floats) {
  struct Buffer {
    float* p = nullptr;
    size_t n = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buffer;
  if (buffer.n < floats) {
    std::free(buffer.p);
    buffer.p = static_cast<float*>(std::aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64));
    buffer.n = floats;
  }
  return buffer.p;
}

// acc[a, v] += sum_x A(a, x) * B[x, v] over x < count: B rows of MV vectors (row stride 16 MV),
// A(a, x) = a_first[a * h + x] (keys: slot a, channel x) or, `by_columns`, a_first[x * h + a]
// (values: channel a, slot x), broadcast.
template <int NA, int MV, bool by_columns>
inline void Tile(const float* __restrict a_first, int h, const float* __restrict b, int count, Vec (&acc)[NA][MV]) {
  for (int x = 0; x < count; ++x) {
    Vec bx[MV];
    for (int v = 0; v < MV; ++v) bx[v] = Load(b + size_t(x) * (kLanes * MV) + kLanes * v);
    for (int a = 0; a < NA; ++a) {
      const Vec s = Set1(by_columns ? a_first[size_t(x) * h + a] : a_first[size_t(a) * h + x]);
      for (int v = 0; v < MV; ++v) acc[a][v] = Fma(s, bx[v], acc[a][v]);
    }
  }
}

// Whether some token of tile `tile` (TV vectors of 16 tokens) of `row` sees a slot of some bank.
bool Sees(const Chunk& C, int row, int tile, int TV) {
  for (const Bank& B : C.banks)
    for (int v = tile * TV; v < std::min(C.vectors, (tile + 1) * TV); ++v) {
      const uint16_t* words = C.BitsOf(B, row, v);
      for (int j = 0; j < B.c; ++j)
        if (words[j]) return true;
    }
  return false;
}

// Partials of query heads kv_head * g + r0 .. + R - 1 of `row` for the tokens of tile `tile` (TV
// vectors of 16 tokens each), continuing those in C.o_in / m_in / l_in, into C.o / m / l.
template <int R, int TV>
void Item(const Chunk& C, int row, int kv_head, int r0, int tile) {
  if (!Sees(C, row, tile, TV)) return;  // (o, m, l already hold what came in)
  constexpr int MV = R * TV, L = kLanes * MV;
  constexpr int NA = MV <= 3 ? 8 : 4;  // slots per score tile: NA x MV accumulators
  constexpr int DA = NA;               // channels per value tile (h is a multiple of 16)
  static_assert(kSlots % NA == 0 && kLanes % DA == 0, "tiles divide blocks and head dims");
  const int h = C.h, t = C.t, n = C.n, v0 = tile * TV;
  float* qt = Scratch(size_t(2 * h + kSlots) * L + 2 * size_t(kSlots) * h + 3 * L);
  float* ot = qt + size_t(h) * L;       // [h, L]
  float* st = ot + size_t(h) * L;       // [kSlots, L]: scores, then probabilities
  float* kb = st + size_t(kSlots) * L;  // [kSlots, h]
  float* vb = kb + size_t(kSlots) * h;  // [kSlots, h]
  float* m = vb + size_t(kSlots) * h;   // [L]
  float* l = m + L;                     // [L]
  float* corr = l + L;                  // [L]

  // queries transposed and the partials so far; lane (r TV + tv) 16 + i is token 16 (v0 + tv) + i of head r0 + r
  for (int r = 0; r < R; ++r)
    for (int tv = 0; tv < TV; ++tv)
      for (int i = 0; i < kLanes; ++i) {
        const int lane = (r * TV + tv) * kLanes + i, token = kLanes * (v0 + tv) + i;
        const size_t at = (size_t(row) * t + token) * n + kv_head * C.g + r0 + r;
        const bool real = token < t;
        for (int d = 0; d < h; ++d) {
          qt[size_t(d) * L + lane] = real ? C.q[at * h + d] : 0.0f;
          ot[size_t(d) * L + lane] = real ? C.o_in[at * h + d] : 0.0f;
        }
        m[lane] = real ? C.m_in[at] : kEmptyMax;
        l[lane] = real ? C.l_in[at] : 0.0f;
      }
  static const std::vector<uint16_t> none(kSlots, 0);
  const Vec scale = Set1(C.sm_scale), empty = Set1(kEmptyMax);

  for (const Bank& B : C.banks) {
    const uint16_t* bits[TV];  // the tile's mask words, per vector of tokens
    for (int tv = 0; tv < TV; ++tv) bits[tv] = v0 + tv < C.vectors ? C.BitsOf(B, row, v0 + tv) : nullptr;
    const size_t head_first = (size_t(row) * C.k + kv_head) * B.c;  // slot 0 of this kv head, in rows of h
    for (int block = 0; block < B.blocks; ++block) {
      const int s0 = block * kSlots;
      const uint16_t* word[TV];
      uint16_t seen[kSlots];
      for (int j = 0; j < kSlots; ++j) seen[j] = 0;
      for (int tv = 0; tv < TV; ++tv) {
        word[tv] = bits[tv] ? bits[tv] + s0 : none.data();
        for (int j = 0; j < kSlots; ++j) seen[j] |= word[tv][j];
      }
      int first = 0, last = kSlots;  // the slots some token of the tile sees lie in [first, last)
      while (first < kSlots && !seen[first]) ++first;
      if (first == kSlots) continue;
      while (!seen[last - 1]) --last;
      const int a0 = first / NA * NA, a1 = (last + NA - 1) / NA * NA;

      for (int j = a0; j < a1; ++j) {  // (a seen slot is < c: the bits past c are 0)
        if (seen[j]) {
          ToFloat(B.keys, (head_first + s0 + j) * h, h, kb + size_t(j) * h);
          ToFloat(B.values, (head_first + s0 + j) * h, h, vb + size_t(j) * h);
        } else {
          std::fill(kb + size_t(j) * h, kb + size_t(j + 1) * h, 0.0f);
          std::fill(vb + size_t(j) * h, vb + size_t(j + 1) * h, 0.0f);
        }
      }

      // scores, masked, and their max per query
      Vec top[MV];
      for (int v = 0; v < MV; ++v) top[v] = empty;
      for (int j = a0; j < a1; j += NA) {
        Vec acc[NA][MV];
        for (int a = 0; a < NA; ++a)
          for (int v = 0; v < MV; ++v) acc[a][v] = Set1(0.0f);
        Tile<NA, MV, false>(kb + size_t(j) * h, h, qt, h, acc);
        for (int a = 0; a < NA; ++a)
          for (int v = 0; v < MV; ++v) {
            const Vec s = Select(Bits(word[v % TV][j + a]), Mul(acc[a][v], scale), empty);
            Store(st + size_t(j + a) * L + kLanes * v, s);
            top[v] = Max(top[v], s);
          }
      }

      // softmax, online: m_new = max(m, top), p = exp(s - m_new) where seen, l = l exp(m - m_new) + sum p
      Vec sum[MV];
      for (int v = 0; v < MV; ++v) {
        const Vec old = Load(m + kLanes * v), now = Max(old, top[v]);
        Store(corr + kLanes * v, ExpOrZero(Bits(0xffff), Sub(old, now)));
        Store(m + kLanes * v, now);
        sum[v] = Set1(0.0f);
      }
      for (int j = a0; j < a1; ++j)
        for (int v = 0; v < MV; ++v) {
          float* at = st + size_t(j) * L + kLanes * v;
          const Vec p = ExpOrZero(Bits(word[v % TV][j]), Sub(Load(at), Load(m + kLanes * v)));
          Store(at, p);
          sum[v] = Add(sum[v], p);
        }
      for (int v = 0; v < MV; ++v)
        Store(l + kLanes * v, Fma(Load(l + kLanes * v), Load(corr + kLanes * v), sum[v]));

      // values: o^T = o^T exp(m - m_new) + v^T p^T
      for (int d0 = 0; d0 < h; d0 += DA) {
        Vec acc[DA][MV];
        for (int a = 0; a < DA; ++a)
          for (int v = 0; v < MV; ++v) acc[a][v] = Mul(Load(ot + size_t(d0 + a) * L + kLanes * v), Load(corr + kLanes * v));
        Tile<DA, MV, true>(vb + size_t(a0) * h + d0, h, st + size_t(a0) * L, a1 - a0, acc);
        for (int a = 0; a < DA; ++a)
          for (int v = 0; v < MV; ++v) Store(ot + size_t(d0 + a) * L + kLanes * v, acc[a][v]);
      }
    }
  }

  for (int r = 0; r < R; ++r)
    for (int tv = 0; tv < TV; ++tv)
      for (int i = 0; i < kLanes; ++i) {
        const int lane = (r * TV + tv) * kLanes + i, token = kLanes * (v0 + tv) + i;
        if (token >= t) continue;
        const size_t at = (size_t(row) * t + token) * n + kv_head * C.g + r0 + r;
        for (int d = 0; d < h; ++d) C.o[at * h + d] = ot[size_t(d) * L + lane];
        C.m[at] = m[lane];
        C.l[at] = l[lane];
      }
}

using ItemFn = void (*)(const Chunk&, int row, int kv_head, int r0, int tile);

// The item for R query heads and TV vectors of tokens (R * TV <= kMaxVectors).
template <int R, int TV>
ItemFn PickFit() {
  if constexpr (R * TV <= kMaxVectors) return Item<R, TV>;
  return nullptr;
}

ItemFn Pick(int R, int TV) {
  switch (R * 8 + TV) {
    case 1 * 8 + 1: return PickFit<1, 1>();
    case 1 * 8 + 2: return PickFit<1, 2>();
    case 1 * 8 + 4: return PickFit<1, 4>();
    case 2 * 8 + 1: return PickFit<2, 1>();
    case 2 * 8 + 2: return PickFit<2, 2>();
    case 3 * 8 + 1: return PickFit<3, 1>();
    case 3 * 8 + 2: return PickFit<3, 2>();
    default: return PickFit<4, 1>();
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> layers, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> o_in,
                ffi::Buffer<ffi::F32> m_in, ffi::Buffer<ffi::F32> l_in, ffi::RemainingArgs args, float sm_scale,
                ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> l) {
  auto bad = [](const std::string& what) { return ffi::Error::InvalidArgument("chunk attention: " + what); };
  auto qd = q.dimensions();
  if (qd.size() != 4) return bad("q must be [b, t, n, h]");
  Chunk C;
  C.b = int(qd[0]), C.t = int(qd[1]), C.n = int(qd[2]), C.h = int(qd[3]), C.k = 0;
  if (C.h % kLanes || C.h > kMaxHead) return bad("the head dim must be a multiple of 16 up to 256");
  if (!HasDims(o_in, {C.b, C.t, C.n, C.h}) || !HasDims(m_in, {C.b, C.t, C.n}) || !HasDims(l_in, {C.b, C.t, C.n}))
    return bad("o, m, l must be [b, t, n, h], [b, t, n], [b, t, n]");
  if (args.size() % 3 || layers.element_count() != int64_t(2 * (args.size() / 3)))
    return bad("each bank takes keys, values, a mask and two layer indices");
  int64_t slots = 0;
  for (size_t p = 0; p < args.size() / 3; ++p) {
    auto keys = args.get<ffi::AnyBuffer>(3 * p), values = args.get<ffi::AnyBuffer>(3 * p + 1);
    auto mask = args.get<ffi::AnyBuffer>(3 * p + 2);
    if (keys.has_error()) return keys.error();
    if (values.has_error()) return values.error();
    if (mask.has_error()) return mask.error();
    const std::string name = "bank " + std::to_string(p) + ": ";
    auto kd = keys->dimensions(), vd = values->dimensions();
    if (kd.size() != 5 || !HasDims(*keys, {kd[0], C.b, kd[2], kd[3], C.h})) return bad(name + "keys must be [L, b, k, c, h]");
    if (C.k && kd[2] != C.k) return bad(name + "every bank must have the same kv heads");
    C.k = int(kd[2]);
    Bank B;
    B.c = int(kd[3]);
    if (vd.size() != 5 || !HasDims(*values, {vd[0], C.b, C.k, B.c, C.h}))
      return bad(name + "values must be [L, b, k, c, h] as the keys");
    if (!IsFloat(keys->element_type()) || !IsFloat(values->element_type()))
      return bad(name + "keys and values must be float16, bfloat16 or float32");
    if (mask->element_type() != ffi::DataType::PRED || !HasDims(*mask, {C.b, C.t, B.c}))
      return bad(name + "mask must be bool [b, t, c]");
    const int32_t layer_k = layers.typed_data()[2 * p], layer_v = layers.typed_data()[2 * p + 1];
    if (layer_k < 0 || layer_k >= kd[0] || layer_v < 0 || layer_v >= vd[0]) return bad(name + "layer index out of range");
    B.keys = LayerOf(*keys, layer_k), B.values = LayerOf(*values, layer_v);
    B.mask = static_cast<const bool*>(mask->untyped_data());
    B.blocks = (B.c + kSlots - 1) / kSlots, B.padded = B.blocks * kSlots;
    slots += B.c;
    if (B.c) C.banks.push_back(std::move(B));
  }
  if (C.k == 0 || C.n % C.k) return bad("query heads must be a multiple of kv heads");
  C.g = C.n / C.k;
  C.sm_scale = sm_scale;
  C.q = q.typed_data();
  C.o_in = o_in.typed_data(), C.m_in = m_in.typed_data(), C.l_in = l_in.typed_data();
  C.o = o->typed_data(), C.m = m->typed_data(), C.l = l->typed_data();
  const size_t partials = size_t(C.b) * C.t * C.n;
  if (C.o != C.o_in) std::copy(C.o_in, C.o_in + partials * C.h, C.o);  // (what no item rewrites: the
  if (C.m != C.m_in) std::copy(C.m_in, C.m_in + partials, C.m);         //  tiles that see nothing)
  if (C.l != C.l_in) std::copy(C.l_in, C.l_in + partials, C.l);
  if (partials == 0 || C.banks.empty()) return ffi::Error::Success();

  C.vectors = (C.t + kLanes - 1) / kLanes;
  C.groups = (C.g + kMaxHeads - 1) / kMaxHeads;  // items of at most 4 query heads, as even as can be
  const int most = (C.g + C.groups - 1) / C.groups;  // query heads in the largest
  C.tv = 1;  // tokens: as many vectors per item as the heads leave room for, and the chunk fills
  while (most * C.tv * 2 <= kMaxVectors && C.tv < C.vectors) C.tv *= 2;
  C.tiles = (C.vectors + C.tv - 1) / C.tv;
  const int64_t pairs = int64_t(C.b) * C.t * C.n * slots;
  const int helpers = pairs < kParallelPairs ? 0 : int(pool.num_threads()) - 1;
  for (Bank& B : C.banks) {
    B.bits.resize(size_t(C.b) * C.vectors * B.padded);
    RunItems(pool, C.b * C.vectors, helpers, [&](int i) { PackMask(C, B, i / C.vectors, i % C.vectors); });
  }

  const int per_row = C.k * C.groups * C.tiles, total = C.b * per_row;
  auto run = [&C](int i) {
    const int row = i / (C.k * C.groups * C.tiles), rest = i % (C.k * C.groups * C.tiles);
    const int kv_head = rest / (C.groups * C.tiles), group = rest / C.tiles % C.groups;
    const int tile = C.tiles - 1 - rest % C.tiles;  // the last tokens first: in a causal chunk they see the most
    const int base = C.g / C.groups, extra = C.g % C.groups;
    const int r0 = group * base + std::min(group, extra), heads = base + (group < extra);
    Pick(heads, C.tv)(C, row, kv_head, r0, tile);
  };
  RunItems(pool, total, helpers, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KvjaxChunkAttention, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layers: per bank, of its keys and values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // o so far
                                  .Arg<ffi::Buffer<ffi::F32>>()   // m so far
                                  .Arg<ffi::Buffer<ffi::F32>>()   // l so far
                                  .RemainingArgs()                // keys, values, mask per bank
                                  .Attr<float>("sm_scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>()   // m
                                  .Ret<ffi::Buffer<ffi::F32>>()); // l
