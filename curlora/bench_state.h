// The state of a running sweep, shared by benchmark.cpp and bench_state.cpp (an
// internal header, not part of the library's API): what every run shares, one
// (method, rank) run, and how both reach the disk: results files, checkpoints, provenance.
#pragma once

#include "curlora/benchmark.h"
#include "data/batching.h"
#include "engine/nn/layers.h"
#include "engine/optim/optimizer.h"
#include "models/gpt2.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace curlora::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// One task's train and eval sets, tokenised, and what results.json says of them.
struct TaskData {
  data::TokenizedDataset train, eval;
  nlohmann::json info;
};

// What every (method, rank) run shares: data tokenised once, the perplexity text, the counters.
struct Sweep {
  Sweep(const BenchConfig& c, const RunOptions& o) : config(c), options(o) {}
  const BenchConfig& config;
  const RunOptions& options;
  engine::Device device = engine::Device::cpu();
  engine::DType compute = engine::DType::F32;  // BF16: the mixed-precision policy
  std::vector<TaskData> tasks;
  std::vector<int32_t> ppl_ids;
  nlohmann::json perplexity_before;
  int64_t tasks_completed = 0;
  std::filesystem::path checkpoints;

  void progress(const std::string& label, int64_t done, int64_t total) const {
    if (options.observer.progress) options.observer.progress(label, done, total);
  }
  void note(const std::string& line) const {
    if (options.observer.note) options.observer.note(line);
  }
};

// One (method, rank): the model with its adapters, one head per task so far, and its results.
struct Run {
  Method method = Method::CurLoRA;
  int64_t rank = 0;
  std::string label, id;
  AdapterConfig adapter;
  std::shared_ptr<models::GPT2LMHeadModel> model;
  std::shared_ptr<engine::nn::Module> lm_head;  // the original (tied) LM head, for perplexity
  std::vector<std::shared_ptr<engine::nn::Linear>> heads;
  nlohmann::json results;
};

// ---- results files and provenance ----

// A reader sees the old file or the new one, never half of one (a kill mid-write leaves only the .tmp).
void write_atomically(const std::filesystem::path& path, const std::string& text);
nlohmann::json read_json(const std::filesystem::path& path);
std::string git_revision();  // the current folder's git HEAD, or "unknown"
int64_t peak_rss_bytes();    // the process's peak resident memory so far
// Peak bytes the engine held on a CUDA device since the last reset; null on the CPU or without CUDA.
nlohmann::json cuda_peak_bytes(engine::Device device, bool reset);

// ---- checkpoints: checkpoints/<run>/task-N/ is complete once it has that name ----

// The run's newest complete checkpoint folder; empty when it has none.
std::filesystem::path latest_checkpoint(const std::filesystem::path& run_dir);
// Writes checkpoints/<run>/task-<tasks_done>/: adapter, heads, optimiser moments, dropout generator, results so far.
void save_checkpoint(const Sweep& s, const Run& run, const engine::optim::AdamW& optimizer, size_t tasks_done);
// Loads a checkpoint's adapter (into run.model), heads, dropout generator and results; `state` is its state.json.
void restore_checkpoint(const Sweep& s, Run& run, const std::filesystem::path& dir, const nlohmann::json& state);

}  // namespace curlora::bench
