// The continual-learning benchmark: config parsing and its errors, the two
// protocols' schedules and logit positions, a whole tiny sweep with every output
// file, and a stopped-then-resumed sweep that matches an uninterrupted one exactly.
#include <catch2/catch.hpp>

#include "curlora/benchmark.h"
#include "curlora/report.h"
#include "data/batching.h"
#include "engine/ops.h"
#include "models/gpt2.h"
#include "tests/test_data.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

namespace fs = std::filesystem;
using namespace curlora::bench;
using engine::Tensor;
using nlohmann::json;

namespace {

std::string configs_dir() { return CURLORA_SOURCE_ROOT "/configs"; }

// A whole benchmark in seconds: gpt2-mini-wiki (GPT-2's vocabulary, so real text),
// 16 rows per task, one epoch, length 32, a short perplexity text.
json tiny_config(const std::string& protocol) {
  json c = json::parse(R"({
    "base": {"model": "gpt2-mini-wiki", "device": "cpu", "seed": 7, "methods": ["curlora"], "ranks": [4]},
    "optimizer": {"lr": 1e-3, "batch_size": 8, "max_length": 32},
    "tasks": [
      {"name": "mrpc", "format": "mrpc", "num_classes": 2, "epochs": 1,
       "train": {"file": "glue-mrpc/train.tsv", "rows": 16},
       "eval": {"file": "glue-mrpc/dev.tsv", "rows": 16, "batch_size": 1},
       "schedule": {"kind": "cosine", "warmup_steps": 1}},
      {"name": "sst2", "format": "sst2", "num_classes": 2, "epochs": 1,
       "train": {"file": "glue-sst2/train.tsv", "rows": 16},
       "eval": {"file": "glue-sst2/dev.tsv", "rows": 16}},
      {"name": "sentiment140", "format": "sentiment140", "num_classes": 3, "epochs": 1,
       "train": {"file": "sentiment140/testdata.manual.2009.06.14.csv", "rows": 16, "labels": {"floor_divide": 4}},
       "eval": {"file": "sentiment140/training.1600000.processed.noemoticon.head9999_tail10001.csv",
                "labels": {"floor_divide": 4}, "balanced_per_class": 8}}
    ],
    "perplexity": {"paper_max_length": 64, "window": 64, "stride": 32, "max_tokens": 128}
  })");
  c["protocol"] = protocol;
  return c;
}

BenchConfig parse(const json& config) { return parse_config(config, "test.json", test_data_dir()); }

// The engine::Error message `fn` throws, or "" when it throws none.
std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const engine::Error& e) {
    return e.what();
  }
  return "";
}

