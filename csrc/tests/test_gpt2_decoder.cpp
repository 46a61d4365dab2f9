// Gpt2Decoder::step against a plain scalar GPT-2 decoder written out here, for every ISA, over a
// ragged batch; bad tokens and positions throw before anything is written.
#include "pyengine/gpt2_decoder.h"

#include <cmath>
#include <stdexcept>
#include <vector>

#include "tests/test_util.h"

using namespace pyengine;
using pyengine::testing::f32_linear;
using pyengine::testing::random_floats;
using pyengine::testing::ref_attention_row;
using pyengine::testing::ref_linear;

namespace {

constexpr int64_t V = 29, H = 12, heads = 3, D = 4, I = 20, L = 2, P = 6, S = 8, B = 2;
constexpr float kEps = 1e-5f;

struct Linear {
  std::vector<float> w, bias;
};

struct Weights {
  std::vector<float> wte = random_floats(V * H, 1), wpe = random_floats(P * H, 2, 0.3f);
  std::vector<float> lnf_w = random_floats(H, 3, 0.2f), lnf_b = random_floats(H, 4, 0.1f);
  std::vector<std::vector<float>> ln1_w, ln1_b, ln2_w, ln2_b;
  std::vector<Linear> qkv, out, fc, proj;
  Weights() {
    for (auto& x : lnf_w) x += 1.0f;
    for (int64_t l = 0; l < L; ++l) {
      const unsigned s = 10 + 20 * static_cast<unsigned>(l);
      ln1_w.push_back(random_floats(H, s, 0.2f));
      ln1_b.push_back(random_floats(H, s + 1, 0.1f));
      ln2_w.push_back(random_floats(H, s + 2, 0.2f));
      ln2_b.push_back(random_floats(H, s + 3, 0.1f));
      for (auto* n : {&ln1_w.back(), &ln2_w.back()})
        for (auto& x : *n) x += 1.0f;
      qkv.push_back({random_floats(3 * H * H, s + 4, 0.3f), random_floats(3 * H, s + 5, 0.1f)});
      out.push_back({random_floats(H * H, s + 6, 0.3f), random_floats(H, s + 7, 0.1f)});
      fc.push_back({random_floats(I * H, s + 8, 0.3f), random_floats(I, s + 9, 0.1f)});
      proj.push_back({random_floats(H * I, s + 10, 0.3f), random_floats(H, s + 11, 0.1f)});
    }
  }
};

void ref_layer_norm(const float* x, const std::vector<float>& w, const std::vector<float>& b, float* y) {
  double mean = 0, var = 0;
  for (int64_t i = 0; i < H; ++i) mean += x[i];
  mean /= H;
  for (int64_t i = 0; i < H; ++i) var += (x[i] - mean) * (x[i] - mean);
  const double inv = 1.0 / std::sqrt(var / H + kEps);
  for (int64_t i = 0; i < H; ++i) y[i] = float((x[i] - mean) * inv * w[i] + b[i]);
}

float ref_gelu(float x) {
  return 0.5f * x * (1.0f + std::tanh(std::sqrt(2.0f / float(M_PI)) * (x + 0.044715f * x * x * x)));
}

// One sequence's decode step, caches [L, B, heads, S, D] (writes slot pos of sequence b).
void ref_step(const Weights& w, int64_t token, int64_t b, int64_t pos, std::vector<float>& kc, std::vector<float>& vc,
              float* logits) {
  std::vector<float> x(H), h(H), qkv(3 * H), attn(H), delta(H), f(I);
  for (int64_t i = 0; i < H; ++i) x[i] = w.wte[token * H + i] + w.wpe[pos * H + i];
  for (int64_t l = 0; l < L; ++l) {
    ref_layer_norm(x.data(), w.ln1_w[l], w.ln1_b[l], h.data());
    ref_linear(h.data(), w.qkv[l].w, w.qkv[l].bias.data(), qkv.data(), 3 * H, H);
    for (int64_t hd = 0; hd < heads; ++hd) {
      const int64_t base = ((l * B + b) * heads + hd) * S * D;
      for (int64_t d = 0; d < D; ++d) {
        kc[base + pos * D + d] = qkv[H + hd * D + d];
        vc[base + pos * D + d] = qkv[2 * H + hd * D + d];
      }
      ref_attention_row(qkv.data() + hd * D, kc.data() + base, vc.data() + base, pos + 1, D, attn.data() + hd * D);
    }
    ref_linear(attn.data(), w.out[l].w, w.out[l].bias.data(), delta.data(), H, H);
    for (int64_t i = 0; i < H; ++i) x[i] += delta[i];
    ref_layer_norm(x.data(), w.ln2_w[l], w.ln2_b[l], h.data());
    ref_linear(h.data(), w.fc[l].w, w.fc[l].bias.data(), f.data(), I, H);
    for (auto& v : f) v = ref_gelu(v);
    ref_linear(f.data(), w.proj[l].w, w.proj[l].bias.data(), delta.data(), H, I);
    for (int64_t i = 0; i < H; ++i) x[i] += delta[i];
  }
  ref_layer_norm(x.data(), w.lnf_w, w.lnf_b, h.data());
  ref_linear(h.data(), w.wte, nullptr, logits, V, H);  // tied lm_head
}

template <class Fn>
bool throws_invalid_argument(Fn fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_matches_reference(Isa isa) {
  set_isa(isa);
  const Weights w;
  std::vector<Gpt2LayerWeights> layers(L);
  for (int64_t l = 0; l < L; ++l) {
    Gpt2LayerWeights& g = layers[l];
    g.ln_1_weight = w.ln1_w[l].data();
    g.ln_1_bias = w.ln1_b[l].data();
    g.qkv = f32_linear(w.qkv[l].w, w.qkv[l].bias.data(), 3 * H, H);
    g.out = f32_linear(w.out[l].w, w.out[l].bias.data(), H, H);
    g.ln_2_weight = w.ln2_w[l].data();
    g.ln_2_bias = w.ln2_b[l].data();
    g.fc = f32_linear(w.fc[l].w, w.fc[l].bias.data(), I, H);
    g.proj = f32_linear(w.proj[l].w, w.proj[l].bias.data(), H, I);
  }
  const Gpt2Dims dims{V, H, heads, D, I, P, kEps};
  const DecoderLinear lm_head = f32_linear(w.wte, nullptr, V, H);
  Gpt2Decoder dec(dims, w.wte.data(), w.wpe.data(), w.lnf_w.data(), w.lnf_b.data(), lm_head, layers);

  std::vector<float> kc(L * B * heads * S * D, 0.0f), vc(kc), ref_kc(kc), ref_vc(kc), logits(B * V), ref(V);
  for (int step = 0; step < 4; ++step) {  // ragged: sequence 1 starts 2 positions later
    const int64_t tokens[B] = {(5 * step + 1) % V, (7 * step + 20) % V};
    const int32_t positions[B] = {step, step + 2};
    dec.step(tokens, B, kc.data(), vc.data(), S, positions, logits.data());
    for (int64_t b = 0; b < B; ++b) {
      ref_step(w, tokens[b], b, positions[b], ref_kc, ref_vc, ref.data());
      for (int64_t v = 0; v < V; ++v) PE_CHECK(std::fabs(logits[b * V + v] - ref[v]) < 1e-4f);
    }
  }
  PE_CHECK(pyengine::testing::max_abs_diff(kc, ref_kc) < 1e-4f && pyengine::testing::max_abs_diff(vc, ref_vc) < 1e-4f);

  // Bad arguments throw before writing anything: a token outside the vocabulary, a position past the
  // position embedding (P < S), a position past the cache.
  const std::vector<float> kc_before = kc;
  const int64_t ok_tokens[B] = {1, 2}, bad_tokens[B] = {1, V};
  const int32_t ok_pos[B] = {0, 1}, past_table[B] = {0, P}, past_cache[B] = {S, 0};
  PE_CHECK(throws_invalid_argument([&] { dec.step(bad_tokens, B, kc.data(), vc.data(), S, ok_pos, logits.data()); }));
  PE_CHECK(throws_invalid_argument([&] { dec.step(ok_tokens, B, kc.data(), vc.data(), S, past_table, logits.data()); }));
  PE_CHECK(throws_invalid_argument([&] { dec.step(ok_tokens, B, kc.data(), vc.data(), S, past_cache, logits.data()); }));
  PE_CHECK(kc == kc_before);

  // Construction rejects a linear of the wrong shape and a missing norm.
  std::vector<Gpt2LayerWeights> bad = layers;
  bad[1].fc.out_features = I + 1;
  PE_CHECK(throws_invalid_argument(
      [&] { Gpt2Decoder(dims, w.wte.data(), w.wpe.data(), w.lnf_w.data(), w.lnf_b.data(), lm_head, bad); }));
  bad = layers;
  bad[0].ln_2_bias = nullptr;
  PE_CHECK(throws_invalid_argument(
      [&] { Gpt2Decoder(dims, w.wte.data(), w.wpe.data(), w.lnf_w.data(), w.lnf_b.data(), lm_head, bad); }));
}

}  // namespace

int main() {
  for (Isa isa : pyengine::testing::supported_isas()) test_matches_reference(isa);
  std::printf("test_gpt2_decoder: ok\n");
  return 0;
}
