// Report writers: Table 2 (Markdown, CSV) and three SVG plots, all computed
// from results.json. SVG is plain text: a few shapes, a scale, some labels.
#include "curlora/report.h"

#include "engine/error.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

namespace curlora::bench {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// "mrpc" -> "MRPC" as the paper writes them; other names stay as given.
std::string display_name(const std::string& task) {
  if (task == "mrpc") return "MRPC";
  if (task == "sst2") return "SST-2";
  if (task == "sentiment140") return "Sentiment140";
  return task;
}

std::vector<std::string> task_names(const json& results) {
  std::vector<std::string> names;
  for (const json& t : results.at("config").at("tasks")) names.push_back(t.at("name").get<std::string>());
  return names;
}

std::optional<double> number_at(const json& object, const std::string& key) {
  if (!object.is_object() || !object.contains(key) || !object[key].is_number()) return std::nullopt;
  return object[key].get<double>();
}

std::string xml_escape(const std::string& text) {
  std::string out;
  for (char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

// Matplotlib's tab10: distinct colours that survive print and colour blindness reasonably.
const char* series_colour(size_t i) {
  static const char* colours[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
  return colours[i % 10];
}

std::string svg_open(double width, double height) {
  return fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0:.0f}\" height=\"{1:.0f}\" viewBox=\"0 0 {0:.0f} {1:.0f}\" "
      "font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height);
}

std::string text(double x, double y, const std::string& content, const char* anchor = "middle",
                 const std::string& extra = "") {
  return fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"{}\"{}>{}</text>\n", x, y, anchor,
                     extra.empty() ? "" : " " + extra, xml_escape(content));
}

// A short number for tick labels: 0.5, 12, 1.2e+04.
std::string tick_label(double v) {
  if (v == 0) return "0";
  const double a = std::abs(v);
  if (a >= 1e5 || a < 1e-3) return fmt::format("{:.1e}", v);
  return fmt::format("{:g}", v);
}

// ---- a line chart, shared by the perplexity and ||ΔW|| plots ----

struct Series {
  std::string name;
  std::vector<std::optional<double>> values;  // one per x label
};

// Ticks at 1, 2 or 5 times a power of ten, about five of them across [lo, hi].
std::vector<double> linear_ticks(double lo, double hi) {
  const double raw = (hi - lo) / 5;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  const double step = raw / power < 1.5 ? power : raw / power < 3.5 ? 2 * power : raw / power < 7.5 ? 5 * power : 10 * power;
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push_back(std::abs(t) < step * 1e-9 ? 0 : t);
  return ticks;
}

std::string line_chart(const std::string& title, const std::string& y_label, const std::vector<std::string>& x_labels,
                       const std::vector<Series>& series) {
  const double left = 80, right = 190, top = 40, bottom = 60, plot_w = std::max(320.0, 110.0 * double(x_labels.size())),
               plot_h = 300;
  std::string svg = svg_open(left + plot_w + right, top + plot_h + bottom);
  svg += text((left + plot_w / 2), 22, title, "middle", "font-size=\"15\" font-weight=\"bold\"");

  double lo = INFINITY, hi = -INFINITY;
  for (const Series& s : series)
    for (const auto& v : s.values)
      if (v && std::isfinite(*v)) lo = std::min(lo, *v), hi = std::max(hi, *v);
  if (!std::isfinite(lo)) {
    svg += text(left + plot_w / 2, top + plot_h / 2, "no values yet");
    return svg + "</svg>\n";
  }
  // A log scale when the values span more than 20x (LoRA's perplexity can grow by orders of magnitude).
  const bool log_scale = lo > 0 && hi / lo > 20;
  double y0 = log_scale ? std::floor(std::log10(lo)) : lo, y1 = log_scale ? std::ceil(std::log10(hi)) : hi;
  if (!log_scale) {
    const double pad = y1 > y0 ? 0.08 * (y1 - y0) : std::max(std::abs(y0) * 0.1, 1e-6);
    y0 = (lo >= 0 && lo - pad < 0) ? 0 : y0 - pad;
    y1 += pad;
  }
  if (y1 <= y0) y1 = y0 + 1;
  auto to_unit = [&](double v) { return log_scale ? std::log10(v) : v; };
  auto y_of = [&](double v) { return top + plot_h * (1 - (to_unit(v) - y0) / (y1 - y0)); };
  auto x_of = [&](size_t i) {
    return x_labels.size() == 1 ? left + plot_w / 2 : left + 30 + (plot_w - 60) * double(i) / double(x_labels.size() - 1);
  };

  // Axes, grid and ticks.
  std::vector<double> ticks;
  if (log_scale) {
    for (double e = y0; e <= y1; ++e) ticks.push_back(std::pow(10.0, e));
  } else {
    ticks = linear_ticks(y0, y1);
  }
  for (double t : ticks) {
    const double y = y_of(t);
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#e0e0e0\"/>\n", left, y,
                       left + plot_w, y);
    svg += text(left - 6, y + 4, tick_label(t), "end");
  }
  svg += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#333\"/>\n", left, top,
                     plot_w, plot_h);
  for (size_t i = 0; i < x_labels.size(); ++i) svg += text(x_of(i), top + plot_h + 18, x_labels[i]);
  svg += text(18, top + plot_h / 2, y_label + (log_scale ? " (log scale)" : ""), "middle",
              fmt::format("transform=\"rotate(-90 18 {:.1f})\"", top + plot_h / 2));