// A fresh, empty folder for one test's outputs.
std::string scratch_dir(const std::string& name) {
  fs::path dir = fs::temp_directory_path() / ("curlora_test_benchmark_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  return dir.string();
}

// The results without what depends on the clock or the process: times, rates, memory.
json numbers_only(json value) {
  if (value.is_object()) {
    json out = json::object();
    for (auto it = value.begin(); it != value.end(); ++it) {
      const std::string& k = it.key();
      if (k == "timings" || k == "peak_memory" || k.ends_with("_seconds") || k == "tokens_per_second") continue;
      out[k] = numbers_only(it.value());
    }
    return out;
  }
  if (value.is_array())
    for (json& v : value) v = numbers_only(v);
  return value;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

// ---------------------------------------------------------------- config

TEST_CASE("benchmark: the shipped configs parse, and paper.json holds the reference's settings", "[benchmark]") {
  for (const char* name : {"paper.json", "corrected.json", "quick.json"}) {
    INFO(name);
    REQUIRE_NOTHROW(load_config(configs_dir() + "/" + name, test_data_dir()));
  }
  const BenchConfig paper = load_config(configs_dir() + "/paper.json", test_data_dir());
  CHECK(paper.protocol == Protocol::Paper);
  CHECK(paper.base.ranks == std::vector<int64_t>{8, 16, 24});
  CHECK(paper.base.methods == std::vector<curlora::Method>{curlora::Method::LoRA, curlora::Method::CurLoRA});
  CHECK(paper.optimizer.lr == 2.5e-4);
  CHECK(paper.optimizer.weight_decay == 0.0);
  CHECK(paper.optimizer.batch_size == 32);
  CHECK(paper.optimizer.max_length == 256);
  CHECK_FALSE(paper.optimizer.shuffle);
  REQUIRE(paper.tasks.size() == 3);
  CHECK(paper.tasks[0].epochs == 3);
  CHECK(paper.tasks[1].epochs == 3);
  CHECK(paper.tasks[2].epochs == 5);
  CHECK(paper.tasks[2].num_classes == 3);
  CHECK(paper.tasks[2].train.labels.map().str() == "label // 4");
  CHECK(paper.tasks[2].eval.rows == std::optional<size_t>(1000));
  CHECK(paper.tasks[2].schedule.kind == "none");
  CHECK(paper.perplexity.paper_max_length == 256);

  const BenchConfig corrected = load_config(configs_dir() + "/corrected.json", test_data_dir());
  CHECK(corrected.protocol == Protocol::Corrected);
  CHECK(corrected.tasks[2].eval.balanced_per_class == 500);
  CHECK(corrected.perplexity.window == 1024);
  CHECK(corrected.perplexity.stride == 512);
}

TEST_CASE("benchmark: the resolved config fills in defaults and round-trips", "[benchmark]") {
  json raw = tiny_config("paper");
  raw.erase("perplexity");
  const BenchConfig c = parse(raw);
  const json resolved = c.to_json();
  CHECK(resolved["protocol"] == "paper");
  CHECK(resolved["optimizer"]["beta2"] == 0.999);
  CHECK(resolved["perplexity"]["window"] == 1024);
  CHECK(resolved["tasks"][1]["schedule"]["kind"] == "none");
  CHECK(resolved["tasks"][2]["train"]["labels"] == json({{"floor_divide", 4}}));
  // What to_json writes parses back to the same config (paths and all).
  json again = resolved;
  again.erase("data_dir");
  again["base"].erase("model_path");
  again["base"].erase("tokenizer_path");
  again["perplexity"].erase("path");
  for (json& t : again["tasks"]) t["train"].erase("path"), t["eval"].erase("path");
  CHECK(parse(again).to_json() == resolved);
}

TEST_CASE("benchmark: config errors name the field, the task and the file", "[benchmark]") {
  json c = tiny_config("papr");
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("unknown protocol 'papr'"));

  c = tiny_config("paper");
  c["tasks"][1]["train"]["file"] = "glue-sst2/no-such-file.tsv";
  std::string message = error_of([&] { parse(c); });
  CHECK_THAT(message, Catch::Contains("tasks[1] ('sst2').train.file"));
  CHECK_THAT(message, Catch::Contains("glue-sst2/no-such-file.tsv"));
  CHECK_THAT(message, Catch::Contains("not found"));

  c = tiny_config("paper");
  c["tasks"][0]["epoch"] = 3;  // a typo must not silently fall back to the default
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("unknown key 'epoch'"));

  c = tiny_config("paper");
  c["tasks"][0]["epochs"] = 0;
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("epochs: must be at least 1"));

  c = tiny_config("paper");
  c["tasks"][2]["name"] = "mrpc";
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("task name 'mrpc' is used twice"));

  c = tiny_config("paper");
  c["base"]["methods"] = {"dora"};
  CHECK_FALSE(error_of([&] { parse(c); }).empty());

  c = tiny_config("paper");
  c["tasks"][0]["schedule"] = {{"kind", "cosine"}, {"warmup_steps", 10}, {"warmup_ratio", 0.1}};
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("not both"));

  c = tiny_config("paper");
  c["base"]["model"] = "no-such-model";
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("no-such-model"));

  c = tiny_config("paper");
  CHECK_THAT(error_of([&] { parse_config(c, "test.json", ""); }), Catch::Contains("CURLORA_DATA_DIR"));

  const std::string bad = scratch_dir("bad_json") + ".json";
  std::ofstream(bad) << "{ \"protocol\": \"paper\", ";
  CHECK_THAT(error_of([&] { load_config(bad, test_data_dir()); }), Catch::Contains("not valid JSON"));
  fs::remove(bad);
}

// ---------------------------------------------------------------- protocol

