// Paged prefill attention on the CPU: many query tokens per sequence (a prompt or a chunk of one,
// after any cached prefix), causal, keys and values read through the block table.
//
// A work item is one sequence, one KV head and a tile of its query tokens. The item first copies
// the keys and values it needs out of the cache blocks into a layout made for the inner loops
// (keys transposed, 16 per vector; values widened to fp32), then streams them once for every few
// query rows (the group's heads times the tile's tokens), with each row's scores, online-softmax
// state and output kept in registers. With AVX512-BF16, bf16 query-key products go through
// `_mm512_dpbf16_ps`; probabilities stay fp32 and weigh fp32 values, as in the decode kernel, so
// a prompt's last row matches what decode computes for it up to summation order (a cached
// prefix must not change a greedy answer). Without AVX-512 a portable loop computes the same.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_simd.h"

namespace {

constexpr int64_t kTile = 32;  // query tokens per work item
constexpr int64_t kKeys = 16;  // keys per score vector

struct Shape {
  int64_t heads, kv_heads, head_dim, block_size, table_width;
  int64_t group() const { return heads / kv_heads; }
};

struct Item {
  int64_t seq, kv_head, first, last;  // query tokens [first, last) of the sequence
};

// Where one row (a query token and head) reads and writes, and the last key it may see.
struct Row {
  const void* q;
  void* out;
  int64_t last_key;
};

// The keys and values of one item in the inner loops' layout, reused by a thread's items.
struct Packed {
  std::vector<uint32_t> k;    // bf16 key pairs [chunk][dim pair][16 keys]
  std::vector<float> kf, vf;  // fp32 keys [chunk][dim][16 keys], values [chunk][16 keys][dim]
};

template <typename T>
const T* cache_row(const T* cache, const int32_t* table, int64_t key, int64_t head,
                   const Shape& s) {
  const int64_t block = table[key / s.block_size], offset = key % s.block_size;
  return cache + ((block * s.block_size + offset) * s.kv_heads + head) * s.head_dim;
}

template <typename T>
void pack_fp32(const T* k_cache, const T* v_cache, const int32_t* table, int64_t head,
               int64_t num_keys, const Shape& s, Packed& p) {
  const int64_t D = s.head_dim, chunks = (num_keys + kKeys - 1) / kKeys;
  p.kf.assign(chunks * D * kKeys, 0.f);
  p.vf.assign(chunks * kKeys * D, 0.f);
  for (int64_t key = 0; key < num_keys; ++key) {
    const T* k = cache_row(k_cache, table, key, head, s);
    const T* v = cache_row(v_cache, table, key, head, s);
    float* kt = p.kf.data() + (key / kKeys) * D * kKeys + key % kKeys;
    float* vt = p.vf.data() + key * D;
    for (int64_t d = 0; d < D; ++d) {
      kt[d * kKeys] = widen(k[d]);
      vt[d] = widen(v[d]);
    }
  }
}

void pack_bf16(const c10::BFloat16* k_cache, const c10::BFloat16* v_cache, const int32_t* table,
               int64_t head, int64_t num_keys, const Shape& s, Packed& p) {
  const int64_t D = s.head_dim, pairs = D / 2, chunks = (num_keys + kKeys - 1) / kKeys;
  p.k.assign(chunks * pairs * kKeys, 0u);
  p.vf.assign(chunks * kKeys * D, 0.f);
  for (int64_t key = 0; key < num_keys; ++key) {
    uint32_t words[256];  // one key's dims as bf16 pairs (head_dim <= 512)
    std::memcpy(words, cache_row(k_cache, table, key, head, s), D * sizeof(c10::BFloat16));
    uint32_t* kt = p.k.data() + (key / kKeys) * pairs * kKeys + key % kKeys;
    for (int64_t i = 0; i < pairs; ++i) kt[i * kKeys] = words[i];
    const c10::BFloat16* v = cache_row(v_cache, table, key, head, s);
    float* vt = p.vf.data() + key * D;
    for (int64_t d = 0; d < D; ++d) vt[d] = widen(v[d]);
  }
}

#ifdef PAGODA_AVX512
// Online softmax over one chunk of R rows' scores; returns the probabilities (masked keys 0)
// and rescales each row's output by how much its running max moved.
template <int R, int V>
inline void softmax_chunk(__m512 (&s)[R], const Row* rows, int64_t chunk, float scale,
                          float (&m)[R], float (&l)[R], __m512 (&acc)[R][V]) {
  const __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(chunk * kKeys)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                          12, 13, 14, 15));
  for (int r = 0; r < R; ++r) {
    const __mmask16 valid = _mm512_cmple_epi32_mask(
        keys, _mm512_set1_epi32(static_cast<int32_t>(rows[r].last_key)));
    const __m512 x = _mm512_maskz_mul_ps(valid, s[r], _mm512_set1_ps(scale));
    if (!valid) {
      s[r] = _mm512_setzero_ps();
      continue;
    }
    const float mx = std::max(m[r], _mm512_mask_reduce_max_ps(valid, x));
    const __m512 p = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
    if (mx > m[r]) {
      const float c = m[r] == -INFINITY ? 0.f : std::exp(m[r] - mx);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_mul_ps(acc[r][v], _mm512_set1_ps(c));
      l[r] *= c;
      m[r] = mx;
    }
    l[r] += _mm512_reduce_add_ps(p);
    s[r] = p;
  }
}

