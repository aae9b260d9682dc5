// The continual-learning benchmark: protocol rules, config parsing, and the run
// loop with its per-task checkpoints. Reading order: protocol, config, running.
#include "curlora/benchmark.h"

#include "curlora/adapter_io.h"
#include "data/gpt2_tokenizer.h"
#include "data/wikitext.h"
#include "engine/backend.h"
#include "engine/error.h"
#include "engine/ops.h"
#include "engine/optim/optimizer.h"
#include "models/gpt2.h"
#include "models/perplexity.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#ifdef CURLORA_WITH_CUDA  // defined for code that links the CUDA backend (see engine/meson.build)
#include "engine/cuda/cuda_backend.h"
#endif

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

namespace curlora::bench {

namespace fs = std::filesystem;
using engine::check;
using engine::fail;
using engine::Tensor;
using nlohmann::json;

// ================================ protocol ================================

std::string protocol_name(Protocol protocol) { return protocol == Protocol::Paper ? "paper" : "corrected"; }

Protocol parse_protocol(const std::string& name) {
  if (name == "paper") return Protocol::Paper;
  if (name == "corrected") return Protocol::Corrected;
  fail("unknown protocol '{}': expected \"paper\" or \"corrected\"", name);
}

json protocol_explanation(Protocol protocol) {
  struct Quirk {
    const char *name, *paper, *corrected;
  };
  static const Quirk quirks[] = {
      {"lr_schedule",
       "get_cosine_schedule_with_warmup(500, epochs * rows): the length counts examples, not steps, so with "
       "fewer than 500 steps the LR only ever warms up (MRPC peaks at 344/500 of the base LR)",
       "the schedule's length is epochs * batches per epoch (optimiser steps); warmup may be a ratio of it"},
      {"logits_position",
       "logits[:, -1, :]: the last position of the padded batch, which is padding for every shorter row",
       "each row's logits come from its last real token (batch.last_index)"},
      {"perplexity",
       "one forward pass over the first paper_max_length tokens of the WikiText-2 test text with blank lines "
       "dropped and the rest joined with no separator",
       "sliding window (window, stride; earlier tokens as context only) over the whole test text joined with "
       "\"\\n\\n\", as the transformers perplexity guide"},
      {"sentiment140_eval",
       "the first 1000 rows of the training file, all of class 0 (the file is sorted by label)",
       "a seeded sample balanced per class (eval.balanced_per_class); a single-class eval set is rejected"},
  };
  json out = json::array();
  for (const Quirk& q : quirks)
    out.push_back({{"quirk", q.name}, {"what_this_run_does", protocol == Protocol::Paper ? q.paper : q.corrected},
                   {"paper", q.paper}, {"corrected", q.corrected}});
  return out;
}

Tensor select_positions(const Tensor& hidden, const data::Batch& batch, Protocol protocol) {
  check(hidden.dim() == 3 && hidden.size(0) == batch.ids.size(0) && hidden.size(1) == batch.ids.size(1),
        "select_positions: hidden {} does not match ids {}", engine::shape_str(hidden.shape()),
        engine::shape_str(batch.ids.shape()));
  const int64_t B = hidden.size(0), T = hidden.size(1), C = hidden.size(2);
  if (protocol == Protocol::Paper) return hidden.select(1, T - 1);
  std::vector<int32_t> rows = batch.last_index.to_vector<int32_t>();
  for (int64_t b = 0; b < B; ++b) rows[size_t(b)] += int32_t(b * T);  // row b's token in the flattened [B*T, C]
  return engine::index_select(hidden.reshape({B * T, C}), 0, Tensor::from_vector<int32_t>(rows, {B}, hidden.device()));
}

engine::optim::Schedule task_schedule(const TaskConfig& task, Protocol protocol, int64_t train_examples,
                                      int64_t steps_per_epoch) {
  using engine::optim::Schedule;
  const ScheduleConfig& s = task.schedule;
  if (s.kind == "none" || s.kind == "constant") return Schedule::constant();
  const int64_t length = task.epochs * (protocol == Protocol::Paper ? train_examples : steps_per_epoch);
  // HF's TrainingArguments.get_warmup_steps: ceil(total * ratio).
  const int64_t warmup = s.warmup_ratio ? int64_t(std::ceil(double(length) * *s.warmup_ratio)) : s.warmup_steps;
  return Schedule::from_name(s.kind, warmup, length);
}

// ================================ config ================================

data::LabelMap LabelSpec::map() const {
  switch (kind) {
    case Kind::FloorDivide: return data::LabelMap::floor_divide(divisor);
    case Kind::Table: return data::LabelMap::table(table);
    case Kind::Identity: break;
  }
  return data::LabelMap::identity();
}

json LabelSpec::to_json() const {
  if (kind == Kind::Identity) return "identity";
  if (kind == Kind::FloorDivide) return {{"floor_divide", divisor}};
  json map = json::object();
  for (auto [raw, cls] : table) map[std::to_string(raw)] = cls;
  return {{"map", map}};
}

namespace {

// One JSON object being read: every key taken is remembered, so that done()
// can reject the rest (a typo such as "epoch" must not silently use a default).
class Fields {
 public:
  Fields(const json& object, std::string where) : object_(object), where_(std::move(where)) {
    check(object.is_object(), "{}: expected a JSON object", where_);
  }
  const std::string& where() const { return where_; }
  std::string name(const std::string& key) const { return where_ + "." + key; }
  const json* find(const std::string& key) {
    used_.insert(key);
    auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  const json& require(const std::string& key) {
    const json* v = find(key);
    check(v != nullptr, "{}: missing", name(key));
    return *v;
  }
  template <typename T>
  T get(const std::string& key, T fallback) {
    const json* v = find(key);
    return v ? as<T>(*v, name(key)) : fallback;
  }
  void done() const {
    for (auto it = object_.begin(); it != object_.end(); ++it)
      check(used_.count(it.key()) != 0, "{}: unknown key '{}'", where_, it.key());
  }

  template <typename T>
  static T as(const json& v, const std::string& name) {
    if constexpr (std::is_same_v<T, bool>) {
      check(v.is_boolean(), "{}: expected true or false, got {}", name, v.dump());
    } else if constexpr (std::is_integral_v<T>) {
      check(v.is_number_integer() && (std::is_signed_v<T> || v.get<int64_t>() >= 0),
            "{}: expected a{} integer, got {}", name, std::is_signed_v<T> ? "n" : " non-negative", v.dump());
    } else if constexpr (std::is_floating_point_v<T>) {
      check(v.is_number() && std::isfinite(v.get<double>()), "{}: expected a number, got {}", name, v.dump());
    } else if constexpr (std::is_same_v<T, std::string>) {
      check(v.is_string(), "{}: expected a string, got {}", name, v.dump());
    } else {  // std::vector<...>
      check(v.is_array() && !v.empty(), "{}: expected a non-empty list, got {}", name, v.dump());
      T out;
      for (size_t i = 0; i < v.size(); ++i)
        out.push_back(as<typename T::value_type>(v[i], fmt::format("{}[{}]", name, i)));
      return out;
    }
    return v.get<T>();
  }

 private:
  const json& object_;
  std::string where_;
  std::set<std::string> used_;
};

std::string resolve(const std::string& file, const std::string& data_dir, const std::string& field) {
  check(!file.empty(), "{}: empty path", field);
  if (fs::path(file).is_absolute()) return file;
  check(!data_dir.empty(), "{}: '{}' is relative, but no data folder is set (set CURLORA_DATA_DIR or pass --data-dir)",
        field, file);
  return (fs::path(data_dir) / file).string();
}

std::string existing_file(const std::string& file, const std::string& data_dir, const std::string& field) {
  std::string path = resolve(file, data_dir, field);
  check(fs::is_regular_file(path), "{}: file '{}' not found", field, path);
  return path;
}

LabelSpec parse_labels(const json* v, const std::string& name) {
  LabelSpec spec;
  if (v == nullptr || (v->is_string() && v->get<std::string>() == "identity")) return spec;
  check(v->is_object() && v->size() == 1, "{}: expected \"identity\", {{\"floor_divide\": N}} or {{\"map\": {{...}}}}",
        name);
  if (v->contains("floor_divide")) {
    spec.kind = LabelSpec::Kind::FloorDivide;
    spec.divisor = Fields::as<int64_t>((*v)["floor_divide"], name + ".floor_divide");
    check(spec.divisor > 0, "{}.floor_divide: must be positive", name);
  } else {
    check(v->contains("map") && (*v)["map"].is_object(), "{}: expected floor_divide or map", name);
    spec.kind = LabelSpec::Kind::Table;
    for (auto it = (*v)["map"].begin(); it != (*v)["map"].end(); ++it) {
      char* end = nullptr;
      long long raw = std::strtoll(it.key().c_str(), &end, 10);
      check(!it.key().empty() && *end == '\0', "{}.map: key '{}' is not an integer", name, it.key());
      spec.table[raw] = Fields::as<int64_t>(it.value(), name + ".map." + it.key());
    }
  }
  return spec;
}

SplitConfig parse_split(const json& v, const std::string& where, const std::string& data_dir, bool eval) {
  Fields f(v, where);
  SplitConfig s;
  s.file = Fields::as<std::string>(f.require("file"), f.name("file"));
  s.path = existing_file(s.file, data_dir, f.name("file"));
  if (const json* rows = f.find("rows")) {
    s.rows = Fields::as<size_t>(*rows, f.name("rows"));
    check(*s.rows > 0, "{}: must be positive", f.name("rows"));
  }
  s.labels = parse_labels(f.find("labels"), f.name("labels"));
  if (eval) {
    s.balanced_per_class = f.get<size_t>("balanced_per_class", 0);
    s.batch_size = f.get<int64_t>("batch_size", 0);
    check(s.batch_size >= 0, "{}: must be >= 0", f.name("batch_size"));
  }
  f.done();
  return s;
}

json split_json(const SplitConfig& s, bool eval) {
  json out = {{"file", s.file}, {"path", s.path}, {"rows", s.rows ? json(*s.rows) : json()}, {"labels", s.labels.to_json()}};
  if (eval) out.update({{"balanced_per_class", s.balanced_per_class}, {"batch_size", s.batch_size}});
  return out;
}

TaskConfig parse_task(const json& v, const std::string& where, const std::string& data_dir) {
  Fields f(v, where);
  TaskConfig t;
  t.name = Fields::as<std::string>(f.require("name"), f.name("name"));
  check(!t.name.empty(), "{}: must not be empty", f.name("name"));
  const std::string named = fmt::format("{} ('{}')", where, t.name);
  t.format = Fields::as<std::string>(f.require("format"), f.name("format"));
  check(data::dataset_format_from_name(t.format).has_value(),
        "{}: unknown format '{}' (expected mrpc, sst2, sentiment140, tsv or jsonl)", named, t.format);
  t.num_classes = f.get<int64_t>("num_classes", 2);
  check(t.num_classes >= 2, "{}.num_classes: must be at least 2, got {}", named, t.num_classes);
  t.epochs = f.get<int64_t>("epochs", 1);
  check(t.epochs >= 1, "{}.epochs: must be at least 1, got {}", named, t.epochs);
  t.train = parse_split(f.require("train"), named + ".train", data_dir, false);
  t.eval = parse_split(f.require("eval"), named + ".eval", data_dir, true);
  if (const json* s = f.find("schedule")) {
    Fields sf(*s, named + ".schedule");
    t.schedule.kind = sf.get<std::string>("kind", "none");
    static const std::set<std::string> kinds = {"none", "constant", "constant_with_warmup", "linear", "cosine"};
    check(kinds.count(t.schedule.kind) != 0, "{}: unknown kind '{}' (expected none, constant, constant_with_warmup, "
          "linear or cosine)", sf.name("kind"), t.schedule.kind);
    t.schedule.warmup_steps = sf.get<int64_t>("warmup_steps", 0);
    check(t.schedule.warmup_steps >= 0, "{}: must be >= 0", sf.name("warmup_steps"));
    if (const json* r = sf.find("warmup_ratio")) {
      t.schedule.warmup_ratio = Fields::as<double>(*r, sf.name("warmup_ratio"));
      check(*t.schedule.warmup_ratio >= 0 && *t.schedule.warmup_ratio <= 1, "{}: must lie in [0, 1]",
            sf.name("warmup_ratio"));
      check(t.schedule.warmup_steps == 0, "{}: give warmup_steps or warmup_ratio, not both", sf.where());
    }
    sf.done();
  }
  f.done();
  return t;
}

}  // namespace

json BenchConfig::to_json() const {
  json methods = json::array();
  for (Method m : base.methods) methods.push_back(method_name(m));
  json tasks_json = json::array();
  for (const TaskConfig& t : tasks) {
    json schedule = {{"kind", t.schedule.kind}, {"warmup_steps", t.schedule.warmup_steps},
                     {"warmup_ratio", t.schedule.warmup_ratio ? json(*t.schedule.warmup_ratio) : json()}};
    tasks_json.push_back({{"name", t.name}, {"format", t.format}, {"num_classes", t.num_classes},
                          {"epochs", t.epochs}, {"train", split_json(t.train, false)},
                          {"eval", split_json(t.eval, true)}, {"schedule", schedule}});
  }
  const Optimizer& o = optimizer;
  const Perplexity& p = perplexity;
  return {{"protocol", protocol_name(protocol)},
          {"description", description},
          {"data_dir", data_dir},
          {"base", {{"model", base.model}, {"model_path", base.model_path}, {"tokenizer", base.tokenizer},
                    {"tokenizer_path", base.tokenizer_path}, {"device", base.device}, {"dtype", base.dtype},
                    {"seed", base.seed}, {"methods", methods}, {"ranks", base.ranks}, {"alpha", base.alpha},
                    {"targets", base.targets}}},
          {"optimizer", {{"name", "adamw"}, {"lr", o.lr}, {"weight_decay", o.weight_decay}, {"beta1", o.beta1},
                         {"beta2", o.beta2}, {"eps", o.eps}, {"batch_size", o.batch_size},
                         {"max_length", o.max_length}, {"shuffle", o.shuffle}, {"head_seed", o.head_seed}}},
          {"tasks", tasks_json},
          {"perplexity", {{"file", p.file}, {"path", p.path}, {"paper_max_length", p.paper_max_length},
                          {"window", p.window}, {"stride", p.stride}, {"max_tokens", p.max_tokens}}}};
}

BenchConfig parse_config(const json& root, const std::string& source, const std::string& data_dir) {
  Fields top(root, source);
  BenchConfig c;
  c.data_dir = data_dir;
  c.protocol = parse_protocol(Fields::as<std::string>(top.require("protocol"), top.name("protocol")));
  c.description = top.get<std::string>("description", "");

  Fields b(top.require("base"), source + ": base");
  c.base.model = Fields::as<std::string>(b.require("model"), b.name("model"));
  if (models::GPT2Config::is_builtin(c.base.model) && !fs::exists(c.base.model)) {
    c.base.model_path = c.base.model;  // fresh weights of a published size
  } else {
    c.base.model_path = resolve(c.base.model, data_dir, b.name("model"));
    check(fs::is_regular_file(fs::path(c.base.model_path) / "config.json"),
          "{}: '{}' is not a model folder (no config.json) and not one of gpt2, gpt2-medium, gpt2-large, gpt2-xl",
          b.name("model"), c.base.model_path);
  }
  c.base.tokenizer = b.get<std::string>("tokenizer", "");
  if (!c.base.tokenizer.empty()) {
    c.base.tokenizer_path = resolve(c.base.tokenizer, data_dir, b.name("tokenizer"));
  } else if (fs::exists(fs::path(c.base.model_path) / "vocab.json")) {
    c.base.tokenizer_path = c.base.model_path;
  } else {
    c.base.tokenizer_path = resolve("gpt2-tokenizer", data_dir, b.name("tokenizer"));
  }
  check(fs::is_directory(c.base.tokenizer_path), "{}: tokenizer folder '{}' not found", b.name("tokenizer"),
        c.base.tokenizer_path);
  c.base.device = b.get<std::string>("device", "auto");
  if (c.base.device != "auto") engine::Device::parse(c.base.device);
  c.base.dtype = b.get<std::string>("dtype", "fp32");
  check(c.base.dtype == "fp32" || c.base.dtype == "bf16" || c.base.dtype == "fp16",
        "{}: unknown dtype '{}' (expected fp32, bf16 or fp16)", b.name("dtype"), c.base.dtype);
  c.base.seed = b.get<uint64_t>("seed", c.base.seed);
  if (const json* m = b.find("methods")) {
    c.base.methods.clear();
    for (const std::string& name : Fields::as<std::vector<std::string>>(*m, b.name("methods")))
      c.base.methods.push_back(parse_method(name));
  }
  c.base.ranks = b.get<std::vector<int64_t>>("ranks", c.base.ranks);
  for (int64_t r : c.base.ranks) check(r > 0, "{}: ranks must be positive, got {}", b.name("ranks"), r);
  c.base.alpha = b.get<double>("alpha", c.base.alpha);
  c.base.targets = b.get<std::vector<std::string>>("targets", c.base.targets);
  b.done();

  BenchConfig::Optimizer& o = c.optimizer;
  if (const json* v = top.find("optimizer")) {
    Fields f(*v, source + ": optimizer");
    check(f.get<std::string>("name", "adamw") == "adamw", "{}: only adamw is supported", f.name("name"));
    o.lr = f.get<double>("lr", o.lr);
    o.weight_decay = f.get<double>("weight_decay", o.weight_decay);
    o.beta1 = f.get<double>("beta1", o.beta1);
    o.beta2 = f.get<double>("beta2", o.beta2);
    o.eps = f.get<double>("eps", o.eps);
    o.batch_size = f.get<int64_t>("batch_size", o.batch_size);
    o.max_length = f.get<int64_t>("max_length", o.max_length);
    o.shuffle = f.get<bool>("shuffle", o.shuffle);
    o.head_seed = f.get<uint64_t>("head_seed", o.head_seed);
    check(o.lr > 0 && o.weight_decay >= 0 && o.eps > 0, "{}: lr and eps must be positive, weight_decay >= 0",
          f.where());
    check(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, "{}: betas must lie in [0, 1)", f.where());
    check(o.batch_size >= 1, "{}: must be at least 1", f.name("batch_size"));
    check(o.max_length >= 2, "{}: must be at least 2", f.name("max_length"));
    f.done();
  }

  const json& tasks = top.require("tasks");
  check(tasks.is_array() && !tasks.empty(), "{}: expected a non-empty list of tasks", top.name("tasks"));
  std::set<std::string> names;
  for (size_t i = 0; i < tasks.size(); ++i) {
    c.tasks.push_back(parse_task(tasks[i], fmt::format("{}: tasks[{}]", source, i), data_dir));
    check(names.insert(c.tasks.back().name).second, "{}: tasks[{}]: task name '{}' is used twice", source, i,
          c.tasks.back().name);
  }

  BenchConfig::Perplexity& p = c.perplexity;
  if (const json* v = top.find("perplexity")) {
    Fields f(*v, source + ": perplexity");
    p.file = f.get<std::string>("file", p.file);
    p.paper_max_length = f.get<int64_t>("paper_max_length", p.paper_max_length);
    p.window = f.get<int64_t>("window", p.window);
    p.stride = f.get<int64_t>("stride", p.stride);
    p.max_tokens = f.get<int64_t>("max_tokens", p.max_tokens);
    check(p.paper_max_length >= 2 && p.window >= 2, "{}: lengths must be at least 2", f.where());
    check(p.stride >= 1 && p.stride <= p.window, "{}: must lie in [1, window]", f.name("stride"));
    check(p.max_tokens >= 0, "{}: must be >= 0", f.name("max_tokens"));
    f.done();
  }
  p.path = existing_file(p.file, data_dir, source + ": perplexity.file");
  top.done();
  return c;
}

BenchConfig load_config(const std::string& path, const std::string& data_dir) {
  std::ifstream in(path);
  check(in.good(), "config '{}': cannot open", path);
  json root;
  try {
    root = json::parse(in, nullptr, /*allow_exceptions=*/true, /*ignore_comments=*/true);
  } catch (const json::parse_error& e) {
    fail("config '{}': not valid JSON: {}", path, e.what());
  }
  return parse_config(root, path, data_dir);
}

// ================================ running ================================

namespace {

using Clock = std::chrono::steady_clock;
using engine::nn::Linear;
using models::GPT2LMHeadModel;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Philox key of balanced eval samples, so they draw other numbers than dropout with the same seed ("BALANCED").
constexpr uint64_t kBalancedKey = 0x42414C414E434544ull;

// A reader sees the old file or the new one, never half of one (a kill mid-write leaves only the .tmp).
void write_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = fs::path(path).concat(".tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  check(fd >= 0, "cannot write '{}'", tmp.string());
  size_t written = 0;
  while (written < text.size()) {
    const ssize_t n = ::write(fd, text.data() + written, text.size() - written);
    if (n <= 0) break;
    written += size_t(n);
  }
  const bool ok = written == text.size() && ::fsync(fd) == 0;
  ::close(fd);
  check(ok, "cannot write '{}'", tmp.string());
  fs::rename(tmp, path);
}

json read_json(const fs::path& path) {
  std::ifstream in(path);
  check(in.good(), "cannot open '{}'", path.string());
  json value = json::parse(in, nullptr, /*allow_exceptions=*/false);
  check(!value.is_discarded(), "'{}' is not valid JSON", path.string());
  return value;
}

std::string git_revision() {
  FILE* pipe = ::popen("git rev-parse HEAD 2>/dev/null", "r");
  if (pipe == nullptr) return "unknown";
  char buffer[128] = {};
  const bool got = std::fgets(buffer, sizeof buffer, pipe) != nullptr;
  ::pclose(pipe);
  std::string rev = got ? std::string(buffer) : "";
  while (!rev.empty() && (rev.back() == '\n' || rev.back() == '\r')) rev.pop_back();
  return rev.size() == 40 ? rev : "unknown";
}

int64_t peak_rss_bytes() {
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return int64_t(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

// Peak bytes the engine held on a CUDA device since the last reset; null on the CPU or without CUDA.
json cuda_peak_bytes(engine::Device device, bool reset) {
#ifdef CURLORA_WITH_CUDA
  if (device.is_cuda()) {
    const size_t peak = engine::cuda_memory_stats(device.index).peak_bytes;
    if (reset) engine::cuda_reset_peak(device.index);
    return peak;
  }
#endif
  (void)device, (void)reset;
  return nullptr;
}

std::string run_label(Method m, int64_t rank) { return fmt::format("{} r{}", m == Method::LoRA ? "LoRA" : "CURLoRA", rank); }
std::string run_id(Method m, int64_t rank) { return fmt::format("{}-r{}", method_name(m), rank); }

// Tokens the model processes for these batches: rows x the longest row of each (padding included).
int64_t padded_tokens(const data::TokenizedDataset& d, const std::vector<std::vector<size_t>>& batches) {
  int64_t total = 0;
  for (const auto& rows : batches) {
    size_t longest = 0;
    for (size_t r : rows) longest = std::max(longest, d.ids[r].size());
    total += int64_t(rows.size() * longest);
  }
  return total;
}

json split_info(const data::Dataset& d) {
  json counts = json::object();
  for (auto [label, n] : d.label_counts()) counts[std::to_string(label)] = n;
  return {{"source", d.source}, {"examples", d.size()}, {"label_counts", counts}};
}

struct TaskData {
  data::TokenizedDataset train, eval;
  json info;
};

// What every (method, rank) run shares: data tokenised once, the perplexity text, the counters.
struct Sweep {
  Sweep(const BenchConfig& c, const RunOptions& o) : config(c), options(o) {}
  const BenchConfig& config;
  const RunOptions& options;
  engine::Device device = engine::Device::cpu();
  engine::DType dtype = engine::DType::F32;
  std::vector<TaskData> tasks;
  std::vector<int32_t> ppl_ids;
  json perplexity_before;
  int64_t tasks_completed = 0;
  fs::path checkpoints;

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
  std::shared_ptr<GPT2LMHeadModel> model;
  std::shared_ptr<engine::nn::Module> lm_head;  // the original (tied) LM head, for perplexity
  std::vector<std::shared_ptr<Linear>> heads;
  json results;
};

data::Dataset read_split(const Sweep& s, const TaskConfig& task, const SplitConfig& split, const char* which) {
  data::ReadOptions read;
  read.max_rows = split.rows;
  read.labels = split.labels.map();
  data::Dataset d = data::read_dataset(split.path, *data::dataset_format_from_name(task.format), read);
  if (split.balanced_per_class > 0) d = data::balanced_sample(d, split.balanced_per_class, s.config.base.seed ^ kBalancedKey);
  check(d.size() > 0, "task '{}': its {} set {} is empty", task.name, which, d.source);
  check(d.num_classes() <= task.num_classes, "task '{}': its {} set {} has label {}, but num_classes is {}", task.name,
        which, d.source, d.num_classes() - 1, task.num_classes);
  return d;
}

void load_data(Sweep& s) {
  const BenchConfig& c = s.config;
  const data::GPT2Tokenizer tokenizer = data::GPT2Tokenizer::from_dir(c.base.tokenizer_path);
  for (const TaskConfig& task : c.tasks) {
    const data::Dataset train = read_split(s, task, task.train, "train");
    const data::Dataset eval = read_split(s, task, task.eval, "eval");
    check(c.protocol == Protocol::Paper || eval.label_counts().size() >= 2,
          "task '{}': its eval set {} holds a single class, so accuracy on it measures nothing; the corrected "
          "protocol needs several (set eval.balanced_per_class)", task.name, eval.source);
    s.tasks.push_back({data::tokenize(train, tokenizer, c.optimizer.max_length),
                       data::tokenize(eval, tokenizer, c.optimizer.max_length),
                       {{"name", task.name}, {"num_classes", task.num_classes}, {"epochs", task.epochs},
                        {"train", split_info(train)}, {"eval", split_info(eval)}}});
  }
  const std::string raw = data::read_text_file(c.perplexity.path);
  if (c.protocol == Protocol::Paper) {
    s.ppl_ids = tokenizer.encode(data::join_wikitext(raw, data::WikiTextJoin::PaperCode));
    // tokenizer(text, truncation=True, max_length=paper_max_length): the head of the encoded text.
    if (int64_t(s.ppl_ids.size()) > c.perplexity.paper_max_length) s.ppl_ids.resize(size_t(c.perplexity.paper_max_length));
  } else {
    s.ppl_ids = tokenizer.encode(data::join_wikitext(raw, data::WikiTextJoin::HfDocs));
    if (c.perplexity.max_tokens > 0 && int64_t(s.ppl_ids.size()) > c.perplexity.max_tokens)
      s.ppl_ids.resize(size_t(c.perplexity.max_tokens));
  }
}

json measure_perplexity(const Sweep& s, GPT2LMHeadModel& model, const std::string& label) {
  const auto& p = s.config.perplexity;
  auto progress = [&](int64_t done, int64_t total) { s.progress(label + " | perplexity", done, total); };
  models::PerplexityResult r =
      s.config.protocol == Protocol::Paper
          ? models::single_window_perplexity(model, s.ppl_ids, p.paper_max_length)
          : models::sliding_window_perplexity(model, s.ppl_ids, p.window, p.stride, progress);
  check(std::isfinite(r.ppl()), "{}: perplexity is {} (nll sum {} over {} tokens)", label, r.ppl(), r.nll_sum, r.scored);
  return {{"ppl", r.ppl()}, {"nll_sum", r.nll_sum}, {"tokens", r.tokens}, {"scored", r.scored}};
}

// Logits [B, K] of a classification batch: hidden states at one position per row, then the head.
Tensor class_logits(const Sweep& s, GPT2LMHeadModel& model, Linear& head, const data::Batch& batch) {
  Tensor hidden = model.hidden_states(batch.ids.to(s.device), batch.attention_mask.to(s.device));
  Tensor picked = select_positions(hidden, batch, s.config.protocol).contiguous();
  return head(picked.dtype() == engine::DType::F32 ? picked : picked.to(engine::DType::F32));
}

double evaluate(const Sweep& s, GPT2LMHeadModel& model, Linear& head, const data::TokenizedDataset& d,
                int64_t batch_size, const std::string& label) {
  engine::NoGradGuard no_grad;
  model.eval();
  data::BatchOptions options;
  options.batch_size = batch_size;
  options.shuffle = false;
  const auto batches = data::epoch_batches(d, options, 0);
  const int64_t total = padded_tokens(d, batches);
  int64_t done = 0, correct = 0;
  for (const auto& rows : batches) {
    const data::Batch batch = data::make_batch(d, rows, options);
    const std::vector<int64_t> predicted = engine::argmax(class_logits(s, model, head, batch), -1).to_vector<int64_t>();
    const std::vector<int32_t> labels = batch.labels.to_vector<int32_t>();
    for (size_t i = 0; i < labels.size(); ++i) correct += predicted[i] == labels[i];
    done += batch.ids.numel();
    s.progress(label, done, total);
  }
  return double(correct) / double(d.size());
}

// Trains the run's newest head and its adapters on task t; returns the training record.
json train_task(Sweep& s, Run& run, size_t t, engine::optim::AdamW& optimizer) {
  const BenchConfig& c = s.config;
  const TaskConfig& task = c.tasks[t];
  const data::TokenizedDataset& train = s.tasks[t].train;
  Linear& head = *run.heads.back();
  data::BatchOptions options;
  options.batch_size = c.optimizer.batch_size;
  options.shuffle = c.optimizer.shuffle;
  options.seed = c.base.seed + t;
  std::vector<std::vector<std::vector<size_t>>> epochs;
  int64_t total_tokens = 0;
  for (int64_t e = 0; e < task.epochs; ++e) {
    epochs.push_back(data::epoch_batches(train, options, uint64_t(e)));
    total_tokens += padded_tokens(train, epochs.back());
  }
  const int64_t steps_per_epoch = int64_t(epochs.front().size());
  const engine::optim::Schedule schedule = task_schedule(task, c.protocol, int64_t(train.size()), steps_per_epoch);

  run.model->train();
  json epoch_loss = json::array();
  double max_lr = 0, last_lr = 0;
  int64_t tokens = 0, real_tokens = 0;
  const auto start = Clock::now();
  for (int64_t e = 0; e < task.epochs; ++e) {
    const std::string label = fmt::format("{} | train {} epoch {}/{}", run.label, task.name, e + 1, task.epochs);
    double loss_sum = 0;
    for (size_t step = 0; step < epochs[size_t(e)].size(); ++step) {
      last_lr = c.optimizer.lr * schedule.multiplier(optimizer.step_count());
      max_lr = std::max(max_lr, last_lr);
      optimizer.set_lr(last_lr);
      const data::Batch batch = data::make_batch(train, epochs[size_t(e)][step], options);
      optimizer.zero_grad();
      Tensor loss = engine::cross_entropy(class_logits(s, *run.model, head, batch), batch.labels.to(s.device));
      const double value = loss.item();
      check(std::isfinite(value), "{}: task '{}': the loss is {} at epoch {} step {} of {}; training diverged (lower "
            "the learning rate?)", run.label, task.name, value, e + 1, step + 1, epochs[size_t(e)].size());
      loss.backward();
      optimizer.step();
      loss_sum += value;
      tokens += batch.ids.numel();
      for (size_t r : batch.rows) real_tokens += int64_t(train.ids[r].size());
      s.progress(label, tokens, total_tokens);
    }
    epoch_loss.push_back(loss_sum / double(epochs[size_t(e)].size()));
  }
  const double seconds = seconds_since(start);
  return {{"steps", optimizer.step_count()}, {"steps_per_epoch", steps_per_epoch},
          {"epoch_mean_loss", epoch_loss},
          {"schedule", {{"kind", task.schedule.kind}, {"warmup", schedule.warmup_steps},
                        {"length", schedule.total_steps},
                        {"length_counts", c.protocol == Protocol::Paper ? "examples" : "steps"}}},
          {"lr_max", max_lr}, {"lr_last", last_lr}, {"padded_tokens", tokens}, {"real_tokens", real_tokens},
          {"timings", {{"train_seconds", seconds}, {"tokens_per_second", double(tokens) / std::max(seconds, 1e-9)}}}};
}

json diagnostics_json(const GPT2LMHeadModel& model) {
  json layers = json::array();
  double delta_sq = 0, weight_sq = 0;
  for (const LayerDiagnostics& d : diagnose_adapters(model)) {
    json norms = json::object();
    for (const auto& [name, norm] : d.trainable_norms) norms[name] = norm;
    layers.push_back({{"name", d.name}, {"trainable_norms", norms}, {"delta_norm", d.delta_norm},
                      {"weight_norm", d.weight_norm}, {"relative_delta", d.relative_delta}});
    delta_sq += d.delta_norm * d.delta_norm;
    weight_sq += d.weight_norm * d.weight_norm;
  }
  // Over all adapted layers at once: sqrt(sum ||dW_l||^2), and that over sqrt(sum ||W_l||^2).
  return {{"delta_norm_total", std::sqrt(delta_sq)},
          {"relative_delta_total", weight_sq > 0 ? std::sqrt(delta_sq / weight_sq) : 0.0}, {"layers", layers}};
}

// ---- checkpoints: checkpoints/<run>/task-N/ is complete once it has that name ----

fs::path latest_checkpoint(const fs::path& run_dir) {
  fs::path best;
  int64_t best_n = 0;
  if (!fs::is_directory(run_dir)) return best;
  for (const auto& entry : fs::directory_iterator(run_dir)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with("task-") || name.ends_with(".tmp")) continue;
    const int64_t n = std::strtoll(name.c_str() + 5, nullptr, 10);
    if (n > best_n && fs::exists(entry.path() / "state.json")) best = entry.path(), best_n = n;
  }
  return best;
}

void save_checkpoint(const Sweep& s, const Run& run, const engine::optim::AdamW& optimizer, size_t tasks_done) {
  const fs::path dir = s.checkpoints / run.id / fmt::format("task-{}", tasks_done);
  const fs::path tmp = fs::path(dir).concat(".tmp");
  fs::remove_all(tmp);
  fs::remove_all(dir);
  fs::create_directories(tmp);
  if (run.method == Method::CurLoRA) {
    save_curlora((tmp / "adapter.safetensors").string(), *run.model, run.adapter);
  } else {
    save_lora_peft((tmp / "adapter").string(), *run.model, run.adapter, s.config.base.model);
  }
  engine::nn::NamedTensors heads;
  for (size_t i = 0; i < run.heads.size(); ++i) {
    heads.emplace_back(fmt::format("{}.weight", i), run.heads[i]->weight.detach());
    heads.emplace_back(fmt::format("{}.bias", i), run.heads[i]->bias.detach());
  }
  save_named_tensors((tmp / "heads.safetensors").string(), heads);
  // Not needed to resume (every task starts a fresh AdamW), kept to inspect or continue a task.
  const engine::optim::OptimizerState state = optimizer.state_dict();
  engine::nn::NamedTensors moments(state.tensors.begin(), state.tensors.end());
  save_named_tensors((tmp / "optimizer.safetensors").string(), moments, {{"scalars", json(state.scalars).dump()}});
  const engine::Generator& gen = run.model->dropout_generator();
  write_atomically(tmp / "state.json", json({{"tasks_done", tasks_done},
                                             {"dropout_generator", {{"seed", gen.seed()}, {"offset", gen.offset()}}},
                                             {"run", run.results}})
                                           .dump(1));
  fs::rename(tmp, dir);
}

void restore_checkpoint(const Sweep& s, Run& run, const fs::path& dir, const json& state) {
  const AdapterConfig loaded = run.method == Method::CurLoRA ? load_curlora(*run.model, (dir / "adapter.safetensors").string())
                                                             : load_lora_peft(*run.model, (dir / "adapter").string());
  check(loaded.rank == run.rank && loaded.targets == run.adapter.targets,
        "checkpoint '{}': rank {} and targets differ from the config's", dir.string(), loaded.rank);
  const engine::nn::NamedTensors heads = load_named_tensors((dir / "heads.safetensors").string());
  std::map<std::string, Tensor> by_name(heads.begin(), heads.end());
  for (size_t i = 0; i < size_t(state.at("tasks_done").get<int64_t>()); ++i) {
    Tensor w = by_name.at(fmt::format("{}.weight", i)).to(s.device), b = by_name.at(fmt::format("{}.bias", i)).to(s.device);
    run.heads.push_back(std::make_shared<Linear>(w, b, engine::WeightLayout::OutIn));
  }
  const json& gen = state.at("dropout_generator");
  run.model->dropout_generator().set_state(gen.at("seed").get<uint64_t>(), gen.at("offset").get<uint64_t>());
  run.results = state.at("run");
}

json new_run_results(const Run& run, const Sweep& s) {
  return {{"method", method_name(run.method)}, {"rank", run.rank}, {"label", run.label}, {"alpha", run.adapter.alpha},
          {"targets", run.adapter.targets}, {"perplexity_before", s.perplexity_before}, {"tasks", json::array()}};
}

// Accuracy of every task (columns) after training each (rows); null above the diagonal.
json accuracy_matrix(const json& tasks, const std::vector<TaskConfig>& configs) {
  json matrix = json::array();
  for (const json& row : tasks) {
    json cells = json::array();
    for (const TaskConfig& t : configs) cells.push_back(row.at("accuracy").contains(t.name) ? row["accuracy"][t.name] : json());
    matrix.push_back(cells);
  }
  return matrix;
}

// Runs (or resumes) one (method, rank). `publish` rewrites results.json with the run so far.
// Returns false when it stopped early (stop_after_tasks).
bool run_one(Sweep& s, Run& run, const std::function<void(const json&)>& publish) {
  const BenchConfig& c = s.config;
  const fs::path run_dir = s.checkpoints / run.id;
  const fs::path checkpoint = latest_checkpoint(run_dir);
  json state = checkpoint.empty() ? json() : read_json(checkpoint / "state.json");
  size_t first_task = state.is_null() ? 0 : size_t(state.at("tasks_done").get<int64_t>());
  if (first_task == c.tasks.size()) {  // finished before: nothing to load
    run.results = state.at("run");
    s.tasks_completed += int64_t(first_task);
    return true;
  }

  auto start = Clock::now();
  cuda_peak_bytes(s.device, /*reset=*/true);
  const std::string& model_path = c.base.model_path;
  run.model = GPT2LMHeadModel::load(model_path, s.dtype, s.device, c.base.seed);
  run.model->dropout_generator().set_state(c.base.seed, 0);
  check(c.optimizer.max_length <= run.model->config().n_positions &&
            (c.protocol == Protocol::Paper ? c.perplexity.paper_max_length : c.perplexity.window) <=
                run.model->config().n_positions,
        "{}: max_length and the perplexity window must not exceed the model's context {}", run.label,
        run.model->config().n_positions);
  const double load_seconds = seconds_since(start);
  if (s.perplexity_before.is_null()) {  // the base model's, before any adapter: once per sweep
    start = Clock::now();
    s.perplexity_before = measure_perplexity(s, *run.model, "base model");
    s.perplexity_before["timings"] = {{"perplexity_seconds", seconds_since(start)}};
    write_atomically(s.checkpoints / "perplexity_before.json", s.perplexity_before.dump(1));
    s.note(fmt::format("base model: perplexity {:.3f}", s.perplexity_before["ppl"].get<double>()));
  }
  if (first_task > 0) {
    restore_checkpoint(s, run, checkpoint, state);
    s.tasks_completed += int64_t(first_task);
    s.note(fmt::format("{}: resumed after task {} ({})", run.label, first_task, c.tasks[first_task - 1].name));
  } else {
    inject_adapters(*run.model, run.adapter);
    run.results = new_run_results(run, s);
    run.results["trainable_parameters"] = run.model->num_trainable_parameters();
  }
  run.results["timings"]["load_seconds"] = load_seconds;
  run.lm_head = run.model->get_submodule("lm_head");

  for (size_t t = first_task; t < c.tasks.size(); ++t) {
    const TaskConfig& task = c.tasks[t];
    // A fresh head per task from a generator seeded anew, as the reference calls
    // torch.manual_seed(1311) before every nn.Linear(C, K).
    engine::Generator head_gen(c.optimizer.head_seed);
    run.heads.push_back(std::make_shared<Linear>(run.model->config().n_embd, task.num_classes, head_gen, true,
                                                 engine::WeightLayout::OutIn, engine::DType::F32, s.device));
    run.model->replace_module("lm_head", run.heads.back());
    engine::optim::AdamWOptions adamw;
    adamw.lr = c.optimizer.lr;
    adamw.beta1 = c.optimizer.beta1;
    adamw.beta2 = c.optimizer.beta2;
    adamw.eps = c.optimizer.eps;
    adamw.weight_decay = c.optimizer.weight_decay;
    engine::optim::AdamW optimizer(run.model->named_trainable_parameters(), adamw);  // adapters + this head

    json record = {{"task", task.name}, {"train", train_task(s, run, t, optimizer)}};
    json timings = record["train"]["timings"];
    record["train"].erase("timings");

    auto start_eval = Clock::now();
    json accuracy = json::object();
    for (size_t j = 0; j <= t; ++j) {
      const int64_t batch = c.tasks[j].eval.batch_size > 0 ? c.tasks[j].eval.batch_size : c.optimizer.batch_size;
      accuracy[c.tasks[j].name] = evaluate(s, *run.model, *run.heads[j], s.tasks[j].eval, batch,
                                           fmt::format("{} | eval {} after {}", run.label, c.tasks[j].name, task.name));
    }
    record["accuracy"] = accuracy;
    timings["eval_seconds"] = seconds_since(start_eval);
    record["diagnostics"] = diagnostics_json(*run.model);

    auto start_ppl = Clock::now();
    run.model->replace_module("lm_head", run.lm_head);  // the tied LM head, for next-token logits
    record["perplexity"] = measure_perplexity(s, *run.model, run.label);
    run.model->replace_module("lm_head", run.heads.back());
    timings["perplexity_seconds"] = seconds_since(start_ppl);
    record["timings"] = timings;
    run.results["tasks"].push_back(record);

    run.results["peak_memory"] = {{"cuda_peak_bytes", cuda_peak_bytes(s.device, /*reset=*/false)}};
    auto start_save = Clock::now();
    save_checkpoint(s, run, optimizer, t + 1);
    run.results["tasks"].back()["timings"]["checkpoint_seconds"] = seconds_since(start_save);
    ++s.tasks_completed;
    s.note(fmt::format("{} | {}: accuracy {:.4f} | perplexity {:.3f} | {:.1f} s", run.label, task.name,
                       accuracy[task.name].get<double>(), record["perplexity"]["ppl"].get<double>(),
                       seconds_since(start)));
    publish(run.results);
    if (s.options.stop_after_tasks && s.tasks_completed >= *s.options.stop_after_tasks) return false;
  }
  return true;
}

// The run's summary once its last task is done: the matrix, final accuracies, perplexity after.
void finish_run(const BenchConfig& c, json& results) {
  const json& tasks = results.at("tasks");
  results["accuracy_matrix"] = accuracy_matrix(tasks, c.tasks);
  results["final_accuracy"] = tasks.back().at("accuracy");
  results["perplexity_after"] = tasks.back().at("perplexity");
  double train = 0, tokens = 0;
  for (const json& t : tasks) {
    train += t["timings"].value("train_seconds", 0.0);
    tokens += t["train"].value("padded_tokens", 0.0);
  }
  results["timings"]["train_seconds"] = train;
  results["timings"]["train_tokens_per_second"] = train > 0 ? tokens / train : 0.0;
}

// Everything but the paths of a resolved config: what must match for a resume.
json comparable(json config) {
  config.erase("data_dir");
  config["base"].erase("model_path");
  config["base"].erase("tokenizer_path");
  config["perplexity"].erase("path");
  for (json& t : config["tasks"]) t["train"].erase("path"), t["eval"].erase("path");
  return config;
}

}  // namespace

json run_benchmark(const BenchConfig& config, const RunOptions& options) {
  const auto start = Clock::now();
  check(!options.out_dir.empty(), "bench: no output folder given");
  const fs::path out(options.out_dir);
  Sweep s(config, options);
  s.checkpoints = out / "checkpoints";
  s.device = config.base.device == "auto" ? (engine::cuda_available() ? engine::Device::cuda(0) : engine::Device::cpu())
                                          : engine::Device::parse(config.base.device);
  s.dtype = config.base.dtype == "bf16" ? engine::DType::BF16
            : config.base.dtype == "fp16" ? engine::DType::F16 : engine::DType::F32;

  const fs::path saved_config = s.checkpoints / "config.json";
  if (fs::exists(saved_config)) {
    check(options.resume, "'{}' already holds a benchmark run; pass --resume to continue it, or choose another output "
          "folder", out.string());
    check(comparable(read_json(saved_config)) == comparable(config.to_json()),
          "cannot resume '{}': the config differs from the one it was started with ({})", out.string(),
          saved_config.string());
  }
  fs::create_directories(s.checkpoints);
  write_atomically(saved_config, config.to_json().dump(1));
  if (options.resume && fs::exists(s.checkpoints / "perplexity_before.json"))
    s.perplexity_before = read_json(s.checkpoints / "perplexity_before.json");

  auto phase = Clock::now();
  load_data(s);
  const double data_seconds = seconds_since(phase);

  json results = {{"format", "curlora-bench/1"},
                  {"complete", false},
                  {"protocol", protocol_name(config.protocol)},
                  {"protocol_explanation", protocol_explanation(config.protocol)},
                  {"seed", config.base.seed},
                  {"git_revision", git_revision()},
                  {"device", s.device.str()},
                  {"config", config.to_json()},
                  {"tasks", json::array()},
                  {"runs", json::array()}};
  for (const TaskData& t : s.tasks) results["tasks"].push_back(t.info);
  std::vector<json> done_runs;
  auto publish = [&](const json& current) {
    json runs = json(done_runs);
    if (!current.is_null()) runs.push_back(current);
    results["runs"] = runs;
    results["perplexity_before"] = s.perplexity_before;
    results["timings"] = {{"data_seconds", data_seconds}, {"total_seconds", seconds_since(start)}};
    json cuda_peak = nullptr;  // the largest of the runs' peaks (each run resets the counter)
    for (const json& run : runs)
      if (run.contains("peak_memory") && run["peak_memory"]["cuda_peak_bytes"].is_number())
        cuda_peak = std::max(cuda_peak.is_null() ? 0 : cuda_peak.get<int64_t>(),
                             run["peak_memory"]["cuda_peak_bytes"].get<int64_t>());
    results["peak_memory"] = {{"cpu_max_rss_bytes", peak_rss_bytes()}, {"cuda_peak_bytes", cuda_peak}};
    write_atomically(out / "results.json", results.dump(1));
  };

  for (Method method : config.base.methods) {
    for (int64_t rank : config.base.ranks) {
      Run run;
      run.method = method;
      run.rank = rank;
      run.label = run_label(method, rank);
      run.id = run_id(method, rank);
      run.adapter.method = method;
      run.adapter.rank = rank;
      run.adapter.alpha = config.base.alpha;
      run.adapter.targets = config.base.targets;
      run.adapter.seed = config.base.seed;
      run.adapter.validate();
      if (!run_one(s, run, publish)) {
        publish(run.results);
        return results;
      }
      finish_run(config, run.results);
      done_runs.push_back(run.results);
      publish(json());
    }
  }
  results["complete"] = true;
  publish(json());
  return results;
}

}  // namespace curlora::bench
