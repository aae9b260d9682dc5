// The benchmark's config: the two protocols and the quirks they differ on, the
// config file's parsing and validation (unknown keys and bad values are errors
// naming the field), its resolved JSON form, and each task's learning-rate schedule.
#include "curlora/bench_config.h"

#include "engine/error.h"
#include "models/gpt2_config.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

namespace curlora::bench {

namespace fs = std::filesystem;
using engine::check;
using engine::fail;
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
  check(c.base.dtype == "fp32" || c.base.dtype == "bf16",
        "{}: unknown dtype '{}' (expected fp32, or bf16 for mixed precision)", b.name("dtype"), c.base.dtype);
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

void apply_override(json& root, const std::string& assignment, const std::string& source) {
  const size_t equals = assignment.find('=');
  check(equals != std::string::npos && equals > 0, "{}: override '{}' must be path=value, e.g. base.model=gpt2-large",
        source, assignment);
  const std::string path = assignment.substr(0, equals), text = assignment.substr(equals + 1);
  json* node = &root;
  for (size_t start = 0; start <= path.size();) {
    const size_t dot = std::min(path.find('.', start), path.size());
    const std::string key = path.substr(start, dot - start);
    check(!key.empty(), "{}: override '{}': empty key in the path", source, assignment);
    if (node->is_array()) {
      size_t index = 0, used = 0;
      try {
        index = std::stoul(key, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      check(used == key.size() && index < node->size(), "{}: override '{}': '{}' is not an index of a list of {}",
            source, assignment, key, node->size());
      node = &(*node)[index];
    } else {
      check(node->is_object(), "{}: override '{}': '{}' is inside a value that is not an object", source, assignment,
            key);
      node = &(*node)[key];  // a new key here fails validation as unknown, naming it
    }
    start = dot + 1;
  }
  // JSON when it parses (numbers, true, lists), else the text as a string.
  *node = json::accept(text) ? json::parse(text) : json(text);
}

BenchConfig load_config(const std::string& path, const std::string& data_dir,
                        const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  check(in.good(), "config '{}': cannot open", path);
  json root;
  try {
    root = json::parse(in, nullptr, /*allow_exceptions=*/true, /*ignore_comments=*/true);
  } catch (const json::parse_error& e) {
    fail("config '{}': not valid JSON: {}", path, e.what());
  }
  check(root.is_object(), "config '{}': expected a JSON object at the top", path);
  for (const std::string& assignment : overrides) apply_override(root, assignment, path);
  return parse_config(root, path, data_dir);
}

}  // namespace curlora::bench
