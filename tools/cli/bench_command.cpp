// curlora bench: the paper's continual-learning benchmark (Table 2) from a config
// file, for every method x rank it names; writes results.json, the table and plots.
#include "curlora/benchmark.h"
#include "curlora/report.h"
#include "engine/error.h"
#include "tools/cli/commands.h"
#include "tools/cli/progress.h"

#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>

namespace cli {

Command add_bench(CLI::App& app) {
  auto config_path = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto data_dir = std::make_shared<std::string>();
  auto resume = std::make_shared<bool>(false);
  auto stop_after = std::make_shared<int64_t>(0);
  auto overrides = std::make_shared<std::vector<std::string>>();
  app.add_option("config", *config_path, "benchmark config (JSON with comments), e.g. configs/paper.json")->required();
  app.add_option("--out", *out, "output folder: results.json, table.md, table.csv, *.svg, checkpoints/")->required();
  app.add_flag("--resume", *resume, "continue a stopped run in --out from its last completed task");
  app.add_option("--data-dir", *data_dir, "where relative paths in the config point (default: $CURLORA_DATA_DIR)");
  app.add_option("--set", *overrides,
                 "override a config field, e.g. --set base.model=gpt2-large --set base.ranks=[8] (repeatable)")
      ->allow_extra_args(false);  // one value per --set, so a config path after it is not taken as one
  app.add_option("--stop-after-tasks", *stop_after, "stop once this many tasks are done over the sweep (0: never)")
      ->capture_default_str();
  return [=] {
    std::string dir = *data_dir;
    if (dir.empty()) {
      const char* env = std::getenv("CURLORA_DATA_DIR");
      dir = env ? env : "";
    }
    const curlora::bench::BenchConfig config = curlora::bench::load_config(*config_path, dir, *overrides);

    // One bar per phase (a task's training, an evaluation, a perplexity); notes print between them.
    auto bar = std::make_shared<std::unique_ptr<Progress>>();
    auto phase = std::make_shared<std::string>();
    curlora::bench::RunOptions options;
    options.out_dir = *out;
    options.resume = *resume;
    if (*stop_after > 0) options.stop_after_tasks = *stop_after;
    options.observer.progress = [bar, phase](const std::string& label, int64_t done, int64_t total) {
      if (!*bar || label != *phase) {
        if (*bar) (*bar)->finish();
        *bar = std::make_unique<Progress>(label, "tok");
        *phase = label;
      }
      (*bar)->update(done, total);
    };
    options.observer.note = [bar](const std::string& line) {
      if (*bar) (*bar)->finish();
      std::fprintf(stderr, "%s\n", line.c_str());
    };

    const nlohmann::json results = curlora::bench::run_benchmark(config, options);
    if (*bar) (*bar)->finish();
    const std::vector<std::string> files = curlora::bench::write_report(results, *out);
    if (results.value("complete", false)) {
      std::fputs(curlora::bench::table_markdown(results).c_str(), stdout);
    } else {
      fmt::print("stopped early; continue with: curlora bench {} --out {} --resume\n", *config_path, *out);
    }
    fmt::print("\nwrote {}/results.json", *out);
    for (const std::string& f : files) fmt::print(", {}", std::filesystem::path(f).filename().string());
    fmt::print("\n");
  };
}

}  // namespace cli