TEST_CASE("benchmark: --set overrides a config's fields before validation", "[benchmark]") {
  json c = tiny_config("paper");
  apply_override(c, "base.model=gpt2-large", "test.json");           // bare text: a string
  apply_override(c, "base.ranks=[8, 16]", "test.json");              // JSON: a list
  apply_override(c, "tasks.1.epochs=3", "test.json");                // into a list by index
  apply_override(c, "optimizer.lr=0.0005", "test.json");             // a number
  apply_override(c, R"(base.dtype="bf16")", "test.json");            // quoted JSON: a string too
  const BenchConfig parsed = parse(c);
  CHECK(parsed.base.model == "gpt2-large");
  CHECK(parsed.base.ranks == std::vector<int64_t>{8, 16});
  CHECK(parsed.tasks[1].epochs == 3);
  CHECK(parsed.optimizer.lr == 0.0005);
  CHECK(parsed.base.dtype == "bf16");
  // The overrides land in the resolved config that results.json records.
  CHECK(parsed.to_json()["base"]["model"] == "gpt2-large");

  // A misspelt key reaches validation as an unknown key; malformed paths fail at once.
  c = tiny_config("paper");
  apply_override(c, "base.rnaks=[8]", "test.json");
  CHECK_THAT(error_of([&] { parse(c); }), Catch::Contains("unknown key 'rnaks'"));
  CHECK_THAT(error_of([&] { apply_override(c, "base.model", "test.json"); }), Catch::Contains("must be path=value"));
  CHECK_THAT(error_of([&] { apply_override(c, "tasks.7.epochs=2", "test.json"); }),
             Catch::Contains("'7' is not an index of a list of 3"));
  CHECK_THAT(error_of([&] { apply_override(c, "tasks.x.epochs=2", "test.json"); }), Catch::Contains("not an index"));
  CHECK_THAT(error_of([&] { apply_override(c, "base.seed.x=2", "test.json"); }),
             Catch::Contains("not an object"));
  CHECK_THAT(error_of([&] { apply_override(c, "base..seed=2", "test.json"); }), Catch::Contains("empty key"));

  // Through load_config, as `curlora bench --set` passes them.
  const BenchConfig paper = load_config(configs_dir() + "/paper.json", test_data_dir(),
                                        {"base.model=gpt2-large", "base.methods=[\"curlora\"]", "base.ranks=[8]"});
  CHECK(paper.base.model == "gpt2-large");
  CHECK(paper.base.methods.size() == 1);
  CHECK(paper.base.ranks == std::vector<int64_t>{8});
}

TEST_CASE("benchmark: the paper's schedule never leaves warmup at MRPC's size; the corrected one does", "[benchmark]") {
  const BenchConfig paper = load_config(configs_dir() + "/paper.json", test_data_dir());
  const TaskConfig& mrpc = paper.tasks[0];
  const int64_t rows = 3668, steps_per_epoch = (rows + 31) / 32;  // 115 batches of at most 32
  const int64_t steps = mrpc.epochs * steps_per_epoch;              // 345
  REQUIRE(steps == 345);

  const auto schedule = task_schedule(mrpc, Protocol::Paper, rows, steps_per_epoch);
  CHECK(schedule.total_steps == 3 * rows);  // examples, not steps
  for (int64_t s = 0; s < steps; ++s) {
    INFO("step " << s);
    REQUIRE(schedule.multiplier(s) == Approx(double(s) / 500).epsilon(1e-12));
  }
  CHECK(schedule.multiplier(steps - 1) < 0.7);  // the LR peaks at 344/500 of its base

  // The same task under the corrected protocol (as corrected.json sets it): 10% warmup, then cosine to 0.
  const BenchConfig corrected = load_config(configs_dir() + "/corrected.json", test_data_dir());
  const auto fixed = task_schedule(corrected.tasks[0], Protocol::Corrected, rows, steps_per_epoch);
  CHECK(fixed.total_steps == steps);
  CHECK(fixed.warmup_steps == 35);  // ceil(0.1 * 345), as HF's get_warmup_steps
  CHECK(fixed.multiplier(35) == Approx(1.0));
  CHECK(fixed.multiplier(steps - 1) < 0.001);

  // A task without a schedule keeps its LR.
  const auto none = task_schedule(paper.tasks[2], Protocol::Paper, 498, 16);
  for (int64_t s : {0, 1, 79}) CHECK(none.multiplier(s) == 1.0);
}

