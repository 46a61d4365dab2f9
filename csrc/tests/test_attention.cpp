#include "pyengine/attention.h"

#include <limits>
#include <stdexcept>

#include "tests/test_util.h"

using namespace pyengine;

namespace {

// Naive two-pass softmax attention in double, straight from the definition.
std::vector<float> reference(const std::vector<float>& q, const std::vector<float>& k,
                             const std::vector<float>& v, const std::vector<int32_t>& q_start,
                             const std::vector<int32_t>& kv_len, const AttentionShape& s, float scale) {
  const int64_t D = s.head_dim, group = s.num_q_heads / s.num_kv_heads;
  std::vector<float> out(q.size());
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t t = 0; t < s.q_len; ++t)
      for (int64_t h = 0; h < s.num_q_heads; ++h) {
        const float* qr = &q[((b * s.q_len + t) * s.num_q_heads + h) * D];
        const int64_t kv_base = (b * s.num_kv_heads + h / group) * s.cache_len * D;
        // Keys [first, end): causal, valid, and inside the sliding window if there is one (a padding
        // row past kv_len + window keeps the last valid key).
        const int64_t position = q_start[b] + t, end = std::min<int64_t>(position + 1, kv_len[b]);
        const int64_t first = s.window > 0 ? std::min(std::max<int64_t>(0, position + 1 - s.window), end - 1) : 0;
        const int64_t n = end - first;
        const int64_t key_base = kv_base + first * D;
        std::vector<double> w(n);
        double max_score = -1e300, sum = 0;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(qr[d]) * k[key_base + j * D + d];
          w[j] = dot * scale;
          max_score = std::max(max_score, w[j]);
        }
        for (auto& x : w) sum += (x = std::exp(x - max_score));
        float* o = &out[((b * s.q_len + t) * s.num_q_heads + h) * D];
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0;
          for (int64_t j = 0; j < n; ++j) acc += w[j] * v[key_base + j * D + d];
          o[d] = float(acc / sum);
        }
      }
  return out;
}

void check_case(const AttentionShape& s, std::vector<int32_t> q_start, std::vector<int32_t> kv_len) {
  const int64_t kv_size = s.batch * s.num_kv_heads * s.cache_len * s.head_dim;
  auto q = testing::random_floats(s.batch * s.q_len * s.num_q_heads * s.head_dim, 1);
  auto k = testing::random_floats(kv_size, 2), v = testing::random_floats(kv_size, 3);
  const float scale = 1.0f / std::sqrt(float(s.head_dim));
  const auto expected = reference(q, k, v, q_start, kv_len, s, scale);
  // Entries past kv_len must never be read: poison them.
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < s.num_kv_heads; ++h)
      for (int64_t j = kv_len[b]; j < s.cache_len; ++j)
        for (int64_t d = 0; d < s.head_dim; ++d) {
          const int64_t i = ((b * s.num_kv_heads + h) * s.cache_len + j) * s.head_dim + d;
          k[i] = v[i] = std::numeric_limits<float>::quiet_NaN();
        }
  std::vector<float> out(q.size());
  for (Isa isa : testing::supported_isas()) {
    set_isa(isa);
    attention(q.data(), k.data(), v.data(), out.data(), q_start.data(), kv_len.data(), s, scale);
    const float err = testing::max_abs_diff(out, expected);
    if (!(err < 2e-5f)) std::fprintf(stderr, "isa %s: max error %g\n", isa_name(isa), err);
    PE_CHECK(err < 2e-5f);
  }
}

}  // namespace

int main() {
  // Decode: SmolLM2 heads, a long ragged batch, head_dim 3.
  check_case({1, 1, 9, 3, 300, 64}, {299}, {300});
  check_case({2, 1, 8, 1, 700, 128}, {699, 40}, {700, 41});
  check_case({2, 1, 2, 2, 9, 3}, {8, 0}, {9, 1});
  // Prefill from 0 and a continued chunk, with padding rows past kv_len.
  check_case({2, 17, 9, 3, 20, 64}, {0, 0}, {17, 9});
  check_case({2, 70, 4, 4, 150, 80}, {5, 60}, {75, 100});
  check_case({1, 5, 6, 2, 8, 3}, {2}, {7});
  // Prefill tiles of 8 positions x 8 heads (GQA 8), head_dim 128, keys over three blocks.
  check_case({1, 150, 8, 1, 160, 128}, {0}, {150});
  // Sliding windows: decode, prefill from 0 and continued, windows inside a block and across blocks.
  check_case({2, 1, 9, 3, 300, 64, 37}, {299, 20}, {300, 21});
  check_case({2, 150, 9, 3, 200, 64, 5}, {0, 40}, {150, 190});
  check_case({1, 130, 4, 4, 130, 80, 70}, {0}, {130});

  bool threw = false;
  try {
    std::vector<float> x(64);
    int32_t start = 0, len = 0;
    attention(x.data(), x.data(), x.data(), x.data(), &start, &len, {1, 1, 1, 1, 1, 64}, 1.0f);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  PE_CHECK(threw);
  threw = false;
  try {  // a negative window
    std::vector<float> x(64);
    int32_t start = 0, len = 1;
    attention(x.data(), x.data(), x.data(), x.data(), &start, &len, {1, 1, 1, 1, 1, 64, -1}, 1.0f);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  PE_CHECK(threw);
  std::printf("test_attention: ok\n");
  return 0;
}
