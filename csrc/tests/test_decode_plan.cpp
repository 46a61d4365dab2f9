// DecodePlan::step replaying a hand-built plan of a Llama-family decoder (what pyengine/runtime/plan.py records
// from models/llama.py) against a plain scalar decoder written out here, for every ISA; bad tokens and
// positions throw before anything is written; inconsistent plans are refused at construction.
#include "pyengine/decode_plan.h"

#include <algorithm>
#include <functional>
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

constexpr int64_t V = 37, H = 16, Hq = 4, Hkv = 2, D = 4, I = 24, L = 2, S = 8, B = 2;
constexpr float kEps = 1e-5f;

struct Weights {
  std::vector<float> embed = random_floats(V * H, 1), final_norm = random_floats(H, 2, 0.2f);
  std::vector<std::vector<float>> attn_norm, qkv, qkv_bias, out, mlp_norm, gate_up, down;
  Weights() {
    for (int64_t l = 0; l < L; ++l) {
      const unsigned s = 10 + 10 * static_cast<unsigned>(l);
      attn_norm.push_back(random_floats(H, s, 0.2f));
      qkv.push_back(random_floats((Hq + 2 * Hkv) * D * H, s + 1, 0.3f));
      qkv_bias.push_back(random_floats((Hq + 2 * Hkv) * D, s + 2, 0.1f));
      out.push_back(random_floats(H * Hq * D, s + 3, 0.3f));
      mlp_norm.push_back(random_floats(H, s + 4, 0.2f));
      gate_up.push_back(random_floats(2 * I * H, s + 5, 0.3f));
      down.push_back(random_floats(H * I, s + 6, 0.3f));
    }
    for (auto& x : final_norm) x += 1.0f;
    for (auto& n : attn_norm) for (auto& x : n) x += 1.0f;
    for (auto& n : mlp_norm) for (auto& x : n) x += 1.0f;
  }
};

void ref_norm(const float* x, const float* w, float* y) {
  double ss = 0;
  for (int64_t i = 0; i < H; ++i) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / H) + kEps);
  for (int64_t i = 0; i < H; ++i) y[i] = x[i] * r * w[i];
}

void ref_rope(float* v, int64_t heads, int64_t pos, const std::vector<float>& cos, const std::vector<float>& sin) {
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t i = 0; i < D / 2; ++i) {
      float& a = v[h * D + i];
      float& b = v[h * D + i + D / 2];
      const float c = cos[pos * D / 2 + i], s = sin[pos * D / 2 + i], a0 = a, b0 = b;
      a = a0 * c - b0 * s;
      b = b0 * c + a0 * s;
    }
  }
}

// One sequence's decode step, caches [L, B, Hkv, S, D] (writes slot pos of sequence b); layer l attends
// the last windows[l] positions (0: all).
void ref_step(const Weights& w, const int64_t (&windows)[L], int64_t token, int64_t b, int64_t pos,
              std::vector<float>& kc, std::vector<float>& vc, const std::vector<float>& cos,
              const std::vector<float>& sin, float* logits) {
  std::vector<float> x(w.embed.begin() + token * H, w.embed.begin() + (token + 1) * H), h(H),
      qkv((Hq + 2 * Hkv) * D), attn(Hq * D), delta(H), gu(2 * I), act(I);
  for (int64_t l = 0; l < L; ++l) {
    ref_norm(x.data(), w.attn_norm[l].data(), h.data());
    ref_linear(h.data(), w.qkv[l], w.qkv_bias[l].data(), qkv.data(), (Hq + 2 * Hkv) * D, H);
    ref_rope(qkv.data(), Hq, pos, cos, sin);
    ref_rope(qkv.data() + Hq * D, Hkv, pos, cos, sin);
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      for (int64_t d = 0; d < D; ++d) {
        const int64_t slot = (((l * B + b) * Hkv + kvh) * S + pos) * D + d;
        kc[slot] = qkv[Hq * D + kvh * D + d];
        vc[slot] = qkv[(Hq + Hkv) * D + kvh * D + d];
      }
    }
    const int64_t first = windows[l] > 0 ? std::max<int64_t>(0, pos + 1 - windows[l]) : 0;
    for (int64_t qh = 0; qh < Hq; ++qh) {
      const int64_t base = ((l * B + b) * Hkv + qh / (Hq / Hkv)) * S * D + first * D;
      ref_attention_row(qkv.data() + qh * D, kc.data() + base, vc.data() + base, pos + 1 - first, D,
                        attn.data() + qh * D);
    }
    ref_linear(attn.data(), w.out[l], nullptr, delta.data(), H, Hq * D);
    for (int64_t i = 0; i < H; ++i) x[i] += delta[i];
    ref_norm(x.data(), w.mlp_norm[l].data(), h.data());
    ref_linear(h.data(), w.gate_up[l], nullptr, gu.data(), 2 * I, H);
    for (int64_t i = 0; i < I; ++i) act[i] = gu[i] / (1.0f + std::exp(-gu[i])) * gu[I + i];
    ref_linear(act.data(), w.down[l], nullptr, delta.data(), H, I);
    for (int64_t i = 0; i < H; ++i) x[i] += delta[i];
  }
  ref_norm(x.data(), w.final_norm.data(), h.data());
  ref_linear(h.data(), w.embed, nullptr, logits, V, H);  // tied lm_head
}