TEST_CASE("benchmark: logits come from position -1 (paper) or each row's last real token (corrected)",
          "[benchmark]") {
  // Rows of 2, 4 and 3 tokens: the batch is 4 wide, padded on the right.
  data::TokenizedDataset d;
  d.ids = {{11, 12}, {21, 22, 23, 24}, {31, 32, 33}};
  d.labels = {0, 1, 0};
  d.max_length = 8;
  data::BatchOptions options;
  options.shuffle = false;
  const data::Batch batch = data::make_batch(d, std::vector<size_t>{0, 1, 2}, options);
  REQUIRE(batch.ids.shape() == engine::Shape{3, 4});

  // hidden[b, t, c] = 100 b + 10 t + c tells which (row, position) a vector came from.
  const int64_t B = 3, T = 4, C = 5;
  std::vector<double> values;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) values.push_back(double(100 * b + 10 * t + c));
  Tensor hidden = Tensor::from_vector<double>(values, {B, T, C});
  hidden.set_requires_grad(true);

  auto position_of = [&](const Tensor& picked, int64_t b) {  // from element [b, 0] = 100 b + 10 t
    const std::vector<double> v = picked.contiguous().to_vector<double>();
    return int64_t(std::lround((v[size_t(b * C)] - 100.0 * double(b)) / 10));
  };

  Tensor paper = select_positions(hidden, batch, Protocol::Paper);
  REQUIRE(paper.shape() == engine::Shape{B, C});
  for (int64_t b = 0; b < B; ++b) CHECK(position_of(paper, b) == T - 1);

  Tensor corrected = select_positions(hidden, batch, Protocol::Corrected);
  REQUIRE(corrected.shape() == engine::Shape{B, C});
  const int64_t expected[] = {1, 3, 2};
  for (int64_t b = 0; b < B; ++b) CHECK(position_of(corrected, b) == expected[b]);

  // The gradient reaches exactly the picked positions.
  engine::sum(corrected).backward();
  const std::vector<double> g = hidden.grad().to_vector<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) CHECK(g[size_t((b * T + t) * C + c)] == (t == expected[b] ? 1.0 : 0.0));
}

TEST_CASE("benchmark: equal-length rows batched give each row's logits alone (how batch size 1 is evaluated)",
          "[benchmark]") {
  auto model = models::GPT2LMHeadModel::load(test_data_dir() + "/gpt2-mini-wiki");
  model->eval();
  engine::NoGradGuard no_grad;
  // Five rows of seven made-up tokens; position -1 of each is a real token.
  data::TokenizedDataset d;
  d.max_length = 16;
  for (int32_t r = 0; r < 5; ++r) {
    std::vector<int32_t> ids;
    for (int32_t t = 0; t < 7; ++t) ids.push_back((7919 * r + 104729 * t + 13) % 50000);
    d.ids.push_back(ids);
    d.labels.push_back(r % 2);
  }
  data::BatchOptions options;
  const std::vector<std::vector<size_t>> groups = data::equal_length_batches(d, 64);
  REQUIRE(groups.size() == 1);
  const data::Batch together = data::make_batch(d, groups[0], options);
  const std::vector<float> batched =
      select_positions(model->hidden_states(together.ids, together.attention_mask), together, Protocol::Paper)
          .contiguous()
          .to_vector<float>();
  const int64_t C = model->config().n_embd;
  for (size_t r = 0; r < d.size(); ++r) {
    const data::Batch alone = data::make_batch(d, std::vector<size_t>{r}, options);
    const std::vector<float> single =
        select_positions(model->hidden_states(alone.ids, alone.attention_mask), alone, Protocol::Paper)
            .contiguous()
            .to_vector<float>();
    REQUIRE(single.size() == size_t(C));
    for (int64_t c = 0; c < C; ++c) {
      INFO("row " << r << " channel " << c);
      CHECK(batched[r * size_t(C) + size_t(c)] == Approx(single[size_t(c)]).margin(1e-4).epsilon(1e-4));
    }
  }
}

// ---------------------------------------------------------------- whole runs

