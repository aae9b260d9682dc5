// One CURLoRA (or LoRA) training step of GPT-2, timed exactly as the PyTorch
// peers time theirs (../shared/bench/torch_reference.py on the GPU,
// torch_cpu_reference.py on the CPU), so the two print side by side.
//
// The step: adapters on attn.c_attn (rank 8, alpha 1), every base weight
// frozen, lm_head replaced by a fresh Linear(C, 2) on the last position's
// hidden state, cross-entropy, backward, AdamW at lr 2.5e-4, dropout on.
// Inputs are random token ids [B, T], an all-ones mask and random labels.
// Prints one JSON line on stdout. bench/run_step_bench.sh runs it beside the peer.
//   bench_step --model gpt2-large --device cuda --tf32 --eval
//   bench_step --model gpt2-large --device cuda --bf16 --eval
//   bench_step --model ../shared/data/gpt2-mini-wiki --device cpu --batch 8 --seq 128 --threads 2
#include "curlora/inject.h"
#include "engine/backend.h"
#include "engine/cpu/cpu_backend.h"
#include "engine/error.h"
#include "engine/nn/layers.h"
#include "engine/ops.h"
#include "engine/optim/optimizer.h"
#include "engine/precision.h"
#include "engine/profiler.h"
#include "models/gpt2.h"

// Defined by engine_dep in CUDA builds.
#ifdef CURLORA_WITH_CUDA
#include "engine/cuda/cuda_backend.h"
#endif

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <random>
#include <string>
#include <vector>

using engine::Device;
using engine::DType;
using engine::Tensor;
using nlohmann::json;

namespace {

struct Options {
  std::string model = "gpt2";
  std::string device;  // empty: cuda when available, else cpu
  std::string adapter = "curlora";
  int64_t batch = 32, seq = 256, rank = 8;
  int steps = 10, warmup = 3;
  bool tf32 = false;
  bool bf16 = false;  // the mixed-precision policy: autocast + bf16 frozen weights
  int threads = 0;  // 0: the engine's default
  bool eval = false;
  int64_t eval_batch = 8, eval_seq = 1024;
  int eval_warmup = 2;  // the peer's time_eval warms up twice
  bool profile = false;
};

// ---- device helpers: no-ops on the CPU and in CPU-only builds ----

void synchronize(Device device) {
#ifdef CURLORA_WITH_CUDA
  if (device.is_cuda()) engine::cuda_synchronize(device.index);
#endif
  (void)device;
}

void reset_peak(Device device) {
#ifdef CURLORA_WITH_CUDA
  if (device.is_cuda()) engine::cuda_reset_peak(device.index);
#endif
  (void)device;
}

json peak_bytes(Device device) {
#ifdef CURLORA_WITH_CUDA
  if (device.is_cuda()) return engine::cuda_memory_stats(device.index).peak_bytes;
#endif
  (void)device;
  return nullptr;
}

void set_tf32(bool allow) {
#ifdef CURLORA_WITH_CUDA
  engine::set_allow_tf32(allow);
#else
  engine::check(!allow, "--tf32 needs a CUDA build");
#endif
}

// ---- timing ----

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct Timing {
  double mean = 0;    // one block of steps, one sync at the end: the peer's figure
  double median = 0;  // each step synced on its own
};

// `warmup` untimed calls, then the mean over a block of `steps` calls with the
// device synchronised before the clock is read at each end (as the peer does
// with torch.cuda.synchronize). The median needs a sync after every call: on
// the CPU that is free, so the block's own laps give it; on a GPU a per-step
// sync would drain the launch queue and bias the mean, so a second block is run.
Timing time_calls(const std::function<void()>& call, int warmup, int steps, Device device) {
  for (int i = 0; i < warmup; ++i) call();
  synchronize(device);
  std::vector<double> laps;
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) {
    const auto lap = std::chrono::steady_clock::now();
    call();
    if (device.is_cpu()) laps.push_back(seconds_since(lap));
  }
  synchronize(device);
  Timing timing;
  timing.mean = seconds_since(start) / steps;
  if (device.is_cuda()) {
    for (int i = 0; i < steps; ++i) {
      const auto lap = std::chrono::steady_clock::now();
      call();
      synchronize(device);
      laps.push_back(seconds_since(lap));
    }
  }
  std::sort(laps.begin(), laps.end());
  const size_t mid = laps.size() / 2;
  timing.median = laps.size() % 2 ? laps[mid] : 0.5 * (laps[mid - 1] + laps[mid]);
  return timing;
}