  // One polyline per series; a gap where a value is missing.
  for (size_t k = 0; k < series.size(); ++k) {
    const char* colour = series_colour(k);
    std::string points;
    auto flush = [&] {
      if (!points.empty())
        svg += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"/>\n", points, colour);
      points.clear();
    };
    for (size_t i = 0; i < series[k].values.size() && i < x_labels.size(); ++i) {
      const auto& v = series[k].values[i];
      if (!v || !std::isfinite(*v) || (log_scale && *v <= 0)) {
        flush();
        continue;
      }
      points += fmt::format("{:.1f},{:.1f} ", x_of(i), y_of(*v));
      svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.5\" fill=\"{}\"><title>{}: {}</title></circle>\n",
                         x_of(i), y_of(*v), colour, xml_escape(series[k].name), tick_label(*v));
    }
    flush();
    const double ly = top + 10 + 20 * double(k);
    svg += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"2\"/>\n",
                       left + plot_w + 15, ly, left + plot_w + 40, ly, colour);
    svg += text(left + plot_w + 46, ly + 4, series[k].name, "start");
  }
  return svg + "</svg>\n";
}

std::string format_cell(const std::optional<double>& v, bool perplexity) {
  if (!v) return "—";
  return perplexity ? fmt::format("{:.2f}", *v) : fmt::format("{:.4f}", *v);
}

void write_text(const fs::path& path, const std::string& content) {
  const fs::path tmp = fs::path(path).concat(".tmp");
  {
    std::ofstream out(tmp, std::ios::binary);
    out << content;
    engine::check(out.good(), "cannot write '{}'", tmp.string());
  }
  fs::rename(tmp, path);
}

}  // namespace

// ---- Table 2 ----

