// What the CPU kernels share: the AVX-512 switch, widening of stored dtypes to fp32 and an
// exp that vectorizes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PAGODA_AVX512 1
#include <immintrin.h>
#endif

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(c10::Half x) { return static_cast<float>(x); }

// exp for x <= 0: 2^n * 2^f with f in [-0.5, 0.5] and a degree-6 polynomial for 2^f, about
// 1e-7 relative error; vectorizes, unlike std::exp.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t - 0.5f));  // round, as t <= 0
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.3888889e-3f;  // Horner with explicit FMAs: equal whether a build contracts or not
  p = __builtin_fmaf(p, f, 8.3333338e-3f);
  p = __builtin_fmaf(p, f, 4.1666668e-2f);
  p = __builtin_fmaf(p, f, 1.6666667e-1f);
  p = __builtin_fmaf(p, f, 0.5f);
  p = __builtin_fmaf(p, f, 1.0f);
  p = __builtin_fmaf(p, f, 1.0f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifdef PAGODA_AVX512
inline __mmask16 tail16(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f with f in [-0.5, 0.5]
// and a degree-6 polynomial for 2^f; below -87 it returns about 1e-38, so callers mask -inf.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.3888889e-3f);
  for (float c : {8.3333338e-3f, 4.1666668e-2f, 1.6666667e-1f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif
