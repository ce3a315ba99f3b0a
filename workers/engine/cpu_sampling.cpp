// One sampled token per row on a CPU: temperature, top-k, top-p and min-p, then one inverse-CDF
// draw, in a few passes over the row where PyTorch sorts it (a sort of 49k logits costs ~2 ms a
// row on this CPU; these passes ~0.05 ms).
//
// Each token's weight is e = exp((logit - max) / temperature), in (0, 1]; each cut is a weight,
// and a token stays when its weight reaches every cut. Top-k and top-p first bound their cut
// from below and look only at the few tokens above that bound: top-k selects among them, top-p
// sums them on a histogram whose buckets follow the weights' float bits (so they hold the row
// in falling order) and sorts only the bucket its cut falls in.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "cpu_simd.h"

namespace {

constexpr int kOctaveBuckets = 128;             // buckets per halving of the weight
constexpr int kBuckets = 32 * kOctaveBuckets;   // weights below 2^-32 share the last
constexpr int64_t kTopKChunks = 1024;           // chunks whose maxima bound the top-k cut
constexpr int64_t kBlock = 256;                 // tokens per block of the draw's walk
constexpr int kTemperature = 0, kTopK = 1, kTopP = 2, kMinP = 3;  // sampling_rows.py's columns

inline int bucket_of(float e) {
  uint32_t bits;
  std::memcpy(&bits, &e, sizeof bits);
  const uint32_t one = 0x3F800000u;  // 1.0f: the top token's weight, the largest
  return static_cast<int>(std::min<uint32_t>((one - bits) >> (23 - 7), kBuckets - 1));
}

struct Scratch {
  std::vector<float> weights;
  std::vector<double> mass;
  std::vector<float> bucket;  // the tokens of the bucket top-p's cut falls in
  std::vector<float> maxima;  // top-k's chunk maxima
  std::vector<float> blocks;
  std::vector<float> heavy;  // the weights above a cut's bound
};

// The bucket where the running total of `mass` over the buckets first reaches `target`, and
// that total before it; kBuckets where it never does.
std::pair<int, double> crossing(const std::vector<double>& mass, double target) {
  double before = 0;
  for (int b = 0; b < kBuckets; ++b) {
    if (before + mass[b] >= target) return {b, before};
    before += mass[b];
  }
  return {kBuckets, before};
}

// The weights of the row's tokens from `floor` up that fall in bucket b, largest first.
void gather_bucket(const float* e, int64_t n, float floor, int b, std::vector<float>& out) {
  out.clear();
  for (int64_t i = 0; i < n; ++i)
    if (e[i] >= floor && bucket_of(e[i]) == b) out.push_back(e[i]);
  std::sort(out.begin(), out.end(), std::greater<float>());
}

// The weights from `floor` up, in token order, into out (room for n + 16); how many.
int64_t compact(const float* e, int64_t n, float floor, float* out) {
  int64_t j = 0, i = 0;
#ifdef PAGODA_AVX512
  // compressed in a register and stored whole: a compressing store is slow on some CPUs
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(e + i);
    const __mmask16 m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(floor), _CMP_GE_OQ);
    _mm512_storeu_ps(out + j, _mm512_maskz_compress_ps(m, v));
    j += __builtin_popcount(m);
  }
#endif
  for (; i < n; ++i) {  // written always, kept when it counts: no branch to mispredict
    out[j] = e[i];
    j += e[i] >= floor;
  }
  return j;
}

// The k-th largest weight: the top-k cut (ties with it are kept too, as in vLLM).
float top_k_cut(const float* e, int64_t n, int64_t k, Scratch& s) {
  // The maxima of k or more chunks are as many tokens' weights, so the k-th largest weight is
  // at least the k-th largest maximum: only the tokens from there up are searched.
  const int64_t chunks = std::min(n, std::max<int64_t>(k, kTopKChunks));
  const int64_t width = (n + chunks - 1) / chunks;
  std::vector<float>& maxima = s.maxima;
  maxima.clear();
  for (int64_t start = 0; start < n; start += width) {
    float m = 0.f;
#pragma omp simd reduction(max : m)
    for (int64_t i = start; i < std::min(n, start + width); ++i) m = std::max(m, e[i]);
    maxima.push_back(m);
  }
  float floor = std::numeric_limits<float>::min();  // weighs something
  if (static_cast<int64_t>(maxima.size()) >= k) {  // rounding up the width can leave fewer
    std::nth_element(maxima.begin(), maxima.begin() + k - 1, maxima.end(),
                     std::greater<float>());
    floor = std::max(floor, maxima[k - 1]);
  }
  float* heavy = s.heavy.data();
  const int64_t m = compact(e, n, floor, heavy);
  if (m < k) return 0.f;  // fewer than k tokens weigh anything: all stay
  std::nth_element(heavy, heavy + k - 1, heavy + m, std::greater<float>());
  return heavy[k - 1];
}

// The smallest weight top-p keeps among the tokens >= cut: by falling weight, a token stays
// while the mass before it is below top_p of the kept tokens' mass (the top token always).
float top_p_cut(const float* e, int64_t n, float cut, float top_p, Scratch& s) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += e[i] >= cut ? e[i] : 0.f;
  if (!(total > 0.f)) return cut;  // nothing weighs anything (a row of NaNs): nothing to cut
  // The tokens under `floor` weigh less together than the 1 - top_p that top-p drops, so
  // they all go: only the few above it (about a tenth of a real vocabulary) are counted.
  const float floor = std::max({cut, (1.f - top_p) * total / n,
                                std::numeric_limits<float>::min()});
  float* heavy = s.heavy.data();
  const int64_t m = compact(e, n, floor, heavy);
  std::fill(s.mass.begin(), s.mass.end(), 0.0);
  for (int64_t i = 0; i < m; ++i) s.mass[bucket_of(heavy[i])] += heavy[i];
  const double target = static_cast<double>(top_p) * total;
  auto [b, before] = crossing(s.mass, target);
  if (b == kBuckets) return floor;  // the sums rounded below top_p: all above floor stay
  gather_bucket(heavy, m, floor, b, s.bucket);
  float smallest = s.bucket.front();
  for (float w : s.bucket) {
    if (before >= target) break;
    smallest = w;
    before += w;
  }
  return smallest;
}

// The first token whose running kept weight (>= cut) reaches `goal`, skipping whole blocks by
// their sums; the last kept token where the sums round apart.
int64_t walk(const float* e, int64_t n, float cut, float goal, const std::vector<float>& blocks) {
  float running = 0.f;
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (running + blocks[b] < goal) {
      running += blocks[b];
      continue;
    }
    for (int64_t i = b * kBlock; i < std::min<int64_t>(n, (b + 1) * kBlock); ++i) {
      if (e[i] < cut || e[i] == 0.f) continue;
      running += e[i];
      if (running >= goal) return i;
    }
  }
  int64_t last = n - 1;
  while (last > 0 && (e[last] < cut || e[last] == 0.f)) --last;
  return last;
}

// The row's token: its argmax when greedy, else the first whose running kept weight reaches
// draw (in (0, 1]) times the kept total.
int64_t sample_row(const float* logits, int64_t n, const float* params, float draw,
                   Scratch& s) {
  float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
  for (int64_t i = 0; i < n; ++i) top = std::max(top, logits[i]);
  const float temperature = params[kTemperature];
  if (temperature == 0.f)  // the first of the largest; token 0 where NaNs leave none
    return (std::find(logits, logits + n, top) - logits) % n;
  float* e = s.weights.data();
  const float inv_t = 1.f / temperature;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {  // a masked (-inf) token weighs 0, not exp(-87)
    const float x = logits[i];  // multiplied by its mask, not selected: the loop vectorizes
    e[i] = exp_nonpositive((x - top) * inv_t) *
           static_cast<float>(x != -std::numeric_limits<float>::infinity());
  }
  // top-k, then top-p over what top-k keeps, then min-p: a weight at least min_p of the top
  // token's, which is 1
  const auto k = static_cast<int64_t>(params[kTopK]);
  float cut = k < n ? top_k_cut(e, n, k, s) : 0.f;
  if (params[kTopP] < 1.f) cut = top_p_cut(e, n, cut, params[kTopP], s);
  cut = std::max(cut, params[kMinP]);
  float kept = 0.f;
  for (size_t b = 0; b < s.blocks.size(); ++b) {
    const int64_t end = std::min<int64_t>(n, (b + 1) * kBlock);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = b * kBlock; i < end; ++i) sum += e[i] >= cut ? e[i] : 0.f;
    s.blocks[b] = sum;
    kept += sum;
  }
  return walk(e, n, cut, draw * kept, s.blocks);
}

torch::Tensor sample(torch::Tensor logits, torch::Tensor params, torch::Tensor draws) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 &&
                  logits.scalar_type() == at::kFloat,
              "logits must be a float32 CPU tensor [rows, vocab]");
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.dim() == 2 && params.size(1) == 4 &&
                  params.size(0) == logits.size(0),
              "params must be float32 [rows, 4]");
  TORCH_CHECK(draws.scalar_type() == at::kFloat && draws.numel() == logits.size(0),
              "draws must be float32 [rows]");
  auto l = logits.contiguous();
  auto p = params.contiguous();
  auto d = draws.contiguous();
  const int64_t rows = l.size(0), n = l.size(1);
  auto out = torch::empty({rows}, torch::kLong);
  const float* lp = l.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch s{std::vector<float>(n), std::vector<double>(kBuckets), {}, {},
              std::vector<float>((n + kBlock - 1) / kBlock), std::vector<float>(n + 16)};
    for (int64_t r = begin; r < end; ++r)
      op[r] = sample_row(lp + r * n, n, pp + r * 4, dp[r], s);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample", &sample,
        "one token per row: its argmax, or temperature, top-k, top-p, min-p and a draw");
}