// Uniform integers in [0, high) as an i32 tensor on the host. Token ids and labels stay
// there, as a data loader's do: ops check them on the host and copy them to the GPU,
// where a check would wait for the device.
Tensor random_ids(const engine::Shape& shape, int64_t high, std::mt19937_64& rng) {
  std::uniform_int_distribution<int32_t> pick(0, int32_t(high - 1));
  std::vector<int32_t> values(size_t(engine::numel(shape)));
  for (int32_t& v : values) v = pick(rng);
  return Tensor::from_vector(values, shape);
}

// The peer's names: its factored CUR adapter ((x C) U) R is the form ours always computes.
std::string adapter_label(curlora::Method method) {
  return method == curlora::Method::CurLoRA ? "curlora-factored" : "lora";
}

// A built-in size keeps its name; a folder is named by its last component.
std::string size_label(const std::string& model) {
  const std::filesystem::path path = std::filesystem::path(model).lexically_normal();
  const std::string name = path.filename().string();
  return name.empty() ? path.parent_path().filename().string() : name;
}

// Kernel calls, GFLOP and seconds of one training step or eval forward (the
// pass), on stderr. On a GPU the seconds are host launch times (kernels run
// asynchronously) unless CURLORA_CUDA_SYNC=1, which times each op's GPU work
// by CUDA events and keys GEMMs by shape; calls and FLOPs hold either way.
void print_profile(const char* pass, const std::function<void()>& step, Device device) {
  engine::Profiler profiler;
  step();
  synchronize(device);
  json kernels = json::object();
  for (const auto& [name, e] : profiler.entries())
    kernels[name] = {{"calls", e.calls}, {"gflop", e.flops * 1e-9}, {"seconds", e.seconds}};
  std::fprintf(stderr, "%s\n", json{{"profile", kernels}, {"pass", pass}}.dump().c_str());
}

