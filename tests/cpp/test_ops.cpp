// C++ test of the CMake-built library (libtfkernels_ops): calls each op through
// the dispatcher, as a C++ user would, and compares it with the same computation
// in plain ATen, in float64 on the CPU; and a few of the CPU kernels' own pieces
// against each other (dropout_rng, softmax_exp2).
//
//   test_ops            run every case
//   test_ops CASE...    run the named cases (ctest runs one case per test)
//
// An op whose CPU kernel is not compiled into the library fails with
// "MISSING KERNEL", distinct from a wrong answer ("MISMATCH").
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu/f32_dot.h"
#include "cpu/f32_exp.h"
#include "cpu/flash_attention_softmax.h"
#include "dropout_rng.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

struct Mismatch : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto kF64 = at::TensorOptions().dtype(at::kDouble);

// Max abs difference within rtol/atol as in torch.testing.assert_close (float64 defaults
// tightened like tests/utils.FLOAT64_TOL).
void expect_close(const Tensor& actual, const Tensor& expected, const std::string& what, double rtol = 1e-9,
                  double atol = 1e-10) {
  std::ostringstream msg;
  if (actual.sizes() != expected.sizes()) {
    msg << what << ": shape " << actual.sizes() << " != expected " << expected.sizes();
    throw Mismatch(msg.str());
  }
  if (actual.scalar_type() != expected.scalar_type()) {
    msg << what << ": dtype " << actual.scalar_type() << " != expected " << expected.scalar_type();
    throw Mismatch(msg.str());
  }
  if (actual.isnan().any().item<bool>()) {
    msg << what << ": contains NaN (unwritten or invalid elements)";
    throw Mismatch(msg.str());
  }
  const Tensor diff = (actual - expected).abs();
  const Tensor bound = atol + rtol * expected.abs();
  if ((diff > bound).any().item<bool>()) {
    const int64_t worst = (diff - bound).flatten().argmax().item<int64_t>();
    msg << what << ": max abs error " << diff.max().item<double>() << " (rtol " << rtol << ", atol " << atol
        << "); worst at flat index " << worst << ": got " << actual.flatten()[worst].item<double>() << ", expected "
        << expected.flatten()[worst].item<double>();
    throw Mismatch(msg.str());
  }
}

// ---------------------------------------------------------------- cases

void test_bias_gelu() {
  auto bias_gelu = op<Tensor(const Tensor&, const Tensor&, c10::string_view)>("tfkernels::bias_gelu");
  for (int64_t n : {1, 7, 40, 129}) {
    const Tensor x = at::randn({3, 5, n}, kF64) * 2;
    const Tensor b = at::randn({n}, kF64);
    for (const char* form : {"none", "tanh"}) {
      expect_close(bias_gelu.call(x, b, form), at::gelu(x + b, form),
                   "bias_gelu(approximate=" + std::string(form) + ", N=" + std::to_string(n) + ")");
    }
  }
}

void test_bias_gelu_bwd() {
  auto bwd = op<Pair(const Tensor&, const Tensor&, const Tensor&, c10::string_view)>("tfkernels::bias_gelu_bwd");
  for (int64_t n : {1, 7, 40, 129}) {
    const Tensor x = at::randn({4, 3, n}, kF64) * 2;
    const Tensor b = at::randn({n}, kF64);
    const Tensor g = at::randn({4, 3, n}, kF64);
    for (const char* form : {"none", "tanh"}) {
      const auto [grad_x, grad_bias] = bwd.call(g, x, b, form);
      const Tensor expected_x = at::gelu_backward(g, x + b, form);
      const std::string where = "(approximate=" + std::string(form) + ", N=" + std::to_string(n) + ")";
      expect_close(grad_x, expected_x, "bias_gelu_bwd grad_x" + where);
      expect_close(grad_bias, expected_x.sum({0, 1}), "bias_gelu_bwd grad_bias" + where);
    }
  }
}

