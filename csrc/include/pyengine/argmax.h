// Greedy decoding's choice: the index of each row's largest value.
#pragma once
#include <cstdint>

namespace pyengine {

// out[r] = the first index of row r's maximum (x: rows x cols, contiguous; cols >= 1). A row with a
// NaN gives its first NaN's index. numpy's argmax, which the torch backend's greedy sampling used:
// the same answer for every input, ties and NaN included.
void argmax_rows(const float* x, int64_t rows, int64_t cols, int64_t* out);

}  // namespace pyengine