ReportTable results_table(const json& results) {
  ReportTable table;
  const json& runs = results.at("runs");
  for (const json& run : runs) table.columns.push_back(run.at("label").get<std::string>());
  const std::vector<std::string> tasks = task_names(results);
  const std::string last = tasks.empty() ? "" : tasks.back();

  auto row = [&](std::string metric, bool ppl, auto value_of) {
    ReportTable::Row r{std::move(metric), ppl, {}};
    for (const json& run : runs) r.values.push_back(value_of(run));
    table.rows.push_back(std::move(r));
  };
  for (size_t t = 0; t < tasks.size(); ++t) {
    const std::string& name = tasks[t];
    row(fmt::format("{} accuracy after {}", display_name(name), display_name(name)), false, [&](const json& run) {
      const json& done = run.at("tasks");
      return t < done.size() ? number_at(done[t].at("accuracy"), name) : std::nullopt;
    });
    if (t + 1 < tasks.size())
      row(fmt::format("{} accuracy after {}", display_name(name), display_name(last)), false, [&](const json& run) {
        return number_at(run.value("final_accuracy", json::object()), name);
      });
  }
  row("WikiText-2 perplexity before", true, [&](const json& run) {
    return number_at(run.value("perplexity_before", json::object()), "ppl");
  });
  row("WikiText-2 perplexity after", true, [&](const json& run) {
    return number_at(run.value("perplexity_after", json::object()), "ppl");
  });
  return table;
}

std::string table_markdown(const json& results) {
  const ReportTable table = results_table(results);
  const json& config = results.at("config");
  std::string md = fmt::format("# Continual learning: {} protocol\n\n", results.value("protocol", "?"));
  md += fmt::format("Model `{}`, seed {}, device {}, tasks in order: ", config.at("base").at("model").get<std::string>(),
                    results.value("seed", json()).dump(), results.value("device", "?"));
  const std::vector<std::string> tasks = task_names(results);
  for (size_t i = 0; i < tasks.size(); ++i) md += (i ? " → " : "") + display_name(tasks[i]);
  md += results.value("complete", false) ? ".\n\n" : ". **Incomplete run**: empty cells are not measured yet.\n\n";
  md += "| Metric |";
  for (const std::string& c : table.columns) md += " " + c + " |";
  md += "\n|---|";
  for (size_t i = 0; i < table.columns.size(); ++i) md += "---:|";
  md += "\n";
  for (const auto& r : table.rows) {
    md += "| " + r.metric + " |";
    for (const auto& v : r.values) md += fmt::format(" {} |", format_cell(v, r.is_perplexity));
    md += "\n";
  }
  md += "\nAccuracy is the fraction correct on each task's eval set, with the head trained for that task. "
        "See results.json for the protocol's explanation, per-layer diagnostics and timings.\n";
  return md;
}

std::string table_csv(const json& results) {
  const ReportTable table = results_table(results);
  auto quoted = [](const std::string& s) { return s.find_first_of(",\"") == std::string::npos ? s : "\"" + s + "\""; };
  std::string csv = "metric";
  for (const std::string& c : table.columns) csv += "," + quoted(c);
  csv += "\n";
  for (const auto& r : table.rows) {
    csv += quoted(r.metric);
    for (const auto& v : r.values) csv += v ? fmt::format(",{}", *v) : ",";  // {} is the shortest exact form
    csv += "\n";
  }
  return csv;
}

// ---- plots ----

