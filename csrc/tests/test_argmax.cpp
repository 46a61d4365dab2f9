// argmax_rows on every ISA against a plain loop (first index of the maximum; a row with NaN: its first
// NaN), over lengths around the vector width, ties, NaN and infinities. Sized exactly, so the
// sanitizer build sees any read past a row.
#include "pyengine/argmax.h"

#include <cmath>
#include <limits>

#include "tests/test_util.h"

using namespace pyengine;

namespace {

int64_t reference(const std::vector<float>& x) {
  int64_t best = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::isnan(x[i])) return static_cast<int64_t>(i);
    if (x[i] > x[best]) best = static_cast<int64_t>(i);
  }
  return best;
}

void check(const std::vector<float>& x) {
  const int64_t want = reference(x);
  for (Isa isa : testing::supported_isas()) {
    set_isa(isa);
    int64_t got = -1;
    argmax_rows(x.data(), 1, static_cast<int64_t>(x.size()), &got);
    PE_CHECK(got == want);
  }
}

}  // namespace

int main() {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 1000}) {
    auto x = testing::random_floats(n, static_cast<unsigned>(n));
    check(x);
    std::vector<float> ties(n, 2.0f);
    check(ties);  // all equal: index 0
    ties[n - 1] = 3.0f;
    check(ties);  // the last
    auto with_nan = x;
    with_nan[n - 1] = nan;
    check(with_nan);
    with_nan[n / 2] = nan;
    check(with_nan);  // the first NaN
    auto with_inf = x;
    with_inf[n / 3] = inf;
    check(with_inf);
    std::vector<float> all_neg_inf(n, -inf);
    check(all_neg_inf);
  }
  std::printf("test_argmax: ok\n");
  return 0;
}
