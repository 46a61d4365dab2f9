#include <cmath>
#include <string>

#include "bindings/bindings.h"
#include "bindings/device_args.h"
#include "pyengine/attention.h"

namespace pyengine::bind {

void bind_attention(py::module_& m) {
  m.def(
      "attention",
      [](py::handle q_obj, py::handle k_obj, py::handle v_obj, py::handle out_obj, py::handle q_start_obj,
         py::handle kv_len_obj, double scale, int64_t window, uintptr_t stream) {
        Tensor q(q_obj, "q"), k_cache(k_obj, "k_cache"), v_cache(v_obj, "v_cache"), out(out_obj, "out"),
            q_start(q_start_obj, "q_start"), kv_len(kv_len_obj, "kv_len");
        check_float_dtype(q);
        for (Tensor* t : {&k_cache, &v_cache, &out}) check_dtype_as(*t, q);
        for (Tensor* t : {&q_start, &kv_len}) check_dtype(*t, DType::I32);
        check_on_device_of(q, {&k_cache, &v_cache, &out, &q_start, &kv_len});
        for (Tensor* t : {&q, &k_cache, &v_cache, &out}) check_operand(*t, 4);
        for (Tensor* t : {&q_start, &kv_len}) check_operand(*t, 1);
        const int64_t batch = q.size(0), q_len = q.size(1), num_q_heads = q.size(2), head_dim = q.size(3);
        check_size(k_cache, 0, batch, "the batch size of q");
        check_size(k_cache, 3, head_dim, "the head_dim of q");
        const int64_t num_kv_heads = k_cache.size(1), cache_len = k_cache.size(2);
        for (int64_t d = 0; d < 4; ++d) {
          check_size(v_cache, d, k_cache.size(d), "the shape of k_cache");
          check_size(out, d, q.size(d), "the shape of q");
        }
        check_size(q_start, 0, batch, "the batch size of q");
        check_size(kv_len, 0, batch, "the batch size of q");
        if (num_q_heads % num_kv_heads != 0) {
          throw py::value_error("q: number of query heads (" + std::to_string(num_q_heads) +
                                ") must be a multiple of k_cache's number of kv heads (" +
                                std::to_string(num_kv_heads) + ")");
        }
        if (!std::isfinite(scale)) throw py::value_error("scale must be finite");
        if (window < 0) {
          throw py::value_error("window must be >= 0 (0: no sliding window), got " + std::to_string(window));
        }
        for (const Tensor* input : {&q, &k_cache, &v_cache, &q_start, &kv_len}) check_no_overlap(out, *input);
        const AttentionShape shape{batch, q_len, num_q_heads, num_kv_heads, cache_len, head_dim, window};
        if (q.is_cuda()) {
          if (head_dim != 64 && head_dim != 128) {
            throw py::value_error("q: head_dim (last dimension) must be 64 or 128 for the CUDA kernel, got shape " +
                                  q.shape_str());
          }
          for (const Tensor* t : {&q, &k_cache, &v_cache, &out}) check_aligned16(*t);
          run_cuda(q, [&] {
            cuda::attention(q.data<void>(), k_cache.data<void>(), v_cache.data<void>(), out.data<void>(),
                            q_start.data<int32_t>(), kv_len.data<int32_t>(), shape, static_cast<float>(scale),
                            float_type(q), as_stream(stream));
          });
          return;
        }
        // On the CPU the lengths are readable here; on CUDA the kernel clamps them instead.
        const int32_t* starts = q_start.data<int32_t>();
        const int32_t* lengths = kv_len.data<int32_t>();
        for (int64_t b = 0; b < batch; ++b) {
          if (lengths[b] < 1 || lengths[b] > cache_len) {
            throw py::value_error("kv_len: entry " + std::to_string(b) + " is " + std::to_string(lengths[b]) +
                                  ", must be in [1, " + std::to_string(cache_len) + "] (the cache length)");
          }
          if (starts[b] < 0) {
            throw py::value_error("q_start: entry " + std::to_string(b) + " is " + std::to_string(starts[b]) +
                                  ", must be >= 0");
          }
        }
        py::gil_scoped_release release;
        attention(q.data<float>(), k_cache.data<float>(), v_cache.data<float>(), out.data<float>(), starts, lengths,
                  shape, static_cast<float>(scale));
      },
      py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("out"), py::arg("q_start"), py::arg("kv_len"),
      py::arg("scale"), py::arg("window") = 0, py::arg("stream") = 0,
      "Causal attention over a KV cache, written to out. q, out: [B, T, Hq, D]; k_cache, v_cache: [B, Hkv, S, D] "
      "(Hq % Hkv == 0), one dtype: float32 (on CUDA also float16, bfloat16; D 64 or 128, 16-byte aligned); "
      "q_start, kv_len: [B] int32. Query t of sequence b sits at position q_start[b] + t and sees cache entries "
      "j <= that position and j < kv_len[b], and with window > 0 (a sliding window) only j > position - window "
      "(pyengine/attention_window.h). All contiguous; out must not overlap the inputs. On the CPU kv_len and "
      "q_start are checked (ValueError); on CUDA kv_len is clamped to [0, S] and a query that sees no key gets "
      "zeros. CUDA: launched on `stream`, not synchronized.");
}

}  // namespace pyengine::bind
