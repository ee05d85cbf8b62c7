// What the CPU kernels (cpu_attention.cc: a decode step; cpu_chunk_attention.cc: a prompt chunk;
// cpu_matmul.cc: block-quantized weights) share: float16 / bfloat16 / float32 arrays read as
// float32, the exp of the softmax, the checks of an FFI operand, a layer's first element in an
// [L, ...] array, fetching lines ahead, and work items run on XLA's intra-op thread pool. The
// sources are compiled into one library (cpu_attention.build_library); everything here has internal
// linkage, so each keeps its own copy.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <mutex>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kEmptyMax = -3.4028234663852886e38f;  // xla_attention.EMPTY_MAX

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

// A float16 / bfloat16 / float32 array (scales, zeros, float keys and values), from its first
// element in this layer.
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
#elif defined(__F16C__)
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
      for (; i < n; ++i) out[i] = HalfToFloat(p[i]);
      return;
    }
    default: {  // BF16 (checked before any work): the 16 high bits of a float32
      const uint16_t* p = static_cast<const uint16_t*>(x.data) + start;
      int i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_si512(out + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))), 16));
#endif
      for (; i < n; ++i) out[i] = Bf16ToFloat(p[i]);
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

#if defined(__AVX512F__)
// exp(x) of 16 lanes x <= 0, ExpNonPositive's polynomial (0 below -87).
inline __m512 ExpNonPositiveV(__m512 x) {
  // 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 (ln 2 in two parts), e^r by Horner's rule,
  // and 2^n applied by vscalefps (no exponent arithmetic); 0 below -87 as in the scalar version
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), p, n);
}
#endif

// The element offset of layer `layer`'s first element in a [L, ...] array.
size_t LayerOffset(ffi::Span<const int64_t> dims, int32_t layer) {
  size_t per_layer = 1;
  for (size_t i = 1; i < dims.size(); ++i) per_layer *= size_t(dims[i]);
  return per_layer * size_t(layer);
}

bool IsFloat(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::F16 || t == ffi::DataType::BF16;
}

template <class Buffer>
bool HasDims(const Buffer& x, std::initializer_list<int64_t> want) {
  auto d = x.dimensions();
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

Floats LayerOf(const ffi::AnyBuffer& x, int32_t layer) {
  const size_t offset = LayerOffset(x.dimensions(), layer) * ffi::ByteWidth(x.element_type());
  return {static_cast<const char*>(x.untyped_data()) + offset, x.element_type()};
}

// Fetches the line at p into the cache: L1 (T0) or L2 (T1). An asm statement, so that the compiler
// keeps it: GCC 12 deleted a loop of __builtin_prefetch whose end it took from a std::min (C++'s
// forward-progress rule lets it drop loops it deems without effect), and the fetches with it.
template <bool T0>
inline void FetchLine(const char* p) {
#if defined(__x86_64__)
  if constexpr (T0) asm volatile("prefetcht0 %0" : : "m"(*p));
  else asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, T0 ? 3 : 2);
#endif
}

// Runs item(i) for i in [0, total) on this thread and `helpers` of the pool's threads, each taking
// the next item until none is left; returns when all are done. A helper that starts after the work
// is gone returns at once without touching `item` (only the shared counters outlive this call).
template <class Item>
void RunItems(ffi::ThreadPool& pool, int total, int helpers, const Item& item) {
  struct Shared {
    std::atomic<int> next{0};
    int total = 0, done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto work = std::make_shared<Shared>();
  work->total = total;
  const Item* run = &item;
  auto take = [work, run] {
    int ran = 0;
    for (int i; (i = work->next.fetch_add(1)) < work->total; ++ran) (*run)(i);
    if (ran) {
      std::lock_guard<std::mutex> lock(work->mu);
      work->done += ran;
      if (work->done == work->total) work->cv.notify_all();
    }
  };
  helpers = std::max(0, std::min(helpers, total - 1));
  for (int i = 0; i < helpers; ++i) pool.Schedule([take] { take(); });
  take();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done == work->total; });
}

}  // namespace