json run(const Options& o) {
  const Device device = o.device.empty() ? (engine::cuda_available() ? Device::cuda(0) : Device::cpu())
                                         : Device::parse(o.device);
  engine::check(o.batch > 0 && o.seq > 0 && o.steps > 0 && o.eval_batch > 0 && o.eval_seq > 0,
                "batch, seq, steps, eval-batch and eval-seq must be positive");
  engine::check(o.warmup >= 0 && o.eval_warmup >= 0, "warmup and eval-warmup must be >= 0");
  engine::check(!o.tf32 || device.is_cuda(), "--tf32 applies to --device cuda only");
  engine::check(!(o.tf32 && o.bf16), "--tf32 and --bf16 exclude each other");
  if (device.is_cpu() && o.threads > 0) engine::set_num_threads(o.threads);
  set_tf32(o.tf32);

  curlora::AdapterConfig adapter;  // attn.c_attn, alpha 1: the paper's GPT-2 run
  adapter.method = curlora::parse_method(o.adapter);
  adapter.rank = o.rank;

  // Adapters first: injection freezes everything else, and the head added after it stays trainable.
  auto model = models::GPT2LMHeadModel::load(o.model, DType::F32, device, /*init_seed=*/0);
  const models::GPT2Config& config = model->config();
  engine::check(o.seq <= config.n_positions && (!o.eval || o.eval_seq <= config.n_positions),
                "sequence length {} (eval {}) exceeds the model's context {}", o.seq, o.eval_seq,
                config.n_positions);
  curlora::inject_adapters(*model, adapter);
  engine::Generator head_gen(1311);
  auto head = std::make_shared<engine::nn::Linear>(config.n_embd, 2, head_gen, true, engine::WeightLayout::OutIn,
                                                   DType::F32, device);
  model->replace_module("lm_head", head);
  // The policy is one switch: the frozen weights move to bf16 here, and every
  // step below runs under the guard (the peer's torch.autocast(bfloat16)).
  const engine::AutocastGuard autocast(o.bf16 ? DType::BF16 : DType::F32);
  if (o.bf16) curlora::store_frozen_weights(*model, DType::BF16);
  model->train();  // dropout on, as in the peer's HF model

  engine::optim::AdamWOptions adamw;
  adamw.lr = 2.5e-4;  // torch.optim.AdamW's other defaults, as the peer
  engine::optim::AdamW optimizer(model->named_trainable_parameters(), adamw);

  std::mt19937_64 rng(0);
  const Tensor ids = random_ids({o.batch, o.seq}, config.vocab_size, rng);
  const Tensor mask = Tensor::ones({o.batch, o.seq}, DType::I32, device);
  const Tensor labels = random_ids({o.batch}, 2, rng);

  Tensor loss;
  auto step = [&] {
    optimizer.zero_grad();
    const Tensor last = model->hidden_states(ids, mask).select(1, o.seq - 1).contiguous();  // [B, C]
    loss = engine::cross_entropy((*head)(last), labels);
    loss.backward();
    optimizer.step();
  };

  synchronize(device);
  reset_peak(device);  // peak := the weights; the steps add activations, gradients and optimiser state
  const Timing train = time_calls(step, o.warmup, o.steps, device);
  const double final_loss = loss.item();
  engine::check(std::isfinite(final_loss), "the loss is {} after training", final_loss);
  loss = Tensor();  // frees the last step's graph before the eval forward

  const double tokens = double(o.batch * o.seq);
  json record = {{"size", size_label(o.model)},
                 {"model", o.model},
                 {"adapter", adapter_label(adapter.method)},
                 {"rank", o.rank},
                 {"device", device.str()},
                 {"dtype", o.bf16 ? "bf16-mixed" : "fp32"},
                 {"tf32", o.tf32},
                 {"batch", o.batch},
                 {"seq", o.seq},
                 {"trainable", model->num_trainable_parameters()},
                 {"train_step_s", train.mean},
                 {"train_step_s_median", train.median},
                 {"train_tok_s", tokens / train.mean},
                 {"train_tok_s_median", tokens / train.median},
                 {"steps", o.steps},
                 {"warmup", o.warmup},
                 {"loss", final_loss}};
  if (device.is_cpu()) record["threads"] = engine::num_threads();
  if (device.is_cuda()) record["peak_bytes"] = peak_bytes(device);

  if (o.profile) print_profile("train", step, device);

  if (o.eval) {
    // As the peer's time_eval: no graph, no attention mask, logits at every
    // position, and the model left in training mode (its dropout stays on).
    const Tensor eval_ids = random_ids({o.eval_batch, o.eval_seq}, config.vocab_size, rng);
    engine::NoGradGuard no_grad;
    optimizer.zero_grad();  // the training gradients need not share memory with the forward
    synchronize(device);
    reset_peak(device);
    auto forward = [&] { model->forward(eval_ids); };
    const Timing eval = time_calls(forward, o.eval_warmup, o.steps, device);
    if (o.profile) print_profile("eval", forward, device);
    const double eval_tokens = double(o.eval_batch * o.eval_seq);
    record[fmt::format("eval_b{}_t{}_s", o.eval_batch, o.eval_seq)] = eval.mean;
    record["eval_tok_s"] = eval_tokens / eval.mean;
    record["eval_step_s_median"] = eval.median;
    if (device.is_cuda()) record["eval_peak_bytes"] = peak_bytes(device);
  }
  return record;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"bench_step: one GPT-2 adapter training step, timed as the PyTorch peer times it"};
  app.add_option("--model", o.model, "gpt2|gpt2-medium|gpt2-large|gpt2-xl (random weights) or a HF folder")
      ->capture_default_str();
  app.add_option("--device", o.device, "cpu, cuda or cuda:N (default: cuda when available)");
  app.add_option("--adapter", o.adapter, "curlora or lora")->capture_default_str();
  app.add_option("--batch", o.batch, "training batch")->capture_default_str();
  app.add_option("--seq", o.seq, "training sequence length")->capture_default_str();
  app.add_option("--steps", o.steps, "timed steps")->capture_default_str();
  app.add_option("--warmup", o.warmup, "untimed steps before them")->capture_default_str();
  app.add_option("--rank", o.rank, "adapter rank")->capture_default_str();
  app.add_flag("--tf32", o.tf32, "let f32 GEMMs use TF32 tensor cores (CUDA)");
  app.add_flag("--bf16", o.bf16, "mixed precision: bf16 GEMMs and attention, bf16 frozen weights, f32 masters");
  app.add_option("--threads", o.threads, "CPU threads for our loops and OpenBLAS (default: the engine's)");
  app.add_flag("--eval", o.eval, "also time a no-grad forward, as the peer's time_eval");
  app.add_option("--eval-batch", o.eval_batch, "eval batch")->capture_default_str();
  app.add_option("--eval-seq", o.eval_seq, "eval sequence length")->capture_default_str();
  app.add_option("--eval-warmup", o.eval_warmup, "untimed eval forwards")->capture_default_str();
  app.add_flag("--profile", o.profile,
               "print one step's (and with --eval one forward's) per-kernel calls, GFLOP and seconds on stderr");
  try {
    app.parse(argc, argv);
    std::printf("%s\n", run(o).dump().c_str());
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step: %s\n", e.what());
    return 1;
  }
  return 0;
}
