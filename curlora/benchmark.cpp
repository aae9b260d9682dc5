// The continual-learning sweep: the data read and tokenised once, then for each
// (method, rank) a fresh base with adapters trained task after task, every earlier
// task re-evaluated, perplexity measured, and results.json rewritten after each task.
#include "curlora/benchmark.h"

#include "curlora/bench_state.h"
#include "data/gpt2_tokenizer.h"
#include "data/wikitext.h"
#include "engine/backend.h"
#include "engine/error.h"
#include "engine/nn/layers.h"
#include "engine/ops.h"
#include "engine/precision.h"
#include "models/perplexity.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

namespace curlora::bench {

namespace fs = std::filesystem;
using engine::check;
using engine::Tensor;
using engine::nn::Linear;
using models::GPT2LMHeadModel;
using nlohmann::json;

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

namespace {

// ---- the data: read, sampled and tokenised once per sweep ----

// Philox key of balanced eval samples, so they draw other numbers than dropout with the same seed ("BALANCED").
constexpr uint64_t kBalancedKey = 0x42414C414E434544ull;

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

// ---- measuring and training ----

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
  // The ids stay on the host, where the embedding checks them without waiting on the device.
  Tensor hidden = model.hidden_states(batch.ids, batch.attention_mask.to(s.device));
  Tensor picked = select_positions(hidden, batch, s.config.protocol).contiguous();
  return head(picked.dtype() == engine::DType::F32 ? picked : picked.to(engine::DType::F32));
}

// At most this many equal-length examples share a forward when evaluating one at a time.
constexpr int64_t kUnpaddedEvalRows = 64;

double evaluate(const Sweep& s, GPT2LMHeadModel& model, Linear& head, const data::TokenizedDataset& d,
                int64_t batch_size, const std::string& label) {
  engine::NoGradGuard no_grad;
  model.eval();
  data::BatchOptions options;
  options.batch_size = batch_size;
  options.shuffle = false;
  // Batch size 1 means every example alone, unpadded (the reference's evaluate_mrpc and
  // evaluate_sst2). Examples of equal length batched together compute that, up to the rounding
  // of a larger GEMM, with one forward per length instead of one per example; accuracy does not
  // depend on the order.
  const auto batches = batch_size == 1 ? data::equal_length_batches(d, kUnpaddedEvalRows)
                                       : data::epoch_batches(d, options, 0);
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

// Training steps between reads of their losses from the device.
constexpr size_t kLossReadSteps = 16;

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
    const size_t steps = epochs[size_t(e)].size();
    double loss_sum = 0;
    // Losses are read back kLossReadSteps at a time: a read waits for the device, and waiting
    // every step would idle it while the host prepares the next step. A non-finite loss still
    // stops the run, naming its step, before anything of this task is saved.
    std::vector<Tensor> unread;
    auto read_losses = [&](size_t steps_done) {
      if (unread.empty()) return;
      const std::vector<double> values = engine::cat(unread, 0).to_vector<double>();
      for (size_t i = 0; i < values.size(); ++i) {
        check(std::isfinite(values[i]), "{}: task '{}': the loss is {} at epoch {} step {} of {}; training "
              "diverged (lower the learning rate?)", run.label, task.name, values[i], e + 1,
              steps_done - values.size() + i + 1, steps);
        loss_sum += values[i];
      }
      unread.clear();
    };
    for (size_t step = 0; step < steps; ++step) {
      last_lr = c.optimizer.lr * schedule.multiplier(optimizer.step_count());
      max_lr = std::max(max_lr, last_lr);
      optimizer.set_lr(last_lr);
      const data::Batch batch = data::make_batch(train, epochs[size_t(e)][step], options);
      optimizer.zero_grad();
      Tensor loss = engine::cross_entropy(class_logits(s, *run.model, head, batch), batch.labels);  // host labels
      loss.backward();
      optimizer.step();
      unread.push_back(loss.detach().reshape({1}));
      if (unread.size() == kLossReadSteps) read_losses(step + 1);
      tokens += batch.ids.numel();
      for (size_t r : batch.rows) real_tokens += int64_t(train.ids[r].size());
      s.progress(label, tokens, total_tokens);
    }
    read_losses(steps);
    epoch_loss.push_back(loss_sum / double(steps));
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

// ---- one (method, rank) run, and the sweep's bookkeeping ----

std::string run_label(Method m, int64_t rank) { return fmt::format("{} r{}", m == Method::LoRA ? "LoRA" : "CURLoRA", rank); }
std::string run_id(Method m, int64_t rank) { return fmt::format("{}-r{}", method_name(m), rank); }

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
  // Weights load in f32 either way. Under bf16 the run computes under
  // autocast, and the weights the adapters freeze are then stored in bf16.
  engine::AutocastGuard autocast(s.compute);
  run.model = GPT2LMHeadModel::load(model_path, engine::DType::F32, s.device, c.base.seed);
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
  if (s.compute == engine::DType::BF16) store_frozen_weights(*run.model, engine::DType::BF16);
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
  s.compute = config.base.dtype == "bf16" ? engine::DType::BF16 : engine::DType::F32;

  const json config_json = config.to_json();
  const fs::path saved_config = s.checkpoints / "config.json";
  if (fs::exists(saved_config)) {
    check(options.resume, "'{}' already holds a benchmark run; pass --resume to continue it, or choose another output "
          "folder", out.string());
    check(comparable(read_json(saved_config)) == comparable(config_json),
          "cannot resume '{}': the config differs from the one it was started with ({})", out.string(),
          saved_config.string());
  }
  fs::create_directories(s.checkpoints);
  write_atomically(saved_config, config_json.dump(1));
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
                  {"config", config_json},
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
