// This machine's limits for pallas_kernels.cpu_bench, compiled with the CPU kernel's flags
// (cpu_attention._compile_command): a STREAM-like copy and a vector multiply-add loop, each on
// `threads` threads (std::thread, one slice or one loop each; the OS places them).
//
//   kvjax_copy_seconds(floats, threads, repeats)   median seconds to copy `floats` float32 (a = b)
//   kvjax_read_seconds(floats, threads, repeats)   median seconds to sum them (read only)
//   kvjax_fma_seconds(iterations, threads)         seconds for `iterations` passes of kFmaChains
//                                                  independent vector multiply-adds per thread
//   kvjax_fma_lanes()                               floats per vector multiply-add in this build
//
// Plain C ABI (ctypes); the arrays are allocated, touched and freed here.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kFmaChains = 16;  // independent accumulators: covers the multiply-add latency x pipes

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs fn(t) on threads 0..threads-1 (thread 0 is this one); returns the seconds from start to the
// last one's end.
template <class Fn>
double Parallel(int threads, Fn fn) {
  std::vector<std::thread> pool;
  const double t0 = Now();
  for (int t = 1; t < threads; ++t) pool.emplace_back(fn, t);
  fn(0);
  for (auto& th : pool) th.join();
  return Now() - t0;
}

double Median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec Set1(float x) { return _mm512_set1_ps(x); }
inline float Sum(Vec x) { return _mm512_reduce_add_ps(x); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec Set1(float x) { return _mm256_set1_ps(x); }
inline float Sum(Vec x) {
  alignas(32) float f[8];
  _mm256_store_ps(f, x);
  float s = 0;
  for (float v : f) s += v;
  return s;
}
#else
typedef float Vec __attribute__((vector_size(16)));  // what the portable build's compiler makes of it
constexpr int kLanes = 4;
inline Vec Fma(Vec a, Vec b, Vec c) { return a * b + c; }
inline Vec Set1(float x) { return Vec{x, x, x, x}; }
inline float Sum(Vec x) { return x[0] + x[1] + x[2] + x[3]; }
#endif

}  // namespace

extern "C" {

int kvjax_fma_lanes() { return kLanes; }

double kvjax_copy_seconds(int64_t floats, int threads, int repeats) {
  float* a = static_cast<float*>(std::aligned_alloc(64, size_t(floats) * 4));
  float* b = static_cast<float*>(std::aligned_alloc(64, size_t(floats) * 4));
  if (!a || !b) return -1.0;
  const int64_t per = (floats / threads + 15) / 16 * 16;
  auto slice = [&](int t, int64_t* s0, int64_t* s1) {
    *s0 = std::min<int64_t>(floats, t * per), *s1 = std::min<int64_t>(floats, *s0 + per);
  };
  Parallel(threads, [&](int t) {  // first touch by the thread that copies it
    int64_t s0, s1;
    slice(t, &s0, &s1);
    for (int64_t i = s0; i < s1; ++i) a[i] = float(i & 1023), b[i] = 0.0f;
  });
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r)
    times.push_back(Parallel(threads, [&](int t) {
      int64_t s0, s1;
      slice(t, &s0, &s1);
      std::memcpy(b + s0, a + s0, size_t(s1 - s0) * 4);
    }));
  volatile float keep = b[floats / 2];
  (void)keep;
  std::free(a);
  std::free(b);
  return Median(times);
}

double kvjax_read_seconds(int64_t floats, int threads, int repeats) {
  float* a = static_cast<float*>(std::aligned_alloc(64, size_t(floats) * 4));
  if (!a) return -1.0;
  const int64_t per = (floats / threads + 15) / 16 * 16;
  std::vector<float> sums(threads * 16);
  auto slice = [&](int t, int64_t* s0, int64_t* s1) {
    *s0 = std::min<int64_t>(floats, t * per), *s1 = std::min<int64_t>(floats, *s0 + per);
  };
  Parallel(threads, [&](int t) {
    int64_t s0, s1;
    slice(t, &s0, &s1);
    for (int64_t i = s0; i < s1; ++i) a[i] = float(i & 1023);
  });
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r)
    times.push_back(Parallel(threads, [&](int t) {
      int64_t s0, s1;
      slice(t, &s0, &s1);
      Vec acc[4] = {Set1(0), Set1(0), Set1(0), Set1(0)};
      int64_t i = s0;
      for (; i + 4 * kLanes <= s1; i += 4 * kLanes)
        for (int j = 0; j < 4; ++j) {
          Vec x;
          std::memcpy(&x, a + i + j * kLanes, sizeof(Vec));
          acc[j] += x;
        }
      float s = Sum(acc[0] + acc[1] + acc[2] + acc[3]);
      for (; i < s1; ++i) s += a[i];
      sums[t * 16] = s;
    }));
  std::free(a);
  return Median(times);
}

double kvjax_fma_seconds(int64_t iterations, int threads) {
  std::vector<float> sink(threads * 16);
  return Parallel(threads, [&](int t) {
    Vec acc[kFmaChains];
    for (int j = 0; j < kFmaChains; ++j) acc[j] = Set1(float(j + t) * 1e-3f);
    Vec x = Set1(0.999999f), y = Set1(1e-7f);
    for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
      for (int j = 0; j < kFmaChains; ++j) acc[j] = Fma(acc[j], x, y);
#if defined(__x86_64__)
      __asm__ volatile("" : "+x"(x));  // x is not known to be constant: no folding across iterations
#endif
    }
    Vec s = acc[0];
    for (int j = 1; j < kFmaChains; ++j) s += acc[j];
    sink[t * 16] = Sum(s);
  });
}

int kvjax_fma_chains() { return kFmaChains; }

}  // extern "C"
