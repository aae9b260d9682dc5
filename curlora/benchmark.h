// The paper's continual-learning benchmark (arXiv 2408.14572 §6-7, Table 2): a
// sweep of adapter methods x ranks, each fine-tuned on a sequence of tasks with a
// fresh head per task, every earlier task re-evaluated with its stored head, and
// WikiText-2 perplexity before, between and after. Two protocols: "paper" keeps
// the reference code's quirks; "corrected" fixes them (see protocol_explanation).
#pragma once

#include "curlora/inject.h"
#include "data/batching.h"
#include "data/datasets.h"
#include "engine/optim/schedule.h"
#include "engine/tensor.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace curlora::bench {

// ---- the protocol ----

enum class Protocol { Paper, Corrected };
std::string protocol_name(Protocol protocol);  // "paper", "corrected"
Protocol parse_protocol(const std::string& name);
// What each protocol does about each quirk, as a JSON list for results.json.
nlohmann::json protocol_explanation(Protocol protocol);

// Each row's hidden state [B, C] that its logits come from: paper, position T-1
// (padding for every row shorter than the batch); corrected, batch.last_index.
engine::Tensor select_positions(const engine::Tensor& hidden, const data::Batch& batch, Protocol protocol);

// ---- the config ----

// How a file's raw labels become classes; in JSON "identity", {"floor_divide": 4} or {"map": {"0": 0, "4": 1}}.
struct LabelSpec {
  enum class Kind { Identity, FloorDivide, Table } kind = Kind::Identity;
  int64_t divisor = 1;
  std::map<int64_t, int64_t> table;

  data::LabelMap map() const;
  nlohmann::json to_json() const;
};

struct SplitConfig {
  std::string file;               // as the config names it
  std::string path;               // resolved against the data folder
  std::optional<size_t> rows;     // only the first N rows, in file order
  LabelSpec labels;
  size_t balanced_per_class = 0;  // eval: >0 draws this many per class (seeded) from the rows read
  int64_t batch_size = 0;         // eval: 0 means the training batch size
};

struct ScheduleConfig {
  std::string kind = "none";           // none | constant | constant_with_warmup | linear | cosine
  int64_t warmup_steps = 0;
  std::optional<double> warmup_ratio;  // instead of warmup_steps: a fraction of the task's length
};

struct TaskConfig {
  std::string name;
  std::string format;  // data::dataset_format_from_name
  int64_t num_classes = 2;
  int64_t epochs = 1;
  SplitConfig train, eval;
  ScheduleConfig schedule;
};

struct BenchConfig {
  Protocol protocol = Protocol::Corrected;
  std::string description;
  std::string data_dir;  // where relative paths are resolved (CURLORA_DATA_DIR)

  struct Base {
    std::string model, model_path;  // a folder (relative to data_dir or absolute) or a built-in size name
    std::string tokenizer, tokenizer_path;  // "" = the model folder's, else data_dir/gpt2-tokenizer
    std::string device = "auto";            // auto | cpu | cuda | cuda:N
    std::string dtype = "fp32";
    uint64_t seed = 1311;                   // adapters, dropout, shuffles, balanced samples
    std::vector<Method> methods = {Method::LoRA, Method::CurLoRA};
    std::vector<int64_t> ranks = {8};
    double alpha = 1.0;
    std::vector<std::string> targets = {"attn.c_attn"};
  } base;

  struct Optimizer {
    double lr = 2.5e-4, weight_decay = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    int64_t batch_size = 32;
    int64_t max_length = 256;
    bool shuffle = false;     // false: file order, as the reference slices dataset[i:i+32]
    uint64_t head_seed = 1311;  // every head is drawn from a generator freshly seeded with this
  } optimizer;

  std::vector<TaskConfig> tasks;

  struct Perplexity {
    std::string file = "wikitext-2-raw/wiki.test.raw", path;
    int64_t paper_max_length = 256;  // paper: one forward over the first N tokens
    int64_t window = 1024, stride = 512;  // corrected: sliding window
    int64_t max_tokens = 0;              // corrected: score only the first N tokens (0: all)
  } perplexity;

  // The resolved config, every default filled in (written into results.json).
  nlohmann::json to_json() const;
};

// Parses and validates a config: unknown keys and protocols, bad values, and
// files that do not exist are engine::Errors naming the field (and task).
// `source` names the config in messages.
BenchConfig parse_config(const nlohmann::json& json, const std::string& source, const std::string& data_dir);
// Reads a JSON file; // and /* */ comments are allowed.
BenchConfig load_config(const std::string& path, const std::string& data_dir);

// The learning-rate schedule of one task. The paper's code sizes the schedule in
// examples (epochs x rows), the corrected protocol in optimiser steps.
engine::optim::Schedule task_schedule(const TaskConfig& task, Protocol protocol, int64_t train_examples,
                                      int64_t steps_per_epoch);

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
