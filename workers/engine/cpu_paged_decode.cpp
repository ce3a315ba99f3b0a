// Paged decode attention on the CPU: one query token per sequence, keys and values read straight
// from the paged cache through the block table (no gather copy).
//
// A work item is a run of one sequence's blocks, all heads at once, so every cache block is
// streamed once, whole and in order, while the next one is prefetched a share per head.
// Softmax is online (one pass over K and V per block, fp32 running max and sum). Short batches split long contexts
// into several items per sequence and merge the partial results by log-sum-exp at the end
// (flash-decoding), so every thread has work at batch 1. Threads take items from a shared
// counter, so uneven lengths still balance. Inner loops use AVX-512 (and AVX512-BF16 dot
// products for bf16) where the compiler targets them, portable SIMD loops otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

namespace {

constexpr int64_t kItemsPerThread = 4;  // split contexts until each thread has this many items
constexpr int64_t kMinSplitBlocks = 4;  // never split finer: each split costs a merge

// exp for x <= 0 (softmax after subtracting the max): 2^n * 2^f with f in [-0.5, 0.5] and a
// degree-6 polynomial for 2^f, about 1e-7 relative error; vectorizes, unlike std::exp.
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(t - 0.5f));  // round, as t <= 0
  const float f = (t - n) * 0.693147180559945309f;
  const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f +
                  f * (8.3333338e-3f + f * 1.3888889e-3f)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifdef PAGODA_AVX512
// 16 elements (the first bits of `m`) widened to fp32
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// 16 fp32 lanes whose sum is q . k (reduced once per 16 keys by sum_lanes16)
template <typename T>
inline __m512 dot_lanes(const float* q, const T* k, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = n - d >= 16 ? __mmask16(0xFFFF) : tail16(n - d);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16(k + d, m), acc);
  }
  return acc;
}

#ifdef __AVX512BF16__
// bf16 query times bf16 key: pairs of exact products summed in fp32, 32 elements per step
inline __m512 dot_lanes(const c10::BFloat16* q, const c10::BFloat16* k, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 32) {
    const __mmask32 m = n - d >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (n - d)) - 1);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, q + d),
                           (__m512bh)_mm512_maskz_loadu_epi16(m, k + d));
  }
  return acc;
}
template <typename T> constexpr bool kRawQuery = std::is_same_v<T, c10::BFloat16>;
#else
template <typename T> constexpr bool kRawQuery = false;
#endif