template <typename T, int R, int V>
inline void store_rows(const Row* rows, const float (&l)[R], __m512 (&acc)[R][V]) {
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / l[r]);
    T* o = static_cast<T*>(rows[r].out);
    for (int v = 0; v < V; ++v) {
      const __m512 y = _mm512_mul_ps(acc[r][v], inv);
      if constexpr (std::is_same_v<T, float>)
        _mm512_storeu_ps(o + 16 * v, y);
      else if constexpr (std::is_same_v<T, c10::Half>)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * v),
                            _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT));
#ifdef __AVX512BF16__
      else if constexpr (std::is_same_v<T, c10::BFloat16>)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * v), (__m256i)_mm512_cvtneps_pbh(y));
#endif
      else
        for (int i = 0; i < 16; ++i) o[16 * v + i] = static_cast<T>(y[i]);
    }
  }
}

// acc[r] += sum_t p[r][t] * v_t over one chunk of fp32 values [16 keys][16 * V]
template <int R, int V>
inline void add_values(const __m512 (&p)[R], const float* values, __m512 (&acc)[R][V]) {
  alignas(64) float pr[R][kKeys];
  for (int r = 0; r < R; ++r) _mm512_store_ps(pr[r], p[r]);
  for (int64_t t = 0; t < kKeys; ++t)
    for (int v = 0; v < V; ++v) {
      const __m512 x = _mm512_loadu_ps(values + t * 16 * V + 16 * v);
      for (int r = 0; r < R; ++r)
        acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(pr[r][t]), x, acc[r][v]);
    }
}

// R rows against the fp32-packed keys and values; V = head_dim / 16.
template <typename T, int R, int V>
void rows_fp32(const Row* rows, const Packed& p, float scale) {
  constexpr int64_t D = 16 * V;
  float q[R][D];
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) q[r][d] = widen(static_cast<const T*>(rows[r].q)[d]);
  __m512 acc[R][V];
  float m[R], l[R];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  int64_t last = 0;
  for (int r = 0; r < R; ++r) last = std::max(last, rows[r].last_key);
  for (int64_t c = 0; c <= last / kKeys; ++c) {
    __m512 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
    const float* kt = p.kf.data() + c * D * kKeys;
    for (int64_t d = 0; d < D; ++d) {
      const __m512 k = _mm512_loadu_ps(kt + d * kKeys);
      for (int r = 0; r < R; ++r) s[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k, s[r]);
    }
    softmax_chunk<R, V>(s, rows, c, scale, m, l, acc);
    add_values<R, V>(s, p.vf.data() + c * kKeys * D, acc);
  }
  store_rows<T, R, V>(rows, l, acc);
}

