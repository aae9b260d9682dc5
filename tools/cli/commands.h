// The subcommands of the `curlora` tool. Each registers its options on a
// CLI11 app and returns the function that runs it; errors are engine::Error
// exceptions that main() prints as one line.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace cli {

using Command = std::function<void()>;

Command add_info(CLI::App& app);
Command add_tokenize(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_perplexity(CLI::App& app);
Command add_bench(CLI::App& app);

}  // namespace cli