// lane t of the result is the sum of a[t]'s 16 lanes: a transpose-and-add tree
inline __m512 sum_lanes16(const __m512* a) {
  __m512 quad[4];  // per 128-bit lane: partial sums of a[4i .. 4i+3]
  for (int i = 0; i < 4; ++i) {
    const __m512* x = a + 4 * i;
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]),
                                     _mm512_unpackhi_ps(x[0], x[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]),
                                     _mm512_unpackhi_ps(x[2], x[3]));
    quad[i] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  }
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x44),
                                   _mm512_shuffle_f32x4(quad[0], quad[1], 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x44),
                                   _mm512_shuffle_f32x4(quad[2], quad[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88),
                       _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

// out[t] = scale * q . k_t for up to 16 keys `stride` apart
template <typename Q, typename T>
inline void score_tile(const Q* q, const T* k, int64_t stride, int64_t count, int64_t n,
                       float scale, float* out) {
  __m512 a[16];
  for (int64_t t = 0; t < 16; ++t)
    a[t] = t < count ? dot_lanes(q, k + t * stride, n) : _mm512_setzero_ps();
  const __m512 scores = _mm512_mul_ps(sum_lanes16(a), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, tail16(count), scores);
}

// acc[h] += sum_t p[h][t] * v_t for the H heads of one KV group, each value row loaded and
// widened once for all of them; 64 outputs per head at a time in registers.
template <int H, typename T>
inline void weighted_sum_heads(float* acc, int64_t acc_stride, const float* p, int64_t p_stride,
                               const T* v, int64_t stride, int64_t count, int64_t n) {
  for (int64_t d0 = 0; d0 < n; d0 += 64) {
    __mmask16 m[4];
    __m512 a[H][4];
    for (int i = 0; i < 4; ++i) {
      m[i] = tail16(std::clamp<int64_t>(n - d0 - 16 * i, 0, 16));
      for (int h = 0; h < H; ++h)
        a[h][i] = _mm512_maskz_loadu_ps(m[i], acc + h * acc_stride + d0 + 16 * i);
    }
    for (int64_t t = 0; t < count; ++t) {
      const T* vt = v + t * stride + d0;
      __m512 x[4];
      for (int i = 0; i < 4; ++i) x[i] = load16(vt + 16 * i, m[i]);
      for (int h = 0; h < H; ++h) {
        const __m512 pt = _mm512_set1_ps(p[h * p_stride + t]);
        for (int i = 0; i < 4; ++i) a[h][i] = _mm512_fmadd_ps(pt, x[i], a[h][i]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < H; ++h)
        _mm512_mask_storeu_ps(acc + h * acc_stride + d0 + 16 * i, m[i], a[h][i]);
  }
}

// the group of heads in register-sized sets of up to four
template <typename T>
inline void weighted_sum_group(float* acc, int64_t acc_stride, const float* p, int64_t p_stride,
                               int64_t heads, const T* v, int64_t stride, int64_t count,
                               int64_t n) {
  for (int64_t h = 0; h < heads; h += 4) {
    float* a = acc + h * acc_stride;
    const float* ph = p + h * p_stride;
    switch (std::min<int64_t>(4, heads - h)) {
      case 4: weighted_sum_heads<4>(a, acc_stride, ph, p_stride, v, stride, count, n); break;
      case 3: weighted_sum_heads<3>(a, acc_stride, ph, p_stride, v, stride, count, n); break;
      case 2: weighted_sum_heads<2>(a, acc_stride, ph, p_stride, v, stride, count, n); break;
      default: weighted_sum_heads<1>(a, acc_stride, ph, p_stride, v, stride, count, n);
    }
  }
}
#else
template <typename T> constexpr bool kRawQuery = false;

template <typename T>
inline void score_tile(const float* q, const T* k, int64_t stride, int64_t count, int64_t n,
                       float scale, float* out) {
  for (int64_t t = 0; t < count; ++t) {
    const T* kt = k + t * stride;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += q[d] * widen(kt[d]);
    out[t] = s * scale;
  }
}

template <typename T>
inline void weighted_sum(float* acc, const float* p, const T* v, int64_t stride, int64_t count,
                         int64_t n) {
  for (int64_t t = 0; t < count; ++t) {
    const T* vt = v + t * stride;
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) acc[d] += p[t] * widen(vt[d]);
  }
}
#endif

#ifdef PAGODA_AVX512
inline float max_of(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < n; t += 16)
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail16(std::min<int64_t>(16, n - t)), x + t));
  return _mm512_reduce_max_ps(m);
}

// x = exp(x - mx) in place; returns the sum
inline float exp_and_sum(float* x, int64_t n, float mx) {
  __m512 sum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = tail16(std::min<int64_t>(16, n - t));
    const __m512 p = _mm512_maskz_mov_ps(
        m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + t), _mm512_set1_ps(mx))));
    _mm512_mask_storeu_ps(x + t, m, p);
    sum = _mm512_add_ps(sum, p);
  }
  return _mm512_reduce_add_ps(sum);
}
#else
inline float max_of(const float* x, int64_t n) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, x[t]);
  return mx;
}

inline float exp_and_sum(float* x, int64_t n, float mx) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    x[t] = exp_nonpositive(x[t] - mx);
    sum += x[t];
  }
  return sum;
}
#endif

inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64)
    __builtin_prefetch(static_cast<const char*>(p) + off, 0, 2);  // into L2
}

struct Shape {
  int64_t heads, kv_heads, head_dim, block_size, table_width;
  int64_t group() const { return heads / kv_heads; }
  int64_t token_stride() const { return kv_heads * head_dim; }  // between tokens of one block
  int64_t block_stride() const { return block_size * token_stride(); }
};