#ifdef __AVX512BF16__
// R bf16 rows against the pair-packed keys (exact products summed in fp32) and fp32 values.
template <int R, int V>
void rows_bf16(const Row* rows, const Packed& p, float scale) {
  constexpr int64_t D = 16 * V, pairs = D / 2;
  __m512 acc[R][V];
  float m[R], l[R];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  int64_t last = 0;
  for (int r = 0; r < R; ++r) last = std::max(last, rows[r].last_key);
  for (int64_t c = 0; c <= last / kKeys; ++c) {
    __m512 s[R];
    for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
    const uint32_t* kt = p.k.data() + c * pairs * kKeys;
    for (int64_t i = 0; i < pairs; ++i) {
      const __m512bh k = (__m512bh)_mm512_loadu_si512(kt + i * kKeys);
      for (int r = 0; r < R; ++r) {
        uint32_t word;
        std::memcpy(&word, static_cast<const uint32_t*>(rows[r].q) + i, sizeof word);
        s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)_mm512_set1_epi32(word), k);
      }
    }
    softmax_chunk<R, V>(s, rows, c, scale, m, l, acc);
    add_values<R, V>(s, p.vf.data() + c * kKeys * D, acc);
  }
  store_rows<c10::BFloat16, R, V>(rows, l, acc);
}
#endif
#endif

// Portable path: one row at a time straight from the cache.
template <typename T>
void row_portable(const Row& row, const T* k_cache, const T* v_cache, const int32_t* table,
                  int64_t head, const Shape& s, float scale) {
  const int64_t D = s.head_dim, n = row.last_key + 1;
  const T* q = static_cast<const T*>(row.q);
  std::vector<float> p(n), acc(D, 0.f);
  float mx = -INFINITY, sum = 0.f;
  for (int64_t key = 0; key < n; ++key) {
    const T* k = cache_row(k_cache, table, key, head, s);
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += widen(q[d]) * widen(k[d]);
    p[key] = dot * scale;
    mx = std::max(mx, p[key]);
  }
  for (int64_t key = 0; key < n; ++key) {
    p[key] = std::exp(p[key] - mx);
    sum += p[key];
    const T* v = cache_row(v_cache, table, key, head, s);
    for (int64_t d = 0; d < D; ++d) acc[d] += p[key] * widen(v[d]);
  }
  T* o = static_cast<T*>(row.out);
  for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / sum);
}

template <typename T>
void run_item(const Item& it, const T* q, const T* k_cache, const T* v_cache, T* out,
              const int32_t* table, int64_t q_start, int64_t q_len, int64_t seq_len,
              const Shape& s, float scale, Packed& packed) {
  const int64_t G = s.group(), D = s.head_dim, H = s.heads;
  std::vector<Row> rows;
  for (int64_t t = it.first; t < it.last; ++t)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t offset = ((q_start + t) * H + it.kv_head * G + g) * D;
      rows.push_back({q + offset, out + offset, seq_len - q_len + t});
    }
  const int64_t num_rows = static_cast<int64_t>(rows.size());
  const int64_t num_keys = rows.back().last_key + 1;
  auto each = [&](auto run, int64_t step) {  // run(first of `step` rows), the last group padded
    int64_t r = 0;
    for (; r + step <= num_rows; r += step) run(rows.data() + r);
    if (r == num_rows) return;
    Row group[8];
    for (int64_t i = 0; i < step; ++i) group[i] = rows[std::min(r + i, num_rows - 1)];
    run(group);  // a repeated row writes the same output twice
  };
