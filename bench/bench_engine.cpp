// Engine overhead on the CPU: large matmuls through engine::matmul against
// raw cblas_sgemm on the same shapes, and an elementwise add at 1 and 2
// threads. Prints one JSON line per case. Run: build/bench/bench_engine
#include "engine/cpu/cpu_backend.h"
#include "engine/ops.h"
#include "engine/rng.h"

#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

using engine::Tensor;

namespace {

double seconds_of(const std::function<void()>& body) {
  auto start = std::chrono::steady_clock::now();
  body();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> times) {
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Median wall time of `body` over `reps` runs, after one warm-up.
double median_seconds(int reps, const std::function<void()>& body) {
  body();
  std::vector<double> times;
  for (int i = 0; i < reps; ++i) times.push_back(seconds_of(body));
  return median(times);
}

void bench_matmul(int64_t m, int64_t k, int64_t n, bool transpose_b) {
  engine::Generator gen(0);
  Tensor a = Tensor::randn({m, k}, gen);
  Tensor b = transpose_b ? Tensor::randn({n, k}, gen) : Tensor::randn({k, n}, gen);
  Tensor c = Tensor::empty({m, n});
  engine::NoGradGuard no_grad;
  auto raw_call = [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_b ? CblasTrans : CblasNoTrans, int(m), int(n), int(k), 1.0f,
                a.data<float>(), int(k), b.data<float>(), transpose_b ? int(k) : int(n), 0.0f, c.data<float>(), int(n));
  };
  auto our_call = [&] { engine::matmul(a, transpose_b ? b.transpose(0, 1) : b); };
  // Interleaved, so that both see the same machine state (clocks, other load).
  raw_call();
  our_call();
  std::vector<double> raw_times, our_times;
  for (int i = 0; i < 15; ++i) {
    raw_times.push_back(seconds_of(raw_call));
    our_times.push_back(seconds_of(our_call));
  }
  double raw = median(raw_times), ours = median(our_times);
  double flops = 2.0 * double(m) * double(n) * double(k);
  fmt::print(R"({{"bench":"matmul","m":{},"k":{},"n":{},"b_transposed":{},"threads":{},"cblas_s":{:.5f},"engine_s":{:.5f},"overhead_pct":{:.2f},"engine_gflops":{:.1f}}})"
             "\n",
             m, k, n, transpose_b, engine::num_threads(), raw, ours, 100.0 * (ours / raw - 1.0), flops / ours * 1e-9);
}

void bench_add(int64_t elements) {
  engine::Generator gen(1);
  Tensor a = Tensor::randn({elements}, gen), b = Tensor::randn({elements}, gen);
  engine::NoGradGuard no_grad;
  double t = median_seconds(20, [&] { engine::add(a, b); });
  double bytes = 3.0 * double(elements) * 4;  // read a, b; write out
  fmt::print(R"({{"bench":"add","elements":{},"threads":{},"seconds":{:.6f},"gb_per_s":{:.2f}}})"
             "\n",
             elements, engine::num_threads(), t, bytes / t * 1e-9);
}

}  // namespace

int main() {
  for (int threads : {1, 2}) {
    engine::set_num_threads(threads);
    bench_matmul(2048, 2048, 2048, false);
    bench_matmul(4096, 1280, 3840, false);  // gpt2-large c_attn at 16 x 256 tokens
    bench_matmul(4096, 1280, 3840, true);
    bench_add(1 << 24);
  }
  return 0;
}