void test_linear_gelu() {
  auto linear_gelu = op<Pair(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, bool)>(
      "tfkernels::linear_gelu");
  const Tensor x = at::randn({2, 9, 41}, kF64);
  const Tensor w = at::randn({33, 41}, kF64) / std::sqrt(41.0);
  const Tensor b = at::randn({33}, kF64);
  for (const char* form : {"none", "tanh"}) {
    const std::string where = std::string("(approximate=") + form + ")";
    auto [out, pre] = linear_gelu.call(x, w, b, form, true);
    expect_close(pre, at::linear(x, w, b), "linear_gelu pre" + where);
    expect_close(out, at::gelu(at::linear(x, w, b), form), "linear_gelu out" + where);
    auto [out_nb, pre_nb] = linear_gelu.call(x, w, std::nullopt, form, false);
    expect_close(out_nb, at::gelu(at::linear(x, w), form), "linear_gelu out without bias" + where);
  }
}

void test_fused_mlp() {
  auto fused_mlp = op<Pair(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&,
                           c10::string_view, bool)>("tfkernels::fused_mlp");
  const Tensor x = at::randn({3, 7, 24}, kF64);
  const Tensor w1 = at::randn({65, 24}, kF64) / std::sqrt(24.0);
  const Tensor b1 = at::randn({65}, kF64);
  const Tensor w2 = at::randn({24, 65}, kF64) / std::sqrt(65.0);
  const Tensor b2 = at::randn({24}, kF64);
  for (const char* form : {"none", "tanh"}) {
    const std::string where = std::string("(approximate=") + form + ")";
    auto [out, pre] = fused_mlp.call(x, w1, b1, w2, b2, form, true);
    expect_close(pre, at::linear(x, w1, b1), "fused_mlp pre" + where);
    expect_close(out, at::linear(at::gelu(at::linear(x, w1, b1), form), w2, b2), "fused_mlp out" + where);
  }
}

void test_fused_qkv() {
  auto fused_qkv = op<Triple(const Tensor&, const Tensor&, const OptTensor&, int64_t, int64_t)>(
      "tfkernels::fused_qkv");
  const int64_t batch = 2, seqlen = 11, embed = 48, head_dim = 8;
  for (auto [heads, kv_heads] : {std::pair<int64_t, int64_t>{6, 6}, {6, 2}, {4, 1}}) {
    const Tensor x = at::randn({batch, seqlen, embed}, kF64);
    const Tensor w = at::randn({(heads + 2 * kv_heads) * head_dim, embed}, kF64) / std::sqrt(double(embed));
    const Tensor b = at::randn({(heads + 2 * kv_heads) * head_dim}, kF64);
    const auto [q, k, v] = fused_qkv.call(x, w, b, heads, kv_heads);
    const auto parts = at::linear(x, w, b).split_with_sizes(
        {heads * head_dim, kv_heads * head_dim, kv_heads * head_dim}, -1);
    auto heads_first = [&](const Tensor& t, int64_t n) {
      return t.reshape({batch, seqlen, n, head_dim}).transpose(1, 2).contiguous();
    };
    const std::string where = "(H=" + std::to_string(heads) + ", Hkv=" + std::to_string(kv_heads) + ")";
    expect_close(q, heads_first(parts[0], heads), "fused_qkv q" + where);
    expect_close(k, heads_first(parts[1], kv_heads), "fused_qkv k" + where);
    expect_close(v, heads_first(parts[2], kv_heads), "fused_qkv v" + where);
    if (!q.is_contiguous() || !k.is_contiguous() || !v.is_contiguous()) {
      throw Mismatch("fused_qkv: outputs must be contiguous" + where);
    }
  }
}

