// Minimal helpers for the C++ unit tests (run by ctest, also under ASan/UBSan in CI).
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/isa_levels.h"
#include "pyengine/cpu_features.h"
#include "pyengine/decoder_common.h"

#define PE_CHECK(cond)                                                          \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                             \
    }                                                                           \
  } while (0)

namespace pyengine::testing {

inline std::vector<float> random_floats(size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

inline float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return m;
}

// An fp32 DecoderLinear over w [n, k] (and bias [n] or null), and the same linear in double.
inline DecoderLinear f32_linear(const std::vector<float>& w, const float* bias, int64_t n, int64_t k) {
  DecoderLinear d;
  d.weight_f32 = w.data();
  d.bias = bias;
  d.out_features = n;
  d.in_features = k;
  return d;
}

inline void ref_linear(const float* x, const std::vector<float>& w, const float* bias, float* y, int64_t n,
                       int64_t k) {
  for (int64_t i = 0; i < n; ++i) {
    double acc = bias ? bias[i] : 0.0;
    for (int64_t j = 0; j < k; ++j) acc += double(x[j]) * w[i * k + j];
    y[i] = float(acc);
  }
}

// One query row q [d] attending keys and values 0 .. n_keys - 1 (rows of d floats at k and v), in
// double: out [d] = softmax(q . k_j / sqrt(d)) . v_j.
inline void ref_attention_row(const float* q, const float* k, const float* v, int64_t n_keys, int64_t d,
                              float* out) {
  std::vector<double> score(n_keys);
  double mx = -1e30, sum = 0;
  for (int64_t j = 0; j < n_keys; ++j) {
    double s = 0;
    for (int64_t i = 0; i < d; ++i) s += double(q[i]) * k[j * d + i];
    score[j] = s / std::sqrt(double(d));
    mx = std::fmax(mx, score[j]);
  }
  for (auto& s : score) sum += (s = std::exp(s - mx));
  for (int64_t i = 0; i < d; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < n_keys; ++j) acc += score[j] * v[j * d + i];
    out[i] = float(acc / sum);
  }
}

// Every ISA level this CPU can run, lowest first.
// The levels this CPU runs, lowest first.
inline std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (const cpu::IsaLevel& level : cpu::kIsaLevels) {
    if (isa_includes(detected_isa(), level.isa)) out.push_back(level.isa);
  }
  return out;
}

}  // namespace pyengine::testing