// The plan's buffers: 0 holds the logits (bound to step()'s output), the rest per-row scratch.
enum Buf : int32_t { kLogits, kX, kH, kQkv, kQ, kK, kAttn, kDelta, kGateUp, kAct, kBuffers };
constexpr int64_t kQkvWidth = (Hq + 2 * Hkv) * D;

PlanView whole(Buf b, int64_t width) { return {b, 0, width}; }

std::vector<PlanInstruction> llama_plan(const Weights& w, const int64_t (&windows)[L], const DecoderLinear& lm_head,
                                        std::vector<DecoderLinear>& linears) {
  std::vector<PlanInstruction> plan;
  const auto add = [&](PlanOp op, PlanView x, PlanView y, PlanView out) -> PlanInstruction& {
    PlanInstruction ins;
    ins.op = op;
    ins.x = x;
    ins.y = y;
    ins.out = out;
    plan.push_back(ins);
    return plan.back();
  };
  const auto norm = [&](bool with_delta, const float* weight) {
    auto& ins = add(with_delta ? PlanOp::kAddRmsNorm : PlanOp::kRmsNorm, whole(kX, H),
                    with_delta ? whole(kDelta, H) : PlanView{}, whole(kH, H));
    ins.weight = weight;
    ins.dim = H;
    ins.scalar = kEps;
  };
  const auto linear = [&](PlanView x, PlanView out, const DecoderLinear& lin) {
    add(PlanOp::kLinear, x, {}, out).linear = lin;
  };
  auto& embed = add(PlanOp::kEmbedding, {}, {}, whole(kX, H));
  embed.weight = w.embed.data();
  embed.table_rows = V;
  for (int64_t l = 0; l < L; ++l) {
    norm(l > 0, w.attn_norm[l].data());
    linear(whole(kH, H), whole(kQkv, kQkvWidth), linears[4 * l]);
    // q and k rotated out of the qkv rows (views at offsets), v written to the cache in place.
    add(PlanOp::kRope, {kQkv, 0, Hq * D}, {}, whole(kQ, Hq * D)).dim = D;
    add(PlanOp::kRope, {kQkv, Hq * D, Hkv * D}, {}, whole(kK, Hkv * D)).dim = D;
    auto& write = add(PlanOp::kWriteKv, whole(kK, Hkv * D), {kQkv, (Hq + Hkv) * D, Hkv * D}, {});
    write.layer = l;
    write.kv_heads = Hkv;
    write.dim = D;
    auto& attn = add(PlanOp::kAttention, whole(kQ, Hq * D), {}, whole(kAttn, Hq * D));
    attn.layer = l;
    attn.heads = Hq;
    attn.kv_heads = Hkv;
    attn.dim = D;
    attn.window = windows[l];
    attn.scalar = 1.0f / std::sqrt(static_cast<float>(D));
    linear(whole(kAttn, Hq * D), whole(kDelta, H), linears[4 * l + 1]);
    norm(true, w.mlp_norm[l].data());
    linear(whole(kH, H), whole(kGateUp, 2 * I), linears[4 * l + 2]);
    add(PlanOp::kSiluMul, {kGateUp, 0, I}, {kGateUp, I, I}, whole(kAct, I));
    linear(whole(kAct, I), whole(kDelta, H), linears[4 * l + 3]);
  }
  norm(true, w.final_norm.data());
  linear(whole(kH, H), whole(kLogits, V), lm_head);
  return plan;
}