void test_flash_attention() {
  auto attention = op<Pair(const Tensor&, const Tensor&, const Tensor&, bool, c10::string_view,
                           std::optional<double>, const OptTensor&, bool, int64_t, int64_t, double, const OptTensor&,
                           double, const OptTensor&)>("tfkernels::flash_attention_fwd");
  const int64_t batch = 2, heads = 4, kv_heads = 2, head_dim = 16;
  for (auto [seqlen_q, seqlen_k] : {std::pair<int64_t, int64_t>{13, 13}, {5, 19}}) {
    for (bool causal : {false, true}) {
      const Tensor q = at::randn({batch, heads, seqlen_q, head_dim}, kF64);
      const Tensor k = at::randn({batch, kv_heads, seqlen_k, head_dim}, kF64);
      const Tensor v = at::randn({batch, kv_heads, seqlen_k, head_dim}, kF64);
      const double scale = 1.0 / std::sqrt(double(head_dim));
      // Plain attention: repeat kv heads, softmax(q k^T * scale + top-left causal mask) v.
      const Tensor kr = k.repeat_interleave(heads / kv_heads, 1);
      const Tensor vr = v.repeat_interleave(heads / kv_heads, 1);
      Tensor scores = at::matmul(q, kr.transpose(-1, -2)) * scale;
      if (causal) {
        const Tensor mask = at::ones({seqlen_q, seqlen_k}, at::kBool).triu(1);
        scores = scores.masked_fill(mask, -std::numeric_limits<double>::infinity());
      }
      const Tensor expected = at::matmul(at::softmax(scores, -1), vr);
      const Tensor expected_lse = at::logsumexp(scores, -1).to(at::kFloat);
      const std::string where = "(Sq=" + std::to_string(seqlen_q) + ", Sk=" + std::to_string(seqlen_k) +
                                ", causal=" + (causal ? "true" : "false") + ")";
      // Every row sees key 0 under the top-left mask, so no row is empty here.
      auto [out, lse] = attention.call(q, k, v, causal, "top_left", std::nullopt, std::nullopt, false, -1, -1, 0.0,
                                       std::nullopt, 0.0, std::nullopt);
      expect_close(out, expected, "flash_attention out" + where);
      expect_close(lse, expected_lse, "flash_attention lse" + where, 1e-6, 1e-6);
    }
  }
}

// Philox4x32-10 against the Random123 known-answer vectors (kat_vectors), the
// generator behind attention dropout (csrc/dropout_rng.h).
void test_dropout_rng() {
  using tfkernels::dropout::Philox4;
  struct Kat {
    Philox4 counter;
    uint32_t key0, key1;
    Philox4 expected;
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       0xffffffffu,
       0xffffffffu,
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
  };
  for (const Kat& kat : kats) {
    const Philox4 r = tfkernels::dropout::philox4x32_10(kat.counter, kat.key0, kat.key1);
    if (r.x != kat.expected.x || r.y != kat.expected.y || r.z != kat.expected.z || r.w != kat.expected.w) {
      std::ostringstream msg;
      msg << std::hex << "philox4x32_10(counter " << kat.counter.x << ", key " << kat.key0 << ") = " << r.x << " "
          << r.y << " " << r.z << " " << r.w << ", expected " << kat.expected.x << " " << kat.expected.y << " "
          << kat.expected.z << " " << kat.expected.w;
      throw Mismatch(msg.str());
    }
  }
}

