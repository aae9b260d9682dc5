// curlora: the command-line tool. One executable, one subcommand per job;
// `curlora SUBCOMMAND --help` describes each. Errors print as one line on
// stderr with a non-zero exit status.
#include "tools/cli/commands.h"

#include "engine/error.h"

#include <cstdio>
#include <map>
#include <new>

int main(int argc, char** argv) {
  CLI::App app{"curlora: GPT-2 with CURLoRA and LoRA adapters, from scratch in C++ (arXiv 2408.14572)"};
  app.require_subcommand(1);
  std::map<CLI::App*, cli::Command> commands;
  auto add = [&](const char* name, const char* help, cli::Command (*setup)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    commands[sub] = setup(*sub);
  };
  add("info", "print a model's config and parameter counts", cli::add_info);
  add("tokenize", "GPT-2 token ids of stdin", cli::add_tokenize);
  add("generate", "continue a prompt", cli::add_generate);
  add("perplexity", "perplexity of a text file", cli::add_perplexity);
  add("bench", "the continual-learning benchmark (the paper's Table 2) from a config", cli::add_bench);
  try {
    app.parse(argc, argv);
    for (auto& [sub, run] : commands)
      if (sub->parsed()) run();
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const engine::Error& e) {
    std::fprintf(stderr, "curlora: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "curlora: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "curlora: %s\n", e.what());
    return 1;
  }
  return 0;
}