TEST_CASE("benchmark: a tiny sweep writes every output file, and results.json holds every field", "[benchmark]") {
  const BenchConfig config = parse(tiny_config("paper"));
  RunOptions options;
  options.out_dir = scratch_dir("smoke");
  int64_t notes = 0, progress_calls = 0;
  options.observer.note = [&](const std::string&) { ++notes; };
  options.observer.progress = [&](const std::string&, int64_t done, int64_t total) {
    ++progress_calls;
    CHECK(done <= total);
  };
  const json results = run_benchmark(config, options);
  write_report(results, options.out_dir);

  for (const char* file : {"results.json", "table.md", "table.csv", "accuracy.svg", "perplexity.svg", "delta_norm.svg"}) {
    INFO(file);
    CHECK(fs::is_regular_file(fs::path(options.out_dir) / file));
  }
  CHECK(fs::is_regular_file(fs::path(options.out_dir) / "checkpoints/curlora-r4/task-3/adapter.safetensors"));
  CHECK(notes == 4);  // the base perplexity, then one line per task
  CHECK(progress_calls > 0);

  // What was written is what was returned.
  const json saved = json::parse(read_file(fs::path(options.out_dir) / "results.json"));
  CHECK(saved == results);
  for (const char* key : {"format", "complete", "protocol", "protocol_explanation", "seed", "git_revision", "device",
                          "config", "tasks", "runs", "perplexity_before", "timings", "peak_memory"}) {
    INFO(key);
    CHECK(results.contains(key));
  }
  CHECK(results["complete"] == true);
  CHECK(results["protocol"] == "paper");
  CHECK(results["protocol_explanation"].size() == 4);
  CHECK(results["seed"] == 7);
  CHECK(results["config"] == config.to_json());
  CHECK(results["peak_memory"]["cpu_max_rss_bytes"].get<int64_t>() > 0);
  CHECK(results["perplexity_before"]["scored"] == 63);  // one window of 64 tokens
  CHECK(results["tasks"][2]["eval"]["label_counts"] == json({{"0", 8}, {"1", 8}}));

  REQUIRE(results["runs"].size() == 1);
  const json& run = results["runs"][0];
  CHECK(run["label"] == "CURLoRA r4");
  CHECK(run["trainable_parameters"] == 8 * 4 * 4);  // one 4 x 4 U per block's c_attn (heads counted apart)
  REQUIRE(run["tasks"].size() == 3);
  for (size_t t = 0; t < 3; ++t) {
    const json& task = run["tasks"][t];
    INFO("task " << t);
    CHECK(task["accuracy"].size() == t + 1);  // this task and every earlier one
    for (const auto& [name, acc] : task["accuracy"].items()) CHECK((acc >= 0.0 && acc <= 1.0));
    CHECK(task["train"]["steps"] == 2);
    CHECK(task["diagnostics"]["layers"].size() == 8);  // c_attn of each of gpt2-mini-wiki's 8 blocks
    CHECK(task["diagnostics"]["delta_norm_total"].get<double>() > 0);
    CHECK(task["perplexity"]["ppl"].get<double>() > 1);
    for (const char* timing : {"train_seconds", "eval_seconds", "perplexity_seconds", "checkpoint_seconds"})
      CHECK(task["timings"].contains(timing));
  }
  // The paper's warmup of 1 step: the first update has LR 0, then the cosine starts.
  CHECK(run["tasks"][0]["train"]["schedule"]["length_counts"] == "examples");
  const json& matrix = run["accuracy_matrix"];
  REQUIRE(matrix.size() == 3);
  CHECK(matrix[0][1].is_null());
  CHECK(matrix[2][0] == run["final_accuracy"]["mrpc"]);
  CHECK(run["perplexity_after"] == run["tasks"][2]["perplexity"]);

  const std::string table = read_file(fs::path(options.out_dir) / "table.md");
  CHECK_THAT(table, Catch::Contains("| CURLoRA r4 |"));
  CHECK_THAT(table, Catch::Contains("MRPC accuracy after Sentiment140"));
  CHECK_THAT(table, Catch::Contains("WikiText-2 perplexity after"));
  const std::string csv = read_file(fs::path(options.out_dir) / "table.csv");
  CHECK(csv.starts_with("metric,CURLoRA r4\n"));
  for (const char* svg : {"accuracy.svg", "perplexity.svg", "delta_norm.svg"}) {
    const std::string text = read_file(fs::path(options.out_dir) / svg);
    CHECK(text.starts_with("<svg"));
    CHECK(text.ends_with("</svg>\n"));
  }
  fs::remove_all(options.out_dir);
}