// The softmax's vector exponentials (f32_exp.h) against its loops
// (flash_attention_softmax.h): the same fast_exp2f bit for bit, over the range
// reductions' edges, NaN and infinities, every tail length; the sums to round-off.
void test_softmax_exp2() {
  namespace cpu = tfkernels::cpu;
  if (!cpu::f32dot::available()) return;  // no AVX2 / AVX-512 here: only the loops run
  std::vector<float> values;
  for (int i = -1450; i <= 1300; ++i) values.push_back(static_cast<float>(i) * 0.1f + 0.0371f);
  for (float x : {-126.0f, -125.5f, -126.5f, 127.0f, 127.5f, -0.5f, 0.5f, 1.5f, -1.5f, 0.0f, -0.0f, 1e-30f})
    values.push_back(x);
  for (float x : {NAN, -NAN, INFINITY, -INFINITY}) values.push_back(x);
  for (const float c : {1.0f, 0.18033688f}) {
    for (const float m : {0.0f, 3.25f, -INFINITY}) {
      for (size_t n = 1; n <= 40; ++n) {
        for (size_t start = 0; start + n <= values.size(); start += 37) {
          std::vector<float> loop(values.begin() + start, values.begin() + start + n), vec = loop;
          const float loop_sum = cpu::fa::exp2_scaled_sum(loop.data(), static_cast<int64_t>(n), c, m);
          const float vec_sum = cpu::f32dot::exp2_scaled_sum(vec.data(), static_cast<int64_t>(n), c, m);
          std::vector<float> rows(values.begin() + start, values.begin() + start + n);
          cpu::f32dot::exp2_scaled(rows.data(), static_cast<int64_t>(n), c, m);
          double exact = 0;
          for (size_t j = 0; j < n; ++j) {
            uint32_t a, b, r;
            std::memcpy(&a, &loop[j], 4);
            std::memcpy(&b, &vec[j], 4);
            std::memcpy(&r, &rows[j], 4);
            const bool both_nan = std::isnan(loop[j]) && std::isnan(vec[j]) && std::isnan(rows[j]);
            if (!both_nan && (a != b || a != r)) {
              std::ostringstream msg;
              msg << "2^(" << values[start + j] << " * " << c << " - " << m << "): loop " << loop[j] << ", vector "
                  << vec[j] << ", vector without the sum " << rows[j];
              throw Mismatch(msg.str());
            }
            exact += loop[j];
          }
          // Positive terms: each float sum is within (n - 1) half-ulps of the exact one,
          // or overflows to inf with it.
          const double tol = 6e-8 * static_cast<double>(n) * std::abs(exact) + 1e-37;
          auto agrees = [&](float sum) {
            if (std::isnan(exact)) return std::isnan(sum);
            if (exact > std::numeric_limits<float>::max()) return std::isinf(sum) && sum > 0;
            return std::abs(static_cast<double>(sum) - exact) <= tol;
          };
          const bool sums_agree = agrees(loop_sum) && agrees(vec_sum);
          if (!sums_agree) {
            std::ostringstream msg;
            msg << "sum of " << n << " exponentials: loop " << loop_sum << ", vector " << vec_sum << ", exact " << exact;
            throw Mismatch(msg.str());
          }
        }
      }
    }
  }
}

const std::map<std::string, std::function<void()>>& cases() {
  static const std::map<std::string, std::function<void()>> all{
      {"bias_gelu", test_bias_gelu},   {"bias_gelu_bwd", test_bias_gelu_bwd},
      {"linear_gelu", test_linear_gelu}, {"fused_mlp", test_fused_mlp},
      {"fused_qkv", test_fused_qkv},   {"flash_attention", test_flash_attention},
      {"dropout_rng", test_dropout_rng}, {"softmax_exp2", test_softmax_exp2},
  };
  return all;
}

bool is_missing_kernel(const std::string& what) {
  return what.find("Could not run") != std::string::npos || what.find("no kernel") != std::string::npos ||
         what.find("NotImplementedError") != std::string::npos;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> names;
  for (int i = 1; i < argc; ++i) names.emplace_back(argv[i]);
  if (names.empty()) {
    for (const auto& [name, fn] : cases()) names.push_back(name);
  }
  at::manual_seed(20261127);
  int failed = 0;
  for (const auto& name : names) {
    const auto it = cases().find(name);
    if (it == cases().end()) {
      std::cerr << "UNKNOWN CASE " << name << " (known:";
      for (const auto& [known, fn] : cases()) std::cerr << " " << known;
      std::cerr << ")\n";
      ++failed;
      continue;
    }
    try {
      it->second();
      std::cout << "PASS " << name << "\n";
    } catch (const Mismatch& e) {
      std::cout << "FAIL " << name << ": MISMATCH with ATen: " << e.what() << "\n";
      ++failed;
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      if (is_missing_kernel(what)) {
        std::cout << "FAIL " << name << ": MISSING KERNEL: the library has no CPU kernel for this op "
                  << "(csrc/cpu/ not compiled in?): " << what.substr(0, what.find(". ")) << "\n";
      } else {
        std::cout << "FAIL " << name << ": ERROR: " << what << "\n";
      }
      ++failed;
    } catch (const std::exception& e) {
      std::cout << "FAIL " << name << ": ERROR: " << e.what() << "\n";
      ++failed;
    }
  }
  std::cout << (names.size() - failed) << " passed, " << failed << " failed\n";
  return failed == 0 ? 0 : 1;
}