#ifdef PAGODA_AVX512
  auto dispatch = [&](auto v_tag, auto use_bf16) {
    constexpr int V = decltype(v_tag)::value;
    constexpr int R = V <= 4 ? 4 : 2;  // R rows x V output vectors stay in registers
#ifdef __AVX512BF16__
    if constexpr (decltype(use_bf16)::value) {
      pack_bf16(k_cache, v_cache, table, it.kv_head, num_keys, s, packed);
      return each([&](const Row* r) { rows_bf16<R, V>(r, packed, scale); }, R);
    }
#endif
    pack_fp32(k_cache, v_cache, table, it.kv_head, num_keys, s, packed);
    each([&](const Row* r) { rows_fp32<T, R, V>(r, packed, scale); }, R);
  };
#ifdef __AVX512BF16__
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool kBf16 = false;
#endif
  using B = std::integral_constant<bool, kBf16>;
  switch (D) {
    case 32: return dispatch(std::integral_constant<int, 2>{}, B{});
    case 64: return dispatch(std::integral_constant<int, 4>{}, B{});
    case 96: return dispatch(std::integral_constant<int, 6>{}, B{});
    case 128: return dispatch(std::integral_constant<int, 8>{}, B{});
    default: break;
  }
#endif
  (void)each;
  (void)packed;
  for (const Row& row : rows) row_portable(row, k_cache, v_cache, table, it.kv_head, s, scale);
}

template <typename T>
void prefill(const T* q, const T* k_cache, const T* v_cache, T* out, const int32_t* tables,
             const int32_t* query_start, const int32_t* seq_lens, const int32_t* seqs,
             int64_t num_seqs, const Shape& s, float scale) {
  std::vector<Item> items;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const int64_t seq = seqs[i], len = query_start[seq + 1] - query_start[seq];
    for (int64_t first = 0; first < len; first += kTile)
      for (int64_t h = 0; h < s.kv_heads; ++h)
        items.push_back({seq, h, first, std::min(len, first + kTile)});
  }
  // costliest first (the most keys), so the last items to finish are short ones
  auto keys = [&](const Item& it) {
    return seq_lens[it.seq] - (query_start[it.seq + 1] - query_start[it.seq]) + it.last;
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const Item& a, const Item& b) { return keys(a) > keys(b); });
  std::atomic<int64_t> next{0};
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, std::min(threads, num_items), 1, [&](int64_t, int64_t) {
    Packed packed;
    for (int64_t i = next++; i < num_items; i = next++) {
      const Item& it = items[i];
      run_item(it, q, k_cache, v_cache, out, tables + it.seq * s.table_width,
               query_start[it.seq], query_start[it.seq + 1] - query_start[it.seq],
               seq_lens[it.seq], s, scale, packed);
    }
  });
}

// Writes attention for the query rows of sequences `seqs` into `out` (same shape as q).
void paged_prefill(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                   torch::Tensor block_tables, torch::Tensor query_start, torch::Tensor seq_lens,
                   torch::Tensor seqs, torch::Tensor out, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [tokens, heads, dim] and caches [blocks, block_size, kv_heads, dim] expected");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
              q.scalar_type() == v_cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, caches and out must share a dtype");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes() &&
              k_cache.is_contiguous() && v_cache.is_contiguous(),
              "contiguous q, out and caches expected");
  for (const auto& t : {block_tables, query_start, seq_lens, seqs})
    TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous(),
                "block_tables, query_start, seq_lens and seqs must be contiguous int32");
  const Shape s{q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), block_tables.size(1)};
  TORCH_CHECK(k_cache.size(3) == s.head_dim && s.heads % s.kv_heads == 0 && s.head_dim <= 512,
              "head_dim or GQA group mismatch");
  TORCH_CHECK(query_start.numel() == seq_lens.numel() + 1 &&
              block_tables.size(0) == seq_lens.numel(), "one table row and length per sequence");
  auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    prefill<T>(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), out.data_ptr<T>(),
               block_tables.data_ptr<int32_t>(), query_start.data_ptr<int32_t>(),
               seq_lens.data_ptr<int32_t>(), seqs.data_ptr<int32_t>(), seqs.numel(), s,
               static_cast<float>(scale));
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_prefill supports float32, bfloat16 and float16");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_prefill", &paged_prefill, "paged causal prefill attention (CPU)");
}
