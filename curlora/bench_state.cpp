// What a sweep writes besides its results: files replaced atomically, the run's
// provenance (git revision, peak memory), and the per-task checkpoints a stopped
// sweep resumes from.
#include "curlora/bench_state.h"

#include "curlora/adapter_io.h"
#include "curlora/revision.h"
#include "engine/error.h"

#include <fmt/format.h>

#include <cstdlib>
#include <fstream>
#include <map>

#ifdef CURLORA_WITH_CUDA  // defined for code that links the CUDA backend (see engine/meson.build)
#include "engine/cuda/cuda_backend.h"
#endif

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

namespace curlora::bench {

namespace fs = std::filesystem;
using engine::check;
using engine::Tensor;
using engine::nn::Linear;
using nlohmann::json;

// ---- results files and provenance ----

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

// The revision this binary was built from; CURLORA_GIT_REVISION overrides it
// for builds made from a copy of the tree without .git (the GPU machine's).
std::string git_revision() {
  const char* given = std::getenv("CURLORA_GIT_REVISION");
  if (given != nullptr && *given != '\0') return given;
  return CURLORA_BUILD_REVISION;
}

int64_t peak_rss_bytes() {
  struct rusage usage {};
  ::getrusage(RUSAGE_SELF, &usage);
  return int64_t(usage.ru_maxrss) * 1024;  // Linux reports KiB
}

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

// ---- checkpoints ----

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

}  // namespace curlora::bench