std::string accuracy_heatmap_svg(const json& results) {
  const std::vector<std::string> tasks = task_names(results);
  const json& runs = results.at("runs");
  // Cells as wide as the longest task name (about 7 px a character at 12 px), so headers never overlap.
  size_t longest = 0;
  for (const std::string& t : tasks) longest = std::max(longest, display_name(t).size());
  const double cell_w = std::max(62.0, 7.0 * double(longest) + 16), cell_h = 44, head_h = 56, gap = 30;
  const double label_w = 7.0 * double(longest) + 50;  // "after " + the name
  const size_t n = tasks.size(), per_row = std::min<size_t>(std::max<size_t>(runs.size(), 1), 3);
  const double panel_w = label_w + cell_w * double(n) + gap, panel_h = head_h + cell_h * double(n) + gap;
  const size_t panel_rows = (std::max<size_t>(runs.size(), 1) + per_row - 1) / per_row;
  std::string svg = svg_open(panel_w * double(per_row) + 20, panel_h * double(panel_rows) + 50);
  svg += text(panel_w * double(per_row) / 2, 24, "Accuracy: task trained (rows) x task evaluated (columns)", "middle",
              "font-size=\"15\" font-weight=\"bold\"");
  for (size_t k = 0; k < runs.size(); ++k) {
    const json& run = runs[k];
    const double x0 = 10 + panel_w * double(k % per_row), y0 = 40 + panel_h * double(k / per_row);
    svg += text(x0 + label_w + cell_w * double(n) / 2, y0 + 14, run.at("label").get<std::string>(), "middle",
                "font-weight=\"bold\"");
    for (size_t j = 0; j < n; ++j)
      svg += text(x0 + label_w + cell_w * (double(j) + 0.5), y0 + head_h - 8, display_name(tasks[j]));
    for (size_t i = 0; i < n; ++i) {
      const double y = y0 + head_h + cell_h * double(i);
      svg += text(x0 + label_w - 8, y + cell_h / 2 + 4, "after " + display_name(tasks[i]), "end");
      for (size_t j = 0; j < n; ++j) {
        const double x = x0 + label_w + cell_w * double(j);
        std::optional<double> v;
        if (i < run.at("tasks").size()) v = number_at(run["tasks"][i].at("accuracy"), tasks[j]);
        // White (0) to dark blue (1) on a fixed scale, so panels compare by eye.
        std::string fill = "#f0f0f0", ink = "#999";
        if (v) {
          const double a = std::clamp(*v, 0.0, 1.0);
          fill = fmt::format("rgb({},{},{})", int(247 - a * (247 - 8)), int(251 - a * (251 - 48)), int(255 - a * (255 - 107)));
          ink = a > 0.55 ? "white" : "black";
        }
        svg += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{}\" height=\"{}\" fill=\"{}\" stroke=\"white\"/>\n", x,
                           y, cell_w, cell_h, fill);
        svg += text(x + cell_w / 2, y + cell_h / 2 + 4, v ? fmt::format("{:.3f}", *v) : (j > i ? "" : "—"), "middle",
                    fmt::format("fill=\"{}\"", ink));
      }
    }
  }
  return svg + "</svg>\n";
}

std::string perplexity_svg(const json& results) {
  const std::vector<std::string> tasks = task_names(results);
  std::vector<std::string> x = {"before"};
  for (const std::string& t : tasks) x.push_back("after " + display_name(t));
  std::vector<Series> series;
  for (const json& run : results.at("runs")) {
    Series s{run.at("label").get<std::string>(), {number_at(run.value("perplexity_before", json::object()), "ppl")}};
    for (const json& t : run.at("tasks")) s.values.push_back(number_at(t.value("perplexity", json::object()), "ppl"));
    series.push_back(std::move(s));
  }
  return line_chart(fmt::format("WikiText-2 perplexity after each task ({} protocol)", results.value("protocol", "?")),
                    "perplexity", x, series);
}

std::string delta_norm_svg(const json& results) {
  std::vector<std::string> x;
  for (const std::string& t : task_names(results)) x.push_back("after " + display_name(t));
  std::vector<Series> series;
  for (const json& run : results.at("runs")) {
    Series s{run.at("label").get<std::string>(), {}};
    for (const json& t : run.at("tasks")) s.values.push_back(number_at(t.value("diagnostics", json::object()), "delta_norm_total"));
    series.push_back(std::move(s));
  }
  return line_chart("Adapter update size after each task", "||ΔW||_F over adapted layers", x, series);
}

std::vector<std::string> write_report(const json& results, const std::string& dir) {
  fs::create_directories(dir);
  const std::vector<std::pair<std::string, std::string>> files = {
      {"table.md", table_markdown(results)},
      {"table.csv", table_csv(results)},
      {"accuracy.svg", accuracy_heatmap_svg(results)},
      {"perplexity.svg", perplexity_svg(results)},
      {"delta_norm.svg", delta_norm_svg(results)},
  };
  std::vector<std::string> written;
  for (const auto& [name, content] : files) {
    write_text(fs::path(dir) / name, content);
    written.push_back((fs::path(dir) / name).string());
  }
  return written;
}

}  // namespace curlora::bench