struct Item {  // blocks [first, last) of one sequence; split >= 0 indexes the partial results
  int64_t seq, first, last, split;
};

// Running softmax state of one item: max m, sum l and unnormalized output acc, per head.
struct State {
  std::vector<float> qf, scores, m, l, acc;
  explicit State(const Shape& s)
      : qf(s.heads * s.head_dim), scores(s.heads * s.block_size), m(s.heads), l(s.heads),
        acc(s.heads * s.head_dim) {}
};

template <typename T>
void run_item(const Item& it, const T* q, const T* k_cache, const T* v_cache,
              const int32_t* table, int64_t len, const Shape& s, float scale, State& st) {
  const int64_t H = s.heads, D = s.head_dim, G = s.group(), bs = s.block_size;
  const T* qs = q + it.seq * H * D;
  if (!kRawQuery<T>)
    for (int64_t i = 0; i < H * D; ++i) st.qf[i] = widen(qs[i]);
  std::fill(st.m.begin(), st.m.end(), -INFINITY);
  std::fill(st.l.begin(), st.l.end(), 0.f);
  std::fill(st.acc.begin(), st.acc.end(), 0.f);
  const int64_t block_bytes = s.block_stride() * static_cast<int64_t>(sizeof(T));
  for (int64_t j = it.first; j < it.last; ++j) {
    // The next block is prefetched a share per head: all of it at once fills the line buffers
    // and stalls the core, a share at a time overlaps the loads with this block's math.
    const bool ahead = j + 1 < it.last;
    const char* next_k = reinterpret_cast<const char*>(k_cache + table[ahead ? j + 1 : j] *
                                                       s.block_stride());
    const char* next_v = reinterpret_cast<const char*>(v_cache + table[ahead ? j + 1 : j] *
                                                       s.block_stride());
    const int64_t share = (block_bytes / 64 + H - 1) / H * 64;
    const int64_t n = std::min(bs, len - j * bs);
    const T* kb = k_cache + table[j] * s.block_stride();
    const T* vb = v_cache + table[j] * s.block_stride();
    for (int64_t h = 0; h < H; ++h) {  // scores[h][t] = q_h . k_t
      const int64_t bytes = std::min(share, block_bytes - h * share);
      if (ahead && bytes > 0) {
        prefetch(next_k + h * share, bytes);
        prefetch(next_v + h * share, bytes);
      }
      const T* k = kb + (h / G) * D;
      for (int64_t t = 0; t < n; t += 16) {
        const int64_t count = std::min<int64_t>(16, n - t);
        float* out = st.scores.data() + h * bs + t;
        if constexpr (kRawQuery<T>)
          score_tile(qs + h * D, k + t * s.token_stride(), s.token_stride(), count, D, scale, out);
        else
          score_tile(st.qf.data() + h * D, k + t * s.token_stride(), s.token_stride(), count, D,
                     scale, out);
      }
    }
    for (int64_t h = 0; h < H; ++h) {  // online softmax: rescale what came before on a new max
      float* sc = st.scores.data() + h * bs;
      const float mx = std::max(st.m[h], max_of(sc, n));
      const float sum = exp_and_sum(sc, n, mx);
      if (mx > st.m[h]) {
        const float c = st.m[h] == -INFINITY ? 0.f : exp_nonpositive(st.m[h] - mx);
        float* a = st.acc.data() + h * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= c;
        st.l[h] *= c;
        st.m[h] = mx;
      }
      st.l[h] += sum;
    }
#ifdef PAGODA_AVX512
    for (int64_t g = 0; g < s.kv_heads; ++g)  // acc[h] += sum_t p[h][t] * v_t, per KV group
      weighted_sum_group(st.acc.data() + g * G * D, D, st.scores.data() + g * G * bs, bs, G,
                         vb + g * D, s.token_stride(), n, D);
#else
    for (int64_t h = 0; h < H; ++h)  // acc[h] += sum_t p[h][t] * v_t
      weighted_sum(st.acc.data() + h * D, st.scores.data() + h * bs, vb + (h / G) * D,
                   s.token_stride(), n, D);
#endif
  }
}

