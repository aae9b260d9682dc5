// What one benchmark run is configured with (arXiv 2408.14572 §6-7): the protocol,
// the base model and adapters, the optimiser, the task sequence and the perplexity
// text. Parsed and validated from JSON; to_json writes it back, every default filled in.
#pragma once

#include "curlora/inject.h"
#include "data/datasets.h"
#include "engine/optim/schedule.h"

#include <nlohmann/json.hpp>

#include <cstdint>
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
  int64_t batch_size = 0;         // eval: 0 means the training batch size; 1 one example at a time, unpadded
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
    std::string dtype = "fp32";             // fp32, or bf16: mixed precision (engine/precision.h)
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
// Reads a JSON file; // and /* */ comments are allowed. Each override
// "a.b.c=value" then sets that field (array elements by index: "tasks.0.epochs")
// before validation, so a misspelt path is an unknown-key error like any other.
// The value is read as JSON when it parses ("bf16" may be written bare,
// [8, 16] is a list).
BenchConfig load_config(const std::string& path, const std::string& data_dir,
                        const std::vector<std::string>& overrides = {});
// One override applied to a parsed config; `source` names the config in messages.
void apply_override(nlohmann::json& root, const std::string& assignment, const std::string& source);

// The learning-rate schedule of one task. The paper's code sizes the schedule in
// examples (epochs x rows), the corrected protocol in optimiser steps.
engine::optim::Schedule task_schedule(const TaskConfig& task, Protocol protocol, int64_t train_examples,
                                      int64_t steps_per_epoch);

}  // namespace curlora::bench
