// The paper's continual-learning benchmark (arXiv 2408.14572 §6-7, Table 2): a
// sweep of adapter methods x ranks, each fine-tuned on a sequence of tasks with a
// fresh head per task, every earlier task re-evaluated with its stored head, and
// WikiText-2 perplexity before, between and after. Two protocols: "paper" keeps
// the reference code's quirks; "corrected" fixes them (see protocol_explanation).
#pragma once

#include "curlora/bench_config.h"
#include "data/batching.h"
#include "engine/tensor.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace curlora::bench {

// The protocols and the config (with its parsing) are in bench_config.h.

// Each row's hidden state [B, C] that its logits come from: paper, position T-1
// (padding for every row shorter than the batch); corrected, batch.last_index.
engine::Tensor select_positions(const engine::Tensor& hidden, const data::Batch& batch, Protocol protocol);

// ---- running it ----

// What the library reports while it runs; the CLI draws it (the library never prints).
struct Observer {
  // A phase's progress in tokens (label: "CURLoRA r8 | train sst2 epoch 2/3").
  std::function<void(const std::string& label, int64_t done, int64_t total)> progress;
  // One line after each milestone (a task trained, a perplexity measured).
  std::function<void(const std::string& line)> note;
};

struct RunOptions {
  std::string out_dir;
  bool resume = false;  // continue from the checkpoints in out_dir
  // Stop (as if killed) once this many tasks, counted over the whole sweep, have completed.
  std::optional<int64_t> stop_after_tasks;
  Observer observer;
};

// Runs the sweep, methods outer and ranks inner, each (method, rank) on a freshly
// loaded base. Writes out_dir/results.json after every task ("complete": false
// until the end) and out_dir/checkpoints/<method>-r<rank>/task-N/ (adapter, heads,
// optimiser state, dropout generator and the run's results so far). Returns the
// results; the report (report.h) is drawn from them. Errors: an out_dir that
// holds a run without `resume`, or a resume with a different config.
nlohmann::json run_benchmark(const BenchConfig& config, const RunOptions& options);

}  // namespace curlora::bench
