// The benchmark's report, made from results.json alone (so it can be redrawn from
// a finished or partial run): the paper's Table 2 as Markdown and CSV, and SVG
// plots written by hand: accuracy matrices, perplexity per task, ||ΔW|| per task.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <vector>

namespace curlora::bench {

// Table 2's layout: one row per metric, one column per run ("LoRA r8").
// Rows: each task's accuracy right after training it and after the last task,
// then the WikiText-2 perplexity before and after. A value not yet measured is empty.
struct ReportTable {
  std::vector<std::string> columns;
  struct Row {
    std::string metric;
    bool is_perplexity = false;
    std::vector<std::optional<double>> values;  // one per column
  };
  std::vector<Row> rows;
};
ReportTable results_table(const nlohmann::json& results);

std::string table_markdown(const nlohmann::json& results);  // with a header naming protocol, model and seed
std::string table_csv(const nlohmann::json& results);       // metric,<column>,... ; full precision

// One heatmap panel per run: rows the task just trained, columns the task evaluated.
std::string accuracy_heatmap_svg(const nlohmann::json& results);
// One line per run over "before", "after <task 1>", ...; log scale when values span over 20x.
std::string perplexity_svg(const nlohmann::json& results);
// ||ΔW||_F over all adapted layers after each task, one line per run.
std::string delta_norm_svg(const nlohmann::json& results);

// Writes table.md, table.csv, accuracy.svg, perplexity.svg and delta_norm.svg
// into `dir` (each atomically); returns the paths written.
std::vector<std::string> write_report(const nlohmann::json& results, const std::string& dir);

}  // namespace curlora::bench