template <typename T>
void decode(const T* q, const T* k_cache, const T* v_cache, const int32_t* block_tables,
            const int32_t* seq_lens, T* out, int64_t num_seqs, const Shape& s, float scale) {
  const int64_t H = s.heads, D = s.head_dim;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (kItemsPerThread * threads + num_seqs - 1) / std::max<int64_t>(1, num_seqs);
  std::vector<Item> items;
  std::vector<int64_t> split_begin(num_seqs + 1, 0);  // sequence i's partials: [begin, begin+1)
  int64_t num_partials = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    split_begin[i] = num_partials;
    const int64_t len = seq_lens[i];
    if (len <= 0) {  // padded rows stay finite
      std::fill(out + i * H * D, out + (i + 1) * H * D, T(0));
      continue;
    }
    const int64_t blocks = (len + s.block_size - 1) / s.block_size;
    const int64_t splits = std::clamp<int64_t>(
        std::min(want, blocks / kMinSplitBlocks), 1, blocks);
    const int64_t chunk = (blocks + splits - 1) / splits;
    for (int64_t b = 0; b < blocks; b += chunk)
      items.push_back({i, b, std::min(blocks, b + chunk), splits > 1 ? num_partials++ : -1});
  }
  split_begin[num_seqs] = num_partials;
  // per partial: m and l for every head, then acc [heads, head_dim]
  std::vector<float> partials(num_partials * H * (D + 2));

  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min(threads, num_items), 1, [&](int64_t, int64_t) {
    State st(s);
    for (int64_t i = next++; i < num_items; i = next++) {
      const Item& it = items[i];
      run_item(it, q, k_cache, v_cache, block_tables + it.seq * s.table_width,
               seq_lens[it.seq], s, scale, st);
      if (it.split < 0) {
        T* o = out + it.seq * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const float inv = 1.f / st.l[h];
          for (int64_t d = 0; d < D; ++d) o[h * D + d] = static_cast<T>(st.acc[h * D + d] * inv);
        }
      } else {
        float* p = partials.data() + it.split * H * (D + 2);
        std::copy(st.m.begin(), st.m.end(), p);
        std::copy(st.l.begin(), st.l.end(), p + H);
        std::copy(st.acc.begin(), st.acc.end(), p + 2 * H);
      }
    }
  });

  for (int64_t i = 0; i < num_seqs; ++i) {  // log-sum-exp merge of split sequences
    const int64_t first = split_begin[i], last = split_begin[i + 1];
    if (last == first) continue;
    for (int64_t h = 0; h < H; ++h) {
      float mx = -INFINITY, sum = 0.f;
      for (int64_t p = first; p < last; ++p) mx = std::max(mx, partials[p * H * (D + 2) + h]);
      std::vector<float> acc(D, 0.f);
      for (int64_t p = first; p < last; ++p) {
        const float* part = partials.data() + p * H * (D + 2);
        const float w = exp_nonpositive(part[h] - mx);
        sum += w * part[H + h];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * part[2 * H + h * D + d];
      }
      T* o = out + (i * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / sum);
    }
  }
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [seqs, heads, dim] and caches [blocks, block_size, kv_heads, dim] expected");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
              q.scalar_type() == v_cache.scalar_type(), "q and caches must share a dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "block_tables and seq_lens must be int32");
  const int64_t num_seqs = q.size(0);
  const Shape s{q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1)};
  TORCH_CHECK(k_cache.size(3) == s.head_dim && s.heads % s.kv_heads == 0,
              "head_dim or GQA group mismatch");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs &&
              seq_lens.numel() == num_seqs, "one block table row and length per sequence");
  auto qc = q.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty_like(qc);
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    decode<T>(qc.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
              tables.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<T>(), num_seqs,
              s, static_cast<float>(scale));
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_decode supports float32, bfloat16 and float16");
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention (CPU)");
}