bool throws(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_matches_reference(Isa isa, const int64_t (&windows)[L]) {
  set_isa(isa);
  const Weights w;
  std::vector<DecoderLinear> linears;
  for (int64_t l = 0; l < L; ++l) {
    linears.push_back(f32_linear(w.qkv[l], w.qkv_bias[l].data(), kQkvWidth, H));
    linears.push_back(f32_linear(w.out[l], nullptr, H, Hq * D));
    linears.push_back(f32_linear(w.gate_up[l], nullptr, 2 * I, H));
    linears.push_back(f32_linear(w.down[l], nullptr, H, I));
  }
  const DecoderLinear lm_head = f32_linear(w.embed, nullptr, V, H);
  const std::vector<int64_t> widths = {V, H, H, kQkvWidth, Hq * D, Hkv * D, Hq * D, H, 2 * I, I};
  const auto instructions = llama_plan(w, windows, lm_head, linears);
  DecodePlan dec(V, widths, kLogits, instructions, {"all"}, 1);
  PE_CHECK(dec.num_layers() == L && dec.kv_heads() == Hkv && dec.head_dim() == D);

  std::vector<float> cos(S * D / 2), sin(S * D / 2);
  for (int64_t p = 0; p < S; ++p) {
    for (int64_t i = 0; i < D / 2; ++i) {
      cos[p * D / 2 + i] = std::cos(p * std::pow(100.0f, -2.0f * i / D));
      sin[p * D / 2 + i] = std::sin(p * std::pow(100.0f, -2.0f * i / D));
    }
  }
  std::vector<float> kc(L * B * Hkv * S * D, 0.0f), vc(kc), ref_kc(kc), ref_vc(kc), logits(B * V), ref(V);
  // Ragged: sequence 1 starts 3 positions later.
  for (int step = 0; step < 4; ++step) {
    const int64_t tokens[B] = {(5 * step + 1) % V, (7 * step + 30) % V};
    const int32_t positions[B] = {step, step + 3};
    dec.step(tokens, B, kc.data(), vc.data(), S, positions, {cos.data()}, {sin.data()}, {S}, logits.data());
    for (int64_t b = 0; b < B; ++b) {
      ref_step(w, windows, tokens[b], b, positions[b], ref_kc, ref_vc, cos, sin, ref.data());
      for (int64_t v = 0; v < V; ++v) PE_CHECK(std::fabs(logits[b * V + v] - ref[v]) < 1e-4f);
    }
  }
  for (size_t i = 0; i < kc.size(); ++i) PE_CHECK(std::fabs(kc[i] - ref_kc[i]) < 1e-4f && std::fabs(vc[i] - ref_vc[i]) < 1e-4f);

  // Bad arguments throw before writing anything.
  const std::vector<float> kc_before = kc;
  const int64_t bad_token[B] = {1, V}, ok_token[B] = {1, 2};
  const int32_t ok_pos[B] = {0, 1}, bad_pos[B] = {0, S}, past_table[B] = {0, 5};
  PE_CHECK(throws([&] { dec.step(bad_token, B, kc.data(), vc.data(), S, ok_pos, {cos.data()}, {sin.data()}, {S}, logits.data()); }));
  PE_CHECK(throws([&] { dec.step(ok_token, B, kc.data(), vc.data(), S, bad_pos, {cos.data()}, {sin.data()}, {S}, logits.data()); }));
  PE_CHECK(throws([&] { dec.step(ok_token, B, kc.data(), vc.data(), S, past_table, {cos.data()}, {sin.data()}, {4}, logits.data()); }));
  PE_CHECK(throws([&] { dec.step(ok_token, B, kc.data(), vc.data(), S, ok_pos, {}, {}, {}, logits.data()); }));
  PE_CHECK(kc == kc_before);

  // Construction rejects inconsistent plans.
  const auto rejects = [&](const std::function<void(std::vector<PlanInstruction>&)>& edit, int32_t output = kLogits) {
    auto bad = instructions;
    edit(bad);
    return throws([&] { DecodePlan(V, widths, output, bad, {"all"}, 1); });
  };
  PE_CHECK(rejects([](auto& p) { p[2].linear.in_features = H + 1; }));          // first qkv linear's shape
  PE_CHECK(rejects([](auto& p) { p[3].x.offset = kQkvWidth; }));                  // rope view outside qkv
  PE_CHECK(rejects([](auto& p) { p[2].x = {kQkv, 0, H}; }));                      // linear input not a whole buffer
  PE_CHECK(rejects([](auto& p) { p[6].heads = 3; }));                             // heads not a multiple of kv_heads
  PE_CHECK(rejects([](auto& p) { p[5].kv_heads = 1; p[5].x.width = D; p[5].y.width = D; }));  // kv heads disagree
  PE_CHECK(rejects([](auto& p) { p[3].table = 1; }));                             // a rope table it is not given
  PE_CHECK(rejects([](auto& p) { p[1].label = 4; }));                             // profile label out of range
  PE_CHECK(rejects([](auto& p) { p.erase(p.begin()); }));                         // no embedding
  PE_CHECK(rejects([](auto&) {}, kQ));                                            // output not vocab wide
}

}  // namespace

int main() {
  // Full attention, then a sliding window of 3 positions on layer 1 only (Qwen2's per-layer windows;
  // positions reach 6, so the window cuts keys from the second step of sequence 1 on).
  const int64_t full[L] = {0, 0}, windowed[L] = {0, 3};
  for (Isa isa : pyengine::testing::supported_isas()) {
    test_matches_reference(isa, full);
    test_matches_reference(isa, windowed);
  }
  std::printf("test_decode_plan: ok\n");
  return 0;
}