TEST_CASE("benchmark: a stopped and resumed sweep gives the uninterrupted sweep's numbers exactly", "[benchmark]") {
  json raw = tiny_config("corrected");
  raw["base"]["methods"] = {"lora", "curlora"};
  raw["tasks"].erase(1);  // two tasks: mrpc, sentiment140
  const BenchConfig config = parse(raw);

  RunOptions whole;
  whole.out_dir = scratch_dir("whole");
  const json uninterrupted = run_benchmark(config, whole);
  REQUIRE(uninterrupted["complete"] == true);

  // Killed after LoRA's two tasks and CURLoRA's first: one finished run, one half done.
  RunOptions first;
  first.out_dir = scratch_dir("resumed");
  first.stop_after_tasks = 3;
  const json partial = run_benchmark(config, first);
  CHECK(partial["complete"] == false);
  CHECK(partial["runs"].size() == 2);
  CHECK(partial["runs"][1]["tasks"].size() == 1);
  CHECK(fs::is_directory(fs::path(first.out_dir) / "checkpoints/curlora-r4/task-1"));
  CHECK_FALSE(fs::exists(fs::path(first.out_dir) / "checkpoints/curlora-r4/task-2"));

  // Running again into the same folder needs --resume, and the same config.
  CHECK_THAT(error_of([&] { run_benchmark(config, first); }), Catch::Contains("pass --resume"));
  RunOptions resume = first;
  resume.resume = true;
  resume.stop_after_tasks.reset();
  json changed = raw;
  changed["optimizer"]["lr"] = 2e-3;
  CHECK_THAT(error_of([&] { run_benchmark(parse(changed), resume); }), Catch::Contains("config differs"));

  const json resumed = run_benchmark(config, resume);
  CHECK(resumed["complete"] == true);
  const json difference = json::diff(numbers_only(uninterrupted["runs"]), numbers_only(resumed["runs"]));
  INFO("first differences: " << difference.dump().substr(0, 600));
  CHECK(difference.empty());
  CHECK(resumed["perplexity_before"]["ppl"] == uninterrupted["perplexity_before"]["ppl"]);
  // The comparison has teeth: both runs trained something, and differently per method.
  CHECK(uninterrupted["runs"][0]["tasks"][1]["diagnostics"]["delta_norm_total"].get<double>() > 0);
  CHECK(uninterrupted["runs"][0]["perplexity_after"] != uninterrupted["runs"][1]["perplexity_after"]);
  fs::remove_all(whole.out_dir);
  fs::remove_all(first.out_dir);
}

TEST_CASE("benchmark: a non-finite loss stops the run with the task, epoch and step", "[benchmark]") {
  json raw = tiny_config("paper");
  raw["optimizer"]["lr"] = 1e38;  // the first update sends the weights to ~1e38; the next loss is not finite
  raw["tasks"][0]["schedule"] = {{"kind", "none"}};
  RunOptions options;
  options.out_dir = scratch_dir("nan");
  const std::string message = error_of([&] { run_benchmark(parse(raw), options); });
  CHECK_THAT(message, Catch::Contains("task 'mrpc'"));
  CHECK_THAT(message, Catch::Contains("epoch 1 step 2"));
  CHECK_THAT(message, Catch::Contains("not finite") || Catch::Contains("diverged"));
  fs::remove_all(options.out_dir);
}

TEST_CASE("benchmark: the corrected protocol rejects a single-class eval set", "[benchmark]") {
  json raw = tiny_config("corrected");
  raw["tasks"][2]["eval"].erase("balanced_per_class");
  raw["tasks"][2]["eval"]["rows"] = 100;  // the first rows of the file are all negative
  RunOptions options;
  options.out_dir = scratch_dir("single_class");
  CHECK_THAT(error_of([&] { run_benchmark(parse(raw), options); }), Catch::Contains("single class"));
  fs::remove_all(options.out_dir);
}
